"""A replica's GPUs: the SM pool (a SimPy container, so work can be partitioned across SMs) and the
HBM budget split into weights, activation workspace and KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import simpy

from sim.errors import ConfigError
from sim.specs import GPUSpec, ModelSpec


@dataclass(frozen=True, slots=True)
class HBMBudget:
    """Per-GPU HBM split (bytes). ``kv_bytes`` is what the KV block pool may use."""

    total_bytes: int
    usable_bytes: int
    weight_bytes: int
    activation_bytes: int
    kv_bytes: int


def hbm_budget(gpu: GPUSpec, model: ModelSpec, *, tp: int, utilization: float,
               activation_reserve_bytes: int) -> HBMBudget:
    """Split one GPU's HBM; an impossible split (weights do not fit) is a ConfigError that says what
    would fit."""
    usable = int(gpu.hbm_bytes * utilization)
    weights = -(-model.weight_bytes // tp)
    kv = usable - weights - activation_reserve_bytes
    if kv <= 0:
        need_tp = tp
        while need_tp < 64 and usable - (-(-model.weight_bytes // need_tp)) - activation_reserve_bytes <= 0:
            need_tp *= 2
        hint = (f"; set replica.tensor_parallel_size = {need_tp} or more" if need_tp < 64 else "")
        raise ConfigError(
            f"model {model.name} does not fit on {gpu.name}: {weights / 1e9:.1f} GB of weights per GPU "
            f"(tensor_parallel_size={tp}) + {activation_reserve_bytes / 1e9:.1f} GB activations > "
            f"{usable / 1e9:.1f} GB usable HBM ({gpu.hbm_bytes / 1e9:.1f} GB x "
            f"gpu_memory_utilization {utilization}){hint}")
    return HBMBudget(total_bytes=gpu.hbm_bytes, usable_bytes=usable, weight_bytes=weights,
                     activation_bytes=activation_reserve_bytes, kv_bytes=kv)


class GPUGroup:
    """The ``tp`` GPUs of one replica. ``sms`` holds the SMs of one GPU (all GPUs run in lockstep);
    execution policies take SMs out of it for their own use (e.g. a persistent scheduler)."""

    def __init__(self, env: simpy.Environment, spec: GPUSpec, tp: int) -> None:
        self.spec = spec
        self.tp = tp
        self.sms = simpy.Container(env, capacity=spec.sm_count, init=spec.sm_count)

    @property
    def sm_fraction_available(self) -> float:
        return self.sms.level / self.spec.sm_count
