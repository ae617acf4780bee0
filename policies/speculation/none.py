"""``none``: plain autoregressive decoding, one token per step per request."""
from __future__ import annotations

from policies.base import DraftPlan, SpeculationPolicy
from policies.registry import register

_NO_DRAFT = DraftPlan()


@register("speculation", "none")
class NoSpeculation(SpeculationPolicy):
    """No drafting: every decode step verifies nothing and emits exactly one token."""

    emits_one_token = True   # lets the replica advance runs of decode steps together

    def propose(self, decodes, now: float, view) -> DraftPlan:
        return _NO_DRAFT

    def accepted(self, rng, req, num_draft: int) -> int:
        return 0
