"""Part ``persistent``: a resident kernel fed through a work queue in mapped pinned host memory.

One block stays resident and polls ``queue[head]`` (host-written; 0 = empty, > 0 = a work item,
``STOP`` = exit). For an item it runs a tiny work body on all threads, then publishes ``done[head] = 1``
after a system-scope fence. Host-written and device-written cells are disjoint (each has one writer).

Hang safety, on both sides:
- device: every wait for an item is capped at ``poll_cap`` polls (tight first, then with ``nanosleep``
  back-off); a wait that hits the cap ends the kernel with ``status[1] = EXIT_TIMEOUT``; the loop over
  slots is bounded by the queue length; a ``STOP`` item ends it normally.
- host: every wait (kernel ready, item done) has a wall-clock deadline; on any failure the host writes
  ``STOP`` into every unused slot, and device waits are capped anyway, so the final synchronize returns.

Variants (median_s per item): ``doorbell_rtt`` (x = 1): host writes one item and spins until its
completion is visible: one host->device->host round trip including the work. ``queued_dispatch``
(x = N): N items written back to back, time until the last completes, divided by N: per-item dispatch
cost of a resident kernel. y = threads in the block.

Under the simulator a launch blocks the host, so the queue is pre-filled (items, then ``STOP``) before
the launch and only ``prefilled_batch`` (whole launch / N) is measured; rows say ``simulated``.
"""
from __future__ import annotations

import time

import numpy as np

from calibration.kernels import devicefns
from calibration.kernels.devicefns import backoff, poll_load
from calibration.kernels.grid import PointRunner
from calibration.kernels.runtime import SIMULATED, cuda, jit, synchronize
from calibration.kernels.timing import Timer
from calibration.raw import Part, PartContext, make_row

PART_NAME = "persistent"
STOP = -1
EXIT_STOP, EXIT_TIMEOUT, EXIT_END_OF_QUEUE = 1, 2, 3
TIGHT_POLLS = 4096          # polls before the device starts backing off with nanosleep
POLL_CAP = 1_000_000        # polls per wait: about 1-3 s at ~1-2 us per poll over PCIe + back-off
# (warm-up round trips, timed round trips, [(items queued back to back, repetitions), ...])
QUICK_PLAN = (2, 8, [(1, 3), (4, 3)])
FULL_PLAN = (200, 2000, [(1, 20), (10, 20), (100, 20), (1000, 10)])


@jit
def persistent_kernel(queue, done, status, data, poll_cap):
    """status: [0] ready flag, [1] exit code, [2] items executed, [3] most polls one wait took."""
    tid = cuda.threadIdx.x
    item = cuda.shared.array(1, np.int64)
    if tid == 0:
        status[0] = 1
        cuda.threadfence_system()
    n_slots = queue.size
    executed = 0
    most_polls = 0
    exit_code = EXIT_END_OF_QUEUE
    for head in range(n_slots):
        if tid == 0:
            value = np.int64(0)
            polls = 0
            while polls < poll_cap:
                value = poll_load(queue, head)
                if value != 0:
                    break
                polls += 1
                if polls > TIGHT_POLLS:
                    backoff()
            item[0] = value
            most_polls = max(most_polls, polls)
        cuda.syncthreads()
        value = item[0]
        cuda.syncthreads()  # everyone has read the item before thread 0 may overwrite it
        if value == 0:
            exit_code = EXIT_TIMEOUT
            break
        if value < 0:
            exit_code = EXIT_STOP
            break
        data[tid] = data[tid] * np.float32(0.5) + np.float32(value)  # the work item's body
        cuda.syncthreads()
        if tid == 0:
            cuda.threadfence_system()   # the work's writes before the completion flag
            done[head] = 1
            cuda.threadfence_system()   # push the flag out to host memory now
        executed += 1
    if tid == 0:
        status[3] = most_polls
        status[2] = executed
        status[1] = exit_code
        cuda.threadfence_system()


class _Queue:
    """Mapped host arrays of one kernel run; the host side of the protocol."""

    def __init__(self, n_slots: int, threads: int) -> None:
        self.queue = cuda.mapped_array(n_slots, dtype=np.int64)
        self.done = cuda.mapped_array(n_slots, dtype=np.int64)
        self.status = cuda.mapped_array(4, dtype=np.int64)
        self.queue[:] = 0
        self.done[:] = 0
        self.status[:] = 0
        self.data = cuda.to_device(np.ones(threads, dtype=np.float32))
        self.threads = threads
        self.head = 0

    def launch(self) -> None:
        persistent_kernel[1, self.threads](self.queue, self.done, self.status, self.data, POLL_CAP)

    def wait(self, cell: np.ndarray, index: int, timeout_s: float) -> bool:
        """Spin (bounded) until ``cell[index]`` is non-zero."""
        deadline = time.perf_counter() + timeout_s
        while cell[index] == 0:
            if time.perf_counter() > deadline:
                return False
        return True

    def stop_all(self) -> None:
        """Write STOP into every unused slot so the kernel ends at its next poll."""
        self.queue[self.head:] = STOP


