"""``cuda-graph``: the whole step replays as one captured CUDA graph.

One host launch per step. Kernel times from a calibrated table already include the gap between
consecutive kernels (they were timed back to back); pure GPU times (the roofline backend) get the
measured per-node cost ``graph_kernel_s`` added for every kernel. The step costs the host's per-step work,
the graph launch, the kernels and one synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import ExecutionPolicy, KernelSequence, LaunchCosts, StepTiming
from policies.registry import register


@dataclass(frozen=True, slots=True, kw_only=True)
class CudaGraphParams:
    cpu_overhead_s: float = 0.0   # engine host work per step (scheduling, input preparation)

    def __post_init__(self) -> None:
        if self.cpu_overhead_s < 0:
            raise ValueError(f"cpu_overhead_s must be >= 0 (got {self.cpu_overhead_s})")


@register("execution", "cuda-graph")
class CudaGraph(ExecutionPolicy):
    """One graph launch per step; per-node gaps from calibration."""

    Params = CudaGraphParams

    def _base(self, seq: KernelSequence, launch: LaunchCosts) -> float:
        gaps = 0.0 if launch.times_include_gap else seq.num_kernels * launch.graph_kernel_s
        return self.p.cpu_overhead_s + launch.graph_launch_s + seq.total_gpu_s + gaps + launch.sync_s

    def step_time_one(self, seq: KernelSequence, var: tuple, launch: LaunchCosts) -> tuple[float, int, int]:
        """One step, in Python floats: the same operations in the same order as :meth:`step_times`,
        so a single step and a run of steps round identically."""
        base = self._base(seq, launch)
        d = None
        for v, w in seq.var_terms:
            d = var[v] * w + base if d is None else d + var[v] * w
        return (base if d is None else d), 1, 1

    def step_times(self, seq: KernelSequence, var_s: np.ndarray, launch: LaunchCosts) -> StepTiming:
        base = self._base(seq, launch)
        # column by column (not a matrix product) so one step and a run of steps round identically
        d = None
        for v, w in seq.var_terms:
            d = var_s[:, v] * w + base if d is None else d + var_s[:, v] * w
        if d is None:
            d = np.full(var_s.shape[0], base)
        return StepTiming(duration_s=d, launches=1, syncs=1)
