"""The block pool: sole owner of one tier's KV blocks, with reference counts and a prefix cache.

Invariants (checked by :meth:`BlockPool.check`):
  * every block is exactly one of FREE, CACHED or ACTIVE, and free + cached + active == num_blocks;
  * FREE   ⇔ refcount 0, no prefix key, on the free stack;
  * CACHED ⇔ refcount 0, registered under a prefix key, in the LRU order (evictable);
  * ACTIVE ⇔ refcount > 0 (held by one or more requests, or by a transfer in flight); an active block
    may carry a prefix key so later requests can share it, and it is never evicted;
  * LOCKED ⊆ ACTIVE: blocks a transfer is reading or writing (on a link), with a count per block (a
    prefix block two swapping requests share is locked twice); ``num_locked`` sums the counts.
Allocation never raises on shortage: it returns ``None`` and the caller preempts, swaps or waits.
Allocation takes FREE blocks first (most recently freed first), then evicts CACHED blocks chosen by the
eviction policy. A request's blocks are released tail-first, so under LRU the end of a shared prefix
is evicted before its head.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import islice

import numpy as np

FREE, CACHED, ACTIVE = 0, 1, 2


class BlockPool:
    __slots__ = ("tier", "num_blocks", "block_size", "bytes_per_block", "refcount", "key",
                 "last_access", "hits", "_free", "_lru", "_by_key", "_locks", "num_locked", "num_evicted",
                 "num_hits")

    def __init__(self, tier: str, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"{tier}: num_blocks must be >= 0")
        self.tier = tier
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.bytes_per_block = int(bytes_per_block)
        self.refcount = np.zeros(self.num_blocks, dtype=np.int32)
        self.key = np.full(self.num_blocks, -1, dtype=np.int64)
        self.last_access = np.zeros(self.num_blocks, dtype=np.float64)
        self.hits = np.zeros(self.num_blocks, dtype=np.int32)
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # stack: block 0 pops first
        self._lru: OrderedDict[int, None] = OrderedDict()                  # cached blocks, LRU first
        self._by_key: dict[int, int] = {}
        self._locks = np.zeros(self.num_blocks, dtype=np.int32)
        self.num_locked = 0
        self.num_evicted = 0
        self.num_hits = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks with no content (not counting evictable cached blocks)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can obtain: free plus evictable cached."""
        return len(self._free) + len(self._lru)

    @property
    def num_active(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_keys(self) -> int:
        """Blocks findable in the prefix cache (cached, or active and registered)."""
        return len(self._by_key)

    def state(self, block: int) -> int:
        if self.refcount[block] > 0:
            return ACTIVE
        return CACHED if block in self._lru else FREE

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int, now: float,
                 choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None
                 ) -> list[int] | None:
        """``n`` blocks with refcount 1, or ``None`` (nothing changes) if fewer are available.

        ``choose_victims(pool, k, now)`` picks ``k`` cached blocks to evict when the free stack runs
        short; without it the least recently used are taken.
        """
        if n <= 0:
            return []
        free = self._free
        if n > len(free) + len(self._lru):
            return None
        take = min(n, len(free))
        out = free[len(free) - take:]
        del free[len(free) - take:]
        out.reverse()
        rest = n - take
        if rest:
            victims = (choose_victims(self, rest, now) if choose_victims is not None
                       else self.lru_order(rest))
            victims = [int(b) for b in victims]
            if len(victims) != rest or len(set(victims)) != rest:
                raise RuntimeError(f"{self.tier}: eviction policy returned {len(victims)} distinct-or-not "
                                   f"blocks, {rest} needed")
            lru = self._lru
            for b in victims:
                if b not in lru:
                    raise RuntimeError(f"{self.tier}: eviction policy chose block {b}, which is not "
                                       f"evictable (state {self.state(b)})")
            # checked first, so a bad choice changes nothing; then one pass per structure
            for b in victims:
                del lru[b]
            by_key = self._by_key
            for k in self.key[victims].tolist():
                del by_key[k]
            self.key[victims] = -1
            self.num_evicted += rest
            out.extend(victims)
        idx = np.asarray(out, dtype=np.int64)
        self.refcount[idx] = 1
        self.last_access[idx] = now
        return out

    def allocate_one(self, now: float,
                     choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None
                     ) -> int:
        """One block, or -1. The common decode case, kept free of list/array allocation."""
        if self._free:
            b = self._free.pop()
        elif self._lru:
            if choose_victims is None:
                b = next(iter(self._lru))
            else:
                chosen = list(choose_victims(self, 1, now))
                if len(chosen) != 1 or chosen[0] not in self._lru:
                    raise RuntimeError(f"{self.tier}: eviction policy returned {chosen}, not one "
                                       f"evictable block")
                b = chosen[0]
            del self._lru[b]
            del self._by_key[int(self.key[b])]
            self.key[b] = -1
            self.num_evicted += 1
        else:
            return -1
        self.refcount[b] = 1
        self.last_access[b] = now
        return b

    def take_free(self, n: int, times: np.ndarray) -> list[int]:
        """``n`` blocks from the free stack, in the order ``n`` calls of :meth:`allocate_one` would
        return them (no eviction: the caller checked ``n <= num_free``); ``times[k]`` is the k-th's
        allocation time."""
        free = self._free
        got = free[len(free) - n:]
        del free[len(free) - n:]
        got.reverse()
        self.refcount[got] = 1
        self.last_access[got] = times
        return got

    def release(self, blocks: Sequence[int], now: float) -> int:
        """Drop one reference to each block (tail first). Unreferenced blocks with a prefix key become
        CACHED (most recently used end), the others FREE. Returns how many became unreferenced."""
        n = len(blocks)
        if n == 0:
            return 0
        if not self._by_key:
            # Blocks are shared only through prefix hits, and a hit block keeps its key while it is
            # held; with no key in the pool every active block has exactly one holder.
            self.refcount[blocks] = 0
            self._free.extend(reversed(blocks))
            return n
        if n < 8:
            return self._release_few(blocks, now)
        idx = np.asarray(blocks, dtype=np.int64)[::-1]          # tail first; a request never holds
        rc = self.refcount                                      # one block twice
        left = rc[idx] - 1
        if (left < 0).any():
            raise RuntimeError(f"{self.tier}: block {int(idx[left < 0][0])} released more often than held")
        rc[idx] = left
        gone = idx[left == 0]
        if gone.size:
            keyed = self.key[gone] >= 0
            cached = gone[keyed]
            if cached.size:
                lru = self._lru
                for b in cached.tolist():
                    lru[b] = None
                self.last_access[cached] = now
            if cached.size != gone.size:
                self._free.extend(gone[~keyed].tolist())
        return int(gone.size)

    def _release_few(self, blocks: Sequence[int], now: float) -> int:
        freed = 0
        rc = self.refcount
        keys = self.key
        for b in reversed(blocks):
            c = rc[b] - 1
            if c < 0:
                raise RuntimeError(f"{self.tier}: block {b} released more often than held")
            rc[b] = c
            if c == 0:
                freed += 1
                if keys[b] >= 0:
                    self._lru[b] = None
                    self.last_access[b] = now
                else:
                    self._free.append(b)
        return freed

    def retain(self, block: int, now: float) -> None:
        """Take one more reference to a block found in the prefix cache (a hit)."""
        if self.refcount[block] == 0:
            if block not in self._lru:
                raise RuntimeError(f"{self.tier}: block {block} is free; it cannot be retained")
            del self._lru[block]
        self.refcount[block] += 1
        self.last_access[block] = now
        self.hits[block] += 1
        self.num_hits += 1

    # ------------------------------------------------------------------ prefix cache
    def register(self, block: int, key: int) -> bool:
        """Make an active block findable under ``key``. False if another block already holds it
        (the duplicate stays unregistered and becomes FREE when released)."""
        return self.register_many([block], [key]) == 1

    def register_many(self, blocks: Sequence[int], keys: Sequence[int]) -> int:
        """:meth:`register` for each (block, key) pair in order; returns how many were registered."""
        by_key = self._by_key
        done_b, done_k = [], []
        for b, k, cur in zip(blocks, keys, self.key[list(blocks)].tolist()):
            if cur < 0 and k not in by_key:
                by_key[k] = b
                done_b.append(b)
                done_k.append(k)
        if done_b:
            self.key[done_b] = done_k
        return len(done_b)

    def lookup(self, key: int) -> int:
        return self._by_key.get(key, -1)

    def count_prefix(self, keys: np.ndarray, limit: int) -> int:
        """How many of ``keys[:limit]`` are findable, counting from the first until one is missing."""
        lookup = self._by_key
        if not lookup:
            return 0
        n = 0
        while n < limit:                       # converted a slice at a time: hits often end early
            for k in keys[n:min(n + 32, limit)].tolist():
                if k not in lookup:
                    return n
                n += 1
        return n

    def num_unreferenced(self, keys: np.ndarray) -> int:
        """How many of the (findable) ``keys`` name a cached block nobody holds: a request that takes
        them makes them unavailable to allocations."""
        lookup = self._by_key
        return int((self.refcount[[lookup[k] for k in keys.tolist()]] == 0).sum())

    def retain_keys(self, keys: np.ndarray, now: float) -> list[int]:
        """:meth:`retain` the blocks findable under ``keys`` (all must be); returns them in order."""
        blocks = [self._by_key[k] for k in keys.tolist()]
        for b in blocks:
            self.retain(b, now)
        return blocks

    # ------------------------------------------------------------------ transfers
    def lock(self, blocks: Sequence[int]) -> None:
        """Mark active blocks as on a link (a transfer reads or writes them). A request holds each of
        its blocks once, so ``blocks`` has no repeats."""
        if not len(blocks):
            return
        idx = np.asarray(blocks, dtype=np.int64)
        if (self.refcount[idx] <= 0).any():
            raise RuntimeError(f"{self.tier}: only active blocks can be locked for a transfer")
        self._locks[idx] += 1
        self.num_locked += len(blocks)

    def unlock(self, blocks: Sequence[int]) -> None:
        if not len(blocks):
            return
        idx = np.asarray(blocks, dtype=np.int64)
        if (self._locks[idx] <= 0).any():
            raise RuntimeError(f"{self.tier}: unlocking blocks that are not locked")
        self._locks[idx] -= 1
        self.num_locked -= len(blocks)

    def lru_order(self, limit: int) -> list[int]:
        return list(islice(self._lru, limit))

    def drop_cache(self) -> None:
        """Forget every cached block (they become FREE); active blocks keep their keys."""
        for b in self._lru:
            del self._by_key[int(self.key[b])]
            self.key[b] = -1
            self._free.append(b)
        self._lru.clear()

    # ------------------------------------------------------------------ checking
    def check(self) -> None:
        """Assert every invariant in the module docstring (tests call this; O(num_blocks))."""
        n = self.num_blocks
        free = set(self._free)
        cached = set(self._lru)
        assert len(free) == len(self._free), f"{self.tier}: duplicate block on the free stack"
        assert not (free & cached), f"{self.tier}: a block is both free and cached"
        active = {b for b in range(n) if self.refcount[b] > 0}
        assert not (active & (free | cached)), f"{self.tier}: a referenced block is free or cached"
        assert len(free) + len(cached) + len(active) == n, f"{self.tier}: blocks not conserved"
        assert np.all(self.refcount >= 0)
        for b in free:
            assert self.key[b] == -1, f"{self.tier}: free block {b} has a key"
        for b in cached:
            assert self.key[b] >= 0 and self._by_key.get(int(self.key[b])) == b
        for key, b in self._by_key.items():
            assert self.key[b] == key
        assert int(self._locks.sum()) == self.num_locked, f"{self.tier}: locked count drifted"
        assert (self.refcount[self._locks > 0] > 0).all(), f"{self.tier}: a locked block is not active"
