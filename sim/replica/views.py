"""The read-only views policies get of a replica, and guarded variants that enforce "read-only".

Views hand out live objects (the request queues, the requests themselves) for speed. With
``guarded=True`` (the property tests turn it on for every policy) they hand out immutable snapshots
instead: queues as tuples, requests behind :class:`FrozenRequest`, which raises on any write, and
block lists as tuples. The replica unwraps the requests of a returned plan.

Router views bring themselves up to date: reading one first commits a decode run in progress up to
now (``Replica.sync``), so a router that reads nothing costs nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from policies.base import StepPlan
from sim.memory.tiers import TIERS
from sim.request import FrozenRequest, Request, unwrap

_TIER_INDEX = {t: i for i, t in enumerate(TIERS)}

if TYPE_CHECKING:
    from sim.replica.loop import Replica


class _Guard:
    """Stable proxies (one per request, so identity checks in policies work) and their removal."""

    __slots__ = ("enabled", "_proxies")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._proxies: dict[int, FrozenRequest] = {}

    def wrap(self, req: Request):
        p = self._proxies.get(id(req))
        if p is None or unwrap(p) is not req:
            p = self._proxies[id(req)] = FrozenRequest(req)
        return p

    def seq(self, reqs):
        return tuple(self.wrap(r) for r in reqs) if self.enabled else reqs

    def plan(self, plan: StepPlan) -> StepPlan:
        if not self.enabled:
            return plan
        return StepPlan(prefill=[(unwrap(r), n) for r, n in plan.prefill], decode=[unwrap(r) for r in plan.decode],
                        preempt=[unwrap(r) for r in plan.preempt], swap_in=[unwrap(r) for r in plan.swap_in])


class SchedulerViewImpl:
    """The live, read-only view a scheduler gets of its replica (``policies.base.SchedulerView``)."""

    __slots__ = ("_r", "_kv", "_g", "block_size", "num_blocks", "max_model_len")

    def __init__(self, replica: Replica, guarded: bool = False) -> None:
        self._r = replica
        self._kv = replica.kv
        self._g = _Guard(guarded)
        self.block_size = replica.kv.block_size
        self.num_blocks = replica.kv.hbm.num_blocks
        self.max_model_len = replica.max_model_len

    @property
    def waiting(self):
        return self._g.seq(self._r.waiting)

    @property
    def running(self):
        return self._g.seq(self._r.running)

    @property
    def swapped(self):
        return self._g.seq(self._r.swapped)

    @property
    def num_swapping_in(self) -> int:
        """Requests on their way into the running batch: swap-ins, and admitted requests whose prefix
        is still loading from a lower tier."""
        return self._r.num_swapping_in + len(self._r.moves.loading)

    @property
    def num_free_blocks(self) -> int:
        return self._kv.hbm.num_available

    def blocks_needed(self, req, new_tokens: int) -> int:
        return self._kv.blocks_needed(unwrap(req), new_tokens)

    def prefix_hit_tokens(self, req) -> int:
        return self._kv.prefix_hit_blocks(unwrap(req)) * self.block_size

    def tokens_to_compute(self, req) -> int:
        return self._kv.tokens_to_compute(unwrap(req))

    def swap_in_blocks(self, req) -> int:
        return len(unwrap(req).dram_blocks)

    def decode_blocks_needed(self, reqs) -> list[int]:
        bs = self.block_size
        if self._g.enabled:
            reqs = [unwrap(r) for r in reqs]
        return [1 if r.num_computed >= len(r.blocks) * bs else 0 for r in reqs]

    def blocks_freed_by_release(self, req) -> int:
        return self._kv.blocks_freed_by_release(unwrap(req))

    def block_slack_tokens(self, req) -> int:
        r = unwrap(req)
        return len(r.blocks) * self.block_size - r.num_computed

    def unwrap_plan(self, plan: StepPlan) -> StepPlan:
        return self._g.plan(plan)

    def frozen(self, reqs):
        """``reqs`` as this view shows requests to policies (guarded: immutable proxies)."""
        return self._g.seq(reqs)

    def show(self, req):
        return self._g.wrap(req) if self._g.enabled else req


class LaneView(SchedulerViewImpl):
    """A decoupled lane's view of its replica (``sim.replica.lanes``): ``running`` shows only the
    requests of the lane's phase that the other lane's step in flight does not hold; the decode lane
    sees no waiting or swapped requests (it admits nothing); ``num_swapping_in`` adds the other lane's
    running requests, so ``max_num_seqs`` still counts every sequence of the replica."""

    __slots__ = ("_lanes", "_lane")

    def __init__(self, replica: Replica, lanes, lane: int, guarded: bool = False) -> None:
        super().__init__(replica, guarded)
        self._lanes = lanes
        self._lane = lane

    @property
    def waiting(self):
        return self._g.seq(self._r.waiting) if self._lane == 0 else ()

    @property
    def running(self):
        return self._g.seq(self._lanes.requests(self._lane))

    @property
    def swapped(self):
        return self._g.seq(self._r.swapped) if self._lane == 0 else ()

    @property
    def num_swapping_in(self) -> int:
        return self._r.num_swapping_in + len(self._r.moves.loading) + self._lanes.others(self._lane)


class RouterView:
    """What routers see of a replica (``policies.base.ReplicaView``); brings itself up to date."""

    __slots__ = ("_r",)

    def __init__(self, replica: Replica) -> None:
        self._r = replica

    def _now(self) -> Replica:
        r = self._r
        r.sync(r.env.now)
        return r

    @property
    def replica_id(self) -> int:
        return self._r.replica_id

    @property
    def num_waiting(self) -> int:
        return len(self._now().waiting)

    @property
    def num_running(self) -> int:
        return len(self._now().running)

    @property
    def queued_tokens(self) -> int:
        r = self._now()
        kv = r.kv
        return sum(kv.tokens_to_compute(q) for q in r.waiting) + sum(q.tokens_to_compute for q in r.running)

    @property
    def num_free_blocks(self) -> int:
        return self._now().kv.hbm.num_available

    @property
    def num_blocks(self) -> int:
        return self._r.kv.hbm.num_blocks

    def prefix_hit_tokens(self, req) -> int:
        r = self._now()
        req = unwrap(req)
        keys = req.hash_keys
        if not r.kv.prefix_caching or keys is None:
            return 0
        bs = r.kv.block_size
        return r.kv.hbm.count_prefix(keys, min(len(keys), (req.prompt_tokens - 1) // bs)) * bs


class SpeculationViewImpl:
    """What a speculation policy sees when it proposes (``policies.base.SpeculationView``): the
    step's price for a draft depth, from the replica's step builder."""

    __slots__ = ("_r", "_decode")

    def __init__(self, replica: Replica) -> None:
        self._r = replica
        self._decode: list = []

    def of(self, decode: list) -> "SpeculationViewImpl":
        """This view for a step whose decodes are ``decode``."""
        self._decode = decode
        return self

    def step_time(self, draft_tokens: int, width: int = 1) -> float:
        return self._r.builder.estimate(self._decode, int(draft_tokens), int(width))


class ResidencyViewImpl:
    """What a residency policy sees (``policies.base.ResidencyView``): the replica's tiers, its queue,
    and for a waiting request where its prefix is and what loading or recomputing it would cost."""

    __slots__ = ("_r", "_g", "preemption_mode", "block_size", "tier_mode", "tiers")

    def __init__(self, replica: Replica, preemption_mode: str, guarded: bool = False) -> None:
        self._r = replica
        self._g = _Guard(guarded)
        self.preemption_mode = preemption_mode
        self.block_size = replica.kv.block_size
        kv = replica.kv
        self.tier_mode = kv.tier_mode
        self.tiers = tuple(t for t, p in zip(TIERS, kv.all_pools) if p.num_blocks)

    def _pool(self, tier: str):
        i = _TIER_INDEX.get(tier)
        if i is None:
            raise KeyError(f"residency view: no tier {tier!r} (tiers: {', '.join(TIERS)})")
        return self._r.kv.all_pools[i]

    @property
    def num_free_dram_blocks(self) -> int:
        return self._r.kv.dram.num_available

    @property
    def waiting(self):
        return self._g.seq(self._r.waiting)

    def num_blocks(self, tier: str) -> int:
        return self._pool(tier).num_blocks

    def num_available_blocks(self, tier: str) -> int:
        """Blocks an allocation in ``tier`` can obtain now (free plus evictable cached)."""
        return self._pool(tier).num_available

    def num_free_blocks(self, tier: str) -> int:
        return self._pool(tier).num_free

    @property
    def num_prefetched_blocks(self) -> int:
        """HBM blocks prefetched and held for waiting requests (loading or landed, not yet admitted)."""
        return self._r.kv.num_held

    def hbm_hit_blocks(self, req) -> int:
        """Leading prompt blocks of a waiting request in HBM, before the first one that is not."""
        return self._r.kv.lookup(unwrap(req)).hbm_lead

    def lower_hit_blocks(self, req) -> dict[str, int]:
        """Prompt blocks of a waiting request found in each lower tier (the prefix found, across tiers)."""
        c = self._r.kv.lookup(unwrap(req)).counts
        return {t: c[i] for i, t in enumerate(TIERS) if i and c[i]}

    def prefix_hit_blocks(self, req) -> int:
        """Leading prompt blocks a waiting request takes from the cache if admitted now."""
        return self._r.kv.prefix_hit_blocks(unwrap(req))

    def load_s(self, req) -> float:
        """Seconds to copy the request's lower-tier prefix into HBM over idle links (no queueing)."""
        return self._r.kv.load_estimate_s(unwrap(req))

    def recompute_s(self, req) -> float:
        """Prefill seconds recomputing that prefix would add."""
        return self._r.kv.recompute_estimate_s(unwrap(req))

    def link_backlog_s(self, link: str) -> float:
        """Seconds of copies queued or in flight on one of the replica's links."""
        return self._r.transfers.backlog_s(link)