def _real_run(ctx: PartContext, timer: Timer, runner: PointRunner, threads: int) -> None:
    warm, n_rtt, queued = QUICK_PLAN if ctx.quick else FULL_PLAN
    n_slots = warm + n_rtt + sum(n * reps for n, reps in queued) + 1
    q = _Queue(n_slots, threads)
    persistent_kernel[1, threads](q.queue, q.done, q.status, q.data, 10)  # compile; exits after 10 polls
    synchronize()
    q.queue[:] = 0
    q.done[:] = 0
    q.status[:] = 0
    base = {"timer": "host perf_counter", "poll": devicefns.POLL_METHOD, "poll_cap": POLL_CAP,
            "memory": "cuda.mapped_array (pinned, mapped, not write-combined)"}
    results: dict[str, list] = {"rtt": [], "queued": []}
    failure = ""
    # No deallocation or other implicit synchronization may happen while the kernel is resident.
    with cuda.defer_cleanup():
        q.launch()
        try:
            if not q.wait(q.status, 0, 20.0):
                raise TimeoutError("persistent kernel did not report ready within 20 s")
            for i in range(warm + n_rtt):
                t0 = time.perf_counter()
                q.queue[q.head] = i + 1
                if not q.wait(q.done, q.head, 2.0):
                    raise TimeoutError(f"item {q.head} not completed within 2 s "
                                       f"(device exit code {int(q.status[1])})")
                elapsed = time.perf_counter() - t0
                q.head += 1
                if i >= warm:
                    results["rtt"].append(elapsed)
            for n, reps in queued:
                samples = []
                for _ in range(reps):
                    first = q.head
                    t0 = time.perf_counter()
                    for j in range(n):
                        q.queue[first + j] = j + 1
                    q.head = first + n
                    if not q.wait(q.done, first + n - 1, 5.0):
                        raise TimeoutError(f"batch of {n} not completed within 5 s")
                    samples.append((time.perf_counter() - t0) / n)
                results["queued"].append((n, samples))
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            q.stop_all()
            synchronize()  # returns: STOP is queued and every device wait is capped
    ctx.progress(f"{PART_NAME}: kernel exit code {int(q.status[1])}, {int(q.status[2])} items executed")
    extra = {**base, "device_exit_code": int(q.status[1]), "items_executed": int(q.status[2]),
             "most_polls_in_one_wait": int(q.status[3])}
    if results["rtt"]:
        runner.run("doorbell_rtt", lambda: [make_row(PART_NAME, "doorbell_rtt", results["rtt"], x=1,
                                                     y=threads, extra=extra)])
    for n, samples in results["queued"]:
        runner.run(f"queued n={n}", lambda n=n, samples=samples: [
            make_row(PART_NAME, "queued_dispatch", samples, x=n, y=threads, extra=extra)])
    if failure:
        runner.run("protocol", lambda: _raise(RuntimeError(failure)))


def _raise(exc: Exception) -> list[dict]:
    raise exc


def _simulated_run(ctx: PartContext, timer: Timer, runner: PointRunner, threads: int) -> None:
    for n in (1, 4):
        def measure(n: int = n) -> list[dict]:
            samples = []
            for _ in range(3):
                q = _Queue(n + 1, threads)
                q.queue[:n] = np.arange(1, n + 1)
                q.queue[n] = STOP
                t0 = time.perf_counter()
                q.launch()
                synchronize()
                samples.append((time.perf_counter() - t0) / n)
                status, done = q.status.copy_to_host(), q.done.copy_to_host()
                if status[1] != EXIT_STOP or status[2] != n or not np.all(done[:n] == 1):
                    raise AssertionError(f"kernel status {status.tolist()}, done {done.tolist()}")
            return [make_row(PART_NAME, "prefilled_batch", samples, x=n, y=threads,
                             extra={**timer.base_extra(), "poll": devicefns.POLL_METHOD,
                                    "note": "simulator: launches block the host, queue pre-filled; "
                                            "no doorbell round trip measurable"})]

        runner.run(f"prefilled n={n}", measure)


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    threads = 32 if (ctx.quick or SIMULATED) else 128
    if SIMULATED or ctx.simulate:
        _simulated_run(ctx, timer, runner, threads)
    else:
        _real_run(ctx, timer, runner, threads)
    return runner.finish()


PART = Part(
    name=PART_NAME,
    description="resident kernel polling a mapped-memory queue: doorbell round trip, per-item dispatch",
    requires=("numba.cuda",),
    coords="x=items per sample (median_s per item), y=threads in the block, z=-",
    run=run,
)
