"""``config``: every preempted request goes where ``replica.preemption_mode`` says (vLLM's
``preemption_mode``: recompute, or swap to CPU memory)."""
from __future__ import annotations

from policies.base import ResidencyPolicy
from policies.registry import register


@register("residency", "config")
class ConfigResidency(ResidencyPolicy):
    """Preempted KV goes where replica.preemption_mode says: recomputed, or swapped to DRAM."""
