"""The ranking view eviction policies get of one tier's evictable blocks (``policies.base.CacheView``).

Every per-block quantity a policy may rank by, read-only: LRU order (and MRU order), last access,
hits since the block's content arrived, when it arrived in this tier, its position in its prompt, the
request that last held it and that request's session, the recompute time its tokens would cost, and —
only for a policy that declares ``needs_future`` — when the trace next uses it. Accessors take one block
id (and return a number) or an array of ids (and return a fresh array), so ranking policies stay
vectorised.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sim.memory.block_pool import BlockPool

if TYPE_CHECKING:
    from sim.memory.tiers import TieredKV


def _read(arr: np.ndarray, blocks, cast):
    if np.ndim(blocks) == 0:
        return cast(arr[int(blocks)])
    return arr[np.asarray(blocks, dtype=np.int64)]      # fancy indexing: a copy the policy may keep


class PoolCacheView:
    """The evictable blocks of one pool, for eviction policies (read-only)."""

    __slots__ = ("_pool", "_kv", "tier")

    def __init__(self, pool: BlockPool, kv: TieredKV | None = None) -> None:
        self._pool = pool
        self._kv = kv
        self.tier = pool.tier

    @property
    def num_cached(self) -> int:
        return self._pool.num_cached

    @property
    def num_blocks(self) -> int:
        """The tier's capacity in blocks."""
        return self._pool.num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self._pool.bytes_per_block

    def lru_order(self, limit: int) -> np.ndarray:
        """Up to ``limit`` evictable blocks, least recently used first."""
        return self._pool.lru_array(limit)

    def candidates(self) -> np.ndarray:
        """Every evictable block, least recently used first."""
        return self._pool.lru_array(self._pool.num_cached)

    def mru_order(self, limit: int) -> np.ndarray:
        """Up to ``limit`` evictable blocks, most recently used first."""
        return self._pool.mru_array(limit)

    def last_access_s(self, block):
        return _read(self._pool.last_access, block, float)

    def hits(self, block):
        """Hits on the block since its content arrived in this tier."""
        return _read(self._pool.hits, block, int)

    def inserted_s(self, block):
        """When the block's content (its prefix key) arrived in this tier."""
        return _read(self._pool.inserted_s, block, float)

    def position(self, block):
        """The block's index in its prompt (0 = the first block of the prefix)."""
        return _read(self._pool.position, block, int)

    def owner(self, block):
        """The trace index of the request that last held the block (-1 if none did: a copy)."""
        return _read(self._pool.owner, block, int)

    def key(self, block):
        return _read(self._pool.key, block, int)

    def session(self, block):
        """The session id of the block's last holder (None when the trace has no sessions)."""
        owners = np.atleast_1d(self.owner(block))
        sessions = self._kv.sessions if self._kv is not None else None
        if sessions is None:
            out = np.full(owners.shape[0], None, dtype=object)
        else:
            out = np.where(owners >= 0, sessions[np.maximum(owners, 0)], None)
        return out[0] if np.ndim(block) == 0 else out

    def recompute_s(self, block):
        """Prefill seconds the block's tokens cost to recompute at its position in its prompt (the
        marginal time of one more block of prefill at that context)."""
        pos = np.atleast_1d(self.position(block))
        out = self._kv.block_recompute_s(pos) if self._kv is not None else np.zeros(pos.shape[0])
        return float(out[0]) if np.ndim(block) == 0 else out

    def next_use_s(self, block):
        """When the trace next uses the block's prefix (inf: never). Only for a policy that declares
        ``needs_future`` (the engine computes it offline from the whole trace)."""
        futures = self._kv.futures if self._kv is not None else None
        if futures is None:
            raise RuntimeError("next_use_s: only an eviction policy that declares needs_future = True "
                               "sees the trace's future")
        out = futures.next_use_of_blocks(self._pool, np.atleast_1d(block))
        return float(out[0]) if np.ndim(block) == 0 else out
