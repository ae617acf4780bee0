"""Decode runs: K steady decode-only steps advanced with one SimPy event, exactly as K single steps.

A decode run is K consecutive decode-only steps of a fixed batch of B requests. Request r starts
with ``nc[r]`` tokens of KV and processes one token per step; step s (0-based) writes token
``nc[r] + s``, which needs a new block when ``(nc[r] + s) % bs == 0``. Step 0's blocks are allocated
before the run is planned, so the run only plans steps 1..K-1. K stops at the first completion, at
the first step whose block allocation could fail, at the step in progress when the next request
arrives, or early when the replica is notified (a transfer completed). The steps are priced with one
vectorised call and committed incrementally (:meth:`DecodeRuns.sync`), with exactly the step times,
token counts and block ids of single stepping: the arithmetic here is exact integer arithmetic shared
with the single-step path, and a property test checks the equivalence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np
import simpy

from policies.base import StepOutcome
from sim.clock import exact_delay
from sim.metrics import fill_run_rows

if TYPE_CHECKING:
    from sim.replica.loop import Replica
    from sim.replica.step import Step

MAX_RUN_STEPS = 4096


@numba.njit(cache=True, nogil=True)
def plan_run(nc, rem, bs, avail, max_steps):
    """Plan a run: (K, allocs, who, when, held0).

    K is at most the steps until the first request finishes (``rem`` = output tokens still to
    produce) and ``max_steps``, and steps 1..K-1 may not need more new blocks than ``avail`` in total.
    ``allocs[s]`` = blocks step s allocates (``allocs[0]`` = 0: step 0's were allocated before the
    run); ``who``/``when`` list those allocations in step order and batch order; ``held0`` = blocks
    the batch holds at the start (each request holds ceil((nc + 1) / bs) once step 0 is allocated)."""
    B = nc.shape[0]
    k_max = max_steps
    held0 = 0
    for r in range(B):
        if rem[r] < k_max:
            k_max = rem[r]
        held0 += (nc[r] + bs) // bs
    allocs = np.zeros(k_max, np.int64)
    for r in range(B):
        s = (bs - nc[r] % bs) % bs
        if s == 0:
            s = bs
        while s < k_max:
            allocs[s] += 1
            s += bs
    cum = 0
    K = k_max
    for s in range(1, k_max):
        cum += allocs[s]
        if cum > avail:
            K = s
            cum -= allocs[s]
            break
    who = np.empty(cum, np.int64)
    when = np.empty(cum, np.int64)
    i = 0
    for s in range(1, K):
        for r in range(B):
            if (nc[r] + s) % bs == 0:
                who[i] = r
                when[i] = s
                i += 1
    return K, allocs[:K], who, when, held0


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
        k_arr = np.searchsorted(ends, t_next, side="right") + 1
        if k_arr < K:
            keep = k_arr
    return ends, keep


@dataclass(slots=True)
class Run:
    """A decode run in progress: K steps priced at its start, committed incrementally."""

    reqs: list
    nc_sum: int
    allocs: np.ndarray      # blocks allocated by each step (step 0's before the run)
    K: int
    start: float
    ends: np.ndarray
    durations: np.ndarray
    launches: int
    syncs: int
    g0: int                 # the run's first step, as a local step index of the replica
    alloc_who: np.ndarray
    alloc_when: np.ndarray
    free0: int
    cached0: int
    active0: int
    held0: int
    dram_used: int
    nvme_used: int
    inflight: int
    next_alloc: int = 0
    committed: int = 0
    finished: list | None = None    # requests the run finished, kept for observers


class DecodeRuns:
    """The decode-run machinery of one replica (its only user)."""

    def __init__(self, replica: Replica, enabled: bool) -> None:
        self.r = replica
        self.enabled = enabled
        self.run_: Run | None = None
        self.in_run = False
        self.stop = False
        self.last_step_s = 0.0
        self.num_runs = 0
        self.run_steps = 0

    def can_run(self, step: Step) -> bool:
        r = self.r
        return (self.enabled and not step.prefill and step.drafts is None and not step.preempted
                and len(step.decode) == len(r.running) and r.scheduler.steady_decode(r.view))

    def interrupt(self) -> None:
        """Cut the run in progress short (unless it already ends with the step in progress)."""
        if self.in_run and not self.stop:
            run = self.run_
            if run is not None and (run.K == 1 or run.ends[run.K - 2] <= self.r.env.now):
                return      # the step in progress is the run's last: the replica plans again after it
            self.stop = True
            self.r.process.interrupt()

    def run(self, step: Step):
        """Advance K decode-only steps with one event (a SimPy process body)."""
        r = self.r
        env = r.env
        kv = r.kv
        hbm = kv.hbm
        bs = kv.block_size
        reqs = step.decode
        ncs = [q.num_computed for q in reqs]
        nc = np.array(ncs, dtype=np.int64)                                           # KV before step 0
        rem = np.array([q.output_tokens - q.num_generated for q in reqs], dtype=np.int64)
        now = r.clock()
        t_next = r.next_arrival_s()
        K, allocs, who, when, held0 = plan_run(nc, rem, bs, hbm.num_available, self._cap(now, t_next))
        nc_sum = sum(ncs)
        durations, launches, syncs = r.builder.decode_run(nc, nc_sum, K)
        self.last_step_s = float(durations[-1])
        # end with the step in progress when the next request arrives: exactly where an interrupt at
        # that arrival would end the run, without the interrupt
        ends, keep = run_ends(now, durations, t_next)
        if keep < K:
            K = keep
            ends, durations, allocs = ends[:K], durations[:K], allocs[:K]
            n_alloc = int(when.searchsorted(K))
            who, when = who[:n_alloc], when[:n_alloc]
        dram, nvme = kv.dram, kv.nvme
        run = Run(reqs, nc_sum, allocs, K, now, ends, durations, launches, syncs, r.steps.n, who, when,
                  hbm.num_free, hbm.num_cached, hbm.num_active, held0,
                  dram.num_active * dram.bytes_per_block, nvme.num_active * nvme.bytes_per_block,
                  hbm.num_locked)
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
        self._allocate(run, done - 1)
        self._progress(run, done)
        self.run_ = None
        self.run_steps += done
        if r.observers:
            r.observe(StepOutcome(r.replica_id, run.start, float(ends[done - 1]), done, finished=run.finished or ()))

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
        self._allocate(run, min(started, run.K - 1))
        self._progress(run, min(started, run.K))

    def _allocate(self, run: Run, through_step: int) -> None:
        """Allocate the run's blocks for steps up to ``through_step``, in step order and batch order."""
        i = run.next_alloc
        when = run.alloc_when
        if i >= when.shape[0] or when[i] > through_step:
            return
        j = int(when.searchsorted(through_step, side="right"))
        self.r.kv.grow_run(run.reqs, run.alloc_who[i:j], run.ends[when[i:j] - 1])
        run.next_alloc = j

    def _progress(self, run: Run, upto: int) -> None:
        """Commit steps [run.committed, upto): step-log rows, token counts, completions."""
        c = run.committed
        if upto <= c:
            return
        r = self.r
        kv = r.kv
        B = len(run.reqs)
        steps = r.steps
        row0 = steps.reserve_block(upto - c)
        busy = fill_run_rows(steps.f, steps.i, steps.ends.a, row0, steps.n, c, upto, run.start, run.ends,
                             run.durations, run.allocs, run.free0, run.cached0, run.active0, run.held0,
                             run.inflight, run.nc_sum, B, kv.block_size, kv.hbm.bytes_per_block,
                             run.dram_used, run.nvme_used, run.launches, run.syncs)
        steps.commit_block(upto - c, busy)
        m = upto - c
        r.num_launches += run.launches * m
        r.num_syncs += run.syncs * m
        g_first = r.step_id_base + run.g0 + c
        g_last = g_first + m - 1
        first_end = float(run.ends[c])
        finished = []
        prev = g_first - 1
        for q in run.reqs:
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
        run.committed = upto
        if finished:
            r.finish(finished, float(run.ends[upto - 1]))
            if r.observers:
                run.finished = (run.finished or []) + finished
