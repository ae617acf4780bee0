"""The block pool against a trivially correct model (Hypothesis RuleBasedStateMachine).

The model keeps, per block, a reference count and an optional key, and the cached blocks in LRU
order; the pool must agree after every operation and keep its own invariants. Besides allocation,
release, registration and hits, the rules cover what the KV tiers use: allocating a decode run's
blocks in one call, discarding blocks (a promoted block leaving an exclusive tier), forgetting cached
keys (a lower copy of a block recomputed above), and locking blocks for a load that is not ready."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sim.memory.block_pool import BlockPool

N = 12


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool("hbm", N, 16, 1024)
        self.rc = [0] * N
        self.key = [None] * N
        self.lru: list[int] = []          # cached blocks, least recent first
        self.held: list[list[int]] = []   # block lists owned by "requests"
        self.t = 0.0

    def _avail(self):
        return sum(1 for b in range(N) if self.rc[b] == 0)

    @rule(n=st.integers(0, N + 2))
    def allocate(self, n):
        self.t += 1
        got = self.pool.allocate(n, self.t)
        if n > self._avail():
            assert got is None
            return
        assert got is not None and len(got) == n and len(set(got)) == n
        free_first = [b for b in got if self.key[b] is None and b not in self.lru]
        evicted = [b for b in got if b in self.lru]
        # free blocks are used before any cached block is evicted, LRU first
        assert got[:len(free_first)] == free_first
        assert evicted == self.lru[:len(evicted)]
        for b in evicted:
            self.lru.remove(b)
            self.key[b] = None
        for b in got:
            assert self.rc[b] == 0
            self.rc[b] = 1
        if n:
            self.held.append(list(got))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), register=st.sampled_from(["none", "one", "many"]), salt=st.integers(0, 3))
    def release(self, i, register, salt):
        blocks = self.held.pop(i % len(self.held))
        if register == "many":
            # one call for the whole list; keys may repeat or already be taken, which must be refused
            keys = [1000 + (b * 7 + int(self.t)) // (salt + 1) for b in blocks]
            ok = 0
            for b, k in zip(blocks, keys):
                if self.key[b] is None and k not in self.key:
                    self.key[b] = k
                    ok += 1
            assert self.pool.register_many(blocks, keys) == ok
        elif register == "one":
            for b in blocks:
                if self.key[b] is None and self.rc[b] == 1:
                    k = 1000 + b * 7 + int(self.t)
                    if k not in self.key:
                        assert self.pool.register(b, k)
                        self.key[b] = k
        self.t += 1
        self.pool.release(blocks, self.t)
        for b in reversed(blocks):
            self.rc[b] -= 1
            if self.rc[b] == 0 and self.key[b] is not None:
                self.lru.append(b)

    @precondition(lambda self: any(k is not None for k in self.key))
    @rule(j=st.integers(0, 100))
    def hit(self, j):
        keyed = [b for b in range(N) if self.key[b] is not None]
        b = keyed[j % len(keyed)]
        assert self.pool.lookup(self.key[b]) == b
        self.t += 1
        self.pool.retain(b, self.t)
        if self.rc[b] == 0:
            self.lru.remove(b)
        self.rc[b] += 1
        self.held.append([b])

    @rule(n=st.integers(1, 4))
    def allocate_run(self, n):
        if n > self._avail():
            return
        self.t += 1
        times = self.t + np.arange(n) * 0.25
        got = self.pool.allocate_run(times, np.full(n, 7, dtype=np.int64))
        evicted = [b for b in got if b in self.lru]
        assert evicted == self.lru[:len(evicted)]
        for b in evicted:
            self.lru.remove(b)
            self.key[b] = None
        for b, t in zip(got, times):
            assert self.rc[b] == 0 and self.pool.last_access[b] == t and self.pool.owner[b] == 7
            self.rc[b] = 1
        self.held.append(list(got))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def discard(self, i):
        blocks = self.held.pop(i % len(self.held))
        self.pool.discard(blocks)
        for b in reversed(blocks):
            self.rc[b] -= 1
            if self.rc[b] == 0:
                self.key[b] = None

    @precondition(lambda self: any(k is not None for k in self.key))
    @rule(j=st.integers(0, 100), extra=st.integers(5000, 5003))
    def forget(self, j, extra):
        keyed = [b for b in range(N) if self.key[b] is not None]
        b = keyed[j % len(keyed)]
        k = self.key[b]
        dropped = self.pool.forget_keys(np.array([k, extra], dtype=np.int64))   # an unknown key is ignored
        if self.rc[b] == 0:
            assert dropped == 1 and self.pool.last_evicted()[0].tolist() == [k]
            self.lru.remove(b)
            self.key[b] = None
        else:
            assert dropped == 0

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def load_and_land(self, i):
        blocks = self.held[i % len(self.held)]
        self.pool.lock(blocks)
        self.pool.set_ready(blocks, False)
        self.pool.check()
        assert not self.pool.ready[blocks].any()
        self.pool.set_ready(blocks, True)
        self.pool.unlock(blocks)

    @invariant()
    def agrees(self):
        self.pool.check()
        assert [int(x) for x in self.pool.refcount] == self.rc
        assert [int(x) for x in self.pool.key] == [-1 if k is None else k for k in self.key]
        assert self.pool.lru_order(N) == self.lru
        assert self.pool.num_available == self._avail()
        assert self.pool.num_active == sum(1 for r in self.rc if r > 0)


TestBlockPool = PoolMachine.TestCase
