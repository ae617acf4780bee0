"""One base class per policy kind, the plans policies return, the outcomes they observe, and the views
they see.

Policies are pure deciders: each decision is a function of a read-only view and ``now`` and returns a
plan. A policy never yields, never reads a wall clock, and never writes to a view, a request or a
pool; the replica applies the plan. Views hand out live simulator objects for speed, so "read-only" is
a contract, and the property tests enforce it: they run every registered policy against guarded views
(``sim.replica.views``) whose requests and queues raise on any write.

Every capability a policy may offer is declared here, on its kind's base class, with a default; the
engine never probes a policy with ``getattr``. A policy keeps state across decisions in ``observe``,
which the replica calls after each step (or each run of decode steps) with what happened.

Kinds and what each decides (``KINDS`` in ``policies.registry`` is the one list):

=============  ==================================================================================
scheduling     which requests run this step and how many tokens each; preemptions; swap-ins
eviction       which cached blocks of a tier (HBM, DRAM, NVMe, the shared store) to evict; which swapped
               requests' DRAM copies to drop
residency      where a preempted request's KV goes (recompute, or swap to DRAM); where evicted and
               released blocks go (drop, or a lower tier); whether a lower-tier prefix hit is loaded or
               recomputed; which waiting requests' prefixes to prefetch
speculation    how many draft tokens each decode proposes (a chain or a tree), with which drafter
               (priced, its weights and KV in HBM); how many the verifier accepts
execution      how a step's kernels are launched (host launches, CUDA graphs, a persistent kernel);
               the batch a captured graph pads a step to; the step's host and dispatch work; SMs it
               reserves
routing        which replica an arriving request joins
sparsity       which KV tokens each decode query reads, what selecting them costs, and what KV the step
               fetches from a lower tier
=============  ==================================================================================
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Protocol

import numpy as np


class RequestState(IntEnum):
    """A request's life cycle; ``sim.request.Request.to`` is the only writer and checks transitions."""

    WAITING = 0        # queued for (re)admission; holds no HBM blocks
    RUNNING = 1        # admitted: prefilling or decoding; holds HBM blocks
    SWAPPING_OUT = 2   # preempted; its KV is on the way to DRAM (HBM blocks locked)
    SWAPPED = 3        # preempted; its KV lives in DRAM
    SWAPPING_IN = 4    # its KV is on the way back to HBM (HBM blocks allocated and locked)
    FINISHED = 5
    REJECTED = 6
    LOADING = 7        # admitted; its prefix hits are on their way in from a lower tier (HBM blocks
                       # allocated, locked, not ready): it joins the running batch when they land
    HANDING_OFF = 8    # prefilled on a prefill replica (first token sampled there); its KV waits for
                       # room on a decode replica and crosses the network to it (sim.handoff), then it
                       # joins that replica's running batch


class RequestLike(Protocol):
    """The fields of a request a policy may read (see ``sim.request.Request``)."""

    idx: int                 # position in the trace (arrival order)
    req_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int
    tenant: str | None       # from the trace's tenant column, when it has one
    session_id: str | None   # from the trace's session column (multi-turn conversations)
    num_computed: int        # tokens whose KV is in cache
    num_generated: int       # output tokens produced so far
    num_prefix_hit: int      # prompt tokens served from the prefix cache at the last admission
    num_preemptions: int
    state: int
    replica: int             # the replica it was routed to (-1 before routing)
    acceptance_rate: float   # from the trace's acceptance_rate column (NaN when it has none)


# ---------------------------------------------------------------------------------------- plans
@dataclass(slots=True)
class StepPlan:
    """What one engine step runs.

    ``prefill``: (request, new tokens) chunks, for requests with more than one token lacking KV (new,
    partially prefilled, or recomputing after preemption). ``decode``: requests that process their last
    sampled token. ``preempt``: running requests to stop before this step (the residency policy says
    whether each recomputes or swaps out). ``swap_in``: swapped requests to bring back; they rejoin
    ``running`` when their transfer completes.
    """

    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    preempt: list = field(default_factory=list)
    swap_in: list = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.prefill or self.decode or self.preempt or self.swap_in)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)


DRAFTER_KINDS = ("none", "model", "eagle", "medusa", "ngram")


