"""``lfu``: least frequently used — fewest hits since the block arrived in the tier, then least
recently used (Mooncake's LFUCache baseline)."""
from __future__ import annotations

from policies.base import CacheView, EvictionPolicy
from policies.eviction.ranking import smallest
from policies.registry import register


@register("eviction", "lfu")
class LFU(EvictionPolicy):
    """Evict the block with the fewest hits since it arrived; ties least recently used first."""

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        return c[smallest(view.hits(c), num_blocks)]
