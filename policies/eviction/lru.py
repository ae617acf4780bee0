"""``lru``: least recently used first, for cached HBM blocks and for swapped requests' DRAM copies."""
from __future__ import annotations

from policies.base import CacheView, EvictionPolicy, SwapView
from policies.registry import register


@register("eviction", "lru")
class LRU(EvictionPolicy):
    """Evict the least recently used cached block; drop the longest-swapped request's DRAM copy."""

    lru_equivalent = True

    def evict_cached(self, view: CacheView, num_blocks: int, now: float) -> list[int]:
        return view.lru_order(num_blocks)

    def drop_swapped(self, view: SwapView, num_blocks: int, now: float) -> list:
        chosen, freed = [], 0
        for req in view.swapped:
            if freed >= num_blocks:
                break
            chosen.append(req)
            freed += view.dram_blocks(req)
        return chosen
