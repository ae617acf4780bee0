"""One engine step: the applied plan, its shape and price (:class:`StepBuilder`), and what it changes
when it completes (:class:`StepRecorder`: the step-log row, request progress, finished requests).

Pricing: the step's prefill chunks and decodes become a step shape; the sparsity policy's attention
plan says how many KV tokens each decode reads, what selecting them costs and what KV comes from a
lower tier; speculative drafts add their drafter's work (``sim.replica.drafting``), priced on the same
GPU with the same cost backend as the target; the execution policy's reserved SMs shrink the share of
the GPU the model's kernels run on (``StepCostModel.for_share``). All of this is arithmetic on
counters: no time passes here (the replica loop owns time).

A verify step: a decode drafting ``d`` tokens in chains of ``w`` (a tree for ``w > 1``) runs
``q = 1 + w d`` query tokens: ``q`` GEMM rows and ``q`` LM-head rows (every position needs its
logits), and attention over its KV plus the new tokens, with the step's longest ``q`` as the query
length (one kernel, padded). Its drafts' KV slots are reserved before the step and counted in the KV
columns.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.base import AttentionPlan, Drafter
from sim.costs.step import StepCostModel
from sim.replica.drafting import Drafting

_NO_CHUNKS = np.empty(0, dtype=np.int64)


def _prefill_chunks(prefill: list) -> tuple[np.ndarray, np.ndarray, int]:
    """A step's prompt chunks as (new tokens, cached tokens) arrays, and how many of them finish their
    prompt (each samples a first token)."""
    if not prefill:
        return _NO_CHUNKS, _NO_CHUNKS, 0
    qs, cs = [], []
    finishing = 0
    for r, n in prefill:
        qs.append(n)
        cs.append(r.num_computed)
        if r.num_computed + n == r.prompt_tokens + r.num_generated:
            finishing += 1
    return np.array(qs, dtype=np.int64), np.array(cs, dtype=np.int64), finishing


@dataclass(slots=True)
class Step:
    """An applied plan: what runs in the step about to start."""

    prefill: list          # (request, tokens)
    decode: list           # requests
    drafts: list | None    # draft depth per decode (speculation), or None
    preempted: list        # requests preempted before this step
    prefix_hit_tokens: int = 0
    loaded_tokens: int = 0         # of those, tokens that come from a lower tier
    waits: list | None = None      # write-backs of the blocks this step reuses (it ends after them)
    width: int = 1         # draft chains per decode (a tree when > 1)
    accepted: list | None = None   # accepted drafts per decode (sampled when the drafts are reserved)


@dataclass(slots=True)
class Priced:
    """A step's price: wall time, launches and syncs, and the KV bytes it fetches from host memory
    before its attention can run (the replica moves them over PCIe and the step waits for them)."""

    duration_s: float
    launches: int
    syncs: int
    fetch_bytes: int = 0
    draft_s: float = 0.0      # the drafter's share of the step
    verify_s: float = 0.0     # the target's forward pass of a step that verifies drafts
    padded_tokens: int = 0    # query rows a captured graph ran beyond the step's own (padding)


class StepBuilder:
    """Prices steps and decode runs of one replica."""

    def __init__(self, *, cost: StepCostModel, sparsity, sm_share: float,
                 drafter_cost: Callable[[str], StepCostModel], drafter: Drafter | None = None,
                 prefill_fraction: float = 0.0) -> None:
        self.cost = cost.for_share(sm_share) if sm_share < 1.0 else cost
        self._whole = cost
        self.sm_share = sm_share
        # Nexus-style lanes: mixed steps' prefill on prefill_fraction of the model's SMs, decodes on the rest
        self.lanes = prefill_fraction > 0.0
        if self.lanes:
            self.prefill_lane = cost.for_share(sm_share * prefill_fraction)
            self.decode_lane = cost.for_share(sm_share * (1.0 - prefill_fraction))
        self.sparsity = sparsity
        self.dense = sparsity.is_dense
        self.num_layers = cost.num_layers

        def model_cost(name: str) -> StepCostModel:
            got = drafter_cost(name)
            return got.for_share(sm_share) if sm_share < 1.0 else got

        self.drafting = Drafting(drafter if drafter is not None else Drafter(), self.cost, model_cost)
        self._estimates: dict[tuple[int, int, int, int], float] = {}

    def price(self, step: Step) -> Priced:
        nd = len(step.decode)
        drafts = step.drafts
        if drafts is not None and nd and max(drafts):
            return self._price_verify(step)
        sampled = nd
        pq, pc, finishing = _prefill_chunks(step.prefill)
        sampled += finishing
        plan: AttentionPlan | None = None
        if self.dense:
            ctx_sum = sum(r.num_computed for r in step.decode) + nd
        else:
            ctx = np.fromiter((r.num_computed + 1 for r in step.decode), dtype=np.int64, count=nd)
            plan = self.sparsity.plan(ctx) if nd else None
            ctx_sum = int(np.asarray(plan.tokens_read).sum()) if plan is not None else 0
        if self.lanes and step.prefill and nd:
            duration, launches, syncs = self.cost.lanes_step(self.prefill_lane, self.decode_lane, pq, pc, nd, ctx_sum,
                                                             sampled, num_seqs=len(step.prefill) + nd)
        else:
            duration, launches, syncs = self.cost.step(pq, pc, nd, ctx_sum, sampled, 1,
                                                       num_seqs=len(step.prefill) + nd)
        padded = self.cost.padded_batch(nd, bool(step.prefill)) - nd
        fetch = self._sparse_extras(plan, nd)
        duration += fetch[0]
        draft = 0.0
        if step.prefill and self.drafting.eager_prefill:
            draft, lc, sc = self.drafting.time(step.prefill, step.decode, drafts, step.width)
            duration += draft
            launches += lc
            syncs += sc
        return Priced(duration, launches, syncs, fetch[1], draft, 0.0, padded)

    def lane_cost(self, fraction: float) -> StepCostModel:
        """The cost model on ``fraction`` of this replica's SMs (a decoupled lane's share)."""
        return self._whole.for_share(self.sm_share * fraction) if fraction < 1.0 else self.cost

    def price_lane(self, step: Step, fraction: float) -> tuple[Priced, float]:
        """A decoupled lane's step (only prefill chunks, or only decodes; dense attention, no drafts) on
        ``fraction`` of this replica's SMs, on its own: its price, with the lane's own per-step host
        work, and the HBM bytes its kernels move (``sim.replica.lanes``)."""
        cost = self.lane_cost(fraction)
        nd = len(step.decode)
        pq, pc, finishing = _prefill_chunks(step.prefill)
        ctx_sum = sum(r.num_computed for r in step.decode) + nd
        d, launches, syncs = cost.step(pq, pc, nd, ctx_sum, nd + finishing, 1, num_seqs=len(step.prefill) + nd)
        padded = cost.padded_batch(nd, bool(step.prefill))
        nbytes = cost.step_bytes(pq, pc, padded, ctx_sum, padded + finishing)
        return Priced(d, launches, syncs, 0, 0.0, 0.0, padded - nd), nbytes

    def _sparse_extras(self, plan: AttentionPlan | None, nd: int) -> tuple[float, int]:
        """(selection seconds, bytes fetched from host memory) of a sparse attention plan."""
        if plan is None:
            return 0.0, 0
        extra = 0.0
        units = plan.selection_units
        if units is not None and nd and float(np.asarray(units).sum()) > 0:
            # one top-k selection per layer, over each decode's scored units, before attention
            per_seq = float(np.asarray(units, dtype=np.float64).mean())
            extra = self.num_layers * self.cost.backend.selection_time(nd, per_seq, plan.selection_k)
        return extra, int(plan.lower_tier_bytes)

    def _price_verify(self, step: Step) -> Priced:
        """A step whose decodes verify drafts (see the module docstring)."""
        nd = len(step.decode)
        w = step.width
        qs_dec = [1 + w * d for d in step.drafts]
        rows = sum(qs_dec)
        query = max(qs_dec)
        sampled = rows
        pq, pc, finishing = _prefill_chunks(step.prefill)
        sampled += finishing
        plan: AttentionPlan | None = None
        if self.dense:
            ctx_sum = sum(r.num_computed for r in step.decode) + rows
        else:
            ctx = np.fromiter((r.num_computed + q for r, q in zip(step.decode, qs_dec)), dtype=np.int64, count=nd)
            plan = self.sparsity.plan(ctx)
            ctx_sum = int(np.asarray(plan.tokens_read).sum())
        verify, launches, syncs = self.cost.step(pq, pc, nd, ctx_sum, sampled, query, rows,
                                                 num_seqs=len(step.prefill) + nd)
        padded = (self.cost.padded_batch(nd, bool(step.prefill)) - nd) * query
        extra, fetch = self._sparse_extras(plan, nd)
        verify += extra
        draft, lc, sc = self.drafting.time(step.prefill, step.decode, step.drafts, w)
        return Priced(verify + draft, launches + lc, syncs + sc, fetch, draft, verify, padded)

    def estimate(self, decode, k: int, width: int = 1) -> float:
        """Seconds of a decode-only step of ``decode`` drafting ``k`` deep in chains of ``width``
        (``SpeculationView.step_time``): the requests at their mean context, rounded up to 64 tokens,
        no drafter lag; cached."""
        b = len(decode)
        if b == 0:
            return 0.0
        ctx = -(-sum(r.num_computed for r in decode) // (64 * b)) * 64
        key = (b, k, width, ctx)
        got = self._estimates.get(key)
        if got is None:
            q = 1 + width * k
            t = self.cost.step(_NO_CHUNKS, _NO_CHUNKS, b, b * (ctx + q), b * q, q, b * q)[0]
            t += self.drafting.estimate(b, ctx, k, width)[0]
            got = self._estimates[key] = t
        return got

    def prefill_s(self, tokens: int, context: int) -> float:
        """Seconds of one prefill step of ``tokens`` tokens after ``context`` tokens of KV (prices what
        recomputing a prefix costs)."""
        if tokens <= 0:
            return 0.0
        return self.cost.step(np.array([tokens], dtype=np.int64), np.array([context], dtype=np.int64), 0, 0, 1,
                              1)[0]

    def decode_run(self, nc: np.ndarray, nc_sum: int, K: int, first: int = 0) -> tuple[np.ndarray, int, int]:
        """Durations of K decode-only steps ``first .. first+K-1`` of a run of a fixed batch whose KV
        before the run's step 0 is ``nc`` tokens per request (each step adds one), plus launches and
        syncs per step."""
        B = nc.shape[0]
        if self.dense:
            return self.dense_decode_run(B, nc_sum, K, first)
        s_idx = np.arange(first, first + K, dtype=np.int64)
        ctx = (nc[None, :] + 1) + s_idx[:, None]
        ctx_sums = np.asarray(self.sparsity.attended(ctx)).sum(axis=1).astype(np.float64)
        return self.cost.decode_run(B, ctx_sums)

    def dense_decode_run(self, B: int, nc_sum: int, K: int, first: int) -> tuple[np.ndarray, int, int]:
        """:meth:`decode_run` under dense attention, from the batch size and its KV total alone."""
        return self.cost.dense_decode_run(B, nc_sum + B * (first + 1), K)

    def chunk_run(self, nc: np.ndarray, nc_sum: int, K: int, c0: int, n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Durations, launches and syncs of K steps that each decode the batch ``nc`` and run an
        ``n``-token prefill chunk on top of ``c0 + s n`` cached tokens (a chunked-prefill run)."""
        B = nc.shape[0]
        if self.dense:
            ctx_sums = np.arange(nc_sum + B, nc_sum + B + B * K, B, dtype=np.float64) if B else np.zeros(K)
        else:
            s_idx = np.arange(K, dtype=np.int64)
            ctx = (nc[None, :] + 1) + s_idx[:, None]
            ctx_sums = np.asarray(self.sparsity.attended(ctx)).sum(axis=1).astype(np.float64) if B \
                else np.zeros(K)
        cached = c0 + n * np.arange(K, dtype=np.int64)
        d, lc, sc = self.cost.chunk_run(B, ctx_sums, n, cached)
        return d, np.full(K, lc, np.int64), np.full(K, sc, np.int64)


