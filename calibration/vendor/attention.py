"""Attention part: ``attention_prefill`` and ``attention_decode`` of ``calibration.torch_ops`` per model.

- ``attn_prefill``: x = q (new tokens per sequence), y = c (cached tokens before the chunk),
  z = seqs. The call is the model's: queries [seqs, qh, q, d] (a transposed view, as they come out of
  rope), keys/values the cache slice [seqs, kvh, c + q, d]; causal, lower-right aligned when c > 0.
- ``attn_decode``: x = batch, y = ctx (keys attended, the new token's included): one query per
  sequence over a [batch, kvh, ctx, d] cache.

One layer's worth (the table prices one layer). The SDPA backend actually used (FlashAttention
preferred) is in extra. Inputs rotate among copies when one set would fit in L2.
"""
from __future__ import annotations

from calibration.raw import ModelShape, Part, PartContext, make_row
from calibration.vendor.keys import attention_key

Q_FULL = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
C_FULL = (0, 512, 2048, 8192)
SEQS_FULL = (1, 2, 4, 8)
MAX_PREFILL_KEYS = 16384          # q + c per sequence
MAX_PREFILL_KV_BYTES = 2 * 2**30  # one set's K+V
BATCH_FULL = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CTX_FULL = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
MAX_DECODE_KV_BYTES = 8 * 2**30   # one layer's cache: batch * ctx * 2 * kvh * d * 2 bytes
Q_QUICK, C_QUICK, SEQS_QUICK = (16, 128), (0, 64), (1, 2)
BATCH_QUICK, CTX_QUICK = (1, 8), (128, 512)
Q_QUICK_CPU, C_QUICK_CPU, SEQS_QUICK_CPU = (8,), (0, 8), (1, 2)
BATCH_QUICK_CPU, CTX_QUICK_CPU = (1, 2), (16,)
PLAN_S = 60.0


def kv_bytes_per_token(shape: ModelShape, itemsize: int = 2) -> int:
    """K and V of one token in one layer."""
    return 2 * shape.num_kv_heads * shape.head_dim * itemsize


def prefill_grid(shape: ModelShape, quick: bool, cuda: bool) -> list[tuple[int, int, int]]:
    """(q, c, seqs) points."""
    if quick:
        qs, cs, ss = (Q_QUICK, C_QUICK, SEQS_QUICK) if cuda else (Q_QUICK_CPU, C_QUICK_CPU, SEQS_QUICK_CPU)
    else:
        qs, cs, ss = Q_FULL, C_FULL, SEQS_FULL
    per_tok = kv_bytes_per_token(shape)
    return [(q, c, s) for q in qs for c in cs for s in ss
            if q + c <= MAX_PREFILL_KEYS and s * (q + c) * per_tok <= MAX_PREFILL_KV_BYTES]


def decode_grid(shape: ModelShape, quick: bool, cuda: bool) -> list[tuple[int, int]]:
    """(batch, ctx) points."""
    if quick:
        bs, cs = (BATCH_QUICK, CTX_QUICK) if cuda else (BATCH_QUICK_CPU, CTX_QUICK_CPU)
    else:
        bs, cs = BATCH_FULL, CTX_FULL
    per_tok = kv_bytes_per_token(shape)
    return [(b, c) for b in bs for c in cs if b * c * per_tok <= MAX_DECODE_KV_BYTES]


def prefill_flops_bytes(shape: ModelShape, q: int, c: int, seqs: int, item: int) -> tuple[float, float]:
    """As ``sim.costs.model.TransformerOps.flops_bytes`` prices ``attn_prefill``."""
    qh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    flops = 4.0 * qh * d * seqs * q * (c + (q + 1) / 2)
    nbytes = 2.0 * seqs * q * qh * d * item + seqs * (c + q) * 2.0 * kvh * d * item
    return flops, nbytes


def decode_flops_bytes(shape: ModelShape, batch: int, ctx: int, item: int) -> tuple[float, float]:
    qh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    return 4.0 * qh * d * batch * ctx, batch * ctx * 2.0 * kvh * d * item + 2.0 * batch * qh * d * item


def make_prefill_inputs(torch, shape: ModelShape, q: int, c: int, seqs: int, device, dtype):
    """One input set: queries as the transposed view rope's output gives, K/V cache slices."""
    qh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qt = torch.randn(seqs * q, qh, d, device=device, dtype=dtype)
    qv = qt.view(seqs, q, qh, d).transpose(1, 2)
    kc = torch.randn(seqs, kvh, c + q, d, device=device, dtype=dtype)
    vc = torch.randn(seqs, kvh, c + q, d, device=device, dtype=dtype)
    return qv, kc, vc


def make_decode_inputs(torch, shape: ModelShape, batch: int, ctx: int, device, dtype):
    qh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qt = torch.randn(batch, qh, d, device=device, dtype=dtype)
    qv = qt.view(batch, 1, qh, d).transpose(1, 2)
    kc = torch.randn(batch, kvh, ctx, d, device=device, dtype=dtype)
    vc = torch.randn(batch, kvh, ctx, d, device=device, dtype=dtype)
    return qv, kc, vc


