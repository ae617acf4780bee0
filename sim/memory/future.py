"""The trace's future, for the offline optimum: when each prefix key is next used.

Belady's MIN evicts the block whose next use is farthest away. The engine computes, once, before the
run, every request's prefix keys and for each key the requests (in arrival order) whose prompt holds
it; an eviction policy that declares ``needs_future`` reads a block's next use through its ranking view
(``CacheView.next_use_s``) and nowhere else. A key's next use is the arrival time of the first request
holding it that has not been admitted yet (on any replica): with admission in arrival order, that is the
next time the block is wanted. A request admitted, preempted and re-admitted counts as used at its first
admission (the bound ignores recomputation after preemption).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.jit import numba
from sim.memory.block_pool import _ht_insert, ht_find, new_table


@numba.njit(cache=True, nogil=True)
def _build_table(keys, ht, bits):
    for j in range(keys.shape[0]):
        _ht_insert(ht, bits, keys[j], j)


@numba.njit(cache=True, nogil=True)
def _next_use(keys, ht, bits, offsets, uses, ptr, admitted, arrival, out):
    inf = np.inf
    for j in range(keys.shape[0]):
        k = keys[j]
        kid = ht_find(ht, bits, k) if k >= 0 else -1
        if kid < 0:
            out[j] = inf
            continue
        p = ptr[kid]
        end = offsets[kid + 1]
        while p < end and admitted[uses[p]]:
            p += 1
        ptr[kid] = p
        out[j] = arrival[uses[p]] if p < end else inf


@numba.njit(cache=True, nogil=True)
def _next_use_blocks(blocks, pool_keys, ckey, ckid, ht, bits, offsets, uses, ptr, admitted, arrival, out):
    """:func:`_next_use` for blocks of a pool, with each block's key id remembered while its key stays
    (the key table is large: a lookup per block and eviction would dominate)."""
    inf = np.inf
    for j in range(blocks.shape[0]):
        b = blocks[j]
        k = pool_keys[b]
        if ckey[b] != k:
            ckey[b] = k
            ckid[b] = ht_find(ht, bits, k) if k >= 0 else -1
        kid = ckid[b]
        if kid < 0:
            out[j] = inf
            continue
        p = ptr[kid]
        end = offsets[kid + 1]
        while p < end and admitted[uses[p]]:
            p += 1
        ptr[kid] = p
        out[j] = arrival[uses[p]] if p < end else inf


class FutureUses:
    """Next use of every prefix key of a trace (see the module docstring)."""

    def __init__(self, keys_per_request: Sequence[np.ndarray | None], arrival_s: np.ndarray) -> None:
        n = len(keys_per_request)
        lens = np.array([0 if k is None else len(k) for k in keys_per_request], dtype=np.int64)
        flat = (np.concatenate([k for k in keys_per_request if k is not None and len(k)])
                if lens.sum() else np.empty(0, np.int64)).astype(np.int64)
        req = np.repeat(np.arange(n, dtype=np.int64), lens)
        order = np.lexsort((req, flat))
        flat, req = flat[order], req[order]
        first = np.ones(flat.shape[0], dtype=bool)
        first[1:] = flat[1:] != flat[:-1]
        uniq = flat[first]
        self.offsets = np.append(np.flatnonzero(first), flat.shape[0]).astype(np.int64)
        self.uses = req.astype(np.int64)
        self.ptr = self.offsets[:-1].copy()
        self.ht, self.bits = new_table(uniq.shape[0])
        _build_table(uniq, self.ht, self.bits)
        self.admitted = np.zeros(n, dtype=np.bool_)
        self.before_admit = None
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        self.num_keys = int(uniq.shape[0])
        self._block_ids: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def admit(self, idx: int, now: float) -> None:
        """Request ``idx`` has been admitted at ``now``: its keys' next uses move past it. Every other
        replica's decode run first catches up to ``now`` (``before_admit``, set by the cluster): the
        allocations of its steps started by then chose their victims by the next uses before this one."""
        if self.before_admit is not None:
            self.before_admit(now)
        self.admitted[idx] = True

    def next_use_s(self, keys: np.ndarray) -> np.ndarray:
        """Arrival time of the next not-yet-admitted request holding each key (inf: never again)."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.empty(keys.shape[0], dtype=np.float64)
        _next_use(keys, self.ht, self.bits, self.offsets, self.uses, self.ptr, self.admitted, self.arrival_s, out)
        return out

    def next_use_of_blocks(self, pool, blocks: np.ndarray) -> np.ndarray:
        """:meth:`next_use_s` of the keys the blocks of ``pool`` carry now."""
        got = self._block_ids.get(id(pool))
        if got is None:
            got = self._block_ids[id(pool)] = (np.full(pool.num_blocks, -2, dtype=np.int64),
                                               np.full(pool.num_blocks, -1, dtype=np.int64))
        blocks = np.asarray(blocks, dtype=np.int64)
        out = np.empty(blocks.shape[0], dtype=np.float64)
        _next_use_blocks(blocks, pool.key, got[0], got[1], self.ht, self.bits, self.offsets, self.uses, self.ptr,
                         self.admitted, self.arrival_s, out)
        return out