@dataclass(frozen=True, slots=True)
class Drafter:
    """What proposes a speculation policy's draft tokens, for the whole run: the replica prices it on
    its own GPU with the target's cost backend, and the engine takes its weights and KV out of the
    target's HBM KV budget.

    ``kind``:

    - ``"none"``: free drafts (an oracle, or tokens that come from elsewhere): no time, no memory;
    - ``"model"``: a draft model, ``model`` (a model preset name or TOML path, e.g. ``llama-3.2-1b``
      drafting for ``llama-3.1-8b``): its weights and its KV (per token, per layer of the draft model)
      take HBM; it prefills every prompt chunk with the target (with ``lazy_prefill``, only when the
      request first drafts: a policy that stops drafting then stops paying for it) and runs one
      autoregressive step per draft token;
    - ``"eagle"``: an EAGLE head (Li et al., ICML 2024, arXiv:2401.15077): ``layers`` decoder layers
      of the target's shape plus a 2h -> h fusion layer, reusing the target's embedding and LM head;
      its weights and its one layer of KV per token take HBM; autoregressive like a draft model;
    - ``"medusa"``: ``heads`` Medusa heads (Cai et al., 2024, arXiv:2401.10774), each a residual
      h x h block and its own LM head, all run in one pass after the target's; no KV;
    - ``"ngram"``: prompt lookup (no model): ``host_s`` seconds of host work per request per
      proposal, on the step's critical path.
    """

    kind: str = "none"
    model: str = ""
    layers: int = 1
    heads: int = 4
    host_s: float = 0.0
    lazy_prefill: bool = False     # a drafter with KV prefills a prompt only when the request first drafts

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter kind {self.kind!r} is not one of {', '.join(DRAFTER_KINDS)}")
        if self.kind == "model" and not self.model:
            raise ValueError("a 'model' drafter needs a model preset name (draft_model)")
        if self.layers < 1 or self.heads < 1 or self.host_s < 0:
            raise ValueError("drafter layers and heads must be >= 1 and host_s >= 0")

    @property
    def keeps_kv(self) -> bool:
        """Whether the drafter keeps KV of its own that must follow the target's tokens (a draft
        model or an EAGLE head): it then prefills with the target and catches up on tokens it did
        not draft."""
        return self.kind in ("model", "eagle")

    @property
    def autoregressive(self) -> bool:
        """One draft pass per draft token (model, EAGLE); Medusa's heads run in one pass."""
        return self.kind in ("model", "eagle")


@dataclass(frozen=True, slots=True)
class DraftPlan:
    """Speculation for one step: the draft depth of each decode request (same order as the plan's
    decodes; 0 = no speculation for it this step) and the tree ``width``: ``width`` candidate chains
    of that depth share the request's last token, so the verifier checks ``1 + width x depth`` query
    tokens with a tree-attention mask and accepts at most ``depth`` of them (width 1 is a plain
    chain). The drafter is the policy's (``SpeculationPolicy.drafter``)."""

    draft_tokens: tuple[int, ...] = ()
    width: int = 1


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """What a step's decode attention reads, decided by the sparsity policy.

    ``tokens_read[i]``: KV tokens decode ``i``'s query attends to (its whole context for dense
    attention). ``selection_units[i]``: units (e.g. KV pages) the policy scores to choose them, and
    ``selection_k`` how many it keeps; a selection step (top-k over the units) is priced when any unit
    is scored. ``lower_tier_bytes``: KV bytes the step must bring from host memory over PCIe before
    attention can run (offloaded KV selected for this step); the step waits for that transfer.
    """

    tokens_read: np.ndarray
    selection_units: np.ndarray | None = None
    selection_k: int = 0
    lower_tier_bytes: int = 0


@dataclass(slots=True)
class StepOutcome:
    """What happened in ``num_steps`` consecutive engine steps of one replica (one step, or a run of
    decode steps advanced together), handed to every policy's ``observe``.

    ``finished``: requests that completed. ``accepted``: (request, drafted, accepted) per speculative
    decode. ``prefix_hit_tokens``: prompt tokens served from the prefix cache at admissions in these
    steps. ``evicted_blocks``: cached HBM blocks evicted. ``preempted``: requests preempted before them.
    """

    replica_id: int
    start_s: float
    end_s: float
    num_steps: int
    finished: Sequence[RequestLike] = ()
    accepted: Sequence[tuple[RequestLike, int, int]] = ()
    prefix_hit_tokens: int = 0
    evicted_blocks: int = 0
    preempted: Sequence[RequestLike] = ()


