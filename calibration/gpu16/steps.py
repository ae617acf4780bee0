"""Parts ``unseen_steps`` and ``unfused_steps``: whole engine steps, eager and replayed as a CUDA graph.

- ``unseen_steps``: the fused reference decoder (``calibration.reference_model``, what the tables
  measured) at model shapes the H200 table never measured, for prefill, decode and mixed chunked-prefill
  steps: the validation points of shape-general pricing (``sim.costs.generalise``).
- ``unfused_steps``: the stock-PyTorch decoder (``calibration.torch_unfused``), the validation points of
  the ``torch-unfused`` recipe, at points of the fused validation grid.

Timing is the validation part's (``reference_model._time_eager`` / ``_time_graph``): host-clock seconds
per step with one synchronize per step (eager), or per replay of one captured step (graph). Rows: part,
variant ``eager`` | ``graph``, op = phase (``prefill``, ``decode``, ``mixed``), key = model, x = batch
(decodes), y = prompt tokens or context, z = a mixed step's chunk; extra: ``recipe``, ``cached`` (a mixed
chunk's prefix), ``tp``, ``point`` (its id), ``kernels`` per step (the captured graph's nodes),
``attention_backend``, device-side medians. Models run one after another, each with a share of the
budget; points are ordered so that a budget cut short still spans every phase's range.
"""
from __future__ import annotations

import json
import math
import time

from calibration.gpu16.plan import StepPoint, step_points
from calibration.raw import make_row

MODE_CAP_S = 0.15           # at most this much timing per point and mode
MEMORY_MARGIN_BYTES = 8 * 2**30
MODEL_WEIGHT = {"qwen2.5-7b": 0.4, "mistral-7b": 0.33, "llama-2-7b": 0.27, "llama-3.1-8b": 0.62,
                "llama-3.2-1b": 0.38}


def run_order(points: list[StepPoint]) -> list[StepPoint]:
    """Each phase coarse-first, the phases interleaved (as the validation part orders its grid)."""
    from calibration.vendor.timing import coarse_first

    by_phase = [coarse_first([p for p in points if p.phase == ph]) for ph in ("prefill", "decode", "mixed")]
    out = []
    for i in range(max(len(b) for b in by_phase)):
        out += [b[i] for b in by_phase if i < len(b)]
    return out


