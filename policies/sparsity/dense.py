"""``dense``: full attention; every decode query reads its whole KV."""
from __future__ import annotations

import numpy as np

from policies.registry import register


@register("sparsity", "dense")
class Dense:
    """Full attention over the whole context; no selection step."""

    identity = True   # lets the replica skip per-sequence bookkeeping on the hot path

    def attended_tokens(self, context: np.ndarray) -> np.ndarray:
        return context

    def selection_tokens(self, context: np.ndarray) -> np.ndarray:
        return np.zeros_like(context)