# ---------------------------------------------------------------------------------------- views
class SchedulerView(Protocol):
    """What a scheduler sees of one replica (live, read-only)."""

    waiting: Sequence[RequestLike]   # FCFS order; recompute-preempted requests at the front
    running: Sequence[RequestLike]   # admission order (the last is the first preemption victim)
    swapped: Sequence[RequestLike]   # swap-out order
    num_swapping_in: int
    block_size: int
    num_blocks: int                  # HBM KV blocks in total
    max_model_len: int

    @property
    def num_free_blocks(self) -> int:
        """HBM blocks an allocation can get now: free plus evictable cached blocks."""

    def blocks_needed(self, req: RequestLike, new_tokens: int) -> int:
        """New HBM blocks ``req`` needs to compute ``new_tokens`` more tokens (prefix hits counted for
        a request not yet admitted)."""

    def prefix_hit_tokens(self, req: RequestLike) -> int:
        """Prompt tokens a waiting request would find in the HBM prefix cache if admitted now."""

    def tokens_to_compute(self, req: RequestLike) -> int:
        """Tokens ``req`` still has to process before it samples its next token (after prefix hits
        for a request not yet admitted)."""

    def swap_in_blocks(self, req: RequestLike) -> int:
        """HBM blocks a swapped request needs to come back."""

    def decode_blocks_needed(self, reqs: Sequence[RequestLike]) -> list[int]:
        """For running requests about to process one token each: new blocks each needs (0 or 1)."""

    def blocks_freed_by_release(self, req: RequestLike) -> int:
        """HBM blocks that preempting ``req`` would make available (its unshared blocks)."""

    def block_slack_tokens(self, req: RequestLike) -> int:
        """Token slots left unused in the request's last allocated block."""


class CacheView(Protocol):
    """Evictable (cached, unreferenced) blocks of one tier, for eviction policies: a ranking view.

    Per-block accessors take one block id (and return a number) or an array of ids (and return an
    array), so ranking policies stay vectorised (``sim.memory.cache_view``)."""

    tier: str                        # "hbm" | "dram" | "nvme" | "store"
    num_cached: int
    num_blocks: int                  # the tier's capacity
    bytes_per_block: int

    def lru_order(self, limit: int) -> np.ndarray:
        """Up to ``limit`` evictable block ids, least recently used first."""

    def mru_order(self, limit: int) -> np.ndarray:
        """Up to ``limit`` evictable block ids, most recently used first."""

    def candidates(self) -> np.ndarray:
        """Every evictable block, least recently used first."""

    def last_access_s(self, block): ...

    def hits(self, block):
        """Hits since the block's content arrived in this tier (its frequency)."""

    def inserted_s(self, block):
        """When the block's content (its prefix key) arrived in this tier."""

    def position(self, block):
        """The block's index in its prompt (0: the head of the prefix)."""

    def owner(self, block):
        """Trace index of the request that last held the block (-1: none, a copy)."""

    def session(self, block):
        """Session id of that request (None when the trace has none)."""

    def key(self, block): ...

    def recompute_s(self, block):
        """Prefill seconds recomputing the block's tokens at its position would cost."""

    def next_use_s(self, block):
        """When the trace next uses the block's prefix (inf: never). Only for a policy that declares
        ``needs_future``: the engine computes it offline from the whole trace."""


class SwapView(Protocol):
    """Swapped requests holding DRAM blocks, for eviction policies."""

    swapped: Sequence[RequestLike]   # swap-out order (oldest first)

    def dram_blocks(self, req: RequestLike) -> int: ...


class ReplicaView(Protocol):
    """What a router sees of a replica; it brings itself up to date (a decode run in progress is
    committed up to ``now``) before answering."""

    replica_id: int
    num_waiting: int
    num_running: int
    queued_tokens: int               # prompt and recompute tokens still to process, waiting + running
    num_free_blocks: int             # HBM blocks available to allocations now
    num_blocks: int

    def prefix_hit_tokens(self, req: RequestLike) -> int:
        """Prompt tokens of ``req`` this replica's HBM prefix cache holds now."""


