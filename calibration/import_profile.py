"""``tiersim calibrate import-profile TRACE``: an engine's profiled steps → a recipe with per-op corrections.

    tiersim calibrate import-profile trace.json --out my-engine.toml [--table h100-sxm-80gb] [--model M]
        [--mode graph] [--phase decode --batch 64 --length 1024]

Input: a PyTorch profiler trace of a few engine steps, either a Kineto / Chrome trace (``traceEvents``:
GPU ``kernel``, ``gpu_memcpy`` and ``gpu_memset`` events; steps split at ``ProfilerStep#N``
annotations through each kernel's launch correlation; the step's shape from ``--model --phase
--batch --length``) or the trace that ``python -m calibration.diagnose trace`` records (one eager
and one CUDA-graph step per point, shape included; ``--mode`` picks which).

Each step's kernels are assigned to the ops of ``sim.costs.model.TransformerOps``, as
``calibration.attribute`` does for the reference decoder but without knowing the engine's kernel
counts: GEMM kernels (with their split-K reduce and workspace memset) and attention kernels are the
anchors, one attention call per layer; the GEMMs before a layer's attention are its QKV projection(s),
the one after it ``o_proj``, the last before the next layer's QKV ``down_proj``, those between
``gate_up_proj``. The other kernels fall between the anchors: rotary and the KV write between QKV and
attention (the trailing copy / cache / index kernels are the KV write), the residual add and the next
norm after ``o_proj`` and ``down_proj`` (the first kernel is the add unless it is the only one: then
add and norm are fused), the activation between ``gate_up_proj`` and ``down_proj``; before the first
layer the embedding (and per-step gathers), after the last the final norm, after the LM head the
sampler. An op's time is the time from its first kernel's start to the next op's first kernel's start
(kernel plus gaps, which is what the table's back-to-back timings include).

Output: a recipe (``sim/costs/recipes/README.md``) with, for every op whose kernel count differs from
the table's or whose in-trace time differs from the table's prediction by more than 2 %, the observed
kernels per call and ``scale`` = in-trace time / predicted time (median over the traced steps), so
the next prediction for that engine uses what it actually runs. The corrections are measured at the
traced shapes and applied at all shapes; trace several shapes (small and large batches, decode and
prefill) for corrections that hold across them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.attribute import GEMM_KERNEL

ATTN_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa|paged|xformers|flashinfer|decode_kernel|mha", re.I)
GEMM_AUX = re.compile(r"splitKreduce|splitK_reduce|reduce_kernel.*cublas|cublasLt::", re.I)
MEMSET = re.compile(r"^Memset", re.I)
KV_KERNEL = re.compile(r"copy|direct_co|cache|scatter|index|store", re.I)   # names are cut at 100 characters
TOLERANCE = 0.02        # corrections smaller than this are left out of the recipe


@dataclass(slots=True)
class Step:
    """One profiled step: its shape and kernels as (name, start µs, duration µs), in start order."""

    model: str
    phase: str
    batch: int
    length: int
    kernels: list


# ------------------------------------------------------------------------------------ reading traces
def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def read_trace(path: Path, *, mode: str = "graph", model: str | None = None, phase: str | None = None,
               batch: int | None = None, length: int | None = None) -> list[Step]:
    """The steps of a Kineto/Chrome trace or of a ``calibration.diagnose`` trace."""
    try:
        with _open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: not a JSON profiler trace ({exc}); give a Kineto/Chrome trace "
                         "(torch.profiler export_chrome_trace, .json or .json.gz) or a calibration.diagnose "
                         "trace") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not a Kineto/Chrome trace (an object with "
                         "traceEvents) or a calibration.diagnose trace (with points)")
    if "points" in data:
        steps = []
        for p in data["points"]:
            ks = p.get(mode)
            if not ks:
                continue
            steps.append(Step(model or p["model"], p["phase"], int(p["batch"]), int(p["length"]), ks))
        if not steps:
            raise ValueError(f"{path}: no {mode!r} kernels in its points")
        return steps
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if events is None:
        raise ValueError(f"{path}: neither a Kineto/Chrome trace (traceEvents) nor a diagnose trace (points)")
    if not (model and phase and batch and length is not None):
        raise ValueError("a Kineto trace does not say the step's shape: give --model, --phase, --batch, --length")
    return [Step(model, phase, int(batch), int(length), ks) for ks in kineto_steps(events)]


def kineto_steps(events: list[dict]) -> list[list]:
    """GPU activities grouped by the ``ProfilerStep#N`` annotation their launch falls in (all in one
    step when there is none), each as (name, start µs relative to the step's first, duration µs)."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launch = {e["args"]["correlation"]: float(e["ts"]) for e in events
              if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    marks = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                   for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#"))
    groups: dict[int, list] = {}
    for e in gpu:
        host = launch.get(e.get("args", {}).get("correlation"), float(e["ts"]))
        idx = 0
        if marks:
            idx = next((i for i, (a, b) in enumerate(marks) if a <= host <= b), -1)
            if idx < 0:
                continue
        name = str(e["name"])
        if e.get("cat") == "gpu_memset" and not name.startswith("Memset"):
            name = "Memset " + name
        groups.setdefault(idx, []).append([name, float(e["ts"]), float(e.get("dur", 0.0))])
    out = []
    for idx in sorted(groups):
        ks = sorted(groups[idx], key=lambda r: r[1])
        t0 = ks[0][1]
        out.append([[n, s - t0, d] for n, s, d in ks])
    return out


# ------------------------------------------------------------------------------------ attribution
def _units(names: list[str]) -> list[tuple[str, list[int]]]:
    """Kernels grouped into units: ("G", GEMM with its memset before and reduce after), ("A", one
    attention call: consecutive attention kernels), ("o", any other single kernel)."""
    units: list[tuple[str, list[int]]] = []
    i, n = 0, len(names)
    while i < n:
        name = names[i]
        nxt = names[i + 1] if i + 1 < n else ""
        if MEMSET.search(name) and GEMM_KERNEL.search(nxt) and not ATTN_KERNEL.search(nxt):
            units.append(("G", [i, i + 1]))
            i += 2
        elif GEMM_KERNEL.search(name) and not ATTN_KERNEL.search(name):
            units.append(("G", [i]))
            i += 1
        elif ATTN_KERNEL.search(name):
            j = i
            while j + 1 < n and ATTN_KERNEL.search(names[j + 1]) and not GEMM_KERNEL.search(names[j + 1]):
                j += 1
            units.append(("A", list(range(i, j + 1))))
            i = j + 1
            continue
        else:
            units.append(("o", [i]))
            i += 1
            continue
        while i < n and GEMM_AUX.search(names[i]):      # split-K reduce of the GEMM just added
            units[-1][1].append(i)
            i += 1
    return units


def assign(step: Step, num_layers: int) -> dict[str, list[list[int]]]:
    """Kernel indices of each op call of one step: ``{op name: [[kernels of call 1], ...]}``."""
    names = [k[0] for k in step.kernels]
    units = _units(names)
    attn = [u for u, (kind, _) in enumerate(units) if kind == "A"]
    if len(attn) != num_layers:
        raise ValueError(f"{step.model} {step.phase} b={step.batch}: {len(attn)} attention calls for "
                         f"{num_layers} layers (attention kernels are matched by {ATTN_KERNEL.pattern!r})")
    gemms = [u for u, (kind, _) in enumerate(units) if kind == "G"]
    pre = [u for u in gemms if u < attn[0]]                 # the first layer's QKV GEMMs
    per_layer = (len(gemms) - 1) // num_layers
    if not pre or (len(gemms) - 1) % num_layers or per_layer < len(pre) + 3:
        raise ValueError(f"{step.model} {step.phase} b={step.batch}: {len(gemms)} GEMM calls do not split into "
                         f"{num_layers} layers of QKV, o, gate/up and down GEMMs plus the LM head")
    n_qkv, n_gu = len(pre), per_layer - len(pre) - 2
    calls: dict[str, list[list[int]]] = {}

    def put(op: str, us) -> None:
        calls.setdefault(op, []).append([k for u in us for k in units[u][1]])

    def split_res_norm(us: list[int], res: str, norm: str) -> None:
        if len(us) >= 2:
            put(res, us[:1])
            put(norm, us[1:])
        else:
            put(res, [])
            put(norm, us)

    g = iter(gemms)
    layer_gemms = [[next(g) for _ in range(per_layer)] for _ in range(num_layers)]
    lm_head = next(g)
    for layer in range(num_layers):
        lg = layer_gemms[layer]
        qkv, o, gu, down = lg[:n_qkv], lg[n_qkv], lg[n_qkv + 1:n_qkv + 1 + n_gu], lg[-1]
        a = attn[layer]
        start_prev = layer_gemms[layer - 1][-1] + 1 if layer else 0
        before = [u for u in range(start_prev, qkv[0])]
        if layer == 0:
            put("embed", [])          # filled below once the norm's kernel count is known
            calls["_prefix"] = [[u for u in before]]
        else:
            split_res_norm(before, "ffn_residual", "attn_norm")
        put("qkv_proj", qkv)
        rk = [u for u in range(qkv[0], a) if units[u][0] != "G"]
        kv = []
        while rk and KV_KERNEL.search(names[units[rk[-1]][1][0]]):
            kv.insert(0, rk.pop())
        put("rope", rk)
        put("kv_write", kv)
        put("attn_prefill" if step.phase == "prefill" else "attn_decode", [a] + list(range(a + 1, o)))
        put("o_proj", [o])
        split_res_norm(list(range(o + 1, gu[0])), "attn_residual", "ffn_norm")
        put("gate_up_proj", gu)
        put("act", [u for u in range(gu[0], down) if units[u][0] != "G"])
        put("down_proj", [down])
    # before the first layer: the embedding (and per-step gathers), then the first attn_norm with as many
    # kernels as the other layers' attn_norm
    prefix = calls.pop("_prefix")[0]
    norm_k = int(np.median([len(c) for c in calls.get("attn_norm", [])])) if calls.get("attn_norm") else 1
    norm_units = prefix[len(prefix) - norm_k:] if norm_k else []
    calls["embed"] = [[k for u in prefix[:len(prefix) - norm_k] for k in units[u][1]]]
    calls.setdefault("attn_norm", []).insert(0, [k for u in norm_units for k in units[u][1]])
    tail = list(range(layer_gemms[-1][-1] + 1, lm_head))
    split_res_norm(tail, "ffn_residual", "final_norm")
    put("lm_head", [lm_head])
    put("sample", list(range(lm_head + 1, len(units))))
    return calls


# ------------------------------------------------------------------------------------ corrections
def observe(step: Step, num_layers: int) -> dict[str, dict]:
    """Per op: kernels per call (median over calls), calls, and in-trace seconds per step."""
    start = np.array([k[1] for k in step.kernels], float)
    dur = np.array([k[2] for k in step.kernels], float)
    slot = np.append(np.diff(start), dur[-1]) * 1e-6
    out = {}
    for op, cs in assign(step, num_layers).items():
        out[op] = {"kernels": int(np.median([len(c) for c in cs])), "calls": len(cs),
                   "time_s": float(sum(slot[k] for c in cs for k in c)),
                   "names": sorted({_short(step.kernels[k][0]) for c in cs for k in c})}
    return out


def _short(name: str) -> str:
    n = re.sub(r"^void ", "", name)
    n = re.sub(r"(at::native::)?(\(anonymous namespace\)::)?", "", n)
    return re.split(r"[<(]", n, maxsplit=1)[0][:48] or name[:48]


def predicted(step: Step, table_dir: Path, mode: str):
    """Per op name: (seconds per step, kernels per call) as the table and the fused recipe price it."""
    from calibration.validate import cost_model, point_shape
    from sim.costs.table import CostTable

    cost = cost_model(CostTable(table_dir), step.model, "graph" if mode == "graph" else "eager")
    shape = point_shape(step.phase, step.batch, step.length)
    _, rows, _, _, _ = cost.breakdown(shape)
    kern = cost.backend.kernel_counts(shape.num_tokens, shape.num_sampled, shape.prefill_q.size > 0,
                                      shape.num_decode > 0)
    per_call = {op.name: int(kern[i]) for i, op in enumerate(cost.ops.ops)}
    return {r.name: r.time_s for r in rows}, per_call, cost


def import_profile(trace: Path, table_dir: Path, *, mode: str = "graph", name: str | None = None,
                   **shape) -> tuple:
    """(recipe, details): the recipe of the engine in ``trace`` against ``table_dir``."""
    from sim.costs.recipe import KernelSpec, OpRecipe, Recipe
    from sim.specs import load_model

    steps = read_trace(trace, mode=mode, **shape)
    per_op: dict[str, dict] = {}
    points = []
    for step in steps:
        layers = load_model(step.model).num_layers
        seen = observe(step, layers)
        pred, kern, cost = predicted(step, table_dir, mode)
        span = (step.kernels[-1][1] + step.kernels[-1][2] - step.kernels[0][1]) * 1e-6
        points.append({"model": step.model, "phase": step.phase, "batch": step.batch, "length": step.length,
                       "span_s": span, "kernels": len(step.kernels), "predicted_ops_s": float(sum(pred.values()))})
        tokens = step.batch * (step.length if step.phase == "prefill" else 1)
        for op, s in seen.items():
            entry = per_op.setdefault(op, {"ratios": {}, "kernels": [], "table_kernels": [], "names": set()})
            p = pred.get(op, 0.0)
            if p > 0 and s["time_s"] > 0:
                rows = step.batch if cost.ops.ops[cost.ops.index[op]].rows == "sampled" else tokens
                entry["ratios"].setdefault(float(rows), []).append(s["time_s"] / p)
            entry["kernels"].append(s["kernels"])
            entry["table_kernels"].append(kern.get(op, 0))
            entry["names"].update(s["names"])
    ops: dict[str, OpRecipe] = {}
    details = {"trace": str(trace), "table": table_dir.name, "mode": mode, "points": points, "ops": {}}
    for op, e in per_op.items():
        # the correction at each traced row count (median over the steps there), clamped to [0.2, 5]
        at = sorted((x, round(min(max(float(np.median(r)), 0.2), 5.0), 4)) for x, r in e["ratios"].items())
        same_count = e["kernels"] == e["table_kernels"]
        k = int(np.median(e["kernels"]))
        details["ops"][op] = {"scale": at, "kernels": e["kernels"], "table_kernels": e["table_kernels"],
                              "kernel_names": sorted(e["names"])[:6]}
        if same_count and all(abs(f - 1.0) <= TOLERANCE for _, f in at):
            continue
        if k == 0 and not same_count:
            continue          # fused into a neighbour: its time is in the neighbour's correction
        label = " + ".join(sorted(e["names"])[:3])[:80] or op
        spec = KernelSpec(label, "table", -1 if same_count else max(k, 1))
        scale = at[0][1] if len(at) == 1 else (tuple(at) if at else 1.0)
        ops[op] = OpRecipe((spec,), scale)
    rec = Recipe(name=name or trace.name.split(".")[0], description=f"imported from {trace.name} against "
                 f"{table_dir.name} ({mode} steps: " + ", ".join(f"{p['model']} {p['phase']} b={p['batch']} "
                                                                 f"n={p['length']}" for p in points) + ")",
                 ops=ops, source=str(trace))
    return rec, details


def add_arguments(p) -> None:
    p.add_argument("--table", default=None, help="cost table the corrections are against (default: the trace's "
                   "GPU's shipped table, else h100-sxm-80gb)")
    p.add_argument("--mode", choices=["graph", "eager"], default="graph",
                   help="which steps of a diagnose trace; the execution the corrections are for")
    p.add_argument("--model", default=None, help="model preset of the traced engine (Kineto traces)")
    p.add_argument("--phase", choices=["prefill", "decode"], default=None, help="step phase (Kineto traces)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (Kineto traces)")
    p.add_argument("--length", type=int, default=None, help="prompt length or cached context (Kineto traces)")
    p.add_argument("--name", default=None, help="the recipe's name (default: the trace file's)")


def run(args) -> int:
    """``tiersim calibrate import-profile TRACE [--out RECIPE]``; exit status 0, or 2 on a bad input."""
    from sim.costs.recipe import format_recipe
    from sim.costs.table import resolve_table_dir
    from sim.errors import TiersimError

    trace = Path(args.trace)
    if not trace.exists():
        print(f"calibrate import-profile: error: {trace}: no such trace file", file=sys.stderr)
        return 2
    table = args.table
    if table is None:
        table = "h100-sxm-80gb"
        try:
            with _open(trace) as fh:
                gpu = str(json.load(fh).get("gpu", ""))
            table = "h200" if "H200" in gpu.upper() else table
        except (OSError, ValueError, AttributeError):
            pass
    try:
        recipe, details = import_profile(trace, resolve_table_dir(table), mode=args.mode, name=args.name,
                                         model=args.model, phase=args.phase, batch=args.batch, length=args.length)
    except (ValueError, KeyError, TiersimError) as exc:
        print(f"calibrate import-profile: error: {exc}", file=sys.stderr)
        return 2
    header = (f"Imported by `tiersim calibrate import-profile {trace}` against the {table} table.\n"
              "Per op: the kernels the engine ran per call and scale = in-trace time / the table's prediction\n"
              "at each traced row count (median over the steps there; interpolated in log rows between them,\n"
              "flat beyond); ops not listed ran as the table predicts (within 2 %).\n"
              + "\n".join(f"  {p['model']} {p['phase']} batch {p['batch']} length {p['length']}: "
                          f"{p['kernels']} kernels, span {p['span_s'] * 1e3:.3f} ms, table ops "
                          f"{p['predicted_ops_s'] * 1e3:.3f} ms" for p in details["points"]))
    text = format_recipe(recipe, header)
    out = Path(args.out) if args.out else Path(f"{recipe.name}.toml")
    out.write_text(text)
    print(f"recipe {recipe.name!r}: {len(recipe.ops)} op(s) corrected -> {out}")
    for op, d in details["ops"].items():
        mark = "*" if op in recipe.ops else " "
        print(f" {mark} {op:16} kernels {'/'.join(map(str, d['kernels']))} (table "
              f"{'/'.join(map(str, d['table_kernels']))}), in-trace / table "
              + ", ".join(f"x{f:.3f} at {x:g} rows" for x, f in d["scale"]))
    print(f"use it: tiersim run --set costs.recipe={out}   or   tiersim predict-step --recipe {out} ...")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.import_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--out")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
