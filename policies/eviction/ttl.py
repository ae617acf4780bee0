"""``ttl``: Continuum-style time-to-live (Li et al., "Continuum: Efficient and Robust Multi-Turn LLM
Agent Scheduling with KV Cache Time-to-Live", 2025) on a block cache.

When a turn ends its KV is pinned for ``ttl_s``: a block released (or last hit) less than ``ttl_s``
ago is pinned. Unpinned blocks are evicted first, least recently used first. When only pinned blocks
are left, the most recently pinned go first: a later turn does not push out an earlier one that is
still inside its TTL (Continuum keeps a pinned program's KV and does not pin more than fits). Under
plain LRU a long burst of new prompts flushes every earlier turn before its follow-up arrives; here the
turns pinned first survive their TTL, so a follow-up that comes within it finds its history.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import CacheView, EvictionPolicy
from policies.registry import register


@dataclass(frozen=True, slots=True, kw_only=True)
class TTLParams:
    ttl_s: float = 120.0        # the Mooncake conversation trace's median gap between turns is ~150 s

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 (got {self.ttl_s})")


@register("eviction", "ttl")
class TTL(EvictionPolicy):
    """Keep a finished turn's KV for ttl_s: expired blocks LRU first, then pinned ones newest first."""

    Params = TTLParams
    time_dependent = True

    def evict_cached(self, view: CacheView, num_blocks: int, now: float):
        head = np.asarray(view.lru_order(num_blocks), dtype=np.int64)
        # the LRU list is in last-access order, so the expired blocks are a prefix of it
        expired = view.last_access_s(head) < now - self.p.ttl_s
        e = num_blocks if expired.all() else int(np.argmin(expired))
        if e == num_blocks:
            return head
        return np.concatenate([head[:e], view.mru_order(num_blocks - e)])
