"""Part ``unfused_ops``: the torch-unfused recipe's ops alone, over tokens, and its GEMMs the table lacks.

Each op is timed as the stock decoder (``calibration.torch_unfused``) runs it, with the vendor parts'
discipline (``calibration.vendor.timing.time_calls``: rotating random inputs, graph replay for short
calls), so its time can be set against what the recipe prices for it from the H200 table:

- ``rms_norm_fp32``: ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(bf16)`` (8 kernels;
  the recipe prices them by their bytes);
- ``rotary_bhld``: rotate-half on q and k laid out [B, heads, L, d] (transposed views of the separate
  projections' outputs), cos/sin [1, 1, L, d] (the recipe prices it as the table's rope);
- ``kv_index_copy``: ``index_copy_`` of K and V into a contiguous [B, kvh, S, d] cache (the table's
  kv_write);
- ``silu_then_mul``: ``silu(gate) * up`` on the separate gate and up outputs (the table's act);
- ``embed_step``: the per-step work before the first layer: embedding gather, position ids, cos/sin
  rows (the table's embed plus three small kernels).

Up to 256 tokens an op sees a decode batch (one new token per sequence), above that one prefill chunk,
as the elementwise part of the suite lays them out. Rows: part ``unfused_ops``, variant = the op above,
op "" (not a table entry), key = the table op's key at the model's shape, x = tokens; extra
``recipe_op`` / ``table_op`` say what it checks. GEMM rows (the separate k/v and gate/up projections at
the (n, k) the table never measured) are table entries: op ``gemm``, variant ``torch``, key
``dtype=bf16,k=..,n=..``, x = M, as ``calibration.vendor.gemm`` writes them.
"""
from __future__ import annotations

from calibration.gpu16.plan import (
    QUICK_UNFUSED_GEMM_M,
    UNFUSED_GEMM_M,
    UNFUSED_OPS,
    unfused_gemm_shapes,
    unfused_op_id,
    unfused_op_points,
)
from calibration.raw import make_row

DECODE_MAX_TOKENS = 256
DECODE_CACHE = 64
PLAN_S = 25.0


def layout(tokens: int) -> tuple[int, int]:
    """(sequences, new tokens each): a decode batch up to 256 tokens, else one prefill chunk."""
    return (tokens, 1) if tokens <= DECODE_MAX_TOKENS else (1, tokens)


def op_key(op: str, shape) -> str:
    from calibration.vendor.keys import elementwise_keys

    return elementwise_keys(shape)[UNFUSED_OPS[op][1]]


def op_bytes(op: str, shape, tokens: int) -> float:
    """Bytes the op's kernels move (the recipe's accounting; informational)."""
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_size
    qh, kvh = shape.num_heads, shape.num_kv_heads
    t = float(tokens)
    if op == "rms_norm_fp32":
        return t * h * (6 + 8 + 4 + 8 + 6 + 4) + t * 16
    if op == "rotary_bhld":
        return 2.0 * t * (qh + kvh) * d * 2 * 5
    if op == "kv_index_copy":
        return 2.0 * t * 2 * kvh * d * 2
    if op == "silu_then_mul":
        return t * f * 2 * 5
    if op == "embed_step":
        return 2.0 * t * h * 2 + 8 * t + 8.0 * d
    raise ValueError(op)


def build_call(torch, op: str, shape, tokens: int, device, dtype, n_sets: int, table=None, rope=None):
    """``call(i)`` over ``n_sets`` random input sets of ``op`` at ``tokens`` (as the stock decoder runs it)."""
    import torch.nn.functional as F

    from calibration.torch_unfused import apply_rotary, rms_norm_fp32

    h, d, f, v = shape.hidden_size, shape.head_dim, shape.ffn_size, shape.vocab_size
    qh, kvh = shape.num_heads, shape.num_kv_heads
    b, new = layout(tokens)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    if op == "rms_norm_fp32":
        w = 1.0 + 0.1 * randn(h)
        xs = [randn(tokens, h) for _ in range(n_sets)]
        return lambda i: rms_norm_fp32(xs[i], w)
    if op == "rotary_bhld":
        ang = torch.rand(1, 1, new, d, device=device, dtype=torch.float32) * 6.283
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        sets = [(randn(b, new, qh, d).transpose(1, 2), randn(b, new, kvh, d).transpose(1, 2)) for _ in range(n_sets)]
        return lambda i: apply_rotary(sets[i][0], sets[i][1], cos, sin)
    if op == "kv_index_copy":
        cap = DECODE_CACHE if new == 1 else new
        start = cap - 1 if new == 1 else 0
        pos = torch.arange(start, start + new, device=device)
        sets = [(randn(b, kvh, cap, d), randn(b, kvh, cap, d), randn(b, new, kvh, d).transpose(1, 2),
                 randn(b, new, kvh, d).transpose(1, 2)) for _ in range(n_sets)]

        def write(i):
            kc, vc, k, vv = sets[i]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, vv)
        return write
    if op == "silu_then_mul":
        sets = [(randn(tokens, f), randn(tokens, f)) for _ in range(n_sets)]
        return lambda i: F.silu(sets[i][0]) * sets[i][1]
    if op == "embed_step":
        tab = table if table is not None else randn(v, h) * 0.02
        cos_t, sin_t = rope
        ids = [torch.randint(0, v, (tokens,), device=device) for _ in range(n_sets)]

        def embed(i):
            pos = torch.arange(0, new, device=device)
            x = F.embedding(ids[i], tab)
            return x, cos_t[pos].view(1, 1, new, d), sin_t[pos].view(1, 1, new, d)
        return embed
    raise ValueError(f"unknown unfused op {op!r}")


