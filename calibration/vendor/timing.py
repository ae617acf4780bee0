"""How the vendor parts time a call: warm-up, L2-defeating rotation, CUDA events or graph replay.

Discipline (see the device notes, METHOD.md): random inputs, never zeros; warm up first; time on the
device with CUDA events; take medians of many samples; rotate among enough input sets that repeated
calls cannot be served from the 50 MB L2.

:func:`time_calls` picks the method from a first estimate of the call's device time:

- ``graph``: calls shorter than ~100 us are captured ``inner`` times (cycling through the rotation
  sets) in one CUDA graph; each sample is one replay timed with events, divided by ``inner``. This
  removes host launch gaps, so the sample is the kernels' device time (plus graph-internal gaps).
- ``events-primed``: longer calls (or calls that cannot be captured) are timed with events around
  ``inner`` eager calls, after a short ``torch.cuda._sleep`` spin that lets the host queue the calls
  before the start event fires, so host launch latency stays out of the sample.
- ``host``: on the CPU (quick mode, tests), ``perf_counter`` around each call; meaningless as a
  timing, but it runs every code path.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from calibration.raw import make_row
from calibration.vendor.kernel_count import finish_graph, new_graph, per_call

L2_FALLBACK_BYTES = 50 * 2**20
L2_MULTIPLE = 3             # rotate through at least this many L2 sizes of distinct data
GRAPH_BELOW_S = 100e-6      # calls shorter than this are timed by graph replay
TARGET_SAMPLE_S = 1e-3      # aim for samples (one replay / one event pair) of about this long
CLOCK_HZ = 1.98e9           # H100 SXM boost clock, only to convert the spin's seconds to cycles


@dataclass(slots=True)
class TorchEnv:
    """Where the torch-based parts run: device, dtype (bf16 on the GPU, float32 on the CPU), L2."""

    torch: object
    device: object
    dtype: object
    cuda: bool
    gpu: str
    l2_bytes: int
    torch_version: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def base_extra(self) -> dict:
        return {"gpu": self.gpu, "torch": self.torch_version, "dtype": self.dtype_name}


def torch_env(quick: bool) -> TorchEnv:
    """The torch environment; without CUDA only quick mode runs (on the CPU, in float32)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        l2 = int(getattr(props, "L2_cache_size", 0) or L2_FALLBACK_BYTES)
        return TorchEnv(torch, torch.device("cuda"), torch.bfloat16, True, props.name, l2,
                        torch.__version__)
    if not quick:
        raise RuntimeError("this part needs a CUDA GPU in full mode (quick mode runs on the CPU)")
    return TorchEnv(torch, torch.device("cpu"), torch.float32, False, "cpu", 256 * 1024,
                    torch.__version__)


class Budget:
    """Soft wall-clock budget of one part: time left for timing, a fair share per point, and what
    remains for the kernel-count child at the end (``reserve`` of the total is kept for it).

    With an infinite ``budget_s`` nothing is ever skipped; ``plan_s`` still sizes repetitions.
    """

    def __init__(self, budget_s: float, plan_s: float, reserve: float = 0.2) -> None:
        self.start = time.monotonic()
        self.enforced = math.isfinite(budget_s)
        self.total_s = budget_s if self.enforced else plan_s
        self.reserve_s = reserve * self.total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for timing (the reserve for kernel counting excluded)."""
        return self.total_s - self.reserve_s - self.elapsed()

    def expired(self) -> bool:
        return self.enforced and self.left() <= 0

    def share(self, points_left: int, lo: float = 0.01, hi: float = 0.5) -> float:
        """Seconds of timing (excluding warm-up) one of ``points_left`` points may spend."""
        return min(hi, max(lo, self.left() / max(points_left, 1)))

    def group(self, group_points: int, points_left: int) -> "Budget":
        """A sub-budget for the next ``group_points`` of ``points_left`` points: their fair share of
        what is left now (time a fast group leaves unused flows to the groups after it)."""
        sub = Budget(math.inf, 0.0, reserve=0.0)
        sub.enforced = self.enforced
        sub.total_s = max(self.left(), 0.0) * group_points / max(points_left, 1)
        return sub

    def count_timeout(self, cap_s: float) -> float:
        """Seconds the kernel-count child may take: what is left of the budget, at most ``cap_s``."""
        if not self.enforced:
            return cap_s
        return min(cap_s, self.total_s - self.elapsed())


@dataclass(slots=True)
class Measurement:
    """Per-call samples (seconds) and how they were taken."""

    samples_s: list[float]
    method: str
    inner: int = 1
    sets: int = 1
    graph_kernels: dict | None = None  # launches per call read off the timing graph
    notes: list[str] = field(default_factory=list)
    host_s: float | None = None        # host seconds per eager call (no synchronisation)

    def extra(self) -> dict:
        out: dict = {"method": self.method, "inner": self.inner, "sets": self.sets}
        if self.host_s is not None:
            out["host_per_call_s"] = self.host_s
        if self.graph_kernels is not None:
            out["graph_kernels"] = self.graph_kernels["kernels"]
            out["graph_kernel_breakdown"] = self.graph_kernels
        if self.notes:
            out["timing_notes"] = self.notes
        return out


def rotation_sets(set_bytes: float, env: TorchEnv, *, max_sets: int = 64,
                  max_total_bytes: float = 2 * 2**30) -> int:
    """Input sets to rotate among so that at least ``L2_MULTIPLE`` L2 sizes of data are cycled."""
    set_bytes = max(float(set_bytes), 1.0)
    want = math.ceil(L2_MULTIPLE * env.l2_bytes / set_bytes)
    cap = max(1, int(max_total_bytes // set_bytes))
    return int(max(1, min(want, max_sets, cap)))


def prime_queue(torch, seconds: float) -> bool:
    """Keep the GPU busy for ``seconds`` so that the host can queue work before a start event."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return False
    sleep(int(min(seconds, 0.05) * CLOCK_HZ))
    return True


