"""GEMM part (CuPy): ``cupy.matmul`` (cuBLAS ``GemmEx``) on float16 at every model GEMM shape.

The same (n, k, M) grid as ``calibration.vendor.gemm``, an independent second library path to
cuBLAS. CuPy has no bfloat16 dtype, so this runs float16; on Hopper the fp16 and bf16 dense
tensor-core rates are identical, so the rows carry the simulator's ``dtype=bf16`` key and say
``measured_dtype: fp16`` in extra. Weights are [k, n] (x @ w, NN layout). Timing: CUDA events around
``inner`` calls, after a spin kernel (``clock64`` loop, compiled with NVRTC) lets the host queue the
calls, so host launch latency stays out of the samples; no graph capture (cuBLAS under CuPy stream
capture is not relied on). Everything CuPy lives in this module, so a CuPy failure only loses
these rows.
"""
from __future__ import annotations

import math
import time

from calibration.raw import Part, PartContext, make_row
from calibration.vendor.gemm import flops_bytes, gemm_shapes, m_grid
from calibration.vendor.keys import gemm_key, part_models

PLAN_S = 60.0
L2_MULTIPLE = 3
INNER_BELOW_S = 100e-6  # shorter calls are timed several per event pair
TARGET_SAMPLE_S = 1e-3
CLOCK_HZ = 1.98e9

_SPIN_SRC = r"""
extern "C" __global__ void tiersim_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


class _CupyTimer:
    """Event timing with an optional priming spin kernel."""

    def __init__(self, cp) -> None:
        self.cp = cp
        self.spin = None
        self.spin_error = None
        try:
            kernel = cp.RawKernel(_SPIN_SRC, "tiersim_spin")
            kernel((1,), (1,), (cp.int64(1000),))
            cp.cuda.runtime.deviceSynchronize()
            self.spin = kernel
        except Exception as exc:  # noqa: BLE001 - timing still works, less well at tiny M
            self.spin_error = f"{type(exc).__name__}: {str(exc)[:200]}"

    def once(self, call, first: int, count: int, n_sets: int, spin_s: float) -> float:
        """Device seconds of ``count`` calls between two events, after a ``spin_s`` priming spin."""
        cp = self.cp
        if self.spin is not None:
            cycles = int(min(spin_s, 0.05) * CLOCK_HZ)
            self.spin((1,), (1,), (cp.int64(cycles),))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for j in range(count):
            call((first + j) % n_sets)
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3


def _device_info(cp) -> tuple[str, int]:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name, int(props.get("l2CacheSize", 0) or 50 * 2**20)


def _compute_type(cp) -> str:
    try:
        from cupy._core import _routines_linalg

        return str(_routines_linalg.get_compute_type(cp.dtype("float16")))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def run(ctx: PartContext) -> list[dict]:
    import cupy as cp

    from calibration.vendor.timing import Budget, coarse_first, describe_error, failure_row

    budget = Budget(ctx.budget_s, PLAN_S, reserve=0.0)
    gpu, l2 = _device_info(cp)
    timer = _CupyTimer(cp)
    base = {"gpu": gpu, "cupy": cp.__version__, "lib": "cuBLAS GemmEx via cupy.matmul",
            "measured_dtype": "fp16", "compute_type": _compute_type(cp),
            "note": "CuPy has no bf16; Hopper fp16 and bf16 tensor-core rates are identical",
            "primed": timer.spin is not None}
    if timer.spin_error:
        base["spin_error"] = timer.spin_error
    rows: list[dict] = []
    pool = cp.get_default_memory_pool()
    models = part_models(ctx.models, ctx.quick, True)
    points_left = sum(len(m_grid(ctx.quick, True, lm)) for _, _, lm in gemm_shapes(models))
    skipped = 0
    try:
        for n, k, lm_head in gemm_shapes(models):
            key = gemm_key(n, k)
            grid = coarse_first(list(m_grid(ctx.quick, True, lm_head)))
            group = budget.group(len(grid), points_left)
            ctx.progress(f"gemm cupy: n={n} k={k} ({len(grid)} M values, {group.total_s:.0f} s)")
            weights: list = []
            for j, m in enumerate(grid):
                points_left -= 1
                if group.expired():
                    skipped += 1
                    continue
                extra = {**base, "n": n, "k": k, "lm_head": lm_head}
                try:
                    set_bytes = 2 * (m * k + k * n + m * n)
                    n_sets = int(max(1, min(math.ceil(L2_MULTIPLE * l2 / set_bytes), 64,
                                            (2 * 2**30) // set_bytes)))
                    while len(weights) < n_sets:
                        w = cp.random.standard_normal((k, n), dtype=cp.float32) * 0.02
                        weights.append(w.astype(cp.float16))
                        del w
                    xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
                          for _ in range(n_sets)]

                    def call(i, xs=xs, ws=weights):
                        return cp.matmul(xs[i], ws[i])

                    for i in range(max(2, n_sets)):
                        call(i % n_sets)
                    cp.cuda.runtime.deviceSynchronize()
                    t0 = time.perf_counter()
                    for i in range(min(n_sets, 8)):
                        call(i % n_sets)
                    host_s = (time.perf_counter() - t0) / min(n_sets, 8)
                    cp.cuda.runtime.deviceSynchronize()

                    def spin_for(count: int, host_s=host_s) -> float:
                        return 20e-6 + 1.5 * host_s * count

                    t1 = max(timer.once(call, 0, 1, n_sets, spin_for(1)), 1e-7)
                    inner = 1 if t1 >= INNER_BELOW_S else int(
                        min(64, max(1, math.ceil(TARGET_SAMPLE_S / t1))))
                    point_s = group.share(len(grid) - j)
                    reps = int(min(40, max(5, point_s // (spin_for(inner) + t1 * inner))))
                    samples = []
                    idx = 0
                    for _ in range(reps):
                        samples.append(timer.once(call, idx, inner, n_sets, spin_for(inner)) / inner)
                        idx += inner
                    fl, by = flops_bytes(m, n, k, 2)
                    rows.append(make_row("gemm_cupy", "cupy-cublas", samples, op="gemm", key=key,
                                         x=m, nbytes=by, flops=fl,
                                         extra={**extra, "method": "events-primed" if timer.spin
                                                else "events", "inner": inner, "sets": n_sets,
                                                "host_per_call_s": host_s}))
                    del xs, call
                except Exception as exc:  # noqa: BLE001 - one point's failure is recorded
                    rows.append(failure_row("gemm_cupy", "cupy-cublas", describe_error(exc),
                                            op="gemm", key=key, x=m, extra=extra,
                                            progress=ctx.progress))
                    try:
                        cp.cuda.runtime.deviceSynchronize()
                    except Exception:  # noqa: BLE001
                        pass
                    pool.free_all_blocks()
            del weights
            pool.free_all_blocks()
    finally:
        pool.free_all_blocks()
    if skipped:
        ctx.progress(f"gemm cupy: budget spent, {skipped} points skipped")
    return rows


PART = Part(
    name="gemm_cupy",
    description="fp16 GEMM through cupy.matmul (cuBLAS) at each model GEMM (n, k) over M",
    requires=("cupy",),
    coords="x = M (rows = tokens); key dtype=bf16,k=K,n=N (measured in fp16, see extra); y = z = 0",
    run=run,
)
