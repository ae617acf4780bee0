"""Host-side storage tiers: DRAM (capacity and bandwidth) and one NVMe drive per replica.

KV capacity in these tiers is owned by the block pools (``sim.memory``); this module owns their
bandwidth: NVMe reads and writes are separate channels (a drive serves both at once, each at its own
sequential rate), and DRAM bandwidth is a channel that host-side copies would queue on.
"""
from __future__ import annotations

import simpy

from sim.hardware.links import Channel
from sim.specs import ServerSpec


class HostDRAM:
    def __init__(self, env: simpy.Environment, name: str, spec: ServerSpec) -> None:
        self.capacity_bytes = spec.dram_bytes
        self.channel = Channel(env, f"{name}.dram", spec.dram_bandwidth_bytes_per_s, 0.0)


class NVMeDrive:
    def __init__(self, env: simpy.Environment, name: str, spec: ServerSpec) -> None:
        nv = spec.nvme
        self.capacity_bytes = nv.capacity_bytes
        self.read = Channel(env, f"{name}.nvme_read", nv.read_bandwidth_bytes_per_s, nv.latency_s)
        self.write = Channel(env, f"{name}.nvme_write", nv.write_bandwidth_bytes_per_s, nv.latency_s)