def set_bytes(op: str, shape, tokens: int, item: int) -> float:
    b, new = layout(tokens)
    nbytes = op_bytes(op, shape, tokens) / 4.0 * item / 2.0
    if op == "kv_index_copy":
        nbytes += 2 * b * shape.num_kv_heads * (DECODE_CACHE if new == 1 else new) * shape.head_dim * item
    return max(nbytes, 1.0)


def _gemm_rows(ctx, sink, env, budget, item) -> None:
    from calibration.vendor.gemm import flops_bytes
    from calibration.vendor.keys import gemm_key
    from calibration.vendor.timing import coarse_first, describe_error, failure_row, recover, rotation_sets, time_calls

    torch = env.torch
    shapes = unfused_gemm_shapes(ctx.quick)
    grid = QUICK_UNFUSED_GEMM_M if ctx.quick else UNFUSED_GEMM_M
    points_left = len(shapes) * len(grid)
    for model, n, k in shapes:
        group = budget.group(len(grid), points_left)
        ctx.progress(f"gemm n={n} k={k} ({model}), {len(grid)} M values, {group.total_s:.0f} s")
        weights: list = []
        ms = coarse_first(list(grid))
        for j, m in enumerate(ms):
            points_left -= 1
            if group.expired():
                continue
            extra = {**env.base_extra(), "lib": "cuBLAS via torch.nn.functional.linear", "n": n, "k": k,
                     "model": model, "why": "torch-unfused recipe: separate k/v and gate/up projections"}
            try:
                n_sets = rotation_sets(item * (m * k + k * n + m * n), env)
                while len(weights) < n_sets:
                    weights.append(torch.randn(n, k, device=env.device, dtype=env.dtype) * 0.02)
                xs = [torch.randn(m, k, device=env.device, dtype=env.dtype) for _ in range(n_sets)]
                meas = time_calls(lambda i, xs=xs, ws=weights: torch.nn.functional.linear(xs[i], ws[i]), n_sets, env,
                                  point_s=group.share(len(ms) - j))
                fl, by = flops_bytes(m, n, k, item)
                sink.add(make_row("unfused_ops", "torch", meas.samples_s, op="gemm", key=gemm_key(n, k), x=m,
                                  nbytes=by, flops=fl, extra={**extra, **meas.extra()}))
                del xs
            except Exception as exc:  # noqa: BLE001
                recover(env, exc)
                sink.add(failure_row("unfused_ops", "torch", describe_error(exc), op="gemm", key=gemm_key(n, k), x=m,
                                     extra=extra))
        del weights
        recover(env)
        sink.flush()


def run(part: str, ctx, sink) -> None:
    from calibration import torch_ops
    from calibration.raw import model_shape
    from calibration.torch_unfused import ROPE_THETA
    from calibration.vendor.keys import tiny_shape
    from calibration.vendor.timing import (
        Budget,
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
    points = unfused_op_points(ctx.quick)
    groups: dict[tuple[str, str], list[int]] = {}
    for model, op, tokens in points:
        groups.setdefault((model, op), []).append(tokens)
    # the ops first (what the recipe's prices are checked against), the GEMMs with what is left
    op_budget = budget.group(len(points), len(points) + len(unfused_gemm_shapes(ctx.quick)) * 8)
    points_left = len(points)
    tables: dict = {}
    for (model, op), tokens_list in groups.items():
        shape = tiny_shape() if ctx.quick else model_shape(model)
        key = op_key(op, shape)
        grid = coarse_first(tokens_list)
        group = op_budget.group(len(grid), points_left)
        ctx.progress(f"{op} {key} ({model}), {len(grid)} points, {group.total_s:.0f} s")
        recipe_op, table_op = UNFUSED_OPS[op]
        base = {**env.base_extra(), "model": model, "recipe_op": recipe_op, "table_op": table_op}
        for j, tokens in enumerate(grid):
            points_left -= 1
            if group.expired():
                continue
            b, new = layout(tokens)
            extra = {**base, "sequences": b, "new_tokens": new, "point": unfused_op_id(model, op, tokens)}
            try:
                table = rope = None
                if op == "embed_step":
                    tk = (shape.vocab_size, shape.hidden_size)
                    if tk not in tables:
                        d = shape.head_dim
                        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
                        ang = torch.outer(torch.arange(16385, dtype=torch.float64), inv)
                        emb = torch.cat((ang, ang), dim=-1)
                        tables[tk] = (torch.randn(*tk, device=env.device, dtype=env.dtype) * 0.02,
                                      (emb.cos().to(env.device, env.dtype), emb.sin().to(env.device, env.dtype)))
                    table, rope = tables[tk]
                n_sets = rotation_sets(set_bytes(op, shape, tokens, item), env, max_sets=256, max_total_bytes=2**30)
                call = build_call(torch, op, shape, tokens, env.device, env.dtype, n_sets, table, rope)
                meas = time_calls(call, n_sets, env, point_s=group.share(len(grid) - j))
                sink.add(make_row("unfused_ops", op, meas.samples_s, key=key, x=tokens,
                                  nbytes=op_bytes(op, shape, tokens) * item / 2.0, extra={**extra, **meas.extra()}))
                del call
            except Exception as exc:  # noqa: BLE001 - recorded, the part goes on
                recover(env, exc)
                sink.add(failure_row("unfused_ops", op, describe_error(exc), key=key, x=tokens, extra=extra))
        sink.flush()
    tables.clear()
    recover(env)
    _gemm_rows(ctx, sink, env, budget, item)
    finish_rows(sink.rows)
