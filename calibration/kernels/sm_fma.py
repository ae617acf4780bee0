"""Part ``sm_fma``: FP32 FMA throughput vs the number of SMs used.

Each thread runs 32 independent FMA chains (a = a*b + c) for ``iterations`` steps; 1024-thread blocks
use more than 32 registers per thread, so no two fit on one SM and ``n <= SM count`` blocks occupy ``n``
SMs (the block scheduler spreads an idle GPU's blocks over distinct SMs; ``extra`` records the register
assumption). ``flops`` = 2 x FMAs per call.

Variants: ``fma_per_sm``: x = SMs used (one block each), y = threads per block, z = blocks per SM (1);
``fma_full_chip``: several 256-thread blocks per SM on every SM: x = SM count, y = 256, z = blocks per SM.
"""
from __future__ import annotations

import numpy as np

from calibration.kernels.devicefns import fill_uniform
from calibration.kernels.grid import PointRunner
from calibration.kernels.runtime import SIMULATED, cuda, jit, sm_count, synchronize
from calibration.kernels.timing import Timer
from calibration.raw import Part, PartContext, make_row

PART_NAME = "sm_fma"
CHAINS = 32


@jit
def fma_kernel(seeds, out, iterations):
    """32 independent chains per thread; the result is stored so nothing is dead code."""
    t = cuda.grid(1)
    x = seeds[t % seeds.size]
    b = np.float32(0.9999)
    c = np.float32(1e-4)
    a0 = x + np.float32(0.0)
    a1 = x + np.float32(1.0)
    a2 = x + np.float32(2.0)
    a3 = x + np.float32(3.0)
    a4 = x + np.float32(4.0)
    a5 = x + np.float32(5.0)
    a6 = x + np.float32(6.0)
    a7 = x + np.float32(7.0)
    a8 = x + np.float32(8.0)
    a9 = x + np.float32(9.0)
    a10 = x + np.float32(10.0)
    a11 = x + np.float32(11.0)
    a12 = x + np.float32(12.0)
    a13 = x + np.float32(13.0)
    a14 = x + np.float32(14.0)
    a15 = x + np.float32(15.0)
    a16 = x + np.float32(16.0)
    a17 = x + np.float32(17.0)
    a18 = x + np.float32(18.0)
    a19 = x + np.float32(19.0)
    a20 = x + np.float32(20.0)
    a21 = x + np.float32(21.0)
    a22 = x + np.float32(22.0)
    a23 = x + np.float32(23.0)
    a24 = x + np.float32(24.0)
    a25 = x + np.float32(25.0)
    a26 = x + np.float32(26.0)
    a27 = x + np.float32(27.0)
    a28 = x + np.float32(28.0)
    a29 = x + np.float32(29.0)
    a30 = x + np.float32(30.0)
    a31 = x + np.float32(31.0)
    for _ in range(iterations):
        a0 = a0 * b + c
        a1 = a1 * b + c
        a2 = a2 * b + c
        a3 = a3 * b + c
        a4 = a4 * b + c
        a5 = a5 * b + c
        a6 = a6 * b + c
        a7 = a7 * b + c
        a8 = a8 * b + c
        a9 = a9 * b + c
        a10 = a10 * b + c
        a11 = a11 * b + c
        a12 = a12 * b + c
        a13 = a13 * b + c
        a14 = a14 * b + c
        a15 = a15 * b + c
        a16 = a16 * b + c
        a17 = a17 * b + c
        a18 = a18 * b + c
        a19 = a19 * b + c
        a20 = a20 * b + c
        a21 = a21 * b + c
        a22 = a22 * b + c
        a23 = a23 * b + c
        a24 = a24 * b + c
        a25 = a25 * b + c
        a26 = a26 * b + c
        a27 = a27 * b + c
        a28 = a28 * b + c
        a29 = a29 * b + c
        a30 = a30 * b + c
        a31 = a31 * b + c
    s0 = (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
    s1 = (((a8 + a9) + (a10 + a11)) + ((a12 + a13) + (a14 + a15)))
    s2 = (((a16 + a17) + (a18 + a19)) + ((a20 + a21) + (a22 + a23)))
    s3 = (((a24 + a25) + (a26 + a27)) + ((a28 + a29) + (a30 + a31)))
    s = (s0 + s1) + (s2 + s3)
    out[t % out.size] = s


def _registers() -> int | None:
    """Registers per thread of the compiled kernel (None if numba cannot say)."""
    try:
        regs = fma_kernel.get_regs_per_thread()
        return int(max(regs.values())) if isinstance(regs, dict) else int(regs)
    except Exception:
        return None


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    sms = sm_count()
    threads = 32 if ctx.quick else 1024
    seeds = cuda.device_array(4096 if not ctx.quick else 64, dtype=np.float32)
    fill_uniform[4, 32](seeds, 7)
    out = cuda.device_array(seeds.size, dtype=np.float32)
    base = {**timer.base_extra(), "chains_per_thread": CHAINS, "dtype": "float32",
            "one_block_per_sm_assumes": "> 32 registers/thread for 1024-thread blocks"}

    # Size the loop so one launch takes ~2 ms on the whole chip (long enough to dwarf launch gaps).
    iterations = 4
    if not ctx.quick and not SIMULATED:
        probe = 256
        fma_kernel[sms, threads](seeds, out, probe)
        synchronize()
        t = timer.device(lambda _: fma_kernel[sms, threads](seeds, out, probe), reps=3, warmup=1)
        per_iteration = float(np.median(t)) / probe
        iterations = int(min(max(2e-3 / max(per_iteration, 1e-12), 256), 2_000_000))
        base["registers_per_thread"] = _registers()

    def measure(variant: str, blocks: int, block_threads: int, per_sm: int, used_sms: int) -> list[dict]:
        samples = timer.device(lambda _: fma_kernel[blocks, block_threads](seeds, out, iterations),
                               reps=3 if ctx.quick else 9, warmup=1 if ctx.quick else 2)
        fmas = blocks * block_threads * CHAINS * iterations
        return [make_row(PART_NAME, variant, samples, x=used_sms, y=block_threads, z=per_sm,
                         flops=2.0 * fmas, extra={**base, "blocks": blocks, "iterations": iterations})]

    if ctx.quick:
        sm_grid = [1, 2]
    else:
        sm_grid = sorted({1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, sms // 4, sms // 2,
                          3 * sms // 4, sms} - {0})
        sm_grid = [n for n in sm_grid if n <= sms]
    for n in sm_grid:
        runner.run(f"sms={n}", lambda n=n: measure("fma_per_sm", n, threads, 1, n))
    # 4 resident 256-thread blocks per SM at <= 64 registers/thread: one wave, no tail
    per_sm = 2 if ctx.quick else 4
    block_threads = 32 if ctx.quick else 256
    runner.run("full chip", lambda: measure("fma_full_chip", per_sm * sms, block_threads, per_sm, sms))
    return runner.finish(sm_count=sms)


PART = Part(
    name=PART_NAME,
    description="FP32 FMA throughput vs SMs used (one block per SM) and on the full chip",
    requires=("numba.cuda",),
    coords="x=SMs used, y=threads per block, z=blocks per SM",
    run=run,
)
