"""GEMM part (torch): bf16 ``F.linear`` (cuBLAS / cuBLASLt through PyTorch) at every model GEMM shape.

For each distinct (n, k) of ``ctx.models`` and each M of a grid dense at small M (tile-quantisation
steps) and reaching the compute-bound regime, time ``calibration.torch_ops.linear(x[M, k], w[n, k])``
— the exact call the reference model makes. Rows: op ``gemm``, key ``dtype=bf16,k=..,n=..``, x = M;
flops = 2MNK, bytes = itemsize * (MK + KN + MN). Weight copies rotate so that they are not
L2-resident between repetitions; the LM head (n = vocabulary) stops at M = 4096 rows, since it only
sees the rows that sample.
"""
from __future__ import annotations

from calibration.raw import ModelShape, Part, PartContext, make_row
from calibration.vendor.keys import gemm_key

M_FULL = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
          640, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
M_QUICK = (1, 16, 128, 1024)
M_QUICK_CPU = (1, 8)
LM_HEAD_MAX_M = 4096
PLAN_S = 60.0  # planned duration when the suite gives no budget


def gemm_shapes(models: tuple[ModelShape, ...]) -> list[tuple[int, int, bool]]:
    """Distinct (n, k, is_lm_head) over the models, in first-seen order."""
    vocab = {m.vocab_size for m in models}
    seen: dict[tuple[int, int], bool] = {}
    for m in models:
        for n, k in m.gemms:
            seen.setdefault((n, k), n in vocab)
    return [(n, k, lm) for (n, k), lm in seen.items()]


def m_grid(quick: bool, cuda: bool, lm_head: bool) -> tuple[int, ...]:
    grid = (M_QUICK if cuda else M_QUICK_CPU) if quick else M_FULL
    return tuple(m for m in grid if not lm_head or m <= LM_HEAD_MAX_M)


def gemm_points(models: tuple[ModelShape, ...], quick: bool, cuda: bool) -> list[tuple[int, int, int]]:
    """(n, k, M) points of the grid, shape by shape."""
    return [(n, k, m) for n, k, lm in gemm_shapes(models) for m in m_grid(quick, cuda, lm)]


def flops_bytes(m: int, n: int, k: int, itemsize: int) -> tuple[float, float]:
    return 2.0 * m * n * k, float(itemsize) * (m * k + k * n + m * n)


def count_call(n: int, k: int, m: int):
    """Kernel-count builder (child process): one bf16 ``linear`` of this shape on the GPU."""
    import torch

    from calibration import torch_ops

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    return lambda: torch_ops.linear(x, w)


def run(ctx: PartContext) -> list[dict]:
    from calibration import torch_ops
    from calibration.vendor.kernel_count import count_in_child
    from calibration.vendor.keys import part_models
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
    budget = Budget(ctx.budget_s, PLAN_S)
    item = torch_ops.itemsize(env.dtype)
    models = part_models(ctx.models, ctx.quick, env.cuda)
    points = gemm_points(models, ctx.quick, env.cuda)
    rows: list[dict] = []
    count_specs: list[dict] = []
    count_rows: list[int] = []
    points_left = len(points)
    skipped = 0
    try:
        for n, k, lm_head in gemm_shapes(models):
            grid = coarse_first(list(m_grid(ctx.quick, env.cuda, lm_head)))
            key = gemm_key(n, k)
            group = budget.group(len(grid), points_left)
            ctx.progress(f"gemm torch: n={n} k={k} ({len(grid)} M values, {group.total_s:.0f} s)")
            weights: list = []
            for j, m in enumerate(grid):
                points_left -= 1
                if group.expired():
                    skipped += 1
                    continue
                extra = {**env.base_extra(), "lib": "cuBLAS via torch.nn.functional.linear",
                         "n": n, "k": k, "lm_head": lm_head}
                try:
                    set_bytes = item * (m * k + k * n + m * n)
                    n_sets = rotation_sets(set_bytes, env)
                    while len(weights) < n_sets:
                        weights.append(torch.randn(n, k, device=env.device, dtype=env.dtype) * 0.02)
                    xs = [torch.randn(m, k, device=env.device, dtype=env.dtype) for _ in range(n_sets)]

                    def call(i, xs=xs, ws=weights):
                        return torch_ops.linear(xs[i], ws[i])

                    meas = time_calls(call, n_sets, env, point_s=group.share(len(grid) - j))
                    fl, by = flops_bytes(m, n, k, item)
                    rows.append(make_row("gemm", "torch", meas.samples_s, op="gemm", key=key, x=m,
                                         nbytes=by, flops=fl, extra={**extra, **meas.extra()}))
                    if env.cuda:
                        count_specs.append({"builder": "calibration.vendor.gemm:count_call",
                                            "kwargs": {"n": n, "k": k, "m": m}})
                        count_rows.append(len(rows) - 1)
                    del xs, call
                except Exception as exc:  # noqa: BLE001 - one point's failure is recorded, not fatal
                    recover(env, exc)
                    rows.append(failure_row("gemm", "torch", describe_error(exc), op="gemm", key=key,
                                            x=m, extra=extra, progress=ctx.progress))
            del weights
            recover(env)  # release this shape's weights before the next one
    finally:
        if env.cuda:
            torch.cuda.empty_cache()
    if skipped:
        ctx.progress(f"gemm torch: budget spent, {skipped} points skipped")
    if count_specs:
        results, note = count_in_child(count_specs, budget.count_timeout(60.0))
        attach_counts(rows, count_rows, results, note)
    finish_rows(rows)
    return rows


PART = Part(
    name="gemm",
    description="bf16 GEMM through torch F.linear (cuBLAS/cuBLASLt) at each model GEMM (n, k) over M",
    requires=("torch",),
    coords="x = M (rows = tokens); key dtype=bf16,k=K,n=N (weights [k, n]); y = z = 0",
    run=run,
)
