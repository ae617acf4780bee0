"""Part ``launch``: what an empty kernel costs, seen from the host and from the GPU.

Variants (``x`` = launches per sample, ``median_s`` = seconds per launch):

- ``roundtrip``: launch one empty kernel and synchronize, host clock (the latency a host-driven engine
  pays for a dependent step).
- ``throughput``: ``x`` launches back to back, one synchronize, host clock divided by ``x`` (the host's
  launch rate through numba's dispatcher, which is slower than a C++ launch; ``extra.launcher`` says so).
- ``gpu_per_kernel``: CUDA events around ``x`` launches that were queued behind a spinner kernel, so the
  GPU runs them back to back: the device-side cost of one empty kernel.

The kernel is configured once (``k[grid, block]``) outside the timed loops.
"""
from __future__ import annotations

from calibration.kernels.grid import PointRunner
from calibration.kernels.runtime import cuda, jit, synchronize
from calibration.kernels.timing import Timer
from calibration.raw import Part, PartContext, make_row

PART_NAME = "launch"


@jit
def empty_kernel():
    pass


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    launch = empty_kernel[1, 32]
    launch()  # compile and load before anything is timed
    synchronize()
    base = {**timer.base_extra(), "grid": [1, 32], "launcher": "numba dispatcher (Python)"}
    quick = ctx.quick

    def roundtrip() -> list[dict]:
        def once(_: int) -> None:
            launch()
            cuda.synchronize()

        samples = timer.host(once, reps=5 if quick else 400, warmup=2 if quick else 50, sync=False)
        return [make_row(PART_NAME, "roundtrip", samples, x=1,
                         extra={**base, "timer": "host perf_counter"})]

    runner.run("roundtrip", roundtrip)

    for n in (1, 4) if quick else (1, 10, 100, 1000):
        def throughput(n: int = n) -> list[dict]:
            def burst(_: int) -> None:
                for _ in range(n):
                    launch()
                cuda.synchronize()

            samples = timer.host(burst, reps=3 if quick else 20, warmup=1 if quick else 3, sync=False)
            return [make_row(PART_NAME, "throughput", [s / n for s in samples], x=n,
                             extra={**base, "timer": "host perf_counter"})]

        runner.run(f"throughput n={n}", throughput)

    # The pending-launch queue holds about a thousand entries; stay well under it so that the spinner,
    # not a full queue, is what keeps the GPU from starting early.
    for n in (4,) if quick else (16, 64, 256):
        def gpu_per_kernel(n: int = n) -> list[dict]:
            def burst(_: int) -> None:
                for _ in range(n):
                    launch()

            samples = timer.device(burst, reps=3 if quick else 15, warmup=1 if quick else 2)
            return [make_row(PART_NAME, "gpu_per_kernel", [s / n for s in samples], x=n, extra=base)]

        runner.run(f"gpu_per_kernel n={n}", gpu_per_kernel)
    return runner.finish()


PART = Part(
    name=PART_NAME,
    description="empty-kernel launch: round-trip latency, host launch rate, GPU time per kernel",
    requires=("numba.cuda",),
    coords="x=launches per sample (median_s is per launch), y=-, z=-",
    run=run,
)
