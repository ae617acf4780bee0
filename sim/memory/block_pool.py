"""The block pool: sole owner of one tier's KV blocks, with reference counts and a prefix cache.

Invariants (checked by :meth:`BlockPool.check`):
  * every block is exactly one of FREE, CACHED or ACTIVE, and free + cached + active == num_blocks;
  * FREE   ⇔ refcount 0, no prefix key, on the free stack;
  * CACHED ⇔ refcount 0, registered under a prefix key, in the LRU order (evictable);
  * ACTIVE ⇔ refcount > 0 (held by one or more requests, or by a transfer in flight); an active block
    may carry a prefix key so later requests can share it, and it is never evicted;
  * LOCKED ⊆ ACTIVE: blocks a transfer is reading or writing (on a link), with a count per block (a
    prefix block two swapping requests share is locked twice); ``num_locked`` sums the counts;
  * not READY ⊆ LOCKED: a block whose bytes are still on their way in (a load from a lower tier); it
    may be registered (so a second request waits for the same copy instead of starting another) but
    no step may read it until the copy lands.
Allocation never raises on shortage: it returns ``None`` and the caller preempts, swaps or waits.
Allocation takes FREE blocks first (most recently freed first), then evicts CACHED blocks chosen by the
eviction policy. A request's blocks are released tail-first, so under LRU the end of a shared prefix
is evicted before its head.

Representation. Mooncake's long prompts make the pool the replay's hot spot (about 9 M block
operations for the conversation trace), so the state is a handful of numpy arrays and the bulk
operations are compiled (``numba.njit``) kernels over them: a record per block (refcount, hits, locks,
position in its prefix, LRU links, key, owner, last access, insertion time, ready and prefetch flags), the
free stack as an array, the LRU order as an array-linked doubly linked list (sentinel ``num_blocks``),
and the prefix keys in an open-addressing table of (key, block) pairs (linear probing with
backward-shift deletion, load at most 1/2, Fibonacci hashing). Each block's fields share one 64-byte
record, so an eviction costs a few cache misses, not one per field. Block ids come out in exactly the
order the list-and-dict pool gave them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sim.errors import PolicyAnswerError
from sim.jit import numba

FREE, CACHED, ACTIVE = 0, 1, 2

# one 64-byte record per block (a cache line: an eviction touches one line per block, not one per
# field), plus the LRU list's sentinel as record ``num_blocks``
BLOCK = np.dtype([("rc", np.int32), ("hits", np.int32), ("locks", np.int32), ("pos", np.int32),
                  ("prev", np.int32), ("next", np.int32),      # the LRU list (-1: not in it)
                  ("key", np.int64), ("owner", np.int64),
                  ("last", np.float64), ("ins", np.float64),   # last access; when its key arrived here
                  ("ready", np.uint8), ("tag", np.uint8)],     # bytes resident; prefetched, unused
                 align=True)
# counters (int64), updated in place by the kernels
(C_FREE, C_CACHED, C_KEYS, C_LOCKED, C_EVICTED, C_HITS, C_VERSION, C_PF_ONTIME, C_PF_LATE, C_PF_WASTED,
 C_NEV, C_NCOUNTERS) = range(12)
EMPTY = -1
_FIB = np.uint64(0x9E3779B97F4A7C15)


# ====================================================================================== kernels
@numba.njit(cache=True, nogil=True, inline="always")
def _slot(key, bits):
    return np.int64((np.uint64(key) * _FIB) >> np.uint64(64 - bits))


@numba.njit(cache=True, nogil=True)
def ht_find(ht, bits, key):
    """The block registered under ``key`` in table ``ht`` ((key, block) rows), or -1."""
    mask = ht.shape[0] - 1
    i = _slot(key, bits)
    while True:
        k = ht[i, 0]
        if k == key:
            return ht[i, 1]
        if k == EMPTY:
            return np.int64(-1)
        i = (i + 1) & mask


@numba.njit(cache=True, nogil=True)
def _ht_insert(ht, bits, key, val):
    mask = ht.shape[0] - 1
    i = _slot(key, bits)
    while ht[i, 0] != EMPTY:
        i = (i + 1) & mask
    ht[i, 0] = key
    ht[i, 1] = val


@numba.njit(cache=True, nogil=True)
def _ht_delete(ht, bits, key):
    mask = ht.shape[0] - 1
    i = _slot(key, bits)
    while ht[i, 0] != key:
        if ht[i, 0] == EMPTY:
            return False
        i = (i + 1) & mask
    j = i
    while True:                 # backward shift: no tombstones, probes stay short
        j = (j + 1) & mask
        k = ht[j, 0]
        if k == EMPTY:
            break
        h = _slot(k, bits)
        stays = (i < h <= j) if i <= j else (h > i or h <= j)
        if not stays:
            ht[i, 0] = k
            ht[i, 1] = ht[j, 1]
            i = j
    ht[i, 0] = EMPTY
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _unlink(m, b):
    p = m[b].prev
    q = m[b].next
    m[p].next = q
    m[q].prev = p
    m[b].prev = -1
    m[b].next = -1


@numba.njit(cache=True, nogil=True, inline="always")
def _append(m, b, s):
    t = m[s].prev
    m[t].next = b
    m[b].prev = t
    m[b].next = s
    m[s].prev = b


@numba.njit(cache=True, nogil=True)
def _forget(b, m, ht, bits, c, ev_keys, ev_pos):
    """Evict cached block ``b`` (already unlinked): drop its key, note it for write-back."""
    k = m[b].key
    _ht_delete(ht, bits, k)
    j = c[C_NEV]
    ev_keys[j] = k
    ev_pos[j] = m[b].pos
    c[C_NEV] = j + 1
    if m[b].tag:
        c[C_PF_WASTED] += 1
        m[b].tag = 0
    m[b].key = -1
    m[b].pos = -1
    c[C_KEYS] -= 1


@numba.njit(cache=True, nogil=True)
def _check_victims(victims, m, mark, epoch):
    """0 when ``victims`` are distinct cached blocks, else 1 + the index of the first bad one."""
    n = m.shape[0] - 1
    for j in range(victims.shape[0]):
        b = victims[j]
        if b < 0 or b >= n or m[b].prev < 0 or mark[b] == epoch:
            return j + 1
        mark[b] = epoch
    return 0


@numba.njit(cache=True, nogil=True)
def _allocate(out, take, victims, use_lru, now, owner, times, owners, m, free, ht, bits, c, ev_keys, ev_pos):
    """Fill ``out``: ``take`` blocks off the free stack (top first), then evict the rest — the LRU
    head when ``use_lru``, else ``victims`` (validated by the caller). Each block's access time and
    owner are ``now`` and ``owner``, or, when ``times`` is not empty, ``times[k]`` and ``owners[k]``
    (a decode run's allocations)."""
    n = out.shape[0]
    nf = c[C_FREE]
    for i in range(take):
        out[i] = free[nf - 1 - i]
    c[C_FREE] = nf - take
    c[C_NEV] = 0
    s = m.shape[0] - 1
    for j in range(n - take):
        b = m[s].next if use_lru else victims[j]
        _unlink(m, b)
        _forget(b, m, ht, bits, c, ev_keys, ev_pos)
        out[take + j] = b
    rest = n - take
    if rest:
        c[C_CACHED] -= rest
        c[C_EVICTED] += rest
        c[C_VERSION] += 1
    each = times.shape[0] > 0
    for i in range(n):
        b = out[i]
        m[b].rc = 1
        m[b].hits = 0
        m[b].last = times[i] if each else now
        m[b].owner = owners[i] if each else owner
        m[b].ready = 1


@numba.njit(cache=True, nogil=True)
def _release(blocks, now, m, free, c):
    """Drop one reference to each block, tail first; returns the number that became unreferenced,
    or -(1 + index) of a block released more often than held (nothing changes then)."""
    for j in range(blocks.shape[0]):
        if m[blocks[j]].rc <= 0:
            return -(1 + j)
    s = m.shape[0] - 1
    gone = 0
    for j in range(blocks.shape[0] - 1, -1, -1):
        b = blocks[j]
        r = m[b].rc - 1
        m[b].rc = r
        if r == 0:
            gone += 1
            if m[b].key >= 0:
                _append(m, b, s)
                c[C_CACHED] += 1
                m[b].last = now
            else:
                free[c[C_FREE]] = b
                c[C_FREE] += 1
    return gone


@numba.njit(cache=True, nogil=True)
def _retain_one(b, now, owner, m, c, hit=True):
    if m[b].rc == 0:
        _unlink(m, b)
        c[C_CACHED] -= 1
    m[b].rc += 1
    if not hit:
        return
    m[b].hits += 1
    m[b].last = now
    m[b].owner = owner
    c[C_HITS] += 1
    if m[b].tag:
        if m[b].ready:
            c[C_PF_ONTIME] += 1
        else:
            c[C_PF_LATE] += 1
        m[b].tag = 0


@numba.njit(cache=True, nogil=True)
def _retain_keys(keys, out, now, owner, m, ht, bits, c, hit):
    """Retain the blocks findable under ``keys``; -1 in ``out`` (and nothing retained from there on)
    if one is missing. Returns how many were retained."""
    for j in range(keys.shape[0]):
        b = ht_find(ht, bits, keys[j])
        if b < 0:
            out[j] = -1
            return j
        _retain_one(b, now, owner, m, c, hit)
        out[j] = b
    return keys.shape[0]


@numba.njit(cache=True, nogil=True)
def _register(blocks, keys, positions, now, m, ht, bits, c):
    done = 0
    for j in range(blocks.shape[0]):
        b = blocks[j]
        k = keys[j]
        if m[b].key < 0 and ht_find(ht, bits, k) < 0:
            _ht_insert(ht, bits, k, b)
            m[b].key = k
            m[b].pos = positions[j]
            m[b].ins = now
            done += 1
    if done:
        c[C_KEYS] += done
        c[C_VERSION] += 1
    return done


@numba.njit(cache=True, nogil=True)
def count_prefix_in(ht, bits, keys, limit):
    """How many of ``keys[:limit]`` are findable, counting from the first until one is missing."""
    for j in range(limit):
        if ht_find(ht, bits, keys[j]) < 0:
            return j
    return limit


@numba.njit(cache=True, nogil=True)
def _num_unreferenced(ht, bits, keys, m):
    n = 0
    for j in range(keys.shape[0]):
        if m[ht_find(ht, bits, keys[j])].rc == 0:
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def find_many(ht, bits, keys, out):
    for j in range(keys.shape[0]):
        out[j] = ht_find(ht, bits, keys[j])


@numba.njit(cache=True, nogil=True)
def _walk(m, out, forward):
    s = m.shape[0] - 1
    b = m[s].next if forward else m[s].prev
    j = 0
    while b != s and j < out.shape[0]:
        out[j] = b
        j += 1
        b = m[b].next if forward else m[b].prev
    return j


@numba.njit(cache=True, nogil=True)
def _forget_keys(keys, m, free, ht, bits, c, ev_keys, ev_pos):
    """Drop the cached (unreferenced) blocks registered under ``keys`` (they become FREE); keys not
    registered, or held by someone, are left alone. Returns how many were dropped."""
    c[C_NEV] = 0
    dropped = 0
    for j in range(keys.shape[0]):
        b = ht_find(ht, bits, keys[j])
        if b < 0 or m[b].rc > 0:
            continue
        _unlink(m, b)
        _forget(b, m, ht, bits, c, ev_keys, ev_pos)
        c[C_CACHED] -= 1
        free[c[C_FREE]] = b
        c[C_FREE] += 1
        dropped += 1
    if dropped:
        c[C_VERSION] += 1
    return dropped


@numba.njit(cache=True, nogil=True)
def _discard(blocks, m, free, ht, bits, c):
    """Drop one reference to each block; one left unreferenced loses its key and becomes FREE."""
    changed = 0
    for j in range(blocks.shape[0] - 1, -1, -1):
        b = blocks[j]
        r = m[b].rc - 1
        m[b].rc = r
        if r == 0:
            k = m[b].key
            if k >= 0:
                _ht_delete(ht, bits, k)
                m[b].key = -1
                m[b].pos = -1
                c[C_KEYS] -= 1
                changed += 1
            if m[b].tag:
                c[C_PF_WASTED] += 1
                m[b].tag = 0
            free[c[C_FREE]] = b
            c[C_FREE] += 1
    if changed:
        c[C_VERSION] += 1


@numba.njit(cache=True, nogil=True)
def _add_locks(blocks, m, c, delta):
    """Add ``delta`` (+1 or -1) to each block's lock count: 0, or -(1 + index) of the first block that
    is not active (locking) or not locked (unlocking); nothing changes then."""
    for j in range(blocks.shape[0]):
        b = blocks[j]
        if (m[b].rc <= 0) if delta > 0 else (m[b].locks <= 0):
            return -(1 + j)
    for j in range(blocks.shape[0]):
        m[blocks[j]].locks += delta
    c[C_LOCKED] += delta * blocks.shape[0]
    return 0


@numba.njit(cache=True, nogil=True)
def _hold(blocks, m):
    """One more reference to each active block; -(1 + index) of the first inactive one (nothing
    changes then), else 0."""
    for j in range(blocks.shape[0]):
        if m[blocks[j]].rc <= 0:
            return -(1 + j)
    for j in range(blocks.shape[0]):
        m[blocks[j]].rc += 1
    return 0


def _table_bits(num_blocks: int) -> int:
    bits = 1
    while (1 << bits) < 2 * max(num_blocks, 1):
        bits += 1
    return bits


def new_table(num_keys: int) -> tuple[np.ndarray, int]:
    """An empty (key, block) table for ``num_keys`` keys and its size in bits."""
    bits = _table_bits(num_keys)
    ht = np.empty((1 << bits, 2), dtype=np.int64)
    ht[:, 0] = EMPTY
    ht[:, 1] = -1
    return ht, bits


class BlockPool:
    __slots__ = ("tier", "num_blocks", "block_size", "bytes_per_block", "m", "free", "ht", "bits", "c",
                 "refcount", "key", "last_access", "hits", "inserted_s", "position", "owner", "ready", "locks",
                 "_prev", "_tag", "_ev_keys", "_ev_pos", "_mark", "_epoch")

    def __init__(self, tier: str, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"{tier}: num_blocks must be >= 0")
        n = self.num_blocks = int(num_blocks)
        self.tier = tier
        self.block_size = int(block_size)
        self.bytes_per_block = int(bytes_per_block)
        m = self.m = np.zeros(n + 1, dtype=BLOCK)
        m["pos"] = -1
        m["prev"] = -1
        m["next"] = -1
        m["key"] = -1
        m["owner"] = -1
        m["ready"] = 1
        m["prev"][n] = m["next"][n] = n                            # the empty list: sentinel to itself
        self.free = np.arange(n - 1, -1, -1, dtype=np.int64)        # stack: block 0 pops first
        self.ht, self.bits = new_table(n)
        self.c = np.zeros(C_NCOUNTERS, dtype=np.int64)
        self.c[C_FREE] = n
        self._ev_keys = np.empty(n, dtype=np.int64)
        self._ev_pos = np.empty(n, dtype=np.int32)
        self._mark = np.zeros(n, dtype=np.int64)
        self._epoch = 0
        # named views of the fields (read by views, metrics and tests; written only by this class)
        self.refcount, self.hits, self.position = m["rc"][:n], m["hits"][:n], m["pos"][:n]
        self.key, self.owner = m["key"][:n], m["owner"][:n]
        self.last_access, self.inserted_s = m["last"][:n], m["ins"][:n]
        self.ready, self.locks = m["ready"][:n], m["locks"][:n]
        self._prev, self._tag = m["prev"], m["tag"][:n]

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks with no content (not counting evictable cached blocks)."""
        return int(self.c[C_FREE])

    @property
    def num_cached(self) -> int:
        return int(self.c[C_CACHED])

    @property
    def num_available(self) -> int:
        """Blocks an allocation can obtain: free plus evictable cached."""
        return int(self.c[C_FREE] + self.c[C_CACHED])

    @property
    def num_active(self) -> int:
        return self.num_blocks - int(self.c[C_FREE] + self.c[C_CACHED])

    @property
    def num_keys(self) -> int:
        """Blocks findable in the prefix cache (cached, or active and registered)."""
        return int(self.c[C_KEYS])

    @property
    def num_locked(self) -> int:
        return int(self.c[C_LOCKED])

    @property
    def num_evicted(self) -> int:
        return int(self.c[C_EVICTED])

    @property
    def num_hits(self) -> int:
        return int(self.c[C_HITS])

    @property
    def version(self) -> int:
        """Changes whenever the set of findable keys changes (lookups may be memoised on it)."""
        return int(self.c[C_VERSION])

    def occupancy(self) -> tuple[int, int, int]:
        """(active, cached, locked) blocks in one call (what a step-log row reads of each tier)."""
        c = self.c
        cached = int(c[C_CACHED])
        return self.num_blocks - int(c[C_FREE]) - cached, cached, int(c[C_LOCKED])

    def prefetch_counts(self) -> tuple[int, int, int]:
        """Prefetched blocks (see :meth:`tag_prefetched`): used after they landed, used while still
        loading (the request waited), and evicted or dropped unused."""
        return int(self.c[C_PF_ONTIME]), int(self.c[C_PF_LATE]), int(self.c[C_PF_WASTED])

    def state(self, block: int) -> int:
        if self.refcount[block] > 0:
            return ACTIVE
        return CACHED if self._prev[block] >= 0 else FREE

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int, now: float,
                 choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None,
                 owner: int = -1) -> list[int] | None:
        """``n`` blocks with refcount 1, or ``None`` (nothing changes) if fewer are available.

        ``choose_victims(pool, k, now)`` picks ``k`` cached blocks to evict when the free stack runs
        short; without it the least recently used are taken. :meth:`last_evicted` then says what
        went. ``owner``: the request index the blocks are for (eviction policies may read it).
        """
        got = self._alloc(n, now, choose_victims, owner)
        return got if got is None else got.tolist()

    def allocate_array(self, n: int, now: float,
                       choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None,
                       owner: int = -1) -> np.ndarray | None:
        """:meth:`allocate`, the blocks as an int64 array (for callers that index with them: a copy's
        destination blocks, a load's; no list is built and converted back)."""
        return self._alloc(n, now, choose_victims, owner)

    def _alloc(self, n: int, now: float, choose_victims, owner: int) -> np.ndarray | None:
        if n <= 0:
            self.c[C_NEV] = 0
            return _NO_BLOCKS
        c = self.c
        if n > c[C_FREE] + c[C_CACHED]:
            return None
        take = min(n, int(c[C_FREE]))
        rest = n - take
        victims = _NO_BLOCKS
        use_lru = True
        if rest and choose_victims is not None:
            victims = self._victims(choose_victims(self, rest, now), rest)
            use_lru = False
        out = np.empty(n, dtype=np.int64)
        # (float: SimPy's clock starts at int 0, and an int would compile the kernel a second time)
        _allocate(out, take, victims, use_lru, float(now), owner, _NO_TIMES, _NO_BLOCKS, self.m, self.free, self.ht,
                  self.bits, c, self._ev_keys, self._ev_pos)
        return out

    def _victims(self, chosen, rest: int) -> np.ndarray:
        victims = np.asarray(chosen, dtype=np.int64).reshape(-1)
        if victims.shape[0] != rest:
            raise PolicyAnswerError(f"{self.tier}: eviction policy returned {victims.shape[0]} blocks, {rest} needed")
        self._epoch += 1
        bad = _check_victims(victims, self.m, self._mark, self._epoch)
        if bad:
            b = int(victims[bad - 1])
            state = self.state(b) if 0 <= b < self.num_blocks else "no such block"
            raise PolicyAnswerError(f"{self.tier}: eviction policy chose block {b}, which is not evictable or "
                               f"chosen twice (state {state})")
        return victims

    def allocate_one(self, now: float,
                     choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None,
                     owner: int = -1) -> int:
        """One block, or -1. The common decode case: a free block is taken without a kernel call."""
        c = self.c
        nf = c[C_FREE]
        if nf:
            b = int(self.free[nf - 1])
            c[C_FREE] = nf - 1
            c[C_NEV] = 0
            # through the field views: a record's field writes (self.m[b]["rc"] = ...) cost 4x more
            self.refcount[b] = 1
            self.hits[b] = 0
            self.last_access[b] = now
            self.owner[b] = owner
            self.ready[b] = 1
            return b
        if not c[C_CACHED]:
            return -1
        return int(self._alloc(1, now, choose_victims, owner)[0])

    def allocate_run(self, times: np.ndarray, owners: np.ndarray,
                     choose_victims: Callable[["BlockPool", int, float], Sequence[int]] | None = None
                     ) -> list[int]:
        """``len(times)`` blocks, the k-th for request ``owners[k]`` at ``times[k]``: the blocks, in the
        order, that as many :meth:`allocate_one` calls would return, for an eviction policy whose
        choice of k victims equals k choices of one (``EvictionPolicy.time_dependent`` is False). The
        caller checked that they fit (a decode run plans them)."""
        n = len(times)
        c = self.c
        if n > c[C_FREE] + c[C_CACHED]:
            raise RuntimeError(f"{self.tier}: a run allocated more blocks than were available")
        take = min(n, int(c[C_FREE]))
        rest = n - take
        victims = _NO_BLOCKS
        use_lru = True
        if rest and choose_victims is not None:
            victims = self._victims(choose_victims(self, rest, float(times[take])), rest)
            use_lru = False
        out = np.empty(n, dtype=np.int64)
        _allocate(out, take, victims, use_lru, 0.0, -1, np.asarray(times, dtype=np.float64),
                  np.asarray(owners, dtype=np.int64), self.m, self.free, self.ht, self.bits, c, self._ev_keys,
                  self._ev_pos)
        return out.tolist()

    def last_evicted(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, positions in their prefix) of the cached blocks the last allocation (or
        :meth:`forget_keys`) evicted, in eviction order."""
        m = int(self.c[C_NEV])
        return self._ev_keys[:m].copy(), self._ev_pos[:m].copy()

    def release(self, blocks: Sequence[int], now: float) -> int:
        """Drop one reference to each block (tail first). Unreferenced blocks with a prefix key become
        CACHED (most recently used end), the others FREE. Returns how many became unreferenced."""
        if not len(blocks):
            return 0
        idx = np.asarray(blocks, dtype=np.int64)
        got = _release(idx, now, self.m, self.free, self.c)
        if got < 0:
            raise RuntimeError(f"{self.tier}: block {int(idx[-got - 1])} released more often than held")
        return got

    def retain(self, block: int, now: float, owner: int = -1) -> None:
        """Take one more reference to a block found in the prefix cache (a hit)."""
        if self.refcount[block] == 0 and self._prev[block] < 0:
            raise RuntimeError(f"{self.tier}: block {block} is free; it cannot be retained")
        _retain_one(int(block), now, owner, self.m, self.c)

    def hold(self, blocks: Sequence[int]) -> None:
        """One more reference to each active block (a transfer reading them keeps them from being
        released to the cache, and so from eviction, until it lands)."""
        if not len(blocks):
            return
        if _hold(np.asarray(blocks, dtype=np.int64), self.m):
            raise RuntimeError(f"{self.tier}: only active blocks can be held by a transfer")

    # ------------------------------------------------------------------ prefix cache
    def register(self, block: int, key: int) -> bool:
        """Make an active block findable under ``key``. False if another block already holds it
        (the duplicate stays unregistered and becomes FREE when released)."""
        return self.register_many([block], [key]) == 1

    def register_many(self, blocks: Sequence[int], keys: Sequence[int], now: float = 0.0,
                      positions: int | np.ndarray = -1) -> int:
        """:meth:`register` for each (block, key) pair in order; returns how many were registered.
        ``positions``: each block's index in its prompt (or the first one's, the rest following), for
        policies that rank blocks by depth; ``now`` is their insertion time in this tier."""
        if not len(blocks):
            return 0
        b = np.asarray(blocks, dtype=np.int64)
        k = np.asarray(keys, dtype=np.int64)
        if (k < 0).any():
            raise ValueError(f"{self.tier}: prefix keys must be >= 0")
        if np.ndim(positions) == 0:
            first = int(positions)
            pos = (np.arange(first, first + len(b), dtype=np.int32) if first >= 0
                   else np.full(len(b), -1, dtype=np.int32))
        else:
            pos = np.asarray(positions, dtype=np.int32)
        return _register(b, k, pos, now, self.m, self.ht, self.bits, self.c)

    def lookup(self, key: int) -> int:
        return int(ht_find(self.ht, self.bits, key)) if key >= 0 else -1

    def count_prefix(self, keys: np.ndarray, limit: int) -> int:
        """How many of ``keys[:limit]`` are findable, counting from the first until one is missing."""
        if not self.c[C_KEYS] or limit <= 0:
            return 0
        return int(count_prefix_in(self.ht, self.bits, keys, limit))

    def num_unreferenced(self, keys: np.ndarray) -> int:
        """How many of the (findable) ``keys`` name a cached block nobody holds: a request that takes
        them makes them unavailable to allocations."""
        return int(_num_unreferenced(self.ht, self.bits, keys, self.m))

    def retain_keys(self, keys: np.ndarray, now: float, owner: int = -1, hit: bool = True) -> list[int]:
        """:meth:`retain` the blocks findable under ``keys`` (all must be); returns them in order.
        ``hit=False`` takes the references without counting a hit or an access (a transfer holding
        its source, a prefetch shielding a request's own hits from its allocation)."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        got = _retain_keys(keys, out, now, owner, self.m, self.ht, self.bits, self.c, hit)
        if got != keys.shape[0]:
            raise RuntimeError(f"{self.tier}: prefix key {int(keys[got])} is not in the cache")
        return out.tolist()

    def forget_keys(self, keys: np.ndarray) -> int:
        """Drop the cached blocks registered under ``keys`` (they become FREE; a block someone holds
        is kept). For exclusive tiers: a key now resident above lives in one tier only."""
        if not self.c[C_KEYS] or not len(keys):
            self.c[C_NEV] = 0
            return 0
        return int(_forget_keys(np.asarray(keys, dtype=np.int64), self.m, self.free, self.ht, self.bits, self.c,
                                self._ev_keys, self._ev_pos))

    def discard(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block left unreferenced loses its key and becomes FREE
        (a promoted block leaving an exclusive tier; a copy that is not wanted any more)."""
        if len(blocks):
            _discard(np.asarray(blocks, dtype=np.int64), self.m, self.free, self.ht, self.bits, self.c)

    # ------------------------------------------------------------------ transfers
    def lock(self, blocks: Sequence[int]) -> None:
        """Mark active blocks as on a link (a transfer reads or writes them). A request holds each of
        its blocks once, so ``blocks`` has no repeats."""
        if not len(blocks):
            return
        if _add_locks(np.asarray(blocks, dtype=np.int64), self.m, self.c, 1):
            raise RuntimeError(f"{self.tier}: only active blocks can be locked for a transfer")

    def unlock(self, blocks: Sequence[int]) -> None:
        if not len(blocks):
            return
        if _add_locks(np.asarray(blocks, dtype=np.int64), self.m, self.c, -1):
            raise RuntimeError(f"{self.tier}: unlocking blocks that are not locked")

    def set_ready(self, blocks: Sequence[int], ready: bool) -> None:
        """Mark blocks whose bytes are on their way in (``False``; they must be locked) or arrived."""
        if not len(blocks):
            return
        idx = np.asarray(blocks, dtype=np.int64)
        if not ready and (self.locks[idx] <= 0).any():
            raise RuntimeError(f"{self.tier}: a block being loaded must be locked")
        self.ready[idx] = 1 if ready else 0

    def tag_prefetched(self, blocks: Sequence[int], source: int = 1) -> None:
        """Count these blocks as prefetched (from tier ``source`` > 0): their first hit is on time
        (landed) or late (still loading); eviction or discard before any hit counts them as wasted."""
        if len(blocks):
            self._tag[np.asarray(blocks, dtype=np.int64)] = source

    def prefetched_from(self, blocks: np.ndarray) -> np.ndarray:
        """The source tier of each block's prefetch not yet used (0: none)."""
        return self._tag[blocks]

    def untag_unused(self) -> int:
        """At the end of a run: prefetched blocks never used count as wasted; returns how many."""
        tagged = int(self._tag.sum())
        self.c[C_PF_WASTED] += tagged
        self._tag[:] = 0
        return tagged

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The block registered under each key, or -1."""
        out = np.empty(len(keys), dtype=np.int64)
        if self.c[C_KEYS]:
            find_many(self.ht, self.bits, np.asarray(keys, dtype=np.int64), out)
        else:
            out[:] = -1
        return out

    def mru_array(self, limit: int) -> np.ndarray:
        """Up to ``limit`` cached blocks, most recently used first."""
        out = np.empty(max(0, min(int(limit), self.num_cached)), dtype=np.int64)
        _walk(self.m, out, False)
        return out

    def lru_order(self, limit: int) -> list[int]:
        return self.lru_array(limit).tolist()

    def lru_array(self, limit: int) -> np.ndarray:
        """Up to ``limit`` cached blocks, least recently used first."""
        out = np.empty(max(0, min(int(limit), self.num_cached)), dtype=np.int64)
        _walk(self.m, out, True)
        return out

    def drop_cache(self) -> None:
        """Forget every cached block (they become FREE); active blocks keep their keys."""
        self.forget_keys(self.key[self.lru_array(self.num_cached)])

    # ------------------------------------------------------------------ checking
    def check(self) -> None:
        """Assert every invariant in the module docstring (tests call this; O(num_blocks))."""
        n = self.num_blocks
        nf = int(self.c[C_FREE])
        free_list = self.free[:nf].tolist()
        free = set(free_list)
        walk = np.empty(n + 1, dtype=np.int64)
        cached_list = walk[:_walk(self.m, walk, True)].tolist()
        cached = set(cached_list)
        assert len(cached_list) == int(self.c[C_CACHED]), f"{self.tier}: cached count drifted"
        assert len(free) == len(free_list), f"{self.tier}: duplicate block on the free stack"
        assert len(cached) == len(cached_list), f"{self.tier}: the LRU list loops"
        assert not (free & cached), f"{self.tier}: a block is both free and cached"
        rc = self.refcount
        active = {b for b in range(n) if rc[b] > 0}
        assert not (active & (free | cached)), f"{self.tier}: a referenced block is free or cached"
        assert len(free) + len(cached) + len(active) == n, f"{self.tier}: blocks not conserved"
        assert np.all(rc >= 0)
        for b in free:
            assert self.key[b] == -1, f"{self.tier}: free block {b} has a key"
            assert self._prev[b] == -1
        for b in cached:
            assert self.key[b] >= 0 and self.lookup(int(self.key[b])) == b
        keyed = np.flatnonzero(self.key >= 0)
        assert keyed.size == int(self.c[C_KEYS]), f"{self.tier}: key count drifted"
        for b in keyed.tolist():
            assert self.lookup(int(self.key[b])) == b, f"{self.tier}: block {b}'s key is not findable"
        assert int((self.ht[:, 0] != EMPTY).sum()) == keyed.size, f"{self.tier}: stale entries in the key table"
        locks = self.locks
        assert int(locks.sum()) == self.num_locked, f"{self.tier}: locked count drifted"
        assert (rc[locks > 0] > 0).all(), f"{self.tier}: a locked block is not active"
        assert (locks[self.ready == 0] > 0).all(), f"{self.tier}: a block still loading is not locked"


_NO_BLOCKS = np.empty(0, dtype=np.int64)
_NO_TIMES = np.empty(0, dtype=np.float64)
