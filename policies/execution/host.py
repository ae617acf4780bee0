"""The engine's per-step host work, shared by every execution mode: scheduling and input preparation.

Before each step an engine's host schedules the batch (queues, block tables, KV allocation) and builds
the step's input tensors; after it, it commits the sampled tokens. The time grows with the batch::

    host_s = host_step_s + host_per_seq_s * sequences + host_per_token_s * tokens

*Serial* (``host_overlap = false``, what a synchronous engine loop does): the GPU waits for it, so a
step takes ``gpu + host_s``. *Overlapped* (``host_overlap = true``: asynchronous scheduling, vLLM's
``--async-scheduling``, SGLang's overlap scheduler): the host prepares step n+1 while the GPU runs step
n, so in steady state a step takes ``max(gpu, host_s + busy)``, where ``busy`` is the host time the
mode itself spends issuing the step (an eager engine's kernel launches, a graph launch; nothing for a
resident kernel) and cannot overlap.

Defaults are 0 (the shipped runs and goldens are unchanged). ``host = "reference-h200"`` takes the
coefficients fitted to the reference server's measured steps on an H200 (``HOST_PROFILES``; the
server's host time per step, ``host_s + post_s``, of 75,757 steps in the eight cases of
``calibration/tables/h200/e2e/run1`` and ``run2``; least squares, median absolute residual 55 us; the
two leases' intercepts differ, 123 and 80 us; ``python -m calibration.host_fit`` refits them). For
comparison, vLLM 0.5.3 spent 29 % of its time scheduling serving Llama-3-8B on one H100 (vLLM blog,
"vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency Reduction", 2024-09-05), which its
asynchronous output processing and multi-step scheduling then hid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.base import KernelSequence, LaunchCosts

# name -> (host_step_s, host_per_seq_s, host_per_token_s); see the module docstring for the fit
HOST_PROFILES: dict[str, tuple[float, float, float]] = {
    "reference-h200": (101.3e-6, 8.32e-6, 0.1298e-6),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HostParams:
    """The host-overhead parameters every execution mode takes (see the module docstring)."""

    host: str = ""                  # a calibrated profile (HOST_PROFILES), or "" for the coefficients below
    host_step_s: float = 0.0        # fixed host seconds per step
    host_per_seq_s: float = 0.0     # host seconds per sequence in the step
    host_per_token_s: float = 0.0   # host seconds per token (prefill chunk tokens and decode tokens)
    host_overlap: bool = False      # True: asynchronous scheduling (the step takes max(gpu, host))

    def __post_init__(self) -> None:
        for key in ("host_step_s", "host_per_seq_s", "host_per_token_s"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{key} must be finite and >= 0 seconds (got {v})")
        if self.host and self.host not in HOST_PROFILES:
            raise ValueError(f"host: unknown host profile {self.host!r} (known: {', '.join(HOST_PROFILES)}; or "
                             f"leave it empty and set host_step_s, host_per_seq_s, host_per_token_s)")
        if self.host and (self.host_step_s or self.host_per_seq_s or self.host_per_token_s):
            raise ValueError(f"host = {self.host!r} sets the coefficients; leave host_step_s, host_per_seq_s and "
                             f"host_per_token_s at 0 (or leave host empty and set them)")

    def coefficients(self) -> tuple[float, float, float]:
        if self.host:
            return HOST_PROFILES[self.host]
        return self.host_step_s, self.host_per_seq_s, self.host_per_token_s


class HostOverhead:
    """``with_step_overhead`` for an execution policy whose ``Params`` derive from :class:`HostParams`.

    A policy says what the host spends issuing a step (:meth:`host_busy_s`) and what a step waits for
    on the device outside its kernels (:meth:`device_overhead_s`: a resident kernel's doorbell and
    dispatch). Works on a float (one step) and on an array (a run) with the same operations in the
    same order, so both round alike.
    """

    def host_busy_s(self, seq: KernelSequence, launch: LaunchCosts) -> float:
        return 0.0

    def device_overhead_s(self, num_seqs: int, seq: KernelSequence, launch: LaunchCosts) -> float:
        return 0.0

    def with_step_overhead(self, durations, num_seqs: int, num_tokens: int, seq: KernelSequence,
                           launch: LaunchCosts):
        d = durations
        extra = self.device_overhead_s(num_seqs, seq, launch)
        if extra:
            d = d + extra
        a, b, c = self.p.coefficients()
        if not (a or b or c):
            return d
        host = a + b * num_seqs + c * num_tokens
        if not self.p.host_overlap:
            return d + host
        floor = host + self.host_busy_s(seq, launch)
        return np.maximum(d, floor) if isinstance(d, np.ndarray) else max(d, floor)