def device_facts(torch) -> dict:
    """What the part ran on (for meta.json)."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sm_count": p.multi_processor_count, "total_memory_bytes": p.total_memory,
            "capability": f"{p.major}.{p.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}


def fit_memory(torch, spec, points: list[StepPoint], cuda: bool) -> tuple[list[StepPoint], int, str]:
    """Points whose cache fits in free memory next to the weights; the cache slots to allocate."""
    need = max(p.cache_tokens for p in points)
    if not cuda:
        return points, need, ""
    free, _ = torch.cuda.mem_get_info()
    room = (free - spec.weight_bytes - MEMORY_MARGIN_BYTES) // spec.kv_bytes_per_token
    kept = [p for p in points if p.cache_tokens <= room]
    note = "" if len(kept) == len(points) else (f"{len(points) - len(kept)} points dropped: {free / 2**30:.0f} GiB "
                                                f"free holds {max(room, 0)} cache tokens next to the weights")
    return kept, max([p.cache_tokens for p in kept], default=0), note


def build(point_part: str, spec, env, capacity: int, points: list[StepPoint], dtype=None):
    """The decoder a part times: fused reference model, or the stock decoder (torch-unfused)."""
    if point_part == "unfused_steps":
        from calibration.torch_unfused import StockDecoder

        positions = max(p.tokens + 1 for p in points) + 1
        return StockDecoder(spec, device=env.device, dtype=dtype or env.dtype, batch=1, capacity_tokens=capacity,
                            max_positions=positions)
    from calibration.reference_model import ReferenceModel

    return ReferenceModel(spec, device=env.device, dtype=dtype or env.dtype, kv_capacity_tokens=capacity)


def make_step(model, p: StepPoint):
    if p.phase == "mixed":
        return model.make_mixed_step(p.batch, p.tokens, p.chunk, p.cached)
    return model.make_step(p.phase, p.batch, p.tokens)


def time_point(env, model, p: StepPoint, mode_s: float, base: dict, spec) -> list[dict]:
    """Eager and graph rows of one point (failure rows where a mode fails)."""
    from calibration.reference_model import _median, _time_eager, _time_graph, step_flops_bytes
    from calibration.vendor.timing import describe_error, failure_row, recover

    torch, cuda = env.torch, env.cuda
    flops, nbytes = step_flops_bytes(spec, p.phase, p.batch, p.tokens, p.chunk, p.cached)
    where = dict(op=p.phase, key=p.model, x=p.batch, y=p.tokens, z=p.chunk)
    extra = {**base, "recipe": p.recipe, "cached": p.cached, "tp": p.tp, "point": p.id}
    rows = []
    try:
        step = make_step(model, p)
        host, gpu, _ = _time_eager(torch, step, cuda, mode_s)
        from calibration import torch_ops

        if p.recipe == "fused":
            extra["attention_backend"] = torch_ops.sdpa_backend("prefill" if p.phase != "decode" else "decode")
        rows.append(make_row(p.part, "eager", host, nbytes=nbytes, flops=flops,
                             extra={**extra, "gpu_span_median_s": _median(gpu)}, **where))
    except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
        recover(env, exc)
        return [failure_row(p.part, "eager", describe_error(exc), extra=extra, **where)]
    if cuda:
        try:
            ghost, ggpu, counts = _time_graph(torch, step, mode_s)
            gx = {**extra, "gpu_median_s": _median(ggpu)}
            if counts is not None:
                gx.update(kernels=counts["kernels"], kernels_source="graph", graph_kernel_breakdown=counts)
                ex = json.loads(rows[0]["extra"])
                ex.update(kernels=counts["kernels"], kernels_source="graph")
                rows[0]["extra"] = json.dumps(ex, sort_keys=True)
            rows.append(make_row(p.part, "graph", ghost, nbytes=nbytes, flops=flops, extra=gx, **where))
        except Exception as exc:  # noqa: BLE001
            recover(env, exc)
            rows.append(failure_row(p.part, "graph", describe_error(exc), extra=extra, **where))
    del step
    return rows


def measure_models(part: str, ctx, sink, points: list[StepPoint], env, weights: dict[str, float]) -> None:
    """Time ``points`` model by model (each gets its weight's share of what is left of the budget)."""
    from calibration.reference_model import resolve_spec
    from calibration.vendor.timing import Budget, describe_error, recover

    torch = env.torch
    budget = Budget(ctx.budget_s, 60.0, reserve=0.0)
    models = list(dict.fromkeys(p.model for p in points))
    w = [weights.get(m, 1.0) for m in models]
    done = sink.meta.setdefault("points_measured", {})
    for i, name in enumerate(models):
        share = max(budget.left(), 0.0) * w[i] / sum(w[i:])
        deadline = time.monotonic() + share
        spec = resolve_spec(name)
        mine, capacity, note = fit_memory(torch, spec, [p for p in points if p.model == name], env.cuda)
        if note:
            ctx.progress(f"{name}: {note}")
            sink.meta.setdefault("notes", []).append(f"{name}: {note}")
        if not mine:
            continue
        ctx.progress(f"{name}: building, cache of {capacity} tokens, {len(mine)} points, {share:.0f} s")
        try:
            model = build(part, spec, env, capacity, mine)
        except Exception as exc:  # noqa: BLE001 - this model is lost; the next may run
            recover(env, exc)
            sink.meta.setdefault("notes", []).append(f"{name}: build failed: {describe_error(exc)}")
            ctx.progress(f"{name}: build failed: {describe_error(exc)}")
            continue
        base = {**env.base_extra(), "model": name, "layers": spec.num_layers}
        order = run_order(mine)
        n = 0
        try:
            for j, p in enumerate(order):
                left = deadline - time.monotonic()
                if budget.enforced and left <= 0:
                    ctx.progress(f"{name}: share spent, {len(order) - j} points left out")
                    break
                mode_s = min(MODE_CAP_S, max(0.02, left / (len(order) - j) / 2.5)) if math.isfinite(left) \
                    else MODE_CAP_S
                sink.add(*time_point(env, model, p, mode_s, base, spec))
                n += 1
            sink.flush()
        finally:
            del model
            recover(env)
        done[name] = n
        ctx.progress(f"{name}: {n} of {len(mine)} points")


def run(part: str, ctx, sink) -> None:
    from calibration.vendor.timing import torch_env

    env = torch_env(ctx.quick)
    sink.meta["device"] = device_facts(env.torch)
    points = step_points(part, ctx.quick)
    sink.meta["points_planned"] = len(points)
    measure_models(part, ctx, sink, points, env, MODEL_WEIGHT)
