"""One engine step: the applied plan, its shape and price (:class:`StepBuilder`), and what it changes
when it completes (:class:`StepRecorder`: the step-log row, request progress, finished requests).

Pricing: the step's prefill chunks and decodes become a step shape; the sparsity policy's attention
plan says how many KV tokens each decode reads, what selecting them costs and what KV comes from a
lower tier; speculative drafts add their drafter's steps, priced on the same GPU with the same cost
backend as the target; the execution policy's reserved SMs shrink the share of the GPU the model's
kernels run on (``StepCostModel.for_share``). All of this is arithmetic on counters: no time passes
here (the replica loop owns time).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.base import AttentionPlan, DraftPlan
from sim.costs.step import StepCostModel

_NO_CHUNKS = np.empty(0, dtype=np.int64)


@dataclass(slots=True)
class Step:
    """An applied plan: what runs in the step about to start."""

    prefill: list          # (request, tokens)
    decode: list           # requests
    drafts: list | None    # draft tokens per decode (speculation), or None
    draft_plan: DraftPlan | None
    preempted: list        # requests preempted before this step
    prefix_hit_tokens: int = 0


@dataclass(slots=True)
class Priced:
    """A step's price: wall time, launches and syncs, and the KV bytes it fetches from host memory
    before its attention can run (the replica moves them over PCIe and the step waits for them)."""

    duration_s: float
    launches: int
    syncs: int
    fetch_bytes: int = 0
    padded_tokens: int = 0    # query rows a captured graph ran beyond the step's own (padding)


class StepBuilder:
    """Prices steps and decode runs of one replica."""

    def __init__(self, *, cost: StepCostModel, sparsity, sm_share: float,
                 drafter_cost: Callable[[str], StepCostModel]) -> None:
        self.cost = cost.for_share(sm_share) if sm_share < 1.0 else cost
        self.sm_share = sm_share
        self.sparsity = sparsity
        self.dense = sparsity.is_dense
        self._drafter_cost = drafter_cost
        self._drafters: dict[str, StepCostModel] = {}
        self.num_layers = cost.num_layers

    def drafter(self, name: str) -> StepCostModel:
        got = self._drafters.get(name)
        if got is None:
            got = self._drafters[name] = self._drafter_cost(name)
            if self.sm_share < 1.0:
                got = self._drafters[name] = got.for_share(self.sm_share)
        return got

    def price(self, step: Step) -> Priced:
        nd = len(step.decode)
        sampled = nd
        if step.prefill:
            qs, cs = [], []
            for r, n in step.prefill:
                qs.append(n)
                cs.append(r.num_computed)
                if r.num_computed + n == r.prompt_tokens + r.num_generated:
                    sampled += 1
            pq = np.array(qs, dtype=np.int64)
            pc = np.array(cs, dtype=np.int64)
        else:
            pq = pc = _NO_CHUNKS
        query = 1
        if step.drafts is not None and nd:
            query = 1 + max(step.drafts)
        plan: AttentionPlan | None = None
        if self.dense:
            ctx_sum = sum(r.num_computed for r in step.decode) + nd * query
        else:
            ctx = np.fromiter((r.num_computed + query for r in step.decode), dtype=np.int64, count=nd)
            plan = self.sparsity.plan(ctx) if nd else None
            ctx_sum = int(np.asarray(plan.tokens_read).sum()) if plan is not None else 0
        duration, launches, syncs = self.cost.step(pq, pc, nd, ctx_sum, sampled, query,
                                                   num_seqs=len(step.prefill) + nd)
        padded = (self.cost.padded_batch(nd, bool(step.prefill)) - nd) * query
        fetch = 0
        if plan is not None:
            units = plan.selection_units
            if units is not None and nd and float(np.asarray(units).sum()) > 0:
                # one top-k selection per layer, over each decode's scored units, before attention
                per_seq = float(np.asarray(units, dtype=np.float64).mean())
                duration += self.num_layers * self.cost.backend.selection_time(nd, per_seq, plan.selection_k)
            fetch = int(plan.lower_tier_bytes)
        if step.drafts is not None and nd and max(step.drafts):
            d, lc, sc = self.draft_time(step)
            duration += d
            launches += lc
            syncs += sc
        return Priced(duration, launches, syncs, fetch, padded)

    def draft_time(self, step: Step) -> tuple[float, int, int]:
        """The drafter's autoregressive steps before verification: one batched draft step per draft
        token (the longest draft sets the count), each over the decodes' contexts plus the drafts so
        far. A drafter of ``"none"`` is free (drafts from elsewhere, e.g. prompt lookup)."""
        plan = step.draft_plan
        if plan is None or plan.drafter == "none":
            return 0.0, 0, 0
        cost = self.drafter(plan.drafter)
        nd = len(step.decode)
        ctx_d = sum(r.num_computed for r in step.decode)
        total, launches, syncs = 0.0, 0, 0
        for j in range(max(step.drafts)):
            d, lc, sc = cost.step(_NO_CHUNKS, _NO_CHUNKS, nd, ctx_d + nd * (j + 1), nd, 1)
            total += d
            launches += lc
            syncs += sc
        return total, launches, syncs

    def decode_run(self, nc: np.ndarray, nc_sum: int, K: int, first: int = 0) -> tuple[np.ndarray, int, int]:
        """Durations of K decode-only steps ``first .. first+K-1`` of a run of a fixed batch whose KV
        before the run's step 0 is ``nc`` tokens per request (each step adds one), plus launches and
        syncs per step."""
        B = nc.shape[0]
        s0 = first + 1
        if self.dense:
            ctx_sums = np.arange(nc_sum + B * s0, nc_sum + B * (s0 + K), B, dtype=np.float64)
        else:
            s_idx = np.arange(first, first + K, dtype=np.int64)
            ctx = (nc[None, :] + 1) + s_idx[:, None]
            ctx_sums = np.asarray(self.sparsity.attended(ctx)).sum(axis=1).astype(np.float64)
        return self.cost.decode_run(B, ctx_sums)

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
             syncs: int, padded_tokens: int = 0, lane: int = 0) -> None:
    """Append one step's row: its batch, and the KV state at its start after its allocations; the
    rows a captured graph padded it with; the lane that ran it (0: the whole GPU)."""
    hbm = kv.hbm
    bpb = hbm.bytes_per_block
    n_prefill = sum(n for _, n in step.prefill)
    tokens = n_prefill + len(step.decode) + (sum(step.drafts) if step.drafts else 0)
    # fragmentation: token slots allocated to running requests but empty at the end of the step;
    # locked: blocks of the step's batch plus blocks in flight on a link
    held = computed = 0
    for r in running:
        held += len(r.blocks)
        computed += r.num_computed
    filled = computed + tokens
    batch = sum(len(r.blocks) for r, _ in step.prefill) + sum(len(r.blocks) for r in step.decode)
    active = hbm.num_active
    dram, nvme = kv.dram, kv.nvme
    steps.append(
        start, duration, end, num_seqs=len(step.prefill) + len(step.decode), prefill_seqs=len(step.prefill),
        prefill_tokens=n_prefill, decode_seqs=len(step.decode), tokens=tokens, hbm_active_bytes=active * bpb,
        hbm_cached_bytes=hbm.num_cached * bpb, hbm_locked_bytes=min(batch + hbm.num_locked, active) * bpb,
        dram_used_bytes=dram.num_active * dram.bytes_per_block,
        nvme_used_bytes=nvme.num_active * nvme.bytes_per_block, frag_tokens=held * kv.block_size - filled,
        launches=launches, syncs=syncs, preemptions=len(step.preempted), padded_tokens=padded_tokens, lane=lane)
