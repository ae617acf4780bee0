"""KV residency of one replica across HBM, DRAM and NVMe: the only code that hands blocks to requests,
takes them back, and moves them between tiers. Bandwidth and time belong to the links
(``sim.memory.transfers``); this module decides which blocks each request holds where.

Prefix caching: a request's prompt is cut into engine blocks; a full block gets a *prefix key* that
identifies the whole prefix up to its end. Traces give prefix hashes over their own block size (512
tokens for Mooncake); engine block ``j`` (ending at token ``e = (j+1)·block_size``) takes the hash of
the trace block that holds token ``e-1`` together with ``e``'s offset in that block. Since trace
hashes are chained (one ID stands for the whole prefix), equal keys mean equal prefixes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.base import RequestState
from sim.memory.block_pool import BlockPool
from sim.request import FrozenRequest, Request, unwrap


def prefix_keys(hashes: np.ndarray, hash_block_tokens: int, prompt_tokens: int, block_size: int) -> np.ndarray:
    """Prefix keys of the full engine blocks of a prompt (see module docstring)."""
    n = prompt_tokens // block_size
    if n == 0 or hashes.size == 0:
        return np.empty(0, dtype=np.int64)
    ends = (np.arange(n, dtype=np.int64) + 1) * block_size
    t_end = (ends - 1) // hash_block_tokens
    valid = t_end < hashes.size
    ends, t_end = ends[valid], t_end[valid]
    # mix (trace hash, offset in its block) into one 64-bit key; works for arbitrary 64-bit hashes
    h = hashes[t_end].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= (ends - t_end * hash_block_tokens).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    return (h & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64)


class PoolCacheView:
    """The evictable blocks of one pool, for eviction policies (read-only)."""

    __slots__ = ("_pool", "tier")

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self.tier = pool.tier

    @property
    def num_cached(self) -> int:
        return self._pool.num_cached

    def lru_order(self, limit: int) -> list[int]:
        return self._pool.lru_order(limit)

    def last_access_s(self, block: int) -> float:
        return float(self._pool.last_access[block])

    def hits(self, block: int) -> int:
        return int(self._pool.hits[block])


class SwapView:
    __slots__ = ("swapped",)

    def __init__(self, swapped: Sequence[Request]) -> None:
        self.swapped = swapped

    def dram_blocks(self, req: Request) -> int:
        return len(unwrap(req).dram_blocks)


class TieredKV:
    """Per-replica KV blocks in HBM, DRAM and NVMe.

    Invariants: a RUNNING or SWAPPING request's ``blocks`` are HBM blocks it holds one reference to;
    a SWAPPED or SWAPPING request's ``dram_blocks`` are DRAM blocks it holds; WAITING, FINISHED and
    REJECTED requests hold nothing. Blocks are conserved in each tier (BlockPool invariants).
    """

    def __init__(self, *, block_size: int, hbm_blocks: int, dram_blocks: int, nvme_blocks: int,
                 hbm_bytes_per_block: int, host_bytes_per_block: int, prefix_caching: bool,
                 eviction, guarded: bool = False) -> None:
        self.block_size = block_size
        self.hbm = BlockPool("hbm", hbm_blocks, block_size, hbm_bytes_per_block)
        self.dram = BlockPool("dram", dram_blocks, block_size, host_bytes_per_block)
        self.nvme = BlockPool("nvme", nvme_blocks, block_size, host_bytes_per_block)
        self.prefix_caching = prefix_caching
        self.eviction = eviction
        self.guarded = guarded          # eviction policies see swapped requests as immutable proxies
        self.hbm_view = PoolCacheView(self.hbm)
        self.hit_tokens = 0
        self.lookup_tokens = 0

    @property
    def pools(self) -> tuple[BlockPool, BlockPool, BlockPool]:
        return self.hbm, self.dram, self.nvme

    # ------------------------------------------------------------------ eviction hook
    def choose_hbm_victims(self, pool: BlockPool, k: int, now: float) -> Sequence[int]:
        return self.eviction.evict_cached(self.hbm_view, k, now)

    # ------------------------------------------------------------------ queries (pure)
    def prefix_hit_blocks(self, req: Request) -> int:
        """Leading full prompt blocks present in the HBM prefix cache; at least one prompt token is
        always left to compute so the step can sample."""
        keys = req.hash_keys
        if not self.prefix_caching or keys is None or req.num_computed > 0:
            return 0
        return self.hbm.count_prefix(keys, min(len(keys), (req.prompt_tokens - 1) // self.block_size))

    def blocks_needed(self, req: Request, new_tokens: int) -> int:
        """Available HBM blocks that computing ``new_tokens`` more tokens consumes. For a request not
        yet admitted this counts its prefix hits: hit blocks that are only cached (unreferenced) stop
        being available once the request takes them."""
        bs = self.block_size
        if req.state == RequestState.WAITING:
            hit = self.prefix_hit_blocks(req)
            fresh = -(-(hit * bs + new_tokens) // bs) - hit
            if hit:
                fresh += self.hbm.num_unreferenced(req.hash_keys[:hit])
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

    # ------------------------------------------------------------------ admission and growth
    def admit(self, req: Request, now: float) -> int:
        """Take references to the request's cached prefix blocks; returns prompt tokens hit."""
        hit = self.prefix_hit_blocks(req)
        keys = req.hash_keys
        if keys is not None and self.prefix_caching:
            self.lookup_tokens += min(len(keys), (req.prompt_tokens - 1) // self.block_size) * self.block_size
        if hit:
            req.blocks = self.hbm.retain_keys(keys[:hit], now)
            req.num_cached_blocks = hit
        else:
            req.blocks = []
            req.num_cached_blocks = 0
        req.num_computed = hit * self.block_size
        req.num_prefix_hit = hit * self.block_size
        req.total_prefix_hit += req.num_prefix_hit
        self.hit_tokens += req.num_prefix_hit
        return req.num_prefix_hit

    def grow(self, req: Request, new_tokens: int, now: float) -> bool:
        """Allocate the HBM blocks needed to compute ``new_tokens`` more tokens. False on shortage."""
        need = -(-(req.num_computed + new_tokens) // self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if need == 1:
            b = self.hbm.allocate_one(now, self.choose_hbm_victims)
            if b < 0:
                return False
            req.blocks.append(b)
            return True
        got = self.hbm.allocate(need, now, self.choose_hbm_victims)
        if got is None:
            return False
        req.blocks.extend(got)
        return True

    def grow_run(self, reqs: Sequence[Request], who: np.ndarray, count: np.ndarray, times: np.ndarray) -> None:
        """``count[k]`` new blocks for ``reqs[who[k]]`` at ``times[k]``, for each k in order (a run's
        allocations, see ``sim.replica.decode_run``): the same blocks, in the same order, as the
        :meth:`grow` calls single stepping makes (one block: ``allocate_one``; several: one
        ``allocate``). The caller planned them to fit."""
        hbm = self.hbm
        total = int(count.sum())
        if total <= hbm.num_free:
            got = hbm.take_free(total, np.repeat(times, count) if total != len(who) else times)
            i = 0
            for w, c in zip(who.tolist(), count.tolist()):
                reqs[w].blocks.extend(got[i:i + c])
                i += c
            return
        victims = self.choose_hbm_victims
        for w, c, t in zip(who.tolist(), count.tolist(), times.tolist()):
            if c == 1:
                b = hbm.allocate_one(t, victims)
                if b < 0:
                    raise RuntimeError("a run allocated more blocks than were available")
                reqs[w].blocks.append(b)
            else:
                got = hbm.allocate(c, t, victims)
                if got is None:
                    raise RuntimeError("a run allocated more blocks than were available")
                reqs[w].blocks.extend(got)

    def truncate(self, req: Request, now: float) -> None:
        """Release the blocks beyond what ``req.num_computed`` tokens need (rolled-back drafts)."""
        keep = -(-req.num_computed // self.block_size)
        if len(req.blocks) > keep:
            self.hbm.release(req.blocks[keep:], now)
            del req.blocks[keep:]

    def register_computed(self, req: Request) -> None:
        """Publish newly completed full prompt blocks in the prefix cache."""
        keys = req.hash_keys
        if keys is None or not self.prefix_caching:
            return
        full = min(req.num_computed // self.block_size, len(keys), req.prompt_tokens // self.block_size)
        first = req.num_cached_blocks
        if full > first:
            self.hbm.register_many(req.blocks[first:full], keys[first:full].tolist())
            req.num_cached_blocks = full

    def release(self, req: Request, now: float) -> None:
        """Give back every HBM block of a finished or recompute-preempted request."""
        if req.blocks:
            self.hbm.release(req.blocks, now)
            req.blocks = []
        req.num_cached_blocks = 0

    # ------------------------------------------------------------------ swapping
    def reserve_dram(self, req: Request, now: float,
                     swapped: Sequence[Request]) -> tuple[bool, list[Request]]:
        """DRAM blocks for ``req``'s KV (into ``req.dram_blocks``), dropping swapped requests' copies
        (chosen by the eviction policy) when DRAM is full. Returns (reserved, requests whose DRAM copy
        was dropped)."""
        n = len(req.blocks)
        got = self.dram.allocate(n, now)
        dropped: list[Request] = []
        if got is None:
            droppable = [r for r in swapped if r.state == RequestState.SWAPPED]
            short = n - self.dram.num_available
            if sum(len(r.dram_blocks) for r in droppable) >= short:
                shown = [FrozenRequest(r) for r in droppable] if self.guarded else droppable
                for victim in self.eviction.drop_swapped(SwapView(tuple(shown)), short, now):
                    victim = unwrap(victim)
                    if victim.state != RequestState.SWAPPED:
                        raise RuntimeError(f"eviction policy dropped request {victim.req_id}, which is "
                                           f"not swapped out")
                    self.drop_dram_copy(victim, now)
                    dropped.append(victim)
                got = self.dram.allocate(n, now)
        if got is None:
            return False, dropped
        req.dram_blocks = got
        return True, dropped

    def drop_dram_copy(self, req: Request, now: float) -> None:
        """Forget a swapped request's DRAM copy (it will recompute, or it was rejected)."""
        self.dram.release(req.dram_blocks, now)
        req.dram_blocks = []

    def finish_swap_out(self, req: Request, now: float) -> None:
        self.release(req, now)

    def reserve_hbm_for_swap_in(self, req: Request, now: float) -> bool:
        got = self.hbm.allocate(len(req.dram_blocks), now, self.choose_hbm_victims)
        if got is None:
            return False
        req.blocks = got
        req.num_cached_blocks = 0
        return True

    def finish_swap_in(self, req: Request, now: float) -> None:
        self.drop_dram_copy(req, now)

    # ------------------------------------------------------------------ transfers
    def lock(self, req: Request) -> int:
        """Lock ``req``'s HBM blocks for a transfer (swap out reads them, swap in writes them);
        returns how many."""
        self.hbm.lock(req.blocks)
        return len(req.blocks)

    def unlock(self, req: Request) -> None:
        self.hbm.unlock(req.blocks)

    def check(self) -> None:
        for pool in self.pools:
            pool.check()
