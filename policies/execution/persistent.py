"""``persistent``: one resident kernel runs every step; the host only enqueues work and reads results.

A persistent (mega)kernel holds ``scheduler_sms`` SMs for its device-side scheduler and stage
workers for the whole run; the model's ops run on the other SMs, at the throughput the cost backend
gives for that SM share (``GPU.sm_share`` -> ``CostBackend.for_share``: compute scales with the SMs,
HBM bandwidth saturates well below all of them, so memory-bound decode barely slows while
compute-bound prefill does). A step costs:

- the model's kernels as fused stages of one kernel: the op times with the idle gap between
  consecutive kernels removed (``LaunchCosts.graph_gap_s`` per kernel: the in-model gap a CUDA-graph
  replay still pays, measured by ``calibration.attribute``; a roofline backend's pure GPU times have
  no gap to remove), never below the op times' sum less the gaps (clamped at zero per step);
- no kernel launch and no host synchronisation (0 launches, 0 syncs);
- per-item dispatch: the device scheduler takes one work item per sequence in the step
  (``dispatch = "per-seq"``) or one per step (``"per-step"``), each at the measured
  ``LaunchCosts.persistent_item_s`` (``calibration/kernels/persistent.py``: N items queued back to
  back through mapped pinned memory, time per item: ~2.9 us on the H100 table, whatever N);
- a step that takes in new work from the host (a prefill chunk: admissions) waits for the host's
  doorbell (``LaunchCosts.doorbell_s``, the measured host write -> kernel sees it -> host sees the
  completion round trip, ~3.7 us on the H100) plus, on average, half the resident kernel's polling
  interval (``poll_interval_s``);
- a step of more items than the device queue holds (``queue_depth``) needs the host to refill it:
  one more doorbell round trip per further queue-full.

The engine's own host work (``host``, ``host_step_s``, ...; ``policies.execution.host``) still applies
when set: a resident kernel issues nothing from the host, so overlapped host work hides entirely
behind a step that is longer than it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.base import ExecutionPolicy, KernelSequence, LaunchCosts, StepTiming
from policies.execution.host import HostOverhead, HostParams
from policies.registry import register


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistentParams(HostParams):
    scheduler_sms: int = 8           # SMs the resident kernel holds for its scheduler and stage workers
    queue_depth: int = 1024          # work items the device-side queue holds at once
    poll_interval_s: float = 0.0     # the resident kernel's sleep between polls of the queue (0: spins)
    dispatch: str = "per-seq"        # "per-seq": one work item per sequence per step | "per-step": one per step
    fuse_stages: bool = True         # False: keep the inter-kernel gaps (a resident loop over unfused kernels)

    def __post_init__(self) -> None:
        HostParams.__post_init__(self)
        if not (isinstance(self.scheduler_sms, int) and self.scheduler_sms >= 0):
            raise ValueError(f"scheduler_sms must be an integer >= 0 (got {self.scheduler_sms!r})")
        if not (isinstance(self.queue_depth, int) and self.queue_depth >= 1):
            raise ValueError(f"queue_depth must be an integer >= 1 (got {self.queue_depth!r})")
        if not (math.isfinite(self.poll_interval_s) and self.poll_interval_s >= 0):
            raise ValueError(f"poll_interval_s must be finite and >= 0 seconds (got {self.poll_interval_s})")
        if self.dispatch not in ("per-seq", "per-step"):
            raise ValueError(f"dispatch must be 'per-seq' or 'per-step' (got {self.dispatch!r})")


@register("execution", "persistent")
class Persistent(HostOverhead, ExecutionPolicy):
    """A resident kernel: fused stages on the SMs it leaves to the model, doorbell and per-item dispatch."""

    Params = PersistentParams

    def reserved_sms(self, sm_count: int) -> int:
        return self.p.scheduler_sms

    def _base(self, seq: KernelSequence, launch: LaunchCosts) -> float:
        gaps = 0.0
        if self.p.fuse_stages and launch.times_include_gap:
            gaps = seq.num_kernels * launch.graph_gap_s
        elif not self.p.fuse_stages and not launch.times_include_gap:
            gaps = -seq.num_kernels * launch.graph_kernel_s
        return seq.total_gpu_s - gaps

    def step_time_one(self, seq: KernelSequence, var: tuple, launch: LaunchCosts) -> tuple[float, int, int]:
        """One step, in Python floats, the same operations in the same order as :meth:`step_times`."""
        base = self._base(seq, launch)
        d = None
        for v, w in seq.var_terms:
            d = var[v] * w + base if d is None else d + var[v] * w
        d = base if d is None else d
        return (d if d > 0.0 else 0.0), 0, 0

    def step_times(self, seq: KernelSequence, var_s: np.ndarray, launch: LaunchCosts) -> StepTiming:
        base = self._base(seq, launch)
        d = None
        for v, w in seq.var_terms:     # column by column, as step_time_one adds them
            d = var_s[:, v] * w + base if d is None else d + var_s[:, v] * w
        if d is None:
            d = np.full(var_s.shape[0], base)
        return StepTiming(duration_s=np.maximum(d, 0.0), launches=0, syncs=0)

    def device_overhead_s(self, num_seqs: int, seq: KernelSequence, launch: LaunchCosts) -> float:
        """Dispatch of the step's work items, and the doorbell of a step fed by the host."""
        items = max(num_seqs, 1) if self.p.dispatch == "per-seq" else 1
        t = items * launch.persistent_item_s
        refills = -(-items // self.p.queue_depth) - 1
        doorbells = refills + (1 if seq.has_prefill else 0)
        if doorbells:
            t += doorbells * (launch.doorbell_s + 0.5 * self.p.poll_interval_s)
        return t
