"""``host-launched``: the host launches every kernel of the step, then synchronises once.

The host spends ``cpu_overhead_s`` on scheduling and input preparation (plus the engine's own
per-step host work when the cost table measured it), then issues kernel j after the host time of
kernels 0..j (each kernel's share of its op call's measured framework cost, or a uniform
``dispatch_s``); the GPU starts a kernel when it is issued and the previous one
has finished. So a step is launch-bound where kernels are shorter than their dispatch and GPU-bound
where they are longer, with queued work draining through short kernels. The step ends when both the
host has issued everything and the GPU has finished, plus one synchronisation round trip.

The engine's scheduling and input preparation per step (``host``, ``host_step_s``, ...; see
``policies.execution.host``) come on top, serial or overlapped with the previous step's GPU work; the
kernel launches themselves are host work that never overlaps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.base import ExecutionPolicy, KernelSequence, LaunchCosts, StepTiming
from policies.execution.host import HostOverhead, HostParams
from policies.registry import register
from sim.jit import numba


@numba.njit(cache=True, nogil=True)
def _pipeline(gpu_s, var_index, var_share, var_s, host_s, cpu0, sync):
    k_steps = var_s.shape[0]
    n = gpu_s.shape[0]
    out = np.empty(k_steps)
    for k in range(k_steps):
        t_gpu = 0.0
        issue = cpu0
        for j in range(n):
            issue += host_s[j]
            g = gpu_s[j]
            v = var_index[j]
            if v >= 0:
                g += var_s[k, v] * var_share[j]
            start = issue if issue > t_gpu else t_gpu
            t_gpu = start + g
        end = t_gpu if t_gpu > issue else issue
        out[k] = end + sync
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLaunchedParams(HostParams):
    cpu_overhead_s: float = 0.0   # engine host work per step before the first launch
    dispatch_s: float | None = None   # a uniform per-kernel host cost instead of the cost table's
                                      # measured per-op host costs (None: use those)

    def __post_init__(self) -> None:
        HostParams.__post_init__(self)
        if not (math.isfinite(self.cpu_overhead_s) and self.cpu_overhead_s >= 0):
            raise ValueError(f"cpu_overhead_s must be finite and >= 0 (got {self.cpu_overhead_s})")
        if self.dispatch_s is not None and not (math.isfinite(self.dispatch_s) and self.dispatch_s >= 0):
            raise ValueError(f"dispatch_s must be finite and >= 0 seconds per kernel, or left out to use the "
                             f"cost table's measured host costs (got {self.dispatch_s})")


@register("execution", "host-launched")
class HostLaunched(HostOverhead, ExecutionPolicy):
    """Eager execution: one host launch per kernel, one sync per step (launch/GPU overlap modelled)."""

    Params = HostLaunchedParams

    def __init__(self, params: HostLaunchedParams | None = None) -> None:
        super().__init__(params)
        self._uniform: dict[int, np.ndarray] = {}

    def step_times(self, seq: KernelSequence, var_s: np.ndarray, launch: LaunchCosts) -> StepTiming:
        if self.p.dispatch_s is not None or seq.host_s is None:
            dispatch = self.p.dispatch_s if self.p.dispatch_s is not None else launch.dispatch_s
            host = self._uniform.get(seq.num_kernels)
            if host is None or host[0] != dispatch:
                host = self._uniform[seq.num_kernels] = np.full(seq.num_kernels, dispatch)
            lead = 0.0
        else:
            host, lead = seq.host_s, seq.lead_s
        d = _pipeline(seq.gpu_s, seq.var_index, seq.var_share, np.ascontiguousarray(var_s, dtype=np.float64),
                      host, self.p.cpu_overhead_s + lead, launch.sync_s)
        return StepTiming(duration_s=d, launches=seq.num_kernels, syncs=1)

    def host_busy_s(self, seq: KernelSequence, launch: LaunchCosts) -> float:
        """The host's own issue time per step: every launch, and the per-step work before the first."""
        if self.p.dispatch_s is not None or seq.host_s is None:
            dispatch = self.p.dispatch_s if self.p.dispatch_s is not None else launch.dispatch_s
            return self.p.cpu_overhead_s + dispatch * seq.num_kernels
        return self.p.cpu_overhead_s + seq.host_total_s
