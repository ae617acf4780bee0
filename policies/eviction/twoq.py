"""``2q``: the simplified 2Q of Johnson & Shasha (VLDB 1994) over one tier's blocks.

A1in holds blocks that arrived and were not hit since (first in, first out); Am holds blocks hit at
least once, and blocks whose key was in the ghost list A1out when they arrived (least recently used
first). A1out remembers the keys recently evicted from A1in (half the tier's capacity). While A1in holds
more than a quarter of the tier's capacity its oldest block goes (its key into A1out), else Am's least
recently used. One-hit prompts thus pass through A1in without flushing the blocks that get reused.
Arrivals are noticed at the next eviction, among the blocks then evictable.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from policies.base import CacheView, EvictionPolicy
from policies.registry import register

K_IN, K_OUT = 0.25, 0.5


@register("eviction", "2q")
class TwoQ(EvictionPolicy):
    """Scan-resistant: once-seen blocks queue in A1in (FIFO); reused ones live in Am (LRU)."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.a1out: OrderedDict[int, None] = OrderedDict()
        self.reborn: set[int] = set()      # keys that arrived while in A1out: they belong to Am
        self._seen_s = -np.inf

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        c = view.candidates()
        cap = max(view.num_blocks, 1)
        keys = view.key(c)
        ins = view.inserted_s(c)
        new = ins > self._seen_s
        if new.any():
            for k in keys[new].tolist():
                if k in self.a1out:
                    del self.a1out[k]
                    self.reborn.add(k)
            self._seen_s = float(ins[new].max())
        am = (view.hits(c) > 0) | np.fromiter((k in self.reborn for k in keys.tolist()), dtype=bool,
                                              count=keys.shape[0])
        a1 = np.flatnonzero(~am)
        a1 = a1[np.argsort(ins[a1], kind="stable")]          # A1in: arrival order
        m = np.flatnonzero(am)                               # Am: the view's LRU order
        out = np.empty(num_blocks, dtype=np.int64)
        i1 = im = 0
        k_in = K_IN * cap
        for j in range(num_blocks):
            if i1 < a1.shape[0] and (a1.shape[0] - i1 > k_in or im >= m.shape[0]):
                out[j] = a1[i1]
                i1 += 1
            else:
                out[j] = m[im]
                im += 1
        for k in keys[a1[:i1]].tolist():
            self.a1out[k] = None
        for k in keys[m[:im]].tolist():
            self.reborn.discard(k)
        while len(self.a1out) > K_OUT * cap:
            self.a1out.popitem(last=False)
        return c[out]