def _events_once(torch, call: Callable[[int], object], first: int, count: int, n_sets: int,
                 spin_s: float) -> tuple[float, bool]:
    """Device seconds of ``count`` eager calls between two events, after a ``spin_s`` priming spin."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    primed = prime_queue(torch, spin_s) if spin_s > 0 else False
    start.record()
    for j in range(count):
        call((first + j) % n_sets)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, primed


def time_calls(call: Callable[[int], object], n_sets: int, env: TorchEnv, *, point_s: float,
               min_reps: int = 5, max_reps: int = 40, use_graph: bool = True,
               max_inner: int = 1024) -> Measurement:
    """Time ``call(i)`` (i = rotation set index in ``range(n_sets)``); returns per-call samples.

    ``point_s`` is the time the timed repetitions may take (warm-up and capture come on top).
    ``call`` must not synchronise and must not keep its outputs alive.
    """
    torch = env.torch
    n_sets = max(1, int(n_sets))
    if not env.cuda:
        for i in range(2):
            call(i % n_sets)
        samples: list[float] = []
        stop = time.perf_counter() + point_s
        for r in range(max_reps):
            t0 = time.perf_counter()
            call(r % n_sets)
            samples.append(time.perf_counter() - t0)
            if len(samples) >= min(min_reps, 3) and time.perf_counter() > stop:
                break
        return Measurement(samples, "host", 1, n_sets)

    # Warm-up: every set once (first-call work such as cuBLAS heuristics and SDPA backend choice),
    # then the host cost of one call (no synchronisation inside the loop) to size priming spins.
    for i in range(max(2, min(n_sets, 64))):
        call(i % n_sets)
    torch.cuda.synchronize()
    k = min(n_sets, 8)
    t0 = time.perf_counter()
    for i in range(k):
        call(i % n_sets)
    host_s = (time.perf_counter() - t0) / k
    torch.cuda.synchronize()

    def spin_for(count: int) -> float:
        return 20e-6 + 1.5 * host_s * count

    t1, _ = _events_once(torch, call, 0, 1, n_sets, spin_for(1))
    t1 = max(t1, 1e-7)
    notes: list[str] = []

    if use_graph and t1 < GRAPH_BELOW_S:
        try:
            meas = _time_graph(torch, call, n_sets, t1, point_s, min_reps, max_reps, max_inner)
            meas.host_s = host_s
            return meas
        except Exception as exc:  # noqa: BLE001 - fall back to eager timing
            notes.append(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass

    inner = 1 if t1 >= GRAPH_BELOW_S else int(min(64, max(1, math.ceil(TARGET_SAMPLE_S / t1))))
    sample_cost = spin_for(inner) + t1 * inner
    reps = int(min(max_reps, max(min_reps, point_s // sample_cost)))
    samples = []
    idx = 0
    primed_all = True
    for _ in range(reps):
        dt, primed = _events_once(torch, call, idx, inner, n_sets, spin_for(inner))
        primed_all &= primed
        idx += inner
        samples.append(dt / inner)
    meas = Measurement(samples, "events-primed" if primed_all else "events", inner, n_sets,
                       notes=notes)
    meas.host_s = host_s
    return meas


def _time_graph(torch, call, n_sets: int, t1: float, point_s: float, min_reps: int,
                max_reps: int, max_inner: int) -> Measurement:
    inner = int(min(max_inner, max(1, math.ceil(TARGET_SAMPLE_S / t1))))
    inner = max(inner, n_sets)
    inner = math.ceil(inner / n_sets) * n_sets  # every replay cycles through all sets
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch advises
        for i in range(2):
            call(i % n_sets)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph, keep = new_graph(torch)
    with torch.cuda.graph(graph):
        for j in range(inner):
            call(j % n_sets)
    counts = per_call(finish_graph(graph, keep), inner)
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replay_s = max(start.elapsed_time(end) / 1e3, 1e-7)
    reps = int(min(max_reps, max(min_reps, point_s // replay_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        graph.replay()
        ends[r].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) / 1e3 / inner for s, e in zip(starts, ends)]
    del graph
    return Measurement(samples, "graph", inner, n_sets, graph_kernels=counts)


def coarse_first(items: list) -> list:
    """``items`` reordered so that every prefix spans the whole range (both ends, then the middle,
    then the quarters, ...): a grid cut short by the budget still covers it coarsely."""
    n = len(items)
    order = [0, n - 1] if n > 1 else list(range(n))
    seen = set(order)
    stride = 1 << max(n - 1, 1).bit_length()
    while stride >= 1:
        for i in range(0, n, stride):
            if i not in seen:
                seen.add(i)
                order.append(i)
        stride //= 2
    return [items[i] for i in order]


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def recover(env: TorchEnv | None, exc: BaseException | None = None) -> None:
    """After a failed point (or between shapes): release cached memory so the next starts clean."""
    if env is None or not env.cuda:
        return
    try:
        env.torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a sticky error will surface at the next point
        pass
    env.torch.cuda.empty_cache()


def failure_row(part: str, variant: str, error: str, *, op: str = "", key: str = "", x: float = 0.0,
                y: float = 0.0, z: float = 0.0, extra: dict | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """A row recording a grid point that did not produce timings: NaN statistics, reps = 0.

    The suite's writer keeps only rows with a finite median, so the failure is also reported
    through ``progress`` (the part's log) when one is given.
    """
    if progress is not None:
        where = " ".join(f"{n}={v:g}" for n, v in (("x", x), ("y", y), ("z", z)) if v)
        progress(f"FAILED {part}/{variant} {op} {key} {where}: {error[:300]}")
    row = make_row(part, variant, [0.0], op=op, key=key, x=x, y=y, z=z)
    for col in ("median_s", "p10_s", "p90_s", "min_s", "max_s"):
        row[col] = math.nan
    row["reps"] = 0
    row["extra"] = json.dumps({**(extra or {}), "error": error[:500]}, sort_keys=True)
    return row


def attach_counts(rows: list[dict], indices: list[int], results: list[dict | None],
                  note: str | None) -> None:
    """Merge child-process kernel counts into the rows' extra (``kernels`` from the profiler)."""
    for row_i, res in zip(indices, results):
        extra = json.loads(rows[row_i]["extra"])
        if res is None:
            if note:
                extra["kernels_note"] = note
        elif "error" in res:
            extra["kernels_error"] = res["error"]
        else:
            extra["kernels"] = res["kernels"]
            extra["kernel_breakdown"] = {k: res[k] for k in ("kernel", "memcpy", "memset") if k in res}
            extra["kernels_source"] = "profiler"
            if res.get("names"):
                extra["kernel_names"] = res["names"][:64]
        if "kernels" not in extra and "graph_kernels" in extra:
            extra["kernels"] = extra["graph_kernels"]
            extra["kernels_source"] = "graph"
        rows[row_i]["extra"] = json.dumps(extra, sort_keys=True)


def finish_rows(rows: list[dict]) -> None:
    """Give rows that got no profiler count their graph count as ``kernels`` (when they have one)."""
    for row in rows:
        extra = json.loads(row["extra"])
        if "kernels" not in extra and "graph_kernels" in extra:
            extra["kernels"] = extra["graph_kernels"]
            extra["kernels_source"] = "graph"
            row["extra"] = json.dumps(extra, sort_keys=True)