class ResidencyView(Protocol):
    """What a residency policy sees of its replica's KV tiers (``sim.replica.views``)."""

    preemption_mode: str             # the replica's configured default: "recompute" | "swap"
    num_free_dram_blocks: int
    block_size: int
    tier_mode: str                   # "inclusive" | "exclusive" (replica.kv_tier_mode)
    tiers: tuple[str, ...]           # tiers with capacity, top down: "hbm", "dram", "nvme", "store"
    waiting: Sequence[RequestLike]   # the replica's queue (FCFS order)

    def num_blocks(self, tier: str) -> int: ...

    def num_available_blocks(self, tier: str) -> int:
        """Blocks an allocation in ``tier`` can get now (free plus evictable cached)."""

    def num_free_blocks(self, tier: str) -> int: ...

    num_prefetched_blocks: int       # HBM blocks prefetched and held for waiting requests

    def hbm_hit_blocks(self, req: RequestLike) -> int:
        """Leading prompt blocks of a waiting request in HBM, before the first one that is not."""

    def lower_hit_blocks(self, req: RequestLike) -> dict[str, int]:
        """Blocks of the request's prefix found in each lower tier."""

    def prefix_hit_blocks(self, req: RequestLike) -> int:
        """Leading prompt blocks the request takes from the cache if admitted now."""

    def load_s(self, req: RequestLike) -> float:
        """Seconds to copy its lower-tier prefix into HBM over idle links."""

    def recompute_s(self, req: RequestLike) -> float:
        """Prefill seconds recomputing that prefix would add."""

    def link_backlog_s(self, link: str) -> float:
        """Seconds of copies queued or in flight on a link (``pcie_h2d``, ``nvme_read``, ...)."""


class SpeculationView(Protocol):
    """What a speculation policy sees when it proposes: the step's price for a draft depth, so a
    policy can weigh the tokens it expects against the time they cost (priced by the replica's step
    builder on its own GPU; cached, approximate: the decodes at their mean context, without the
    step's prefill chunks)."""

    def step_time(self, draft_tokens: int, width: int = 1) -> float:
        """Seconds of a decode step of these requests if each drafted ``draft_tokens`` (0: plain
        decode) in chains of ``width``: the drafter's work plus the target's verification."""


# ---------------------------------------------------------------------------------------- kinds
class Policy:
    """What every policy has: a name and kind (set by ``@register``), its frozen ``Params`` (or
    none), a per-instance random generator (``self.rng``, seeded from the run's seed, the kind and the
    replica), and ``observe``. One instance serves one replica (routers: one cluster)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Params: ClassVar[type | None] = None

    def __init__(self, params: Any = None) -> None:
        cls = type(self).Params
        self.p = params if params is not None else (cls() if cls is not None else None)
        self.rng: np.random.Generator = np.random.default_rng(0)

    def attach(self, rng: np.random.Generator) -> None:
        """Called once by the engine before the run: the instance's own random generator."""
        self.rng = rng

    def observe(self, outcome: StepOutcome) -> None:
        """What the last step(s) did. The default ignores it; stateful policies (adaptive k, ARC,
        fair schedulers) keep their state here. Called only for policies that override it."""

    watches_arrivals: ClassVar[bool] = False
    """True for a policy that must hear of a request when it arrives, not when the replica next plans
    (prefetching its KV, say): arrivals are then released as SimPy events at their times."""

    @classmethod
    def observes(cls) -> bool:
        return cls.observe is not Policy.observe


class SchedulingPolicy(Policy):
    def schedule(self, view: SchedulerView, now: float) -> StepPlan:
        raise NotImplementedError

    def steady_decode(self, view: SchedulerView) -> bool:
        """True if, while no request arrives or finishes, no transfer completes and free HBM blocks
        only shrink, every following step's plan would be exactly "decode all running requests".
        The replica then advances those steps together (exactly; see ``sim.replica.decode_run``).
        False (the default) is always correct, only slower."""
        return False

    def steady_through_finishes(self, view: SchedulerView) -> bool:
        """True if, when :meth:`steady_decode` holds, it keeps holding as running requests finish
        (while nothing arrives, no transfer completes and free blocks only shrink): the plan stays
        "decode all running requests" with fewer of them. The replica then advances past completions
        in one event. False (the default) is always correct, only slower."""
        return False

    def steady_chunk(self, view: SchedulerView) -> tuple[RequestLike, int] | None:
        """``(request, tokens)`` if, while nothing arrives or finishes, no transfer completes and free
        blocks only shrink, every following step's plan would be exactly "decode every decoding
        request, plus a chunk of ``tokens`` of ``request``" for as long as ``request`` has more than
        ``tokens`` left to compute (chunked prefill's steady phase). The replica then advances those
        steps together, exactly. None (the default) is always correct, only slower."""
        return None

    def max_prompt_tokens(self, max_model_len: int) -> int:
        """The longest prompt (plus recomputed output) this scheduler can ever run; longer requests are
        rejected on arrival ("exceeds scheduler token budget")."""
        return max_model_len


