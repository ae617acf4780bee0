"""Part ``hbm_stream``: device-memory bandwidth of STREAM kernels, vs bytes and vs thread blocks.

Kernels (float64 elements, grid-stride loops, four independent 8-byte loads in flight per thread, each
warp access a coalesced 256-byte line): ``copy`` a=b, ``scale`` a=s*b, ``triad`` a=b+s*c.
``bytes`` = bytes read + bytes written per call.

Variants and coordinates:

- ``copy``, ``scale``, ``triad``: x = bytes moved per call (log grid, 1 MiB ... 2 GiB), y = thread blocks
  (enough to fill the chip), z = threads per block. Working sets under 3x L2 rotate through disjoint
  buffer slices so repeats do not hit in L2 (``extra.rotation_sets``).
- ``copy_vs_blocks``, ``triad_vs_blocks``: x = bytes moved per call (fixed, arrays >= 4x L2),
  y = thread blocks of 1024 threads (1 ... several x SM count), z = threads per block: the bandwidth a
  subset of SMs can pull, for modelling SM partitioning. With y <= SM count the blocks are assumed to
  land on distinct SMs (the block scheduler spreads an idle GPU's blocks breadth-first).
"""
from __future__ import annotations

import numpy as np

from calibration.kernels.devicefns import fill_uniform
from calibration.kernels.grid import PointRunner
from calibration.kernels.runtime import cuda, free_device_bytes, jit, l2_bytes, release_memory, sm_count, synchronize
from calibration.kernels.timing import Timer, reps_for, rotation_sets
from calibration.raw import Part, PartContext, make_row

PART_NAME = "hbm_stream"
MiB = 2**20


@jit
def copy_kernel(a, b):
    n = a.size
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * stride < n:
        b0 = b[i]
        b1 = b[i + stride]
        b2 = b[i + 2 * stride]
        b3 = b[i + 3 * stride]
        a[i] = b0
        a[i + stride] = b1
        a[i + 2 * stride] = b2
        a[i + 3 * stride] = b3
        i += 4 * stride
    while i < n:
        a[i] = b[i]
        i += stride


@jit
def scale_kernel(a, b, s):
    n = a.size
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * stride < n:
        b0 = b[i]
        b1 = b[i + stride]
        b2 = b[i + 2 * stride]
        b3 = b[i + 3 * stride]
        a[i] = s * b0
        a[i + stride] = s * b1
        a[i + 2 * stride] = s * b2
        a[i + 3 * stride] = s * b3
        i += 4 * stride
    while i < n:
        a[i] = s * b[i]
        i += stride


@jit
def triad_kernel(a, b, c, s):
    n = a.size
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * stride < n:
        b0 = b[i]
        b1 = b[i + stride]
        b2 = b[i + 2 * stride]
        b3 = b[i + 3 * stride]
        c0 = c[i]
        c1 = c[i + stride]
        c2 = c[i + 2 * stride]
        c3 = c[i + 3 * stride]
        a[i] = b0 + s * c0
        a[i + stride] = b1 + s * c1
        a[i + 2 * stride] = b2 + s * c2
        a[i + 3 * stride] = b3 + s * c3
        i += 4 * stride
    while i < n:
        a[i] = b[i] + s * c[i]
        i += stride


SCALE = 0.75
# name → (arrays touched per element, launcher)
KERNELS = {
    "copy": (2, lambda cfg, a, b, c: copy_kernel[cfg](a, b)),
    "scale": (2, lambda cfg, a, b, c: scale_kernel[cfg](a, b, SCALE)),
    "triad": (3, lambda cfg, a, b, c: triad_kernel[cfg](a, b, c, SCALE)),
}


