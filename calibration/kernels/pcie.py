"""Part ``pcie``: host<->device copies vs transfer size, pinned and pageable, one way and both ways.

Variants (x = bytes per direction, ``bytes`` = bytes moved in total, median_s = seconds per transfer):

- ``pinned_h2d``, ``pinned_d2h``: asynchronous copies from/to ``cuda.pinned_array`` memory, timed with
  CUDA events on the copy's stream (DMA time; ``extra.host_median_s`` adds the host's view).
- ``pageable_h2d``, ``pageable_d2h``: synchronous copies from/to ordinary numpy memory (pages touched
  beforehand), host clock: the driver stages these through its own pinned buffers.
- ``pinned_bidir``: an H2D and a D2H of x bytes each at once on two streams; time until both finish;
  ``bytes`` = 2x.

Host buffers hold random bytes (never zeros), device buffers are distinct per direction.
"""
from __future__ import annotations

import time

import numpy as np

from calibration.kernels.grid import PointRunner, coarse_first
from calibration.kernels.runtime import SIMULATED, cuda, free_device_bytes, release_memory, synchronize
from calibration.kernels.timing import Timer, reps_for
from calibration.raw import Part, PartContext, make_row

PART_NAME = "pcie"
KiB, MiB, GiB = 2**10, 2**20, 2**30


def _random_fill(buf: np.ndarray, seed: int) -> None:
    """Fill a uint8 buffer with random bytes cheaply: one random MiB tiled (not zeros, not constant)."""
    tile = np.random.default_rng(seed).integers(0, 256, size=min(buf.size, MiB), dtype=np.uint8)
    for start in range(0, buf.size, tile.size):
        end = min(start + tile.size, buf.size)
        buf[start:end] = tile[:end - start]


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    if ctx.quick:
        sizes = [4 * KiB, 64 * KiB]
    else:
        cap = min(GiB, int(0.2 * free_device_bytes()))
        sizes = [s for s in (4 * KiB * 4**k for k in range(10)) if s <= cap]  # 4 KiB ... 1 GiB
    largest = max(sizes)
    ctx.progress(f"{PART_NAME}: allocating {2 * largest / MiB:.2f} MiB pinned host memory")
    mem = {"pinned_src": cuda.pinned_array(largest, dtype=np.uint8),
           "pinned_dst": cuda.pinned_array(largest, dtype=np.uint8),
           "pageable_src": np.empty(largest, dtype=np.uint8),
           "pageable_dst": np.ones(largest, dtype=np.uint8),  # touched: no first-touch faults while timed
           "dev_in": cuda.device_array(largest, dtype=np.uint8)}
    _random_fill(mem["pinned_src"], 1)
    _random_fill(mem["pageable_src"], 2)
    mem["pinned_dst"][:] = 3
    mem["dev_out"] = cuda.to_device(mem["pinned_src"])  # random device-side source for D2H
    s_h2d, s_d2h = cuda.stream(), cuda.stream()
    synchronize()
    base = timer.base_extra()

    def est(size: int) -> float:
        return size / 20e9 + 10e-6

    def reps(size: int) -> int:
        return 3 if ctx.quick else reps_for(est(size), target_s=0.15, lo=5, hi=30)

    def pinned(direction: str, size: int) -> list[dict]:
        d_in, d_out = mem["dev_in"][:size], mem["dev_out"][:size]
        h_src, h_dst = mem["pinned_src"][:size], mem["pinned_dst"][:size]
        if direction == "h2d":
            def copy(_: int) -> None:
                d_in.copy_to_device(h_src, stream=s_h2d)
            stream = s_h2d
        else:
            def copy(_: int) -> None:
                d_out.copy_to_host(h_dst, stream=s_d2h)
            stream = s_d2h
        samples = timer.device(copy, reps=reps(size), warmup=2, stream=stream)

        def host_copy(_: int) -> None:
            copy(0)
            stream.synchronize()

        host = timer.host(host_copy, reps=max(3, reps(size) // 3), warmup=1, sync=False)
        if direction == "d2h" and not np.array_equal(h_dst[:64], mem["pinned_src"][:64]):
            raise AssertionError("D2H copy returned wrong bytes")
        return [make_row(PART_NAME, f"pinned_{direction}", samples, x=size, nbytes=size,
                         extra={**base, "host_median_s": float(np.median(host))})]

    def pageable(direction: str, size: int) -> list[dict]:
        d_in, d_out = mem["dev_in"][:size], mem["dev_out"][:size]
        h_src, h_dst = mem["pageable_src"][:size], mem["pageable_dst"][:size]
        if direction == "h2d":
            def copy(_: int) -> None:
                d_in.copy_to_device(h_src)
        else:
            def copy(_: int) -> None:
                d_out.copy_to_host(h_dst)
        samples = timer.host(copy, reps=reps(size), warmup=2)
        extra = {**base, "timer": "host perf_counter (synchronous copy)"}
        return [make_row(PART_NAME, f"pageable_{direction}", samples, x=size, nbytes=size, extra=extra)]

    def bidir(size: int) -> list[dict]:
        d_in, d_out = mem["dev_in"][:size], mem["dev_out"][:size]
        h_src, h_dst = mem["pinned_src"][:size], mem["pinned_dst"][:size]
        if SIMULATED:
            def both(_: int) -> None:
                d_in.copy_to_device(h_src, stream=s_h2d)
                d_out.copy_to_host(h_dst, stream=s_d2h)
            samples = timer.host(both, reps=reps(size), warmup=1)
        else:
            start, end_a, end_b = (cuda.event(timing=True) for _ in range(3))
            samples = []
            for i in range(reps(size) + 2):
                synchronize()
                timer.prequeue(s_h2d, 200e-6)  # both copies are queued before the start event fires
                start.record(s_h2d)
                start.wait(s_d2h)  # both copies start after the same point
                d_in.copy_to_device(h_src, stream=s_h2d)
                d_out.copy_to_host(h_dst, stream=s_d2h)
                end_a.record(s_h2d)
                end_b.record(s_d2h)
                end_a.synchronize()
                end_b.synchronize()
                if i >= 2:  # the first two are warm-up
                    samples.append(max(start.elapsed_time(end_a), start.elapsed_time(end_b)) / 1e3)
        return [make_row(PART_NAME, "pinned_bidir", samples, x=size, nbytes=2 * size,
                         extra={**base, "streams": 2})]

    for size in coarse_first(sizes):
        runner.run(f"pinned_h2d {size}", lambda size=size: pinned("h2d", size))
        runner.run(f"pinned_d2h {size}", lambda size=size: pinned("d2h", size))
        runner.run(f"pinned_bidir {size}", lambda size=size: bidir(size))
        runner.run(f"pageable_h2d {size}", lambda size=size: pageable("h2d", size))
        runner.run(f"pageable_d2h {size}", lambda size=size: pageable("d2h", size))
    rows = runner.finish()
    t0 = time.perf_counter()
    mem.clear()
    release_memory()
    ctx.progress(f"{PART_NAME}: freed buffers in {time.perf_counter() - t0:.1f} s")
    return rows


PART = Part(
    name=PART_NAME,
    description="host<->device copy time vs size: pinned/pageable, each direction, both at once",
    requires=("numba.cuda",),
    coords="x=bytes per direction, y=-, z=-",
    run=run,
)