class EvictionPolicy(Policy):
    """One instance per tier of each replica (and one for the shared store). ``evict_cached`` for
    ``n`` blocks must choose what ``n`` successive calls for one block each would (decode runs ask for
    all of a run's evictions at once), unless the policy declares ``time_dependent``."""

    time_dependent: ClassVar[bool] = False
    """True when the choice depends on ``now`` (a TTL): decode runs then ask at each allocation's time."""

    needs_future: ClassVar[bool] = False
    """True for an offline policy that reads ``CacheView.next_use_s`` (the engine then computes, before
    the run, when every prefix key is next used)."""

    lru_equivalent: ClassVar[bool] = False
    """True for a policy whose ``evict_cached`` is exactly ``view.lru_order(num_blocks)``: the block
    pool then evicts from its LRU head itself, without building the list and asking."""

    def evict_cached(self, view: CacheView, num_blocks: int, now: float) -> Sequence[int]:
        """Choose ``num_blocks`` cached blocks to evict (the view holds at least that many)."""
        raise NotImplementedError

    def drop_swapped(self, view: SwapView, num_blocks: int, now: float) -> Sequence[RequestLike]:
        """Choose swapped requests whose DRAM copies to drop (they will recompute) to free at least
        ``num_blocks`` DRAM blocks. The default drops the longest-swapped first."""
        chosen, freed = [], 0
        for req in view.swapped:
            if freed >= num_blocks:
                break
            chosen.append(req)
            freed += view.dram_blocks(req)
        return chosen


class ResidencyPolicy(Policy):
    """Where KV lives across the tiers. Every default reproduces an HBM-only prefix cache: evicted
    blocks are dropped, nothing is offloaded or prefetched, and a lower-tier hit (there is none then)
    would be loaded when that is faster than recomputing it."""

    def preempt_to(self, view: ResidencyView, req: RequestLike, now: float) -> str:
        """Where a preempted running request's KV goes: ``"recompute"`` (dropped; the request
        re-prefills later) or ``"swap"`` (copied to DRAM over PCIe, brought back on swap-in). The
        default follows ``replica.preemption_mode``."""
        return view.preemption_mode

    def demote_to(self, view: ResidencyView, tier: str, now: float) -> str:
        """Where blocks evicted from ``tier`` go: ``"drop"`` or a lower tier (``"dram"``, ``"nvme"``,
        ``"store"``), written back over the links before their blocks are reused. Asked at every
        eviction, and when a decode run is planned (a run stops at the first eviction that is written
        back), so the answer must depend on the view, not on time alone. Default: drop."""
        return "drop"

    def offload_to(self, view: ResidencyView, req: RequestLike, now: float) -> str:
        """When a finished or recompute-preempted request releases its blocks, where a copy of its
        prompt blocks goes (write-through; blocks the tier already has are skipped): ``"none"``, or a
        lower tier. Not used in exclusive mode. Default: none."""
        return "none"

    def offloads(self) -> bool:
        """False if :meth:`offload_to` always answers ``"none"``: releasing a finished request's blocks
        then starts no copy, and a decode run may advance past completions in one event. The default
        is True for a policy that overrides :meth:`offload_to` (always correct, only slower)."""
        return type(self).offload_to is not ResidencyPolicy.offload_to

    def load_or_recompute(self, view: ResidencyView, req: RequestLike, now: float) -> str:
        """For a waiting request whose prefix continues in a lower tier: ``"load"`` it (the request
        waits for the copies) or ``"recompute"`` it (only the HBM blocks before the first lower-tier one
        are used). Asked whenever the prefix found changes. Default, as Mooncake's bandwidth threshold:
        load when the copy over idle links is faster than recomputing those tokens."""
        return "load" if view.load_s(req) < view.recompute_s(req) else "recompute"

    def prefetch(self, view: ResidencyView, now: float) -> Sequence[RequestLike]:
        """Waiting requests whose lower-tier prefix to start loading into HBM now, ahead of their
        admission (asked at planning points where the queue, the lower tiers' contents or the released
        requests changed since the last ask; a request with nothing below HBM, or whose prefix the
        residency policy would recompute, is skipped, as are blocks already in HBM or loading).
        Default: none."""
        return ()


