"""Steady runs: K predictable engine steps advanced with one SimPy event, exactly as K single steps.

A run is K consecutive steps whose plans the scheduler guarantees (``SchedulingPolicy.steady_decode``,
``steady_through_finishes``, ``steady_chunk``): every step decodes the same decoders, one token each
(request r starts with ``nc[r]`` tokens of KV; step s writes token ``nc[r] + s``, which needs a new
block when ``(nc[r] + s) % bs == 0``), plus, in a chunk run, a prefill chunk of ``n`` tokens of one
request that does not finish its prompt. Decoders may finish inside a run when the scheduler says the
plan survives it: the batch then shrinks, and the run continues in *segments*, each priced for its own
batch. Step 0's blocks are allocated before the run is planned (it is an applied plan), so the run plans
allocations of steps 1..K-1, in the order single stepping makes them: per step the chunk's blocks,
then each decoder's in batch order.

K stops at the last finish (or the first, where finishes do not keep the plan), at the first step
whose blocks could run short, at the step in progress when the next request arrives, or early when the
replica is notified (a transfer completed). The steps are committed incrementally
(:meth:`DecodeRuns.sync`): allocations of a step when it starts, progress and finishes when it ends,
and a finish's released blocks before the next step allocates. Everything is exact integer
arithmetic shared with single stepping, and a property test checks step times, token counts and block
ids against stepping one by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy

from policies.base import StepOutcome
from sim.clock import exact_delay
from sim.jit import numba, searchsorted
from sim.metrics import fill_run_rows
from sim.request import unwrap

if TYPE_CHECKING:
    from sim.replica.loop import Replica
    from sim.replica.step import Step

MAX_RUN_STEPS = 4096


@numba.njit(cache=True, nogil=True)
def plan_run(nc, rem, bs, avail, max_steps, span, c0, n, todo):
    """Plan a run: (K, allocs, who, when, count, held0, fin).

    Decoder r finishes at the end of step ``rem[r] - 1``; K is at most ``max_steps``, and the steps
    until the first finish (``span`` False) or the last (``span`` True). With a chunk (``n`` > 0: the
    chunk request has ``c0`` tokens computed before step 0 and ``todo`` left to compute), K is at most
    the steps whose chunk leaves more than ``n`` tokens to compute. Steps 1..K-1 may not allocate more
    than ``avail`` blocks in total (finished requests' released blocks are not counted). ``allocs[s]``
    = blocks step s allocates (``allocs[0]`` = 0); ``who``/``when``/``count`` list the allocations in
    the order single stepping makes them (``who`` = B is the chunk request); ``held0`` = blocks held
    after step 0's allocation; ``fin`` = the sorted steps (< K) at whose end some decoder finishes,
    when ``span``."""
    B = nc.shape[0]
    k_max = max_steps
    if B:
        last = rem[0]
        first = rem[0]
        for r in range(B):
            if rem[r] < first:
                first = rem[r]
            if rem[r] > last:
                last = rem[r]
        k_max = min(k_max, last if span else first)
    if n > 0:
        k_max = min(k_max, (todo + n - 1) // n - 1)
    if k_max < 1:
        k_max = 1
    held0 = 0
    for r in range(B):
        held0 += (nc[r] + bs) // bs
    if n > 0:
        held0 += (c0 + n + bs - 1) // bs
    allocs = np.zeros(k_max, np.int64)
    chunk_blocks = np.zeros(k_max, np.int64)
    for s in range(1, k_max):
        if n > 0:
            cb = (c0 + (s + 1) * n + bs - 1) // bs - (c0 + s * n + bs - 1) // bs
            chunk_blocks[s] = cb
            allocs[s] += cb
        for r in range(B):
            if s < rem[r] and (nc[r] + s) % bs == 0:
                allocs[s] += 1
    cum = 0
    K = k_max
    for s in range(1, k_max):
        cum += allocs[s]
        if cum > avail:
            K = s
            cum -= allocs[s]
            break
    entries = 0
    for s in range(1, K):
        entries += (1 if chunk_blocks[s] > 0 else 0)
        for r in range(B):
            if s < rem[r] and (nc[r] + s) % bs == 0:
                entries += 1
    who = np.empty(entries, np.int64)
    when = np.empty(entries, np.int64)
    count = np.empty(entries, np.int64)
    i = 0
    for s in range(1, K):
        if chunk_blocks[s] > 0:
            who[i] = B
            when[i] = s
            count[i] = chunk_blocks[s]
            i += 1
        for r in range(B):
            if s < rem[r] and (nc[r] + s) % bs == 0:
                who[i] = r
                when[i] = s
                count[i] = 1
                i += 1
    n_fin = 0
    seen = np.zeros(K, np.bool_)
    if span:
        for r in range(B):
            if rem[r] <= K and not seen[rem[r] - 1]:
                seen[rem[r] - 1] = True
                n_fin += 1
    fin = np.empty(n_fin, np.int64)
    j = 0
    for s in range(K):
        if seen[s]:
            fin[j] = s
            j += 1
    return K, allocs[:K], who, when, count, held0, fin


@numba.njit(cache=True, nogil=True)
def run_ends(now, durations, t_next):
    """End time of every planned step (accumulated left to right, as single steps add up), and how
    many steps to keep: all, or up to the one in progress when the next request arrives at
    ``t_next`` (where that arrival's interrupt would end the run)."""
    K = durations.shape[0]
    ends = np.empty(K)
    t = now
    for s in range(K):
        t = t + durations[s]
        ends[s] = t
    keep = K
    if t_next <= ends[K - 1]:
        k_arr = searchsorted(ends, t_next, True) + 1
        if k_arr < K:
            keep = k_arr
    return ends, keep


@numba.njit(cache=True, nogil=True)
def segments(nc, rem, fin, K):
    """The segments of a run of K steps whose decoders finish at the end of the steps ``fin``
    (sorted): each segment's end step (exclusive), its decoders (those with ``rem`` > its first
    step) and their KV tokens before step 0."""
    m = 0
    for f in fin:
        if f < K - 1:
            m += 1
    bounds = np.empty(m + 1, np.int64)
    sizes = np.zeros(m + 1, np.int64)
    sums = np.zeros(m + 1, np.int64)
    a = 0
    j = 0
    for f in fin:
        if f < K - 1:
            bounds[j] = f + 1
            j += 1
    bounds[m] = K
    for j in range(m + 1):
        for r in range(nc.shape[0]):
            if rem[r] > a:
                sizes[j] += 1
                sums[j] += nc[r]
        a = bounds[j]
    return bounds, sizes, sums


@dataclass(slots=True)
class Run:
    """A run in progress: K steps priced at its start, committed incrementally, segment by segment.

    ``reqs``: the decoders, then (chunk runs) the chunk request. ``fin``: the sorted steps at whose
    end some decoder finishes (inside the run). The current segment starts at step ``seg0`` with the
    KV figures the step log needs (``free0``, ``cached0``, ``active0``, ``held0``, ``nc0``: tokens
    computed by every running request) and ``B`` decoders still running.
    """

    reqs: list
    B: int
    n: int                  # chunk tokens per step (0: a decode run)
    rem: np.ndarray         # output tokens each decoder still had to produce at the start
    fin: list
    allocs: np.ndarray      # blocks allocated by each step (step 0's before the run)
    K: int
    start: float
    ends: np.ndarray
    durations: np.ndarray
    launches: np.ndarray
    syncs: np.ndarray
    g0: int                 # the run's first step, as a local step index of the replica
    alloc_who: np.ndarray
    alloc_when: np.ndarray
    alloc_count: np.ndarray
    seg0: int
    B_seg: int              # decoders running in the current segment
    free0: int
    cached0: int
    active0: int
    held0: int
    nc0: int
    dram_used: int
    nvme_used: int
    dram_cached: int
    nvme_cached: int
    loading: int
    inflight: int
    next_fin: int = 0
    next_alloc: int = 0
    committed: int = 0
    finished: list | None = None    # requests the run finished, kept for observers


class DecodeRuns:
    """The run machinery of one replica (its only user)."""

    def __init__(self, replica: Replica, enabled: bool) -> None:
        self.r = replica
        self.enabled = enabled
        self.run_: Run | None = None
        self.in_run = False
        self.stop = False
        self.last_step_s = 0.0
        self.num_runs = 0
        self.run_steps = 0

    def plan_for(self, step: Step) -> tuple[bool, tuple | None] | None:
        """How ``step`` may start a run: None if it may not; else (span finishes, chunk) where chunk
        is None or (request, tokens per step)."""
        r = self.r
        if (not self.enabled or step.drafts is not None or step.preempted or step.prefix_hit_tokens
                or step.waits):
            return None     # (an admission into LOADING, or a write-back the step waits for: one step)
        sched = r.scheduler
        if not step.prefill:
            if len(step.decode) != len(r.running) or not sched.steady_decode(r.view):
                return None
            # a hand-off waiting for room (sim.handoff) takes the blocks of the run's first finish
            span = sched.steady_through_finishes(r.view) and r.kv.finishes_quiet()
            return span and not (r.handoffs is not None and r.handoffs.blocked), None
        if len(step.prefill) != 1 or len(step.decode) + 1 != len(r.running) or r.builder.lanes:
            return None     # (chunk runs price time-multiplexed steps; lanes step one at a time)
        got = sched.steady_chunk(r.view)
        if got is None:
            return None
        req, n = unwrap(got[0]), got[1]
        if req is not step.prefill[0][0] or n != step.prefill[0][1]:
            return None
        return False, (req, n)

    def interrupt(self) -> None:
        """Cut the run in progress short (unless it already ends with the step in progress)."""
        if self.in_run and not self.stop:
            run = self.run_
            if run is not None and (run.K == 1 or run.ends[run.K - 2] <= self.r.env.now):
                return      # the step in progress is the run's last: the replica plans again after it
            self.stop = True
            self.r.process.interrupt()

    def run(self, step: Step, span: bool, chunk: tuple | None):
        """Advance the run that ``step`` starts with one event (a SimPy process body)."""
        r = self.r
        env = r.env
        kv = r.kv
        hbm = kv.hbm
        bs = kv.block_size
        dec = step.decode
        B = len(dec)
        ncs = [q.num_computed for q in dec]
        nc = np.array(ncs, dtype=np.int64)                                           # KV before step 0
        rem = np.array([q.output_tokens - q.num_generated for q in dec], dtype=np.int64)
        nc_sum = sum(ncs)
        c0 = n = todo = 0
        reqs = dec
        if chunk is not None:
            creq, n = chunk
            c0, todo = creq.num_computed, creq.tokens_to_compute
            reqs = dec + [creq]
        now = r.clock()
        t_next = r.next_arrival_s()
        K, allocs, who, when, count, held0, fin = plan_run(nc, rem, bs, kv.run_budget(now),
                                                           self._cap(now, t_next), span and B > 0, c0, n, todo)
        durations, launches, syncs = self._price(nc, nc_sum, rem, fin, K, c0, n)
        self.last_step_s = float(durations[-1])
        # end with the step in progress when the next request arrives: exactly where an interrupt at
        # that arrival would end the run, without the interrupt
        ends, keep = run_ends(now, durations, t_next)
        if keep < K:
            K = keep
            ends, durations, allocs = ends[:K], durations[:K], allocs[:K]
            launches, syncs = launches[:K], syncs[:K]
            n_alloc = int(when.searchsorted(K))
            who, when, count = who[:n_alloc], when[:n_alloc], count[:n_alloc]
            fin = fin[:int(fin.searchsorted(K))]
        dram, nvme = kv.dram, kv.nvme
        run = Run(reqs, B, n, rem, fin.tolist(), allocs, K, now, ends, durations, launches, syncs, r.steps.n,
                  who, when, count, 0, B, hbm.num_free, hbm.num_cached, hbm.num_active, held0, nc_sum + c0,
                  dram.num_active * dram.bytes_per_block, nvme.num_active * nvme.bytes_per_block,
                  dram.num_cached * dram.bytes_per_block, nvme.num_cached * nvme.bytes_per_block,
                  len(r.moves.loading), hbm.num_locked)
        self.num_runs += 1
        self.run_ = run
        self.in_run, self.stop = True, False
        done = K
        try:
            yield env.timeout(exact_delay(env.now, float(ends[-1])))
        except simpy.Interrupt:
            j = int(np.searchsorted(ends, env.now, side="right"))   # steps finished by now
            done = min(j + 1, K)                                     # the one in progress completes
            target = float(ends[done - 1])
            while env.now < target:
                try:
                    yield env.timeout(exact_delay(env.now, target))
                except simpy.Interrupt:
                    pass
        finally:
            self.in_run = False
        r.t_end = float(ends[done - 1])
        self._advance(run, done - 1, done)
        self.run_ = None
        self.run_steps += done
        if r.observers:
            r.observe(StepOutcome(r.replica_id, run.start, float(ends[done - 1]), done, finished=run.finished or ()))

    def _price(self, nc, nc_sum, rem, fin, K, c0, n):
        """Durations, launches and syncs of each of the K planned steps, segment by segment."""
        builder = self.r.builder
        if n:
            return builder.chunk_run(nc, nc_sum, K, c0, n)
        if fin.size == 0 or (fin.size == 1 and fin[0] == K - 1):
            d, lc, sc = builder.decode_run(nc, nc_sum, K)
            return d, np.full(K, lc, np.int64), np.full(K, sc, np.int64)
        durations = np.empty(K)
        launches = np.empty(K, np.int64)
        syncs = np.empty(K, np.int64)
        bounds, sizes, sums = segments(nc, rem, fin, K)
        a = 0
        dense = builder.dense
        for b, B, total in zip(bounds.tolist(), sizes.tolist(), sums.tolist()):
            if dense:
                d, lc, sc = builder.dense_decode_run(B, total, b - a, a)
            else:
                d, lc, sc = builder.decode_run(nc[rem > a], total, b - a, first=a)
            durations[a:b], launches[a:b], syncs[a:b] = d, lc, sc
            a = b
        return durations, launches, syncs

    def _cap(self, now: float, t_next: float) -> int:
        """How many steps to plan. A run ending early is exact (the replica plans again and finds the
        same steady batch), so planning far past the next arrival, which will cut the run anyway,
        only wastes work: plan a quarter more than the steps expected until then."""
        if t_next == math.inf or self.last_step_s <= 0:
            return MAX_RUN_STEPS
        return int(min(MAX_RUN_STEPS, (t_next - now) / self.last_step_s * 1.25 + 2))

    def sync(self, now: float) -> None:
        """Bring a run's effects up to ``now``: allocations of steps started by now and the progress
        of steps finished by now. Called before anything else touches the replica's KV or reads its
        state mid-run (transfer completions, routers reading the replica's view)."""
        run = self.run_
        if run is None:
            return
        started = int(np.searchsorted(run.ends, now, side="right"))    # step `started` began at ends[started-1]
        self._advance(run, min(started, run.K - 1), min(started, run.K))

    def _advance(self, run: Run, alloc_through: int, progress_upto: int) -> None:
        """Allocate through step ``alloc_through`` and commit steps up to ``progress_upto``, in the
        order single stepping does it: a step's blocks when it starts, and the blocks of requests
        that finish at the end of step f released before step f + 1 allocates."""
        fin = run.fin
        while True:
            f = fin[run.next_fin] if run.next_fin < len(fin) else run.K - 1
            self._allocate(run, min(alloc_through, f))
            self._progress(run, min(progress_upto, f + 1))
            if run.committed < f + 1 or run.next_fin >= len(fin):
                return
            # decoders finished at the end of step f: a new segment starts with the pool as it is now
            run.next_fin += 1
            self._segment(run, f + 1)

    def _segment(self, run: Run, s: int) -> None:
        kv = self.r.kv
        hbm = kv.hbm
        act = [q for q in run.reqs[:run.B] if q.state == 1]
        run.seg0 = s
        run.B_seg = len(act)
        run.free0, run.cached0, run.active0 = hbm.num_free, hbm.num_cached, hbm.num_active
        run.held0 = sum(len(q.blocks) for q in act)
        run.nc0 = sum(q.num_computed for q in act)

    def _allocate(self, run: Run, through_step: int) -> None:
        """Allocate the run's blocks for steps up to ``through_step``, in step order and batch order."""
        i = run.next_alloc
        when = run.alloc_when
        if i >= when.shape[0] or when[i] > through_step:
            return
        j = int(when.searchsorted(through_step, side="right"))
        self.r.kv.grow_run(run.reqs, run.alloc_who[i:j], run.alloc_count[i:j], run.ends[when[i:j] - 1])
        run.next_alloc = j

    def _progress(self, run: Run, upto: int) -> None:
        """Commit steps [run.committed, upto) of one segment: step-log rows, token counts, finishes."""
        c = run.committed
        if upto <= c:
            return
        r = self.r
        kv = r.kv
        a = run.seg0
        B = run.B_seg
        steps = r.steps
        row0 = steps.reserve_block(upto - c)
        pad = r.builder.cost.padded_batch(B, run.n > 0) - B      # a captured graph's padding rows
        busy, nl, ns = fill_run_rows(steps.f, steps.i, steps.ends.a, row0, steps.n, c, upto, a, run.start, run.ends,
                             run.durations, run.allocs, run.free0, run.cached0, run.active0, run.held0,
                             run.inflight, run.nc0, B, run.n, kv.block_size, kv.hbm.bytes_per_block,
                             run.dram_used, run.nvme_used, run.dram_cached, run.nvme_cached, run.loading,
                             run.launches, run.syncs, pad)
        steps.commit_block(upto - c, busy)
        m = upto - c
        r.num_launches += nl
        r.num_padded_tokens += pad * (upto - c)
        r.num_syncs += ns
        g_first = r.step_id_base + run.g0 + c
        g_last = g_first + m - 1
        first_end = float(run.ends[c])
        finished = []
        prev = g_first - 1
        for q in run.reqs[:run.B]:
            if q.state != 1:        # finished in an earlier segment
                continue
            q.num_computed += m
            g = q.num_generated = q.num_generated + m
            se = q.seg_end              # Request.record_tokens, inlined: this loop is the hot path
            if se and se[-1] == prev:   # (runs never follow a speculative step: its run emitted 1 each)
                se[-1] = g_last
            else:
                q.seg_start.append(g_first)
                se.append(g_last)
                q.seg_tokens.append(1)
            if q.first_token_s < 0:
                q.first_token_s = first_end
            if g >= q.output_tokens:
                finished.append(q)
        if run.n:
            # the chunk's full prompt blocks are published step by step, at each step's end, as
            # single stepping does (their registration time is their last use)
            q = run.reqs[run.B]
            r.num_prefill_tokens += m * run.n
            if q.hash_keys is None or not kv.prefix_caching:
                q.num_computed += m * run.n
            else:
                for s in range(c, upto):
                    q.num_computed += run.n
                    kv.register_computed(q, float(run.ends[s]))
        run.committed = upto
        if finished:
            r.finish(finished, float(run.ends[upto - 1]))
            if r.observers:
                run.finished = (run.finished or []) + finished
