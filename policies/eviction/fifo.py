"""``fifo``: first in, first out — the block whose content arrived in the tier earliest goes first."""
from __future__ import annotations

from policies.base import CacheView, EvictionPolicy
from policies.eviction.ranking import smallest
from policies.registry import register


@register("eviction", "fifo")
class FIFO(EvictionPolicy):
    """Evict the block that arrived in the tier first (insertion order; hits do not count)."""

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        return c[smallest(view.inserted_s(c), num_blocks)]
