"""``cost-aware``: GreedyDual-Size-Frequency (Cherkasova, 1998) with the recompute time a block saves
as its cost: a block's value is ``L + (1 + hits) · recompute_s / bytes`` — the prefill seconds a hit on
it saves per byte it occupies, weighted by how often it was hit — plus the inflation clock ``L`` at
its last access (``L`` rises to the value of each evicted block, so blocks not touched for long age
out). The lowest value goes first. A block deep in a long prompt costs more to recompute (attention
over a longer context), so it is kept over a shallow one hit as often.
"""
from __future__ import annotations

import numpy as np

from policies.base import CacheView, EvictionPolicy
from policies.eviction.ranking import smallest
from policies.registry import register


@register("eviction", "cost-aware")
class CostAware(EvictionPolicy):
    """Evict the lowest (1 + hits) x recompute seconds per byte, aged by GreedyDual's clock."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._t = [-np.inf]         # the clock's history: L was _l[i] from _t[i] on
        self._l = [0.0]

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        at = np.searchsorted(np.asarray(self._t), view.last_access_s(c), side="left") - 1
        value = (np.asarray(self._l)[np.maximum(at, 0)]
                 + (1.0 + view.hits(c)) * view.recompute_s(c) / view.bytes_per_block)
        got = smallest(value, num_blocks)
        top = float(value[got].max()) if got.shape[0] else self._l[-1]
        if top > self._l[-1]:
            self._t.append(now)
            self._l.append(top)
        return c[got]
