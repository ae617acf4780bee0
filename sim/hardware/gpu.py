"""A replica's GPUs: the SMs the model's kernels may use, and the HBM budget split into weights,
activation workspace and KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """The ``tp`` GPUs of one replica (they run in lockstep). An execution policy may hold back SMs
    for itself (a persistent scheduler's own SMs); the model's kernels get ``sm_share`` of the GPU,
    and the cost backend prices them on that share."""

    def __init__(self, spec: GPUSpec, tp: int, reserved_sms: int = 0) -> None:
        if not 0 <= reserved_sms < spec.sm_count:
            raise ConfigError(f"the execution policy reserves {reserved_sms} of {spec.name}'s {spec.sm_count} SMs; "
                              f"it must leave at least one to the model")
        self.spec = spec
        self.tp = tp
        self.reserved_sms = int(reserved_sms)

    @property
    def sm_share(self) -> float:
        """Fraction of the GPU's SMs the model's kernels run on."""
        return (self.spec.sm_count - self.reserved_sms) / self.spec.sm_count
