"""Timing device work properly: warm-up, CUDA events, a queued-ahead spinner, repetitions.

``Timer.device`` times ``fn`` with CUDA events. Before each timed region it launches a one-thread
*spinner* kernel that keeps the GPU busy for longer than the host needs to enqueue the region, so the
start event fires only when the region's work is already queued: the events then bracket GPU execution,
not numba's Python launch overhead (tens of microseconds, which would otherwise dominate microsecond
kernels). ``Timer.host`` times with ``time.perf_counter`` after a synchronize, for costs seen from the host.

Under the CUDA simulator events do not time (``elapsed_time`` returns -1), so both fall back to the host
clock and rows say ``simulated: true``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from calibration.kernels.runtime import SIMULATED, cuda, jit, synchronize


@jit
def spin_kernel(iterations, out):
    """One thread runs a dependent FMA chain of ``iterations`` steps (bounded by construction)."""
    if cuda.grid(1) == 0:
        x = out[0]
        for _ in range(iterations):
            x = x * np.float32(0.999999) + np.float32(1e-6)
        out[0] = x


class Timer:
    """Times callables on the current device; one per part (it owns the spinner and its calibration)."""

    def __init__(self, max_spin_s: float = 0.05) -> None:
        self.simulated = SIMULATED
        self.max_spin_s = max_spin_s
        self._spin_out = None
        self._spin_rate = 0.0  # spinner iterations per second, measured
        self._events = None

    # ------------------------------------------------------------------ spinner
    def _calibrate_spinner(self) -> None:
        self._spin_out = cuda.to_device(np.ones(1, dtype=np.float32))
        launch = spin_kernel[1, 1]
        launch(1000, self._spin_out)  # compile and load outside the measurement
        synchronize()
        start, end = cuda.event(timing=True), cuda.event(timing=True)
        iterations = 200_000
        for _ in range(3):  # grow until the spin is long enough to time well (>= 1 ms)
            start.record()
            launch(iterations, self._spin_out)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
            if elapsed >= 1e-3:
                break
            iterations *= 8
        self._spin_rate = iterations / max(elapsed, 1e-6)
        self._events = (cuda.event(timing=True), cuda.event(timing=True))

    def _spin(self, seconds: float, stream) -> None:
        iterations = int(min(seconds, self.max_spin_s) * self._spin_rate) + 1
        spin_kernel[1, 1, stream](iterations, self._spin_out)

    def prequeue(self, stream, seconds: float = 100e-6) -> None:
        """Keep ``stream`` busy for about ``seconds`` so that work enqueued next starts back to back."""
        if self.simulated:
            return
        if self._events is None:
            self._calibrate_spinner()
        self._spin(seconds, stream if stream is not None else 0)

    # ------------------------------------------------------------------ timing
    def device(self, fn: Callable[[int], None], *, reps: int, warmup: int = 2, inner: int = 1,
               stream=None, prequeue: bool = True) -> list[float]:
        """Seconds per call of ``fn(i)`` (i counts calls, for buffer rotation), one sample per rep.

        Each sample brackets ``inner`` back-to-back calls with events on ``stream`` (default stream if
        None) and divides by ``inner``. ``fn`` must enqueue its work on that stream.
        """
        if self.simulated:
            return self.host(fn, reps=reps, warmup=warmup, inner=inner)
        if self._events is None:
            self._calibrate_spinner()
        s = stream if stream is not None else 0
        calls = 0
        host_per_call = 0.0
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fn(calls)
            host_per_call = time.perf_counter() - t0
            calls += 1
        synchronize()
        start, end = self._events
        samples = []
        for _ in range(reps):
            if prequeue:
                # cover the host time to enqueue `inner` calls, with margin
                self._spin(2.0 * host_per_call * inner + 20e-6, s)
            start.record(s)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(calls)
                calls += 1
            host_per_call = (time.perf_counter() - t0) / inner
            end.record(s)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        synchronize()
        return samples

    def host(self, fn: Callable[[int], None], *, reps: int, warmup: int = 2, inner: int = 1,
             sync: bool = True) -> list[float]:
        """Host wall seconds per call of ``fn(i)``, synchronizing the device after each sample."""
        calls = 0
        for _ in range(warmup):
            fn(calls)
            calls += 1
        if sync:
            synchronize()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(calls)
                calls += 1
            if sync:
                synchronize()
            samples.append((time.perf_counter() - t0) / inner)
        return samples

    def base_extra(self) -> dict:
        """What every row of this timer should say about how it was timed."""
        if self.simulated:
            return {"simulated": True, "timer": "host perf_counter (simulator)"}
        return {"timer": "cuda events, spinner-prequeued"}


def rotation_sets(working_set_bytes: float, l2: int, available_bytes: float, max_sets: int = 64) -> int:
    """How many distinct buffer sets to cycle through so that repeats are not served from L2.

    Enough sets that one cycle touches >= 3x L2, limited by the memory available for copies.
    """
    if l2 <= 0 or working_set_bytes <= 0 or working_set_bytes >= 3 * l2:
        return 1
    wanted = math.ceil(3 * l2 / working_set_bytes)
    fit = int(available_bytes // working_set_bytes)
    return max(1, min(wanted, fit, max_sets))


def reps_for(estimate_s: float, *, target_s: float = 0.2, lo: int = 5, hi: int = 30) -> int:
    """Repetitions so that one grid point takes about ``target_s`` (clamped to [lo, hi])."""
    if estimate_s <= 0:
        return hi
    return int(min(hi, max(lo, target_s / estimate_s)))
