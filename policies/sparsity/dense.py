"""``dense``: full attention; every decode query reads its whole KV."""
from __future__ import annotations

import numpy as np

from policies.base import AttentionPlan, SparsityPolicy
from policies.registry import register


@register("sparsity", "dense")
class Dense(SparsityPolicy):
    """Full attention over the whole context; no selection step."""

    is_dense = True   # lets the replica skip per-sequence bookkeeping on the hot path

    def plan(self, context: np.ndarray) -> AttentionPlan:
        return AttentionPlan(tokens_read=context)

    def attended(self, context: np.ndarray) -> np.ndarray:
        return context

    def steady(self) -> bool:
        return True