class SpeculationPolicy(Policy):
    emits_one_token: ClassVar[bool] = False
    """True for a policy that never drafts: the replica may then advance steady decode runs together."""

    def propose(self, decodes: Sequence[RequestLike], now: float, view: SpeculationView) -> DraftPlan:
        """Draft depth for each decode of the step about to run (and the tree width). The replica
        reserves each request's lookahead KV before verifying; a request that cannot get it drafts
        less or not at all."""
        raise NotImplementedError

    def accepted(self, rng: np.random.Generator, req: RequestLike, num_draft: int) -> int:
        """Draft tokens the verifier accepts (0..num_draft, the request's draft depth); the step
        emits accepted + 1 tokens and the replica rolls back the KV slots of the rejected ones.
        Randomness comes from ``rng`` (the replica's, seeded by the run's seed)."""
        raise NotImplementedError

    def drafter(self) -> Drafter:
        """The drafter behind this policy's drafts, for the whole run: the engine reserves its
        weights and KV in HBM (out of the target's KV budget) and the replica prices its work on the
        same GPU. Default: free drafts (``Drafter()``, kind ``"none"``)."""
        return _FREE_DRAFTER


class SparsityPolicy(Policy):
    is_dense: ClassVar[bool] = False
    """True when every query reads its whole context and nothing is selected (skips the plan)."""

    def plan(self, context: np.ndarray) -> AttentionPlan:
        """The attention plan of one step's decodes, given each decode's context (KV tokens including
        the new one)."""
        raise NotImplementedError

    def attended(self, context: np.ndarray) -> np.ndarray:
        """Tokens read per query, for contexts shaped (steps, sequences) in a decode run: the default
        takes ``plan(...).tokens_read`` row by row."""
        return np.stack([self.plan(row).tokens_read for row in np.atleast_2d(context)])

    def steady(self) -> bool:
        """True when plans never select and never fetch from a lower tier (only ``tokens_read``
        changes), so a decode run can be priced from ``attended`` alone. Default: False."""
        return False


@dataclass(frozen=True, slots=True)
class LaunchCosts:
    """Host/launch constants that execution policies combine with kernel times (seconds).

    ``dispatch_s``: host time to launch one kernel from the serving framework (eager);
    ``graph_launch_s``: launching one CUDA graph; ``graph_kernel_s``: extra time per kernel node inside
    a graph; ``sync_s``: a host↔device synchronisation round trip; ``doorbell_s`` and
    ``persistent_item_s``: persistent-kernel host→device doorbell latency and per-work-item dispatch.
    ``graph_gap_s``: the idle gap between consecutive kernels inside a real model's CUDA-graph replay,
    measured in-model (``calibration.attribute``; 0 when the table has no such measurement) -- what
    fusing the kernels into one resident kernel's stages removes; ``graph_gap_source`` says where it
    came from.
    """

    dispatch_s: float
    graph_launch_s: float
    graph_kernel_s: float
    sync_s: float
    doorbell_s: float = 5e-6
    persistent_item_s: float = 1e-6
    # Measured op times (calibrated tables) already include the gap between back-to-back kernels;
    # roofline times are pure GPU time and need ``graph_kernel_s`` added per kernel.
    times_include_gap: bool = False
    graph_gap_s: float = 0.0
    graph_gap_source: str = ""


