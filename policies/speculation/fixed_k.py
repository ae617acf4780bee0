"""``fixed-k``: every decode drafts the same ``k`` tokens in every step (vLLM's and SGLang's
``num_speculative_tokens``), with the drafter and acceptance model of its parameters
(``policies.speculation.drafting``)."""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import DraftPlan
from policies.registry import register
from policies.speculation.drafting import DraftingParams, DraftingPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedKParams(DraftingParams):
    k: int = 3          # draft tokens per decode per step

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k})")
        self.check(self.k)


@register("speculation", "fixed-k")
class FixedK(DraftingPolicy):
    """k draft tokens per decode per step, verified as one chain."""

    Params = FixedKParams

    def propose(self, decodes, now, view) -> DraftPlan:
        return DraftPlan(draft_tokens=self.depths(len(decodes), self.p.k))
