"""``arc``: the Adaptive Replacement Cache (Megiddo & Modha, FAST 2003) over one tier's blocks.

T1 holds the cached blocks not hit since they arrived, T2 those hit at least once, each in LRU order;
ghost lists B1 and B2 remember the keys recently evicted from each (at most the tier's capacity in
all). A block arriving whose key is in B1 means T1 was too small: its target size ``p`` grows by
max(1, |B2| / |B1|); one whose key is in B2 shrinks it by max(1, |B1| / |B2|). Eviction takes T1's LRU
block while T1 holds more than ``p`` blocks, else T2's. Arrivals are noticed at the next eviction,
among the blocks then evictable (a block held by a request since it arrived is noticed later).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from policies.base import CacheView, EvictionPolicy
from policies.registry import register


def _trim(ghost: OrderedDict, limit: int) -> None:
    while len(ghost) > limit:
        ghost.popitem(last=False)


@register("eviction", "arc")
class ARC(EvictionPolicy):
    """Adaptive replacement: recency (T1) versus frequency (T2), balanced by ghost hits."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.p = 0.0
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._seen_s = -np.inf

    def _adapt(self, view: CacheView, c: np.ndarray, cap: int) -> None:
        ins = view.inserted_s(c)
        new = ins > self._seen_s
        if not new.any():
            return
        for k in view.key(c[new]).tolist():
            if k in self.b1:
                self.p = min(float(cap), self.p + max(1.0, len(self.b2) / len(self.b1)))
                del self.b1[k]
            elif k in self.b2:
                self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))
                del self.b2[k]
        self._seen_s = float(ins[new].max())

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        cap = max(view.num_blocks, 1)
        self._adapt(view, c, cap)
        hot = view.hits(c) > 0
        t1, t2 = c[~hot], c[hot]
        out = np.empty(num_blocks, dtype=np.int64)
        i1 = i2 = 0
        for j in range(num_blocks):
            if i1 < t1.shape[0] and (t1.shape[0] - i1 > self.p or i2 >= t2.shape[0]):
                out[j] = t1[i1]
                i1 += 1
            else:
                out[j] = t2[i2]
                i2 += 1
        keys = view.key(out)
        from1 = np.isin(out, t1[:i1])
        for k in keys[from1].tolist():
            self.b1[k] = None
        for k in keys[~from1].tolist():
            self.b2[k] = None
        _trim(self.b1, cap)
        _trim(self.b2, max(cap - len(self.b1), 0))
        return out
