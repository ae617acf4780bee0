"""Data links as SimPy resources: each direction of a link is one FIFO channel.

A transfer (``sim.memory.transfers``) queues for its channel, then holds it for ``latency_s + bytes /
bandwidth``. Transfers on
the same channel therefore serialise (they contend); transfers on different channels (H2D vs D2H, or
PCIe vs NVMe) overlap with each other and with compute, which runs in the replica's own process.
"""
from __future__ import annotations

import simpy


class Channel:
    """One direction of a link. Owns its bandwidth and counts the bytes, transfers and busy time it
    carried (updated by the transfer layer, the link's only user)."""

    __slots__ = ("env", "name", "bandwidth_bytes_per_s", "latency_s", "resource", "bytes_moved",
                 "num_transfers", "busy_s", "queued_bytes")

    def __init__(self, env: simpy.Environment, name: str, bandwidth_bytes_per_s: float,
                 latency_s: float) -> None:
        if bandwidth_bytes_per_s <= 0:
            raise ValueError(f"{name}: bandwidth must be > 0")
        self.env = env
        self.name = name
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.latency_s = float(latency_s)
        self.resource = simpy.Resource(env, capacity=1)
        self.bytes_moved = 0
        self.num_transfers = 0
        self.busy_s = 0.0
        self.queued_bytes = 0           # bytes of transfers queued or in flight

    def duration_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s

    @property
    def queue_length(self) -> int:
        return len(self.resource.queue)


class PCIeLink:
    """A GPU's (or a tensor-parallel group's) PCIe link to host memory: H2D and D2H channels.

    With tensor parallelism every GPU moves its own KV shard over its own link at the same time, so
    a group of ``lanes`` GPUs is modelled as one link with ``lanes`` times the bandwidth.
    """

    def __init__(self, env: simpy.Environment, name: str, h2d_bytes_per_s: float, d2h_bytes_per_s: float,
                 latency_s: float, lanes: int = 1) -> None:
        self.h2d = Channel(env, f"{name}.h2d", h2d_bytes_per_s * lanes, latency_s)
        self.d2h = Channel(env, f"{name}.d2h", d2h_bytes_per_s * lanes, latency_s)