def _check_kernels(bufs, cfg) -> None:
    """Each kernel against numpy on an odd-sized slice (exercises the unrolled body and the tail)."""
    n = min(bufs[0].size, 4099)
    a, b, c = (buf[:n] for buf in bufs)
    hb, hc = b.copy_to_host(), c.copy_to_host()
    want = {"copy": hb, "scale": SCALE * hb, "triad": hb + SCALE * hc}
    for name, (_, launch) in KERNELS.items():
        a.copy_to_device(np.full(n, np.nan))
        launch(cfg, a, b, c)
        got = a.copy_to_host()
        if not np.allclose(got, want[name], rtol=1e-12, atol=0):
            raise AssertionError(f"{name} kernel disagrees with numpy")


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    sms, l2 = sm_count(), l2_bytes()
    if ctx.quick:
        array_bytes = 4096 * 8
        threads, blocks_full = 32, 1
        moved_grid = [2048 * 8, 6144 * 8]
        block_grid = [1, 2]
        fixed_array_bytes = 1024 * 8
    else:
        array_bytes = int(min(1024 * MiB, 0.6 * free_device_bytes() / 3)) // 4096 * 4096
        threads, blocks_full = 1024, 2 * sms
        moved_grid = [MiB * 2**k for k in range(12)]  # 1 MiB ... 2 GiB moved
        block_grid = sorted({1, 2, 4, 8, 16, 32, 64, sms // 4, sms // 2, 3 * sms // 4, sms,
                             2 * sms, 4 * sms, 8 * sms} - {0})
        fixed_array_bytes = min(array_bytes, max(256 * MiB, 4 * l2)) // 4096 * 4096
    n_cap = array_bytes // 8
    bufs = [cuda.device_array(n_cap, dtype=np.float64) for _ in range(3)]  # a, b, c
    for seed, buf in enumerate(bufs):
        fill_uniform[min(4 * sms, 1024), 256 if not ctx.quick else 32](buf, seed + 1)
    synchronize()
    base = {**timer.base_extra(), "dtype": "float64", "loads_in_flight_per_thread": 4}

    runner.run("check", lambda: (_check_kernels(bufs, (blocks_full, threads)), [])[1])

    def measure(name: str, variant: str, moved: int, blocks: int, sweep: str, bufs=bufs) -> list[dict]:
        arrays, launch = KERNELS[name]
        n = moved // (8 * arrays)
        if n < 1 or n > n_cap:
            raise ValueError(f"{moved} bytes do not fit the {array_bytes}-byte arrays")
        moved_exact = n * 8 * arrays
        sets = rotation_sets(moved_exact, l2, available_bytes=n_cap * 8 * arrays)
        sets = max(1, min(sets, n_cap // n))
        views = [tuple(buf[k * n:(k + 1) * n] for buf in bufs) for k in range(sets)]
        cfg = (blocks, threads)
        est = moved_exact / (2.5e12 * min(1.0, blocks / max(sms, 1))) + 5e-6  # few blocks: slower
        samples = timer.device(lambda i: launch(cfg, *views[i % sets]),
                               reps=3 if ctx.quick else reps_for(est, target_s=0.05, lo=7, hi=25),
                               warmup=1 if ctx.quick else 3)
        return [make_row(PART_NAME, variant, samples, x=moved_exact, y=blocks, z=threads,
                         nbytes=moved_exact, flops=0 if name == "copy" else n * (1 if name == "scale" else 2),
                         extra={**base, "elements": n, "rotation_sets": sets, "sweep": sweep})]

    for moved in moved_grid:
        for name in KERNELS:
            runner.run(f"{name} {moved} B",
                       lambda name=name, moved=moved: measure(name, name, moved, blocks_full, "bytes"))
    for blocks in block_grid:
        for name in ("copy", "triad"):
            moved = fixed_array_bytes * KERNELS[name][0]
            runner.run(f"{name} blocks={blocks}",
                       lambda name=name, moved=moved, blocks=blocks:
                       measure(name, f"{name}_vs_blocks", moved, blocks, "blocks"))
    rows = runner.finish(sm_count=sms, l2_bytes=l2)
    bufs.clear()  # the last references to the device arrays
    release_memory()
    return rows


PART = Part(
    name=PART_NAME,
    description="HBM bandwidth of copy/scale/triad vs bytes (full chip) and vs thread blocks",
    requires=("numba.cuda",),
    coords="x=bytes moved per call (read+written), y=thread blocks, z=threads per block",
    run=run,
)