def count_call(shape: dict, kind: str, a: int, b: int, seqs: int = 1):
    """Kernel-count builder (child process): one prefill (q=a, c=b) or decode (batch=a, ctx=b)."""
    import torch

    from calibration import torch_ops
    from calibration.vendor.keys import shape_from_dict

    s = shape_from_dict(shape)
    if kind == "prefill":
        qv, kc, vc = make_prefill_inputs(torch, s, a, b, seqs, "cuda", torch.bfloat16)
        return lambda: torch_ops.attention_prefill(qv, kc, vc)
    qv, kc, vc = make_decode_inputs(torch, s, a, b, "cuda", torch.bfloat16)
    return lambda: torch_ops.attention_decode(qv, kc, vc, b)


def _unique_shapes(models: tuple[ModelShape, ...]) -> list[ModelShape]:
    seen: dict[str, ModelShape] = {}
    for m in models:
        seen.setdefault(attention_key(m), m)
    return list(seen.values())


def _prefill_call(torch, torch_ops, shape: ModelShape, point, env, n_sets: int):
    q, c, seqs = point
    sets = [make_prefill_inputs(torch, shape, q, c, seqs, env.device, env.dtype) for _ in range(n_sets)]
    return lambda i: torch_ops.attention_prefill(*sets[i])


def _decode_call(torch, torch_ops, shape: ModelShape, point, env, n_sets: int):
    batch, ctx_len = point
    sets = [make_decode_inputs(torch, shape, batch, ctx_len, env.device, env.dtype)
            for _ in range(n_sets)]
    return lambda i: torch_ops.attention_decode(*sets[i], ctx_len)


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
    groups = []  # (shape, op, points) in run order
    for shape in _unique_shapes(models):
        groups.append((shape, "attn_prefill", coarse_first(prefill_grid(shape, ctx.quick, env.cuda))))
        groups.append((shape, "attn_decode", coarse_first(decode_grid(shape, ctx.quick, env.cuda))))
    points_left = sum(len(pts) for _, _, pts in groups)
    rows: list[dict] = []
    specs: list[dict] = []
    spec_rows: list[int] = []
    skipped = 0
    try:
        for shape, op, pts in groups:
            key = attention_key(shape)
            kind = "prefill" if op == "attn_prefill" else "decode"
            group = budget.group(len(pts), points_left)
            ctx.progress(f"attention: {op} {shape.name} ({key}), {len(pts)} points, "
                         f"{group.total_s:.0f} s")
            base = {**env.base_extra(), "model": shape.name}
            for j, point in enumerate(pts):
                points_left -= 1
                if group.expired():
                    skipped += 1
                    continue
                if op == "attn_prefill":
                    q, c, seqs = point
                    where = dict(x=q, y=c, z=seqs)
                    fl, by = prefill_flops_bytes(shape, q, c, seqs, item)
                    set_bytes = by + seqs * q * shape.num_heads * shape.head_dim * item
                    spec_kw = {"a": q, "b": c, "seqs": seqs}
                else:
                    batch, ctx_len = point
                    where = dict(x=batch, y=ctx_len)
                    fl, by = decode_flops_bytes(shape, batch, ctx_len, item)
                    set_bytes = by
                    spec_kw = {"a": batch, "b": ctx_len}
                try:
                    n_sets = rotation_sets(set_bytes, env, max_sets=512 if op == "attn_prefill" else 1024,
                                           max_total_bytes=2**30)
                    make = _prefill_call if op == "attn_prefill" else _decode_call
                    call = make(torch, torch_ops, shape, point, env, n_sets)
                    meas = time_calls(call, n_sets, env, point_s=group.share(len(pts) - j))
                    rows.append(make_row("attention", "torch-sdpa", meas.samples_s, op=op, key=key,
                                         nbytes=by, flops=fl, **where,
                                         extra={**base, **meas.extra(),
                                                "attention_backend": torch_ops.sdpa_backend(kind)}))
                    if env.cuda:
                        specs.append({"builder": "calibration.vendor.attention:count_call",
                                      "kwargs": {"shape": shape_dict(shape), "kind": kind, **spec_kw}})
                        spec_rows.append(len(rows) - 1)
                    del call
                except Exception as exc:  # noqa: BLE001 - recorded, the part goes on
                    recover(env, exc)
                    rows.append(failure_row("attention", "torch-sdpa", describe_error(exc), op=op,
                                            key=key, extra=base, progress=ctx.progress, **where))
            recover(env)
    finally:
        if env.cuda:
            torch.cuda.empty_cache()
    if skipped:
        ctx.progress(f"attention: budget spent, {skipped} points skipped")
    if specs:
        results, note = count_in_child(specs, budget.count_timeout(60.0))
        attach_counts(rows, spec_rows, results, note)
    finish_rows(rows)
    return rows


PART = Part(
    name="attention",
    description="SDPA attention (FlashAttention preferred) of calibration.torch_ops, one layer",
    requires=("torch",),
    coords="attn_prefill: x = q new tokens/seq, y = c cached tokens, z = seqs; "
           "attn_decode: x = batch, y = ctx keys attended; key d,dtype,kvh,qh",
    run=run,
)
