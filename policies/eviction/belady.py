"""``belady``: the offline optimum (Belady's MIN, 1966) — evict the block whose next use in the trace
is farthest away.

The engine computes, before the run, when every prefix key is next used (``sim.memory.future``); this
policy alone declares ``needs_future`` and reads it through its ranking view. A block never used again
goes first. Ties (blocks of one prefix used next by the same request) go deepest first, so a prefix is
cut from its tail, never its head. It is the bound the online policies are measured against: with
requests admitted in arrival order and one at a time, no policy hits more blocks.
"""
from __future__ import annotations

from policies.base import CacheView, EvictionPolicy
from policies.eviction.ranking import smallest
from policies.registry import register


@register("eviction", "belady")
class Belady(EvictionPolicy):
    """Offline optimum: evict the block whose prefix the trace uses again farthest in the future."""

    needs_future = True

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        return c[smallest(-view.next_use_s(c), num_blocks, tiebreak=-view.position(c))]
