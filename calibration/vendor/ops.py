"""Elementwise-op part: rms_norm, rope, kv_write, act, add, embed, sample of ``calibration.torch_ops``.

Each table op at each model's key over a token grid (x = tokens; for ``sample`` x = rows of logits
over the full vocabulary), timed in isolation with rotating random inputs, with the launches per
call in extra (``kernels``: profiler count from a child process, else the timing graph's node
count). Inputs are built as the reference model builds them: q/k/v are strided views of one fused
qkv GEMM output, cos/sin are per-token rows [T, 1, d].

``kv_write`` layout: up to 256 tokens are a decode batch (T sequences, one new token each, cache
capacity 64); above that one prefill chunk (one sequence, T new tokens). ``extra`` says which.
"""
from __future__ import annotations

from calibration.raw import ModelShape, Part, PartContext, make_row
from calibration.vendor.keys import elementwise_keys

TOKENS_FULL = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 384, 512, 768,
               1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
TOKENS_QUICK = (1, 16, 256, 2048)
TOKENS_QUICK_CPU = (1, 4)
SAMPLE_MAX_ROWS = 4096      # logits [rows, vocab] in bf16: 1 GB at 4096 x 128256
KV_DECODE_MAX_TOKENS = 256  # kv_write: a decode batch up to here, one prefill chunk above
KV_DECODE_CACHE = 64        # cache capacity per sequence in the decode layout
OPS = ("rms_norm", "rope", "kv_write", "act", "add", "embed", "sample")
PLAN_S = 45.0


def token_grid(op: str, quick: bool, cuda: bool) -> tuple[int, ...]:
    grid = (TOKENS_QUICK if cuda else TOKENS_QUICK_CPU) if quick else TOKENS_FULL
    if op == "sample":
        grid = tuple(t for t in grid if t <= SAMPLE_MAX_ROWS)
    return grid


def op_points(models: tuple[ModelShape, ...], quick: bool,
              cuda: bool) -> list[tuple[str, str, ModelShape, int]]:
    """(op, key, shape, tokens) for every distinct (op, key) of the models."""
    seen: dict[tuple[str, str], ModelShape] = {}
    for m in models:
        for op, key in elementwise_keys(m).items():
            seen.setdefault((op, key), m)
    return [(op, key, shape, t) for (op, key), shape in seen.items()
            for t in token_grid(op, quick, cuda)]


def flops_bytes(op: str, shape: ModelShape, tokens: int, item: int) -> tuple[float, float]:
    """FLOPs and bytes of one call, as ``sim.costs.model.TransformerOps.flops_bytes`` prices them."""
    t = float(tokens)
    h, d, v, f = shape.hidden_size, shape.head_dim, shape.vocab_size, shape.ffn_size
    qh, kvh = shape.num_heads, shape.num_kv_heads
    if op == "rms_norm":
        return 4 * t * h, (2 * t * h + h) * item
    if op == "rope":
        return 3 * t * (qh + kvh) * d, 2 * t * (qh + kvh) * d * item
    if op == "kv_write":
        return 0.0, 2 * t * 2 * kvh * d * item
    if op == "act":
        return 5 * t * f, 3 * t * f * item
    if op == "add":
        return t * h, 3 * t * h * item
    if op == "embed":
        return 0.0, 2 * t * h * item
    if op == "sample":
        return t * v, t * v * item
    raise ValueError(f"unknown elementwise op {op!r}")


def kv_layout(tokens: int) -> tuple[int, int, int, int]:
    """(batch, new tokens per sequence, start position, cache capacity) for ``kv_write``."""
    if tokens <= KV_DECODE_MAX_TOKENS:
        return tokens, 1, KV_DECODE_CACHE - 1, KV_DECODE_CACHE
    return 1, tokens, 0, tokens


def build_call(torch, op: str, shape: ModelShape, tokens: int, device, dtype, n_sets: int = 1,
               table=None):
    """``(call(i), meta)`` for ``n_sets`` random input sets of ``op`` at ``tokens``.

    ``table`` lets ``embed`` share one embedding table across calls (it is large and only gathered).
    """
    from calibration import torch_ops

    t = tokens
    h, d, v, f = shape.hidden_size, shape.head_dim, shape.vocab_size, shape.ffn_size
    qh, kvh = shape.num_heads, shape.num_kv_heads
    qkv_n = (qh + 2 * kvh) * d

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    meta: dict = {}
    if op == "rms_norm":
        w = 1.0 + 0.1 * randn(h)
        xs = [randn(t, h) for _ in range(n_sets)]
        return (lambda i: torch_ops.rms_norm(xs[i], w)), meta
    if op == "rope":
        sets = []
        for _ in range(n_sets):
            qkv = randn(t, qkv_n)
            q = qkv[:, :qh * d].view(t, qh, d)
            k = qkv[:, qh * d:(qh + kvh) * d].view(t, kvh, d)
            ang = torch.rand(t, 1, d, device=device, dtype=torch.float32) * 6.283
            sets.append((q, k, ang.cos().to(dtype), ang.sin().to(dtype)))
        return (lambda i: torch_ops.rope(*sets[i])), meta
    if op == "kv_write":
        batch, new, start, cap = kv_layout(t)
        meta.update(batch=batch, new_tokens=new, cache_capacity=cap)
        sets = []
        for _ in range(n_sets):
            k = randn(t, kvh, d)
            v_ = randn(t, qkv_n)[:, (qh + kvh) * d:].view(t, kvh, d)
            sets.append((randn(batch, kvh, cap, d), randn(batch, kvh, cap, d), k, v_))
        return (lambda i: torch_ops.kv_write(*sets[i], start)), meta
    if op == "act":
        xs = [randn(t, 2 * f) for _ in range(n_sets)]
        return (lambda i: torch_ops.act(xs[i])), meta
    if op == "add":
        sets = [(randn(t, h), randn(t, h)) for _ in range(n_sets)]
        return (lambda i: torch_ops.add(*sets[i])), meta
    if op == "embed":
        tab = table if table is not None else randn(v, h) * 0.02
        ids = [torch.randint(0, v, (t,), device=device) for _ in range(n_sets)]
        return (lambda i: torch_ops.embed(ids[i], tab)), meta
    if op == "sample":
        xs = [randn(t, v) for _ in range(n_sets)]
        return (lambda i: torch_ops.sample(xs[i])), meta
    raise ValueError(f"unknown elementwise op {op!r}")