def log_step(steps, kv, running, step: Step, start: float, duration: float, end: float, launches: int,
             syncs: int, loading: int = 0, draft_s: float = 0.0, verify_s: float = 0.0, padded_tokens: int = 0) -> None:
    """Append one step's row: its batch, and the KV state at its start after its allocations; the
    rows a captured graph padded it with."""
    hbm = kv.hbm
    bpb = hbm.bytes_per_block
    prefill = step.prefill
    decode = step.decode
    n_prefill = 0
    batch = 0
    for r, n in prefill:
        n_prefill += n
        batch += len(r.blocks)
    for r in decode:
        batch += len(r.blocks)
    drafted = step.width * sum(step.drafts) if step.drafts else 0
    nd = len(decode)
    tokens = n_prefill + nd + drafted
    # fragmentation: token slots allocated to running requests but empty at the end of the step;
    # locked: blocks of the step's batch plus blocks in flight on a link
    held = computed = 0
    for r in running:
        held += len(r.blocks)
        computed += r.num_computed
    active, cached, locked = hbm.occupancy()
    locked += batch
    dram_active, dram_cached, _ = kv.dram.occupancy()
    nvme_active, nvme_cached, _ = kv.nvme.occupancy()
    dbpb, nbpb = kv.dram.bytes_per_block, kv.nvme.bytes_per_block
    steps.append_row(start, duration, end, (
        len(prefill) + nd, len(prefill), n_prefill, nd, tokens, active * bpb, cached * bpb,
        (locked if locked < active else active) * bpb, dram_active * dbpb, nvme_active * nbpb,
        held * kv.block_size - computed - tokens, launches, syncs, len(step.preempted), padded_tokens,
        dram_cached * dbpb, nvme_cached * nbpb, loading, step.prefix_hit_tokens, step.loaded_tokens))

    if drafted or draft_s:
        steps.set_last(draft_tokens=drafted, accepted_tokens=sum(step.accepted) if step.accepted else 0,
                       draft_s=draft_s, verify_s=verify_s, draft_kv_bytes=drafted * bpb // kv.block_size)
