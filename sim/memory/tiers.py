"""KV residency of one replica across HBM, DRAM and NVMe (and a cluster's shared store): the only code
that hands blocks to requests, takes them back, and moves them between tiers. Bandwidth and time belong
to the links (``sim.memory.transfers``); this module decides which blocks each request holds where,
and which copies must cross which links (:class:`Move`, started by ``sim.replica.prefetch``).

Prefix caching: a request's prompt is cut into engine blocks; a full block gets a *prefix key* that
identifies the whole prefix up to its end. Traces give prefix hashes over their own block size (512
tokens for Mooncake); engine block ``j`` (ending at token ``e = (j+1)·block_size``) takes the hash of
the trace block that holds token ``e-1`` together with ``e``'s offset in that block. Since trace
hashes are chained (one ID stands for the whole prefix), equal keys mean equal prefixes.

A lookup walks the prompt's keys and, for each, HBM, then DRAM, then NVMe, then the shared store,
stopping at the first key no tier holds. A hit in a lower tier is a hit that costs a transfer; the
residency policy decides, per request, whether to load it or recompute it (``load_or_recompute``).
Loading allocates and registers the request's HBM blocks at once, *not ready* and locked, and the
request waits (state LOADING) until every one has landed; a second request wanting the same block
waits for the same copy. Prefetch does the same for a waiting request's lower-tier prefix before it is
admitted, the blocks held for that request (not evictable: HBM is the scarcest tier, and a prefetched
block evicted before its request is admitted is bandwidth thrown away) until its admission takes them
over.

Where evicted blocks go is the residency policy's call (``demote_to``): dropped, or written back to a
lower tier. A write-back copies the victims' bytes out before their blocks are reused, so whatever
reuses them (a step's prefill, a load, a swap) waits for the copy; until it lands the blocks are not
findable in the lower tier. ``offload_to`` copies a request's prompt blocks down when it releases them
(write-through, as LMCache stores a finished request's KV), so that a later eviction is free.
Inclusive mode: lower tiers keep a copy of what they pushed up. Exclusive: a block lives in one of the
replica's tiers at a time (a load frees the lower copy; a block recomputed into HBM frees the lower
copy; offload is not used); the shared store is always inclusive.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from policies.base import RequestState
from sim.errors import PolicyAnswerError
from sim.jit import numba
from sim.memory.block_pool import C_KEYS, C_NEV, C_VERSION, BlockPool, ht_find
from sim.memory.cache_view import PoolCacheView
from sim.request import FrozenRequest, Request, unwrap

TIERS = ("hbm", "dram", "nvme", "store")
HBM, DRAM, NVME, STORE = range(4)
# the links a copy crosses, in order
LOAD_LINKS = {DRAM: ("pcie_h2d",), NVME: ("nvme_read", "pcie_h2d"), STORE: ("net_read", "pcie_h2d")}
WRITE_LINKS = {(HBM, DRAM): ("pcie_d2h",), (HBM, NVME): ("pcie_d2h", "nvme_write"),
               (HBM, STORE): ("pcie_d2h", "net_write"), (DRAM, NVME): ("nvme_write",),
               (DRAM, STORE): ("net_write",), (NVME, STORE): ("nvme_read", "net_write")}
_NONE = np.empty(0, dtype=np.int64)


_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
_LOW63 = np.uint64(0x7FFFFFFFFFFFFFFF)


@numba.njit(cache=True, nogil=True)
def _prefix_keys(hashes, hash_block_tokens, n, block_size, out):
    j = 0
    for b in range(n):
        end = (b + 1) * block_size
        t = (end - 1) // hash_block_tokens
        if t >= hashes.shape[0]:
            break
        # mix (trace hash, offset in its block) into one 64-bit key; works for arbitrary 64-bit hashes
        h = np.uint64(hashes[t]) * _M1
        h ^= np.uint64(end - t * hash_block_tokens) * _M2
        h ^= h >> np.uint64(31)
        out[j] = np.int64(h & _LOW63)
        j += 1
    return j


def prefix_keys(hashes: np.ndarray, hash_block_tokens: int, prompt_tokens: int, block_size: int) -> np.ndarray:
    """Prefix keys of the full engine blocks of a prompt (see module docstring)."""
    n = prompt_tokens // block_size
    if n == 0 or hashes.size == 0:
        return np.empty(0, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    return out[:_prefix_keys(np.asarray(hashes, dtype=np.int64), int(hash_block_tokens), n, block_size, out)]


@numba.njit(cache=True, nogil=True)
def lookup_tiers(keys, limit, ht0, b0, ht1, b1, ht2, b2, ht3, b3, out, counts):
    """For each of ``keys[:limit]`` the first tier whose table holds it, into ``out`` (and counted per
    tier in ``counts``), until a key no tier holds; returns (blocks found, index of the first one not in
    HBM, or the number found)."""
    lead = -1
    for j in range(limit):
        k = keys[j]
        if ht_find(ht0, b0, k) >= 0:
            t = 0
        elif ht_find(ht1, b1, k) >= 0:
            t = 1
        elif ht_find(ht2, b2, k) >= 0:
            t = 2
        elif ht_find(ht3, b3, k) >= 0:
            t = 3
        else:
            return j, (lead if lead >= 0 else j)
        out[j] = t
        counts[t] += 1
        if t and lead < 0:
            lead = j
    return limit, (lead if lead >= 0 else limit)


@numba.njit(cache=True, nogil=True)
def fresh_for_hits(tiers, keys, hit, ht, bits, m):
    """Available HBM blocks that taking the first ``hit`` found prompt blocks consumes: one per block
    found below HBM (it is loaded into a fresh block) and one per HBM hit nobody holds (a cached
    block stops being available once taken)."""
    n = 0
    for j in range(hit):
        if tiers[j] != HBM:
            n += 1
        elif m[ht_find(ht, bits, keys[j])].rc == 0:
            n += 1
    return n


@dataclass(frozen=True, slots=True)
class PrefixLookup:
    """Where a waiting request's prompt blocks are: ``found`` leading blocks held by some tier,
    ``hbm_lead`` of them in HBM before the first one that is not, ``tiers`` the tier of each found block
    (None when all are in HBM) and ``counts`` the found blocks per tier."""

    found: int
    hbm_lead: int
    tiers: np.ndarray | None
    counts: tuple[int, int, int, int]


NO_LOOKUP = PrefixLookup(0, 0, None, (0, 0, 0, 0))


@dataclass(slots=True, eq=False)
class Move:
    """One block-group copy between tiers, decided here and carried out over links by the replica.

    ``load``: ``src_blocks`` (held and locked in tier ``src``) are copied into ``dst_blocks`` (HBM,
    registered, locked, not ready). ``write``: ``keys`` go to ``dst_blocks`` (allocated and locked in
    ``dst``, registered when the copy lands); ``src_blocks`` are HBM blocks the copy holds while it reads
    them (write-through), or empty when the source blocks were evicted (write-back: whoever reuses them
    waits for this move). ``after``: moves that must land first (they free the blocks this one writes).
    """

    kind: str
    src: int
    dst: int
    links: tuple
    nbytes: int
    src_blocks: np.ndarray
    dst_blocks: np.ndarray
    keys: np.ndarray
    positions: np.ndarray
    after: list = field(default_factory=list)
    request: int = -1
    prefetch: bool = False
    event: object = None          # the transfer process, once started
    landed_s: float = -1.0


class SwapView:
    __slots__ = ("swapped",)

    def __init__(self, swapped: Sequence[Request]) -> None:
        self.swapped = swapped

    def dram_blocks(self, req: Request) -> int:
        return len(unwrap(req).dram_blocks)


class TieredKV:
    """Per-replica KV blocks in HBM, DRAM and NVMe, and the shared store when the cluster has one.

    Invariants: a RUNNING or SWAPPING request's ``blocks`` are HBM blocks it holds one reference to,
    all ready; a LOADING request's ``blocks`` are HBM blocks it holds, some still loading; a HANDING_OFF
    request's ``blocks`` are its sender's (ready; locked while they are sent), and ``num_importing``
    blocks of the receiver are reserved for it (locked, not ready) until they land; a SWAPPED or
    SWAPPING request's ``dram_blocks`` are DRAM blocks it holds; WAITING, FINISHED and REJECTED
    requests hold nothing. Blocks are conserved in each tier (BlockPool invariants); in exclusive mode
    no settled block (not on a link) is findable in two of the replica's tiers.
    """

    def __init__(self, *, block_size: int, hbm_blocks: int, dram_blocks: int, nvme_blocks: int,
                 hbm_bytes_per_block: int, host_bytes_per_block: int, prefix_caching: bool,
                 eviction, guarded: bool = False, lower_eviction: dict | None = None,
                 tier_mode: str = "inclusive", store=None) -> None:
        self.block_size = block_size
        self.hbm = BlockPool("hbm", hbm_blocks, block_size, hbm_bytes_per_block)
        self.dram = BlockPool("dram", dram_blocks, block_size, host_bytes_per_block)
        self.nvme = BlockPool("nvme", nvme_blocks, block_size, host_bytes_per_block)
        self.store = store
        store_pool = store.pool if store is not None else BlockPool("store", 0, block_size, host_bytes_per_block)
        self._pools = (self.hbm, self.dram, self.nvme, store_pool)
        self.host_bytes_per_block = host_bytes_per_block
        self.prefix_caching = prefix_caching
        self.eviction = eviction
        lower = lower_eviction or {}
        self._evictions = (eviction, lower.get("dram", eviction), lower.get("nvme", eviction),
                           store.eviction if store is not None else eviction)
        self.time_dependent = type(eviction).time_dependent
        self.guarded = guarded          # policies see requests as immutable proxies
        self.exclusive = tier_mode == "exclusive"
        self.tier_mode = tier_mode
        self._views = tuple(PoolCacheView(p, self) for p in self._pools)
        self.hbm_view = self._views[HBM]
        self._choose = tuple(self._chooser(t) for t in range(4))
        self._cs = tuple(p.c for p in self._pools)
        # attached by the replica (sim.replica.prefetch): the residency policy and its view, the links,
        # prefill pricing; by the engine: the trace's sessions and, for an oracle policy, its future
        self.residency = None
        self.res_view = None
        self.links: dict = {}
        self.prefill_s: Callable[[int, int], float] | None = None
        self.sessions = None
        self.futures = None
        self._recompute_table: np.ndarray | None = None
        self._recompute_memo: dict[tuple[int, int, int], float] = {}
        self._now = 0.0
        self._moves: list[Move] = []
        self._waits: tuple[list, list, list, list] = ([], [], [], [])
        self._lookups: dict[int, tuple] = {}
        self._decisions: dict[int, tuple] = {}
        # statistics
        self.hit_tokens = 0
        self.lookup_tokens = 0
        self.tier_hit_tokens = np.zeros(4, dtype=np.int64)
        self.tier_hit_requests = np.zeros(4, dtype=np.int64)
        self.admissions = 0
        self.releases = 0                 # requests that gave their blocks back (prefetch re-asks then)
        self.hit_ratio_sum = 0.0          # per-request prefix hit ratio, summed over admissions
        self.tier_ratio_sum = np.zeros(4)  # ... and the share of it each tier served
        self.loads = np.zeros(4, dtype=np.int64)          # load copies per source tier
        self.load_blocks = np.zeros(4, dtype=np.int64)
        self.prefetch_requests = 0
        self.prefetch_blocks = 0
        self._holds: dict[int, list[int]] = {}     # HBM blocks prefetched for a waiting request
        self.num_held = 0
        self.num_importing = 0            # HBM blocks reserved for KV on its way from another replica
        self.recompute_choices = 0        # admissions that found a lower-tier prefix and recomputed it
        self.recompute_choice_tokens = 0
        self.write_blocks = np.zeros((4, 4), dtype=np.int64)   # [source, destination]
        self.writes = np.zeros((4, 4), dtype=np.int64)
        self.dropped_blocks = np.zeros(4, dtype=np.int64)      # evictions not kept below
        self.demoted_blocks = np.zeros(4, dtype=np.int64)

    def _chooser(self, t: int):
        policy, view = self._evictions[t], self._views[t]
        if type(policy).lru_equivalent:
            return None         # the pool evicts from its LRU head (what the policy would choose)

        def choose(pool: BlockPool, k: int, now: float):
            return policy.evict_cached(view, k, now)
        return choose

    def attach(self, *, residency, view, links: dict, prefill_s: Callable[[int, int], float]) -> None:
        """The replica's residency policy and view, its links by name (bandwidth and latency for load
        estimates) and a prefill pricer ``prefill_s(tokens, context)``."""
        self.residency = residency
        self.res_view = view
        self.links = links
        self.prefill_s = prefill_s

    @property
    def pools(self) -> tuple[BlockPool, BlockPool, BlockPool]:
        """The replica's own tiers (the shared store belongs to the cluster)."""
        return self.hbm, self.dram, self.nvme

    @property
    def all_pools(self) -> tuple[BlockPool, BlockPool, BlockPool, BlockPool]:
        return self._pools

    def at(self, now: float) -> None:
        """The replica's current time (decisions asked through scheduler views use it)."""
        self._now = now

    def _shown(self, req: Request):
        return FrozenRequest(req) if self.guarded else req

    # ------------------------------------------------------------------ eviction hook
    def choose_hbm_victims(self, pool: BlockPool, k: int, now: float) -> Sequence[int]:
        choose = self._choose[HBM]
        return pool.lru_array(k) if choose is None else choose(pool, k, now)

    # ------------------------------------------------------------------ lookups (pure)
    def lower_versions(self) -> tuple[int, int, int]:
        """Changes whenever the set of keys findable below HBM changes."""
        cs = self._cs
        return int(cs[1][C_VERSION]), int(cs[2][C_VERSION]), int(cs[3][C_VERSION])

    def _lower_keys(self) -> bool:
        cs = self._cs
        return bool(cs[1][C_KEYS] or cs[2][C_KEYS] or cs[3][C_KEYS])

    def _limit(self, req: Request) -> int:
        return min(len(req.hash_keys), (req.prompt_tokens - 1) // self.block_size)

    def lookup(self, req: Request) -> PrefixLookup:
        """Where the request's prompt blocks are now, across tiers (memoised until a tier's set of
        findable keys changes)."""
        keys = req.hash_keys
        if not self.prefix_caching or keys is None or req.num_computed > 0:
            return NO_LOOKUP
        limit = self._limit(req)
        if not self._lower_keys():
            h = self.hbm.count_prefix(keys, limit)
            return PrefixLookup(h, h, None, (h, 0, 0, 0)) if h else NO_LOOKUP
        cs = self._cs
        versions = (cs[0][C_VERSION], cs[1][C_VERSION], cs[2][C_VERSION], cs[3][C_VERSION])
        memo = self._lookups.get(req.idx)
        if memo is not None and memo[0] == versions:
            return memo[1]
        p = self._pools
        out = np.empty(limit, dtype=np.int8)
        counts = np.zeros(4, dtype=np.int64)
        found, lead = lookup_tiers(keys, limit, p[0].ht, p[0].bits, p[1].ht, p[1].bits, p[2].ht, p[2].bits,
                                   p[3].ht, p[3].bits, out, counts)
        if lead == found:
            got = PrefixLookup(found, found, None, (found, 0, 0, 0)) if found else NO_LOOKUP
        else:
            c = counts.tolist()
            got = PrefixLookup(found, lead, out[:found], (c[0], c[1], c[2], c[3]))
        self._lookups[req.idx] = (versions, got)
        return got

    def usable_blocks(self, req: Request) -> tuple[int, PrefixLookup]:
        """(leading prompt blocks the request will take from the cache, the lookup): every block found
        when the residency policy loads lower-tier hits, else the HBM blocks before the first one that
        is not in HBM."""
        lk = self.lookup(req)
        if lk.tiers is None:
            return lk.found, lk
        sig = (lk.found, lk.hbm_lead, lk.counts)
        memo = self._decisions.get(req.idx)
        if memo is not None and memo[0] == sig:
            load = memo[1]
        else:
            if self.residency is None:
                load = False
            else:
                choice = self.residency.load_or_recompute(self.res_view, self._shown(req), self._now)
                if choice not in ("load", "recompute"):
                    raise PolicyAnswerError(f"residency policy {self.residency.name!r} answered {choice!r} to "
                                       f"load_or_recompute (expected 'load' or 'recompute')")
                load = choice == "load"
            self._decisions[req.idx] = (sig, load)
        return (lk.found if load else lk.hbm_lead), lk

    def prefix_hit_blocks(self, req: Request) -> int:
        """Leading full prompt blocks the request takes from the cache if admitted now (HBM hits, and
        lower-tier hits it would load); at least one prompt token is always left to compute."""
        keys = req.hash_keys
        if not self.prefix_caching or keys is None or req.num_computed > 0:
            return 0
        if not self._lower_keys():
            return self.hbm.count_prefix(keys, self._limit(req))
        return self.usable_blocks(req)[0]

    def load_estimate_s(self, req: Request) -> float:
        """Seconds to bring the request's lower-tier prefix blocks into HBM over idle links: each
        source's own hop (NVMe read, network) and then PCIe host-to-device for all of them."""
        lk = self.lookup(req)
        if lk.tiers is None:
            return 0.0
        bpb = self.host_bytes_per_block
        lower = sum(lk.counts[1:])
        t = 0.0
        first = 0.0
        for tier in (NVME, STORE):
            if lk.counts[tier]:
                ch = self.links[LOAD_LINKS[tier][0]]
                first = max(first, ch.latency_s + lk.counts[tier] * bpb / ch.bandwidth_bytes_per_s)
        h2d = self.links["pcie_h2d"]
        t = first + h2d.latency_s + lower * bpb / h2d.bandwidth_bytes_per_s
        return t

    def recompute_estimate_s(self, req: Request) -> float:
        """Prefill seconds the request's lower-tier prefix would add if recomputed: its prefill from
        the first block not in HBM, less its prefill from the end of the blocks found (priced by the
        replica's cost model; remembered per (tokens, from, to))."""
        lk = self.lookup(req)
        if lk.tiers is None or self.prefill_s is None:
            return 0.0
        bs = self.block_size
        total = req.num_tokens
        a, b = lk.hbm_lead * bs, lk.found * bs
        got = self._recompute_memo.get((total, a, b))
        if got is None:
            got = self._recompute_memo[(total, a, b)] = self.prefill_s(total - a, a) - self.prefill_s(total - b, b)
        return got

    def blocks_needed(self, req: Request, new_tokens: int) -> int:
        """Available HBM blocks that computing ``new_tokens`` more tokens consumes. For a request not
        yet admitted this counts its prefix hits: hit blocks that are only cached (unreferenced) stop
        being available once the request takes them, and lower-tier hits it loads need fresh blocks."""
        bs = self.block_size
        if req.state == RequestState.WAITING:
            if not self.prefix_caching or req.hash_keys is None or req.num_computed > 0:
                return -(-new_tokens // bs)
            if not self._lower_keys():
                hit = self.hbm.count_prefix(req.hash_keys, self._limit(req))
                fresh = -(-(hit * bs + new_tokens) // bs) - hit
                if hit:
                    fresh += self.hbm.num_unreferenced(req.hash_keys[:hit])
                return fresh
            hit, lk = self.usable_blocks(req)
            fresh = -(-(hit * bs + new_tokens) // bs) - hit
            if hit:
                if lk.tiers is None:
                    fresh += self.hbm.num_unreferenced(req.hash_keys[:hit])
                else:
                    hbm = self.hbm
                    fresh += int(fresh_for_hits(lk.tiers, req.hash_keys, hit, hbm.ht, hbm.bits, hbm.m))
            return fresh
        return -(-(req.num_computed + new_tokens) // bs) - len(req.blocks)

    def can_admit(self, req: Request, new_tokens: int) -> bool:
        return self.blocks_needed(req, new_tokens) <= self.hbm.num_available

    def tokens_to_compute(self, req: Request) -> int:
        if req.state == RequestState.WAITING:
            return req.num_tokens - self.prefix_hit_blocks(req) * self.block_size
        return req.num_tokens - req.num_computed

    def blocks_freed_by_release(self, req: Request) -> int:
        """HBM blocks that would become available if ``req`` released its blocks now."""
        rc = self.hbm.refcount
        return sum(1 for b in req.blocks if rc[b] == 1)

    def finishes_quiet(self) -> bool:
        """True when releasing a finished request's blocks starts no copy (no write-through): a
        decode run may then advance past completions (``sim.replica.decode_run``)."""
        return (self.residency is None or self.exclusive or not self.prefix_caching
                or not self.residency.offloads())

    def run_budget(self, now: float) -> int:
        """HBM blocks a decode run may allocate: all available ones when evictions are dropped; only
        the free ones when an evicted block would be written back (each copy must start at the step
        that evicts, so the run stops there and that step runs alone)."""
        if self._demotion(HBM, now) < 0:
            return self.hbm.num_available
        return self.hbm.num_free

    # ------------------------------------------------------------------ allocation and demotion
    def _demotion(self, t: int, now: float) -> int:
        """The tier the residency policy sends blocks evicted from tier ``t`` to, or -1 (dropped)."""
        if self.residency is None or t == STORE or not self.prefix_caching:
            return -1
        name = self.residency.demote_to(self.res_view, TIERS[t], now)
        if name == "drop":
            return -1
        if name not in TIERS or TIERS.index(name) <= t:
            raise PolicyAnswerError(f"residency policy {self.residency.name!r}: demote_to({TIERS[t]!r}) answered "
                               f"{name!r}; expected 'drop' or a lower tier ({', '.join(TIERS[t + 1:])})")
        d = TIERS.index(name)
        return d if self._pools[d].num_blocks else -1

    def _alloc(self, t: int, n: int, now: float, owner: int = -1, array: bool = False
               ) -> tuple[list[int] | np.ndarray | None, list[Move]]:
        """``n`` blocks of tier ``t`` (a list, or with ``array`` an int64 array) and the write-backs
        their evicted contents need (whoever writes the blocks waits for those)."""
        pool = self._pools[t]
        got = (pool.allocate_array if array else pool.allocate)(n, now, self._choose[t], owner)
        if got is None or not pool.c[C_NEV]:
            return got, []
        return got, self._evicted(t, now)

    def _evicted(self, t: int, now: float) -> list[Move]:
        pool = self._pools[t]
        dest = self._demotion(t, now)
        if dest < 0:
            self.dropped_blocks[t] += int(pool.c[C_NEV])
            return []
        keys, pos = pool.last_evicted()
        m = self._write(t, dest, keys, pos, now)
        return [m] if m is not None else []

    def _write(self, src: int, dst: int, keys: np.ndarray, pos: np.ndarray, now: float,
               src_blocks: np.ndarray | None = None) -> Move | None:
        """Copy ``keys`` from tier ``src`` to ``dst`` (those ``dst`` lacks, as many as it has room for,
        in order); ``src_blocks`` are the source blocks when they are still live (write-through)."""
        dpool = self._pools[dst]
        n0 = keys.shape[0]
        if dpool.num_keys:
            keep = dpool.find(keys) < 0
            keys, pos = keys[keep], pos[keep]
            if src_blocks is not None:
                src_blocks = src_blocks[keep]
        n = min(keys.shape[0], dpool.num_available)
        if src_blocks is None:      # evicted blocks not kept below are dropped
            self.dropped_blocks[src] += keys.shape[0] - n
            self.demoted_blocks[src] += n0 - (keys.shape[0] - n)
        if n == 0:
            return None
        keys, pos = keys[:n], pos[:n]
        dst_blocks, cascade = self._alloc(dst, n, now, array=True)
        dpool.lock(dst_blocks)
        held = _NONE
        if src_blocks is not None:
            held = np.asarray(src_blocks[:n], dtype=np.int64)
            spool = self._pools[src]
            spool.hold(held)
            spool.lock(held)
        m = Move("write", src, dst, WRITE_LINKS[(src, dst)], n * self.host_bytes_per_block, held, dst_blocks,
                 keys, pos.astype(np.int32), cascade)
        self._moves.append(m)
        self.write_blocks[src, dst] += n
        self.writes[src, dst] += 1
        return m

    def _retain_sources(self, keys: np.ndarray, tiers: np.ndarray, now: float) -> dict[int, np.ndarray]:
        """Take the lower-tier copies a load will read, before the HBM blocks it writes are allocated:
        that allocation's write-backs can cascade down (exclusive tiers move every HBM victim to DRAM,
        whose own victims move on to NVMe) and must not evict the very copies being loaded."""
        return {t: np.asarray(self._pools[t].retain_keys(keys[tiers == t], now), dtype=np.int64)
                for t in (DRAM, NVME, STORE) if (tiers == t).any()}

    def _load(self, req_idx: int, positions: np.ndarray, keys: np.ndarray, dst_blocks: np.ndarray,
              tiers: np.ndarray, srcs: dict[int, np.ndarray], after: list[Move], prefetch: bool) -> None:
        """Loads of ``keys`` (found in ``tiers``, their copies ``srcs`` retained by
        :meth:`_retain_sources`) into the HBM blocks ``dst_blocks``, one per source."""
        for t in (DRAM, NVME, STORE):
            sel = tiers == t
            n = int(sel.sum())
            if not n:
                continue
            src = srcs[t]
            self._pools[t].lock(src)
            self._moves.append(Move("load", t, HBM, LOAD_LINKS[t], n * self.host_bytes_per_block, src,
                                    dst_blocks[sel], keys[sel], positions[sel].astype(np.int32), list(after),
                                    request=req_idx, prefetch=prefetch))
            self.loads[t] += 1
            self.load_blocks[t] += n

    def take_moves(self) -> list[Move]:
        """Copies decided since the last call, in dependency order (a move's ``after`` come first)."""
        got = self._moves
        self._moves = []
        return got

    def take_waits(self, tier: str = "hbm") -> list[Move]:
        """Write-backs of blocks of ``tier`` evicted by allocations since the last call: whatever
        writes those blocks (the next step's prefill, a swap's copy) must wait for them."""
        w = self._waits[TIERS.index(tier)]
        got = list(w)
        w.clear()
        return got

    # ------------------------------------------------------------------ admission and growth
    def admit(self, req: Request, now: float) -> int:
        """Take the request's cached prefix: references to its HBM hits, and HBM blocks for the
        lower-tier hits it loads (registered, not ready; their copies queued). Returns prompt tokens
        hit; :meth:`waiting_on_load` says whether the request must wait for copies."""
        self._now = now
        keys = req.hash_keys
        bs = self.block_size
        hit = 0
        lk = NO_LOOKUP
        if keys is not None and self.prefix_caching and req.num_computed == 0:
            self.lookup_tokens += self._limit(req) * bs
            hit, lk = self.usable_blocks(req)
        self._lookups.pop(req.idx, None)
        self._decisions.pop(req.idx, None)
        if self.futures is not None:
            self.futures.admit(req.idx, now)
        held = self._holds.pop(req.idx, None)
        served = None          # the tier each hit block came from (prefetched ones: their source)
        if not hit:
            req.blocks = []
        elif lk.tiers is None or hit <= lk.hbm_lead:
            if lk.tiers is not None or self.prefetch_blocks:
                served = self.hbm.prefetched_from(self.hbm.find(keys[:hit])).astype(np.int64)
            req.blocks = self.hbm.retain_keys(keys[:hit], now, req.idx)
        else:
            tiers = lk.tiers[:hit]
            hpos = np.flatnonzero(tiers == HBM)
            lpos = np.flatnonzero(tiers != HBM)
            blocks = np.empty(hit, dtype=np.int64)
            served = tiers.astype(np.int64)
            if self.prefetch_blocks:
                served[hpos] = self.hbm.prefetched_from(self.hbm.find(keys[hpos]))
            blocks[hpos] = self.hbm.retain_keys(keys[hpos], now, req.idx)
            srcs = self._retain_sources(keys[lpos], tiers[lpos], now)
            new, waits = self._alloc(HBM, lpos.shape[0], now, req.idx, array=True)
            if new is None:
                raise RuntimeError("admit: no HBM blocks for the lower-tier hits (can_admit was not asked)")
            blocks[lpos] = new
            self.hbm.register_many(new, keys[lpos], now, lpos)
            self.hbm.lock(new)
            self.hbm.set_ready(new, False)
            self._waits[HBM].extend(waits)
            self._load(req.idx, lpos, keys[lpos], new, tiers[lpos], srcs, waits, False)
            req.blocks = blocks.tolist()
        if held:
            self.hbm.release(held, now)      # the request holds what was prefetched for it now
            self.num_held -= len(held)
        if lk.found > hit:
            self.recompute_choices += 1
            self.recompute_choice_tokens += (lk.found - hit) * bs
        req.num_cached_blocks = hit
        req.num_computed = hit * bs
        req.num_prefix_hit = hit * bs
        req.total_prefix_hit += req.num_prefix_hit
        self.hit_tokens += req.num_prefix_hit
        if keys is not None and self.prefix_caching:
            self.admissions += 1
            limit = self._limit(req)
            if limit:
                self.hit_ratio_sum += hit / limit
            if hit:
                counts = (np.bincount(served, minlength=4) if served is not None else np.array([hit, 0, 0, 0]))
                self.tier_hit_tokens += counts * bs
                self.tier_hit_requests += counts > 0
                if limit:
                    self.tier_ratio_sum += counts / limit
                if counts[1:].any():
                    req.lower_hit_tokens += int(counts[1:].sum()) * bs
        return req.num_prefix_hit

    def waiting_on_load(self, req: Request) -> bool:
        """True while some of the request's HBM blocks are still on their way in."""
        return bool(req.blocks) and not self.hbm.ready[req.blocks].all()

    def prefetch(self, req: Request, now: float) -> int:
        """Start loading a waiting request's lower-tier prefix into HBM ahead of its admission; the
        blocks are held for it until then (:meth:`admit` takes them over, :meth:`drop_prefetch` gives
        them back). Its own HBM hits are kept from being evicted by the allocation. Returns the blocks
        started (0: nothing to load, or no room)."""
        self._now = now
        if req.state != RequestState.WAITING:
            return 0
        hit, lk = self.usable_blocks(req)
        if lk.tiers is None or hit <= lk.hbm_lead:
            return 0
        keys = req.hash_keys
        tiers = lk.tiers[:hit]
        hpos = np.flatnonzero(tiers == HBM)
        lpos = np.flatnonzero(tiers != HBM)
        if lpos.shape[0] > self.hbm.num_available - hpos.shape[0]:
            return 0
        shield = self.hbm.retain_keys(keys[hpos], now, hit=False)
        srcs = self._retain_sources(keys[lpos], tiers[lpos], now)
        new, waits = self._alloc(HBM, lpos.shape[0], now, array=True)
        self.hbm.release(shield, now)
        if new is None:
            for t, src in srcs.items():
                self._pools[t].release(src.tolist(), now)
            return 0
        self.hbm.register_many(new, keys[lpos], now, lpos)
        self.hbm.lock(new)
        self.hbm.set_ready(new, False)
        for t in (DRAM, NVME, STORE):
            self.hbm.tag_prefetched(new[tiers[lpos] == t], t)
        self._load(req.idx, lpos, keys[lpos], new, tiers[lpos], srcs, waits, True)
        self._holds.setdefault(req.idx, []).extend(new.tolist())
        self.num_held += lpos.shape[0]
        self.prefetch_requests += 1
        self.prefetch_blocks += lpos.shape[0]
        return lpos.shape[0]

    def drop_prefetch(self, req: Request, now: float) -> None:
        """Give back the blocks prefetched for a request that will not be admitted (rejected)."""
        held = self._holds.pop(req.idx, None)
        if held:
            self.hbm.release(held, now)
            self.num_held -= len(held)

    def grow(self, req: Request, new_tokens: int, now: float) -> bool:
        """Allocate the HBM blocks needed to compute ``new_tokens`` more tokens. False on shortage."""
        need = -(-(req.num_computed + new_tokens) // self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        hbm = self.hbm
        if need == 1:
            b = hbm.allocate_one(now, self._choose[HBM], req.idx)
            if b < 0:
                return False
            if hbm.c[C_NEV]:
                self._waits[HBM].extend(self._evicted(HBM, now))
            req.blocks.append(b)
            return True
        got, waits = self._alloc(HBM, need, now, req.idx)
        if got is None:
            return False
        self._waits[HBM].extend(waits)
        req.blocks.extend(got)
        return True

    def grow_run(self, reqs: Sequence[Request], who: np.ndarray, count: np.ndarray, times: np.ndarray) -> None:
        """``count[k]`` new blocks for ``reqs[who[k]]`` at ``times[k]``, for each k in order (a run's
        allocations, see ``sim.replica.decode_run``): the same blocks, in the same order, as the
        :meth:`grow` calls single stepping makes (one block: ``allocate_one``; several: one
        ``allocate``). The caller planned them to fit (:meth:`run_budget`), so nothing evicted here is
        written back."""
        hbm = self.hbm
        wl = who.tolist()
        cl = count.tolist()
        total = sum(cl)
        if self.time_dependent and total > hbm.num_free:
            # a policy whose choice depends on the time is asked at each allocation's own time
            choose = self._choose[HBM]
            for w, c, t in zip(wl, cl, times.tolist()):
                req = reqs[w]
                if c == 1:
                    b = hbm.allocate_one(t, choose, req.idx)
                    if b < 0:
                        raise RuntimeError("a run allocated more blocks than were available")
                    req.blocks.append(b)
                else:
                    got = hbm.allocate(c, t, choose, req.idx)
                    if got is None:
                        raise RuntimeError("a run allocated more blocks than were available")
                    req.blocks.extend(got)
                if hbm.c[C_NEV]:
                    self.dropped_blocks[HBM] += int(hbm.c[C_NEV])
            return
        owners = np.array([reqs[w].idx for w in wl], dtype=np.int64)
        if total != len(wl):
            owners = np.repeat(owners, count)
            times = np.repeat(times, count)
        got = hbm.allocate_run(times, owners, self._choose[HBM])
        if hbm.c[C_NEV]:
            self.dropped_blocks[HBM] += int(hbm.c[C_NEV])
        if total == len(wl):
            for w, b in zip(wl, got):
                reqs[w].blocks.append(b)
            return
        i = 0
        for w, c in zip(wl, cl):
            reqs[w].blocks.extend(got[i:i + c])
            i += c

    def truncate(self, req: Request, now: float) -> None:
        """Release the blocks beyond what ``req.num_computed`` tokens need (rolled-back drafts)."""
        keep = -(-req.num_computed // self.block_size)
        if len(req.blocks) > keep:
            self.hbm.release(req.blocks[keep:], now)
            del req.blocks[keep:]

    def register_computed(self, req: Request, now: float = 0.0) -> None:
        """Publish newly completed full prompt blocks in the prefix cache (in exclusive mode a lower
        tier's copy of the same prefix is dropped: it now lives in HBM)."""
        keys = req.hash_keys
        if keys is None or not self.prefix_caching:
            return
        full = min(req.num_computed // self.block_size, len(keys), req.prompt_tokens // self.block_size)
        first = req.num_cached_blocks
        if full > first:
            self.hbm.register_many(req.blocks[first:full], keys[first:full], now, first)
            req.num_cached_blocks = full
            if self.exclusive and self._lower_keys():
                for pool in (self.dram, self.nvme):
                    if pool.num_keys:
                        pool.forget_keys(keys[first:full])

    def release(self, req: Request, now: float, offload: bool = True) -> None:
        """Give back every HBM block of a finished or recompute-preempted request (first copying its
        prompt blocks down if the residency policy offloads them)."""
        self.releases += 1
        if req.blocks:
            if (offload and self.residency is not None and req.num_cached_blocks and not self.exclusive
                    and self.prefix_caching):
                dest = self.residency.offload_to(self.res_view, self._shown(req), now)
                if dest != "none":
                    self._offload(req, dest, now)
            self.hbm.release(req.blocks, now)
            req.blocks = []
        req.num_cached_blocks = 0

    def _offload(self, req: Request, dest: str, now: float) -> None:
        if dest not in TIERS[1:]:
            raise PolicyAnswerError(f"residency policy {self.residency.name!r}: offload_to answered {dest!r}; "
                               f"expected 'none' or a lower tier ({', '.join(TIERS[1:])})")
        d = TIERS.index(dest)
        if not self._pools[d].num_blocks:
            return
        nb = req.num_cached_blocks
        blocks = np.asarray(req.blocks[:nb], dtype=np.int64)
        keys = req.hash_keys[:nb]
        mine = self.hbm.key[blocks] == keys        # blocks registered under their key (not duplicates)
        mine &= self.hbm.ready[blocks] == 1
        pos = np.flatnonzero(mine)
        self._write(HBM, d, keys[pos], pos.astype(np.int32), now, src_blocks=blocks[pos])

    # ------------------------------------------------------------------ landing
    def land(self, m: Move, now: float) -> None:
        """Apply a copy that has landed."""
        m.landed_s = now
        if m.kind == "load":
            src = self._pools[m.src]
            src.unlock(m.src_blocks)
            if self.exclusive and m.src != STORE:
                src.discard(m.src_blocks)
            else:
                src.release(m.src_blocks, now)
            hbm = self.hbm
            hbm.unlock(m.dst_blocks)
            hbm.set_ready(m.dst_blocks, True)
            return
        dst = self._pools[m.dst]
        dst.unlock(m.dst_blocks)
        dst.register_many(m.dst_blocks, m.keys, now, m.positions)
        dst.release(m.dst_blocks, now)
        if m.src_blocks.shape[0]:
            src = self._pools[m.src]
            src.unlock(m.src_blocks)
            src.release(m.src_blocks, now)
        if self.exclusive and m.dst != STORE:
            # recomputed above while the copy was on its way: the block lives up there now
            above = np.zeros(m.keys.shape[0], dtype=bool)
            for pool in self._pools[:m.dst]:
                if pool.num_keys:
                    above |= pool.find(m.keys) >= 0
            if above.any():
                dst.forget_keys(m.keys[above])

    # ------------------------------------------------------------------ swapping
    def reserve_dram(self, req: Request, now: float,
                     swapped: Sequence[Request]) -> tuple[bool, list[Request]]:
        """DRAM blocks for ``req``'s KV (into ``req.dram_blocks``), evicting cached DRAM blocks and then
        dropping swapped requests' copies (chosen by the eviction policy) when DRAM is full. Returns
        (reserved, requests whose DRAM copy was dropped); write-backs of evicted DRAM blocks the swap
        must wait for are in :meth:`take_waits` ``("dram")``."""
        n = len(req.blocks)
        got, waits = self._alloc(DRAM, n, now)
        dropped: list[Request] = []
        if got is None:
            droppable = [r for r in swapped if r.state == RequestState.SWAPPED]
            short = n - self.dram.num_available
            if sum(len(r.dram_blocks) for r in droppable) >= short:
                shown = [FrozenRequest(r) for r in droppable] if self.guarded else droppable
                for victim in self.eviction.drop_swapped(SwapView(tuple(shown)), short, now):
                    victim = unwrap(victim)
                    if victim.state != RequestState.SWAPPED:
                        raise PolicyAnswerError(f"eviction policy dropped request {victim.req_id}, which is "
                                           f"not swapped out")
                    self.drop_dram_copy(victim, now)
                    dropped.append(victim)
                got, waits = self._alloc(DRAM, n, now)
        if got is None:
            return False, dropped
        self._waits[DRAM].extend(waits)
        req.dram_blocks = got
        return True, dropped

    def drop_dram_copy(self, req: Request, now: float) -> None:
        """Forget a swapped request's DRAM copy (it will recompute, or it was rejected)."""
        self.dram.release(req.dram_blocks, now)
        req.dram_blocks = []

    def finish_swap_out(self, req: Request, now: float) -> None:
        self.release(req, now, offload=False)

    def reserve_hbm_for_swap_in(self, req: Request, now: float) -> bool:
        got, waits = self._alloc(HBM, len(req.dram_blocks), now, req.idx)
        if got is None:
            return False
        self._waits[HBM].extend(waits)
        req.blocks = got
        req.num_cached_blocks = 0
        return True

    def finish_swap_in(self, req: Request, now: float) -> None:
        self.drop_dram_copy(req, now)

    # ------------------------------------------------------------------ hand-off between replicas
    def reserve_import(self, num_blocks: int, now: float, owner: int = -1) -> list[int] | None:
        """HBM blocks for KV arriving from another replica (a prefill replica's hand-off): allocated
        (evicting cached blocks if need be), locked and not ready until :meth:`land_import`; None on
        shortage. Write-backs of evicted blocks the copy must wait for are in :meth:`take_waits`."""
        got, waits = self._alloc(HBM, num_blocks, now, owner)
        if got is None:
            return None
        self._waits[HBM].extend(waits)
        arr = np.asarray(got, dtype=np.int64)
        self.hbm.lock(arr)
        self.hbm.set_ready(arr, False)
        self.num_importing += len(got)
        return got

    def land_import(self, req: Request, blocks: list[int], now: float) -> None:
        """The hand-off reserved in ``blocks`` has landed: they become ``req``'s block table, ready. The
        prompt blocks are not published in this replica's prefix cache (a decode replica never
        prefills them; a request it recompute-preempts publishes its own when it prefills again)."""
        if req.blocks:
            raise RuntimeError(f"request {req.req_id} still holds {len(req.blocks)} blocks of its sender")
        arr = np.asarray(blocks, dtype=np.int64)
        self.hbm.unlock(arr)
        self.hbm.set_ready(arr, True)
        self.num_importing -= len(blocks)
        req.blocks = list(blocks)
        req.num_cached_blocks = 0

    # ------------------------------------------------------------------ transfers
    def lock(self, req: Request) -> int:
        """Lock ``req``'s HBM blocks for a transfer (swap out reads them, swap in writes them);
        returns how many."""
        self.hbm.lock(req.blocks)
        return len(req.blocks)

    def unlock(self, req: Request) -> None:
        self.hbm.unlock(req.blocks)

    # ------------------------------------------------------------------ costs for ranking policies
    def block_recompute_s(self, positions: np.ndarray) -> np.ndarray:
        """Prefill seconds one block at each position adds to a long prefill (2,048 more tokens after
        it: the compute-bound regime a recomputed prefix runs in), from a table priced once per run on
        a geometric grid of positions and interpolated."""
        if self.prefill_s is None:
            return np.zeros(len(positions))
        if self._recompute_table is None:
            bs, rest = self.block_size, 2048
            top = max(2, -(-131072 // bs))
            grid = np.unique(np.concatenate(([0], np.geomspace(1, top, 40).astype(np.int64))))
            cost = np.array([self.prefill_s(rest + bs, int(g) * bs) - self.prefill_s(rest, (int(g) + 1) * bs)
                             for g in grid])
            self._recompute_table = np.maximum(np.interp(np.arange(top + 1), grid, cost), 0.0)
        pos = np.clip(np.asarray(positions, dtype=np.int64), 0, self._recompute_table.shape[0] - 1)
        return self._recompute_table[pos]

    # ------------------------------------------------------------------ checking and figures
    def check(self) -> None:
        for pool in self._pools:
            pool.check()
        if self.exclusive:
            settled = []
            for pool in self.pools:
                ok = (pool.key >= 0) & (pool.locks == 0)
                settled.append(set(pool.key[ok].tolist()))
            for i in range(3):
                for j in range(i + 1, 3):
                    both = settled[i] & settled[j]
                    assert not both, f"exclusive tiers: {len(both)} blocks in both {TIERS[i]} and {TIERS[j]}"

    def stats(self) -> dict:
        """Counters for the summary (``summary["kv_tiers"]``)."""
        on_time, late, wasted = self.hbm.prefetch_counts()
        return {
            "hit_tokens": {t: int(self.tier_hit_tokens[i]) for i, t in enumerate(TIERS)},
            "hit_requests": {t: int(self.tier_hit_requests[i]) for i, t in enumerate(TIERS)},
            "admissions": self.admissions, "hit_ratio_sum": self.hit_ratio_sum,
            "loads": {t: int(self.loads[i]) for i, t in enumerate(TIERS) if i},
            "load_blocks": {t: int(self.load_blocks[i]) for i, t in enumerate(TIERS) if i},
            "recompute_choices": self.recompute_choices, "recompute_choice_tokens": self.recompute_choice_tokens,
            "write_blocks": {f"{TIERS[s]}->{TIERS[d]}": int(self.write_blocks[s, d])
                             for s in range(4) for d in range(4) if self.write_blocks[s, d]},
            "writes": {f"{TIERS[s]}->{TIERS[d]}": int(self.writes[s, d])
                       for s in range(4) for d in range(4) if self.writes[s, d]},
            "evicted_blocks": {t: p.num_evicted for t, p in zip(TIERS, self._pools) if p.num_blocks},
            "dropped_blocks": {t: int(self.dropped_blocks[i]) for i, t in enumerate(TIERS)},
            "demoted_blocks": {t: int(self.demoted_blocks[i]) for i, t in enumerate(TIERS)},
            "prefetch": {"requests": self.prefetch_requests, "blocks": self.prefetch_blocks, "on_time_blocks": on_time,
                         "late_blocks": late, "wasted_blocks": wasted},
        }