def set_bytes(op: str, shape: ModelShape, tokens: int, item: int) -> float:
    """Bytes of one input set plus output (what must not stay L2-resident between calls)."""
    _, nbytes = flops_bytes(op, shape, tokens, item)
    if op == "kv_write":
        batch, _, _, cap = kv_layout(tokens)
        nbytes += 2 * batch * shape.num_kv_heads * cap * shape.head_dim * item
    if op == "rope":  # the whole qkv buffer is allocated per set
        nbytes += tokens * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * item
    return nbytes


def count_call(shape: dict, op: str, tokens: int):
    """Kernel-count builder (child process)."""
    import torch

    from calibration.vendor.keys import shape_from_dict

    call, _ = build_call(torch, op, shape_from_dict(shape), tokens, "cuda", torch.bfloat16)
    return lambda: call(0)


def run(ctx: PartContext) -> list[dict]:
    from calibration import torch_ops
    from calibration.vendor.kernel_count import count_in_child
    from calibration.vendor.keys import part_models, shape_dict
    from calibration.vendor.timing import (
        Budget,
        attach_counts,
        coarse_first,
        describe_error,
        failure_row,
        finish_rows,
        recover,
        rotation_sets,
        time_calls,
        torch_env,
    )

    env = torch_env(ctx.quick)
    torch = env.torch
    item = torch_ops.itemsize(env.dtype)
    budget = Budget(ctx.budget_s, PLAN_S)
    models = part_models(ctx.models, ctx.quick, env.cuda)
    groups: dict[tuple[str, str], tuple[ModelShape, list[int]]] = {}
    for op, key, shape, tokens in op_points(models, ctx.quick, env.cuda):
        groups.setdefault((op, key), (shape, []))[1].append(tokens)
    points_left = sum(len(t) for _, t in groups.values())
    rows: list[dict] = []
    specs: list[dict] = []
    spec_rows: list[int] = []
    tables: dict[tuple[int, int], object] = {}
    skipped = 0
    try:
        for (op, key), (shape, tokens_list) in groups.items():
            grid = coarse_first(tokens_list)
            group = budget.group(len(grid), points_left)
            ctx.progress(f"ops: {op} {key}, {len(grid)} points, {group.total_s:.0f} s")
            base = {**env.base_extra(), "model": shape.name}
            for j, tokens in enumerate(grid):
                points_left -= 1
                if group.expired():
                    skipped += 1
                    continue
                try:
                    n_sets = rotation_sets(set_bytes(op, shape, tokens, item), env, max_sets=256,
                                           max_total_bytes=2**30)
                    table = None
                    if op == "embed":
                        tk = (shape.vocab_size, shape.hidden_size)
                        if tk not in tables:
                            tables[tk] = torch.randn(*tk, device=env.device, dtype=env.dtype) * 0.02
                        table = tables[tk]
                    call, meta = build_call(torch, op, shape, tokens, env.device, env.dtype, n_sets,
                                            table)
                    meas = time_calls(call, n_sets, env, point_s=group.share(len(grid) - j))
                    fl, by = flops_bytes(op, shape, tokens, item)
                    rows.append(make_row("ops", "torch", meas.samples_s, op=op, key=key, x=tokens,
                                         nbytes=by, flops=fl, extra={**base, **meta, **meas.extra()}))
                    if env.cuda:
                        specs.append({"builder": "calibration.vendor.ops:count_call",
                                      "kwargs": {"shape": shape_dict(shape), "op": op,
                                                 "tokens": tokens},
                                      "names": tokens in (1, 4096)})
                        spec_rows.append(len(rows) - 1)
                    del call
                except Exception as exc:  # noqa: BLE001 - recorded, the part goes on
                    recover(env, exc)
                    rows.append(failure_row("ops", "torch", describe_error(exc), op=op, key=key,
                                            x=tokens, extra=base, progress=ctx.progress))
    finally:
        tables.clear()
        if env.cuda:
            torch.cuda.empty_cache()
    if skipped:
        ctx.progress(f"ops: budget spent, {skipped} points skipped")
    if specs:
        results, note = count_in_child(specs, budget.count_timeout(60.0))
        attach_counts(rows, spec_rows, results, note)
    finish_rows(rows)
    return rows


PART = Part(
    name="ops",
    description="elementwise table ops of calibration.torch_ops (eager PyTorch kernels) over tokens",
    requires=("torch",),
    coords="x = tokens (sample: rows of logits); key as sim.costs.model; y = z = 0",
    run=run,
)