def _numpy_sum(x: list[float], lo: int = 0, n: int = -1) -> float:
    """``float(np.sum(np.array(x)))`` for a list of floats, in NumPy's order (its pairwise summation of
    a contiguous float64 array: eight running sums per block of up to 128, halves above that), so the
    result is the same float."""
    if n < 0:
        n = len(x)
        return 0.0 + _numpy_sum(x, 0, n)
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += x[i]
        return res
    if n <= 128:
        r = x[lo:lo + 8]
        i = lo + 8
        end = lo + n - n % 8
        while i < end:
            for j in range(8):
                r[j] += x[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(end, lo + n):
            res += x[i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _numpy_sum(x, lo, n2) + _numpy_sum(x, lo + n2, n - n2)


class KernelSequence:
    """The kernels of one step, described per op and expanded to launch order on demand.

    Ops run in order: the ops before the first per-layer op once, the per-layer ops ``num_layers``
    times, the rest once. Op ``i`` launches ``op_kernels[i]`` kernels per call (0: it does not run in
    this step), each taking ``op_gpu_s[i] / op_kernels[i]`` plus ``switch_s`` of GPU time; a variable op
    (``op_var[i] >= 0``: attention, whose time changes from step to step within a decode run) adds its
    per-call time ``var_s[:, op_var[i]]`` split evenly over its kernels. An eager engine spends
    ``op_host_s[i]`` of host time issuing a call, spread over its kernels, after ``lead_s`` of host work
    per step.

    The aggregates (``num_kernels``, ``total_gpu_s``, ``var_weight``) are all that whole-step policies
    such as CUDA graphs need; the per-kernel arrays (``gpu_s``, ``var_index``, ``var_share``,
    ``host_s``, in launch order) are built on first use, for policies that walk kernels one by one.

    ``batch`` is the decode batch the kernels are shaped for (after a captured graph's padding, see
    ``ExecutionPolicy.padded_batch``) and ``has_prefill`` whether the step runs prefill chunks: what a
    policy that captures graphs for some shapes only needs to tell a graphed step from an eager one.
    """

    __slots__ = ("op_gpu_s", "op_kernels", "op_var", "op_host_s", "op_repeat", "switch_s", "lead_s",
                 "num_kernels", "total_gpu_s", "var_weight", "var_terms", "batch", "has_prefill", "_arrays",
                 "_host_total")

    def __init__(self, *, op_gpu_s: np.ndarray, op_kernels: np.ndarray, op_var: np.ndarray,
                 op_host_s: np.ndarray, op_repeat: np.ndarray, switch_s: float = 0.0, lead_s: float = 0.0,
                 num_var: int = 2, batch: int = 0, has_prefill: bool = False) -> None:
        self.batch, self.has_prefill = int(batch), bool(has_prefill)
        self._host_total = None
        self.op_gpu_s, self.op_kernels, self.op_var = op_gpu_s, op_kernels, op_var
        self.op_host_s, self.op_repeat = op_host_s, op_repeat
        self.switch_s, self.lead_s = float(switch_s), float(lead_s)
        # The aggregates over a few dozen ops, in Python numbers: each NumPy call on arrays this small
        # costs more than its arithmetic, and a step shape's first use builds one. Op i runs
        # calls_i = repeat_i times when it has kernels; the GPU total adds calls_i x (fixed time + its
        # kernels' switches) in NumPy's summation order (``_numpy_sum``), so it is the float
        # ``(calls * (fixed + kernels * switch_s)).sum()`` gives.
        sw = self.switch_s
        num_kernels = 0
        terms = []
        weight = [0] * num_var
        for k, r, v, g in zip(op_kernels.tolist(), op_repeat.tolist(), op_var.tolist(), op_gpu_s.tolist()):
            c = r if k > 0 else 0
            num_kernels += k * c
            terms.append(c * ((g if v < 0 else 0.0) + k * sw))
            if 0 <= v < num_var:
                weight[v] += c
        self.num_kernels = num_kernels
        self.total_gpu_s = _numpy_sum(terms)
        self.var_weight = np.array(weight, dtype=np.float64)
        # (variable op, weight) pairs with a nonzero weight, as Python numbers for per-step arithmetic
        self.var_terms = tuple((v, float(w)) for v, w in enumerate(weight) if w)
        self._arrays = None

    def _expand(self):
        if self._arrays is None:
            k = self.op_kernels
            runs = k > 0
            per = np.where(runs, k, 1)
            g = np.where(self.op_var < 0, self.op_gpu_s / per, 0.0) + self.switch_s
            share = np.where(self.op_var >= 0, 1.0 / per, 0.0)
            h = self.op_host_s / per
            rep = self.op_repeat
            layer = (rep > 1) & runs
            first = int(np.argmax(layer)) if layer.any() else len(rep)
            last = len(rep) - int(np.argmax(layer[::-1])) if layer.any() else len(rep)
            L = int(rep[first]) if layer.any() else 1
            live = runs & (rep > 0)
            mid_rep = rep[first:last][live[first:last]]
            parts = []
            for a in (g, self.op_var, share, h):
                head = np.repeat(a[:first], np.where(live[:first], k[:first], 0))
                tail = np.repeat(a[last:], np.where(live[last:], k[last:], 0))
                if mid_rep.size == 0 or (mid_rep == L).all():
                    mid = np.tile(np.repeat(a[first:last], np.where(live[first:last], k[first:last], 0)), L)
                else:
                    # ops repeated different numbers of times (a part of a model priced as such): round
                    # by round, each op as long as it has calls left
                    rr = rep[first:last]
                    mid = np.concatenate([np.repeat(a[first:last], np.where(live[first:last] & (rr > r),
                                                                               k[first:last], 0))
                                          for r in range(int(mid_rep.max()))])
                parts.append(np.concatenate([head, mid, tail]))
            self._arrays = (parts[0].astype(np.float64), parts[1].astype(np.int64), parts[2].astype(np.float64),
                            parts[3].astype(np.float64))
        return self._arrays

    @property
    def gpu_s(self) -> np.ndarray:
        return self._expand()[0]

    @property
    def var_index(self) -> np.ndarray:
        return self._expand()[1]

    @property
    def var_share(self) -> np.ndarray:
        return self._expand()[2]

    @property
    def host_s(self) -> np.ndarray:
        return self._expand()[3]

    @property
    def host_total_s(self) -> float:
        """Host seconds an eager engine spends issuing the whole step (``lead_s`` plus every call)."""
        if self._host_total is None:
            calls = np.where(self.op_kernels > 0, self.op_repeat, 0)
            self._host_total = self.lead_s + float((calls * self.op_host_s).sum())
        return self._host_total


@dataclass(frozen=True, slots=True)
class StepTiming:
    duration_s: np.ndarray    # (K,) wall time of each step, launch and sync included
    launches: int             # host launches per step (kernels, or graphs)
    syncs: int                # host↔device syncs per step


class ExecutionPolicy(Policy):
    def reserved_sms(self, sm_count: int) -> int:
        """SMs held back from the model's kernels (a persistent scheduler's own SMs, say); the cost
        backend prices the model's ops on the SMs left. Default: none."""
        return 0

    def padded_batch(self, num_decode: int, has_prefill: bool) -> int:
        """The decode batch a step's kernels run at: a captured CUDA graph's batch size when the step
        replays one (at least ``num_decode``; the rest is padding, priced as real rows), else
        ``num_decode``. Default: no padding."""
        return num_decode

    def with_step_overhead(self, durations, num_seqs: int, num_tokens: int, seq: KernelSequence,
                           launch: LaunchCosts):
        """Step durations (a float, or an array of a run's steps: the same arithmetic either way, so
        single steps and runs round alike) with the per-step work outside the model's kernels that the
        step waits for: the engine's scheduling and input preparation on the host for ``num_seqs``
        sequences and ``num_tokens`` tokens (serial, or overlapped one step ahead), a resident kernel's
        doorbell and per-item dispatch. Called for engine steps only (not a drafter's). Default: none."""
        return durations

    def step_times(self, seq: KernelSequence, var_s: np.ndarray, launch: LaunchCosts) -> StepTiming:
        """Durations of K steps that share ``seq``, with ``var_s`` (K, num_variable_ops)."""
        raise NotImplementedError

    def step_time_one(self, seq: KernelSequence, var: tuple, launch: LaunchCosts) -> tuple[float, int, int]:
        """(duration, launches, syncs) of one step with variable-op times ``var``. The default goes
        through :meth:`step_times`; a policy may override it with scalar arithmetic, which must round
        exactly like :meth:`step_times` does (the bulk-equivalence test checks it)."""
        t = self.step_times(seq, np.array([var], dtype=np.float64), launch)
        return float(t.duration_s[0]), t.launches, t.syncs

    def linear_step(self, seq: KernelSequence, launch: LaunchCosts) -> tuple[float, tuple, int, int] | None:
        """``(base, terms, launches, syncs)`` when :meth:`step_times` of ``seq`` is, for every step,
        ``base + var[v0] * w0 + var[v1] * w1 ...`` over ``terms`` = ``((v0, w0), ...)``, added in that
        order with ``base`` joining the first product, and the same launches and syncs each step;
        None otherwise. The cost model then prices a run of such steps in one compiled pass with
        exactly those operations (the bulk-equivalence test and ``test_linear_step_pass_is_exact``
        check that it rounds like :meth:`step_times`). Default: None (always the general way)."""
        return None


class RoutingPolicy(Policy):
    reads_state: ClassVar[bool] = True
    """False for a router that never reads the replica views (its choice depends on the request and
    its own state only): the cluster then routes every request up front, in arrival order, and each
    replica pulls its arrivals as it plans, with no SimPy event per arrival. Same results, faster."""

    def route(self, request: RequestLike, replicas: Sequence[ReplicaView], now: float) -> int:
        """The index (into ``replicas``) of the replica ``request`` joins. Views bring themselves up
        to date when read, so a router that reads none of them costs nothing extra."""
        raise NotImplementedError


_FREE_DRAFTER = Drafter()

BASES: dict[str, type[Policy]] = {
    "scheduling": SchedulingPolicy, "eviction": EvictionPolicy, "residency": ResidencyPolicy,
    "speculation": SpeculationPolicy, "execution": ExecutionPolicy, "routing": RoutingPolicy,
    "sparsity": SparsityPolicy,
}
