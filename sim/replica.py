"""One serving instance: the per-iteration SimPy process that asks the scheduler for a plan, applies
it (preemptions, swaps, admissions, block allocation), prices the step and advances time.

Time is advanced by one SimPy event per engine step — or, when the scheduler says the batch is in a
steady decode run, by one event for the whole run (see :meth:`Replica._decode_run`): the K decode
steps until the next request finishes or blocks run out are priced with one vectorised call and
committed together, with exactly the same step times, token counts and block allocations as stepping
one by one. An arrival or a finished transfer interrupts the run; the step in progress completes
and the replica plans afresh.

Invariants: ``running`` holds RUNNING requests in admission order; ``waiting`` holds WAITING
requests (recompute-preempted first, then by arrival); ``swapped`` holds SWAPPED requests in
swap-out order; a request is in at most one of them, or in flight on a link, or done.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import simpy

from policies.base import RequestState, StepPlan
from sim.costs.step import StepCostModel
from sim.hardware.gpu import GPUGroup
from sim.hardware.links import PCIeLink
from sim.memory.tiers import TieredKV
from sim.metrics import REJECT_REASONS, RequestLog, StepLog
from sim.request import Request

WAITING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN = (RequestState.WAITING, RequestState.RUNNING,
                                                         RequestState.SWAPPING_OUT, RequestState.SWAPPED,
                                                         RequestState.SWAPPING_IN)
_REASON = {r: i for i, r in enumerate(REJECT_REASONS)}
MAX_RUN_STEPS = 4096


def exact_delay(now: float, target: float) -> float:
    """A delay ``d`` with ``now + d == target`` in floating point (SimPy schedules at now + delay)."""
    d = target - now
    for _ in range(4):
        got = now + d
        if got == target:
            return d
        d = np.nextafter(d, math.inf if got < target else -math.inf)
    return max(d, 0.0)


class SchedulerViewImpl:
    """The live, read-only view a scheduler gets of this replica."""

    __slots__ = ("_r", "_kv", "block_size", "num_blocks", "max_model_len")

    def __init__(self, replica: "Replica") -> None:
        self._r = replica
        self._kv = replica.kv
        self.block_size = replica.kv.block_size
        self.num_blocks = replica.kv.hbm.num_blocks
        self.max_model_len = replica.max_model_len

    @property
    def waiting(self):
        return self._r.waiting

    @property
    def running(self):
        return self._r.running

    @property
    def swapped(self):
        return self._r.swapped

    @property
    def num_swapping_in(self) -> int:
        return self._r.num_swapping_in

    @property
    def num_free_blocks(self) -> int:
        return self._kv.hbm.num_available

    def blocks_needed(self, req, new_tokens: int) -> int:
        return self._kv.blocks_needed(req, new_tokens)

    def prefix_hit_tokens(self, req) -> int:
        return self._kv.prefix_hit_blocks(req) * self.block_size

    def tokens_to_compute(self, req) -> int:
        return self._kv.tokens_to_compute(req)

    def swap_in_blocks(self, req) -> int:
        return len(req.dram_blocks)

    def blocks_freed_by_release(self, req) -> int:
        return self._kv.blocks_freed_by_release(req)

    def block_slack_tokens(self, req) -> int:
        return len(req.blocks) * self.block_size - req.num_computed


class ReplicaStateView:
    """What routers see of a replica."""

    __slots__ = ("_r",)

    def __init__(self, replica: "Replica") -> None:
        self._r = replica

    @property
    def replica_id(self) -> int:
        return self._r.replica_id

    @property
    def num_waiting(self) -> int:
        return len(self._r.waiting)

    @property
    def num_running(self) -> int:
        return len(self._r.running)

    @property
    def num_free_blocks(self) -> int:
        return self._r.kv.hbm.num_available

    @property
    def num_blocks(self) -> int:
        return self._r.kv.hbm.num_blocks


@dataclass(slots=True)
class _Step:
    """An applied plan: what runs in the step about to start."""

    prefill: list          # (request, tokens)
    decode: list           # requests
    drafts: list           # draft tokens per decode (speculation), or None
    num_preempted: int


class Replica:
    def __init__(self, *, env: simpy.Environment, replica_id: int, kv: TieredKV, cost: StepCostModel,
                 gpu: GPUGroup, pcie: PCIeLink, scheduler, speculation, sparsity, preemption_mode: str,
                 max_model_len: int, max_prompt_tokens: int, requests: RequestLog, step_log: StepLog,
                 rng: np.random.Generator, bulk_decode: bool, draft_cost: StepCostModel | None = None) -> None:
        self.env = env
        self.replica_id = replica_id
        self.kv = kv
        self.cost = cost
        self.draft_cost = draft_cost
        self.gpu = gpu
        self.pcie = pcie
        self.scheduler = scheduler
        self.speculation = speculation
        self.sparsity = sparsity
        self.preemption_mode = preemption_mode
        self.max_model_len = max_model_len
        self.max_prompt_tokens = max_prompt_tokens
        self.log = requests
        self.steps = step_log
        self.rng = rng
        self.bulk = bulk_decode and getattr(speculation, "emits_one_token", False) \
            and hasattr(scheduler, "steady_decode")
        self.dense = bool(getattr(sparsity, "identity", False))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_swapping_in = 0
        self.num_swapping_out = 0
        self.inflight_blocks = 0
        self.view = SchedulerViewImpl(self)
        self.state_view = ReplicaStateView(self)
        self._wake: simpy.Event | None = None
        self._run: _Run | None = None
        self._in_run = False
        self._stop_run = False
        self.check_invariants = False   # tests turn this on: O(blocks) checks after every step
        self.process = env.process(self._loop())
        # counters
        self.num_launches = 0
        self.num_syncs = 0
        self.num_runs = 0
        self.run_steps = 0
        self.num_swaps_out = 0
        self.num_swaps_in = 0
        self.num_swap_drops = 0

    # ================================================================== arrivals and wake-ups
    def submit(self, req: Request) -> None:
        """A request routed here (called by the cluster's arrival process at its arrival time)."""
        req.replica = self.replica_id
        reason = self._reject_reason(req)
        if reason:
            self.log.reject(req, _REASON[reason], self.env.now)
            return
        self.waiting.append(req)
        self.notify()

    def _reject_reason(self, req: Request) -> str:
        total = req.prompt_tokens + req.output_tokens
        if total > self.max_model_len:
            return "exceeds max_model_len"
        if req.prompt_tokens + req.num_generated > self.max_prompt_tokens:
            return "exceeds scheduler token budget"
        if -(-(total - 1) // self.kv.block_size) > self.kv.hbm.num_blocks:
            return "exceeds KV capacity"
        return ""

    def notify(self) -> None:
        """Something changed (arrival, transfer done): wake an idle replica, or cut a decode run short."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._in_run and not self._stop_run:
            self._stop_run = True
            self.process.interrupt()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.num_swapping_in
                    or self.num_swapping_out)

    # ================================================================== main loop
    def _loop(self):
        env = self.env
        while True:
            if not (self.waiting or self.running or self.swapped):
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            now = env.now
            plan = self.scheduler.schedule(self.view, now)
            step = self._apply(plan, now)
            if not (step.prefill or step.decode):
                if self.num_swapping_in or self.num_swapping_out:
                    self._wake = env.event()
                    yield self._wake
                    self._wake = None
                    continue
                if plan.is_empty() or not (plan.prefill or plan.decode):
                    self._unblock(now)
                continue
            if (self.bulk and not step.prefill and step.drafts is None and step.num_preempted == 0
                    and len(step.decode) == len(self.running) and self.scheduler.steady_decode(self.view)):
                yield from self._decode_run(step)
            else:
                yield from self._single_step(step)
            if self.check_invariants:
                self.check()

    def _unblock(self, now: float) -> None:
        """The scheduler planned nothing although work is queued and nothing is in flight: if the
        head of the queue can never run, reject it rather than wait forever."""
        if self.running:
            raise RuntimeError(f"replica {self.replica_id}: scheduling policy {self.scheduler.name!r} planned "
                               f"no work for {len(self.running)} running requests")
        if self.waiting:
            req = self.waiting.popleft()
            self.log.reject(req, _REASON["could not be scheduled"], now)
        elif self.swapped:
            req = self.swapped.pop(0)
            self.kv.dram.release(req.dram_blocks, now)
            req.dram_blocks = []
            self.log.reject(req, _REASON["could not be scheduled"], now)

    # ================================================================== applying a plan
    def _apply(self, plan: StepPlan, now: float) -> _Step:
        kv = self.kv
        npre = 0
        for req in plan.preempt:
            if req.state != RUNNING:
                raise RuntimeError(f"scheduling policy {self.scheduler.name!r} preempted request "
                                   f"{req.req_id}, which is not running")
            self._preempt(req, now)
            npre += 1
        for req in plan.swap_in:
            self._start_swap_in(req, now)
        prefill = []
        admitted = 0
        for req, n in plan.prefill:
            if req.state == WAITING:
                if not kv.can_admit(req, n):
                    break       # blocks ran short (e.g. prefix hits were evicted since planning)
                kv.admit(req, now)
                n = min(n, req.tokens_to_compute)
                kv.grow(req, n, now)
                req.state = RUNNING
                if req.first_scheduled_s < 0:
                    req.first_scheduled_s = now
                self.running.append(req)
                admitted += 1
                prefill.append((req, n))
            elif req.state == RUNNING:
                n = min(n, req.tokens_to_compute)
                if n > 0 and kv.grow(req, n, now):
                    prefill.append((req, n))
            else:
                raise RuntimeError(f"scheduling policy {self.scheduler.name!r} scheduled request "
                                   f"{req.req_id} in state {RequestState(req.state).name}")
        if admitted:
            self._dequeue_admitted(admitted)
        decode = []
        for req in plan.decode:
            if req.state != RUNNING or req.tokens_to_compute != 1:
                raise RuntimeError(f"scheduling policy {self.scheduler.name!r} put request {req.req_id} "
                                   f"in the decode list but it is not decoding")
            if kv.grow(req, 1, now):
                decode.append(req)
        drafts = None
        if decode and not getattr(self.speculation, "emits_one_token", False):
            drafts = self._apply_drafts(decode, now)
        return _Step(prefill=prefill, decode=decode, drafts=drafts, num_preempted=npre)

    def _dequeue_admitted(self, admitted: int) -> None:
        w = self.waiting
        head_ok = all(w[i].state == RUNNING for i in range(min(admitted, len(w))))
        if head_ok:
            for _ in range(admitted):
                w.popleft()
        else:
            self.waiting = deque(r for r in w if r.state == WAITING)

    def _apply_drafts(self, decode: list, now: float) -> list:
        plan = self.speculation.propose(decode, now)
        k = list(plan.draft_tokens) + [0] * (len(decode) - len(plan.draft_tokens))
        out = []
        for req, d in zip(decode, k):
            d = max(0, min(int(d), req.output_tokens - req.num_generated - 1))
            if d and not self.kv.grow(req, 1 + d, now):
                d = 0
            out.append(d)
        self._draft_plan = plan
        return out

    # ================================================================== preemption and swapping
    def _preempt(self, req: Request, now: float) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        if self.preemption_mode == "swap" and req.blocks:
            got, dropped = self.kv.reserve_dram(req, now, self.swapped)
            for victim in dropped:
                self.swapped.remove(victim)
                self._to_waiting_front(victim)
                self.num_swap_drops += 1
            if got is not None:
                req.dram_blocks = got
                req.state = SWAPPING_OUT
                req.num_swaps += 1
                self.num_swapping_out += 1
                self.num_swaps_out += 1
                nbytes = len(req.blocks) * self.kv.hbm.bytes_per_block
                self.inflight_blocks += len(req.blocks)
                self.env.process(self._swap_out(req, nbytes))
                return
        self.kv.release(req, now)
        self._to_waiting_front(req)

    def _to_waiting_front(self, req: Request) -> None:
        req.state = WAITING
        req.num_computed = 0
        req.num_cached_blocks = 0
        # preempted requests go back in front, earliest arrival first
        i = 0
        w = self.waiting
        while i < len(w) and w[i].num_preemptions > 0 and w[i].arrival_s <= req.arrival_s:
            i += 1
        w.insert(i, req)

    def _swap_out(self, req: Request, nbytes: int):
        yield from self.pcie.d2h.transfer(nbytes)
        now = self.env.now
        self.sync(now)
        self.inflight_blocks -= len(req.blocks)
        self.kv.finish_swap_out(req, now)
        req.state = SWAPPED
        self.num_swapping_out -= 1
        self.swapped.append(req)
        self.notify()

    def _start_swap_in(self, req: Request, now: float) -> None:
        if req.state != SWAPPED:
            raise RuntimeError(f"scheduling policy {self.scheduler.name!r} swapped in request {req.req_id}, "
                               f"which is not swapped out")
        if not self.kv.reserve_hbm_for_swap_in(req, now):
            return
        self.swapped.remove(req)
        req.state = SWAPPING_IN
        self.num_swapping_in += 1
        self.num_swaps_in += 1
        nbytes = len(req.blocks) * self.kv.hbm.bytes_per_block
        self.inflight_blocks += len(req.blocks)
        self.env.process(self._swap_in(req, nbytes))

    def _swap_in(self, req: Request, nbytes: int):
        yield from self.pcie.h2d.transfer(nbytes)
        now = self.env.now
        self.sync(now)
        self.inflight_blocks -= len(req.blocks)
        self.kv.finish_swap_in(req, now)
        req.state = RUNNING
        self.num_swapping_in -= 1
        self.running.append(req)
        self.notify()

    def check(self) -> None:
        """Assert the replica's invariants (see the module docstring and ``TieredKV``)."""
        self.kv.check()
        bs = self.kv.block_size
        seen = set()
        for group, state in ((self.running, RUNNING), (self.waiting, WAITING), (self.swapped, SWAPPED)):
            for r in group:
                assert r.state == state, f"request {r.req_id} in the wrong queue ({r.state})"
                assert id(r) not in seen, f"request {r.req_id} queued twice"
                seen.add(id(r))
                assert 0 <= r.num_generated < r.output_tokens or r.state != RUNNING
        for r in self.running:
            assert len(r.blocks) == -(-r.num_computed // bs), \
                f"request {r.req_id}: {len(r.blocks)} blocks for {r.num_computed} computed tokens"
            assert 0 <= r.num_computed <= r.num_tokens
        for r in self.waiting:
            assert not r.blocks and r.num_computed == 0
        held = sum(len(r.blocks) for r in self.running)
        assert self.kv.hbm.num_active <= held + self.inflight_blocks

    # ================================================================== one step
    def _single_step(self, step: _Step):
        env = self.env
        start = env.now
        pq = np.fromiter((n for _, n in step.prefill), dtype=np.int64, count=len(step.prefill))
        pc = np.fromiter((r.num_computed for r, _ in step.prefill), dtype=np.int64, count=len(step.prefill))
        sampled = sum(1 for r, n in step.prefill if r.num_computed + n == r.num_tokens) + len(step.decode)
        nd = len(step.decode)
        query = 1
        if step.drafts is not None and nd:
            query = 1 + max(step.drafts)
        if self.dense:
            ctx_sum = sum(r.num_computed for r in step.decode) + nd * query
        else:
            ctx = np.fromiter((r.num_computed + query for r in step.decode), dtype=np.int64, count=nd)
            ctx_sum = int(self.sparsity.attended_tokens(ctx).sum()) if nd else 0
        duration, launches, syncs = self.cost.step(pq, pc, nd, ctx_sum, sampled, query)
        if step.drafts is not None and nd and self.draft_cost is not None and max(step.drafts):
            ctx_d = sum(r.num_computed for r in step.decode)
            for j in range(max(step.drafts)):
                d, l_, s_ = self.draft_cost.step(np.empty(0, np.int64), np.empty(0, np.int64), nd,
                                                 ctx_d + nd * (j + 1), nd, 1)
                duration += d
                launches += l_
                syncs += s_
        end = start + duration
        self._log_step(start, duration, end, step, pq, launches, syncs)
        yield env.timeout(exact_delay(start, end))
        self._commit(step, self.steps.n - 1, end)

    def _log_step(self, start, duration, end, step, pq, launches, syncs) -> None:
        kv = self.kv
        hbm = kv.hbm
        bpb = hbm.bytes_per_block
        nseq = len(step.prefill) + len(step.decode)
        tokens = int(pq.sum()) + len(step.decode) + (sum(step.drafts) if step.drafts else 0)
        held = sum(len(r.blocks) for r in self.running)
        filled = sum(r.num_computed for r in self.running) + tokens
        locked = min(sum(len(r.blocks) for r, _ in step.prefill) + sum(len(r.blocks) for r in step.decode)
                     + self.inflight_blocks, hbm.num_active)
        self.steps.append(start, duration, end, (
            nseq, len(step.prefill), int(pq.sum()), len(step.decode), tokens,
            hbm.num_active * bpb, hbm.num_cached * bpb, locked * bpb,
            kv.dram.num_active * kv.dram.bytes_per_block, kv.nvme.num_active * kv.nvme.bytes_per_block,
            held * kv.block_size - filled, launches, syncs, step.num_preempted))
        self.num_launches += launches
        self.num_syncs += syncs

    def _commit(self, step: _Step, step_idx: int, end: float) -> None:
        kv = self.kv
        finished = []
        for req, n in step.prefill:
            req.num_computed += n
            kv.register_computed(req)
            if req.num_computed == req.num_tokens:
                req.num_generated += 1
                req.record_tokens(step_idx, step_idx)
                if req.first_token_s < 0:
                    req.first_token_s = end
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        if step.drafts is None:
            for req in step.decode:
                req.num_computed += 1
                req.num_generated += 1
                req.record_tokens(step_idx, step_idx)
                if req.first_token_s < 0:     # the prompt's last token ran as a one-token step
                    req.first_token_s = end
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        else:
            for req, d in zip(step.decode, step.drafts):
                a = max(0, min(int(self.speculation.accepted(self.rng, req, d)), d)) if d else 0
                req.num_computed += 1 + a
                req.num_generated += 1 + a
                req.record_tokens(step_idx, step_idx, extra=a)
                if req.first_token_s < 0:
                    req.first_token_s = end
                # roll back the KV slots of rejected drafts
                keep = -(-req.num_computed // kv.block_size)
                if len(req.blocks) > keep:
                    kv.hbm.release(req.blocks[keep:], end)
                    del req.blocks[keep:]
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        if finished:
            self._finish(finished, end)

    def _finish(self, finished: list, end: float) -> None:
        kv = self.kv
        done = set(map(id, finished))
        self.running = [r for r in self.running if id(r) not in done]
        for req in finished:
            req.finish_s = end
            req.state = RequestState.FINISHED
            kv.release(req, end)
            self.log.finish(req)

    # ================================================================== decode runs
    def _decode_run(self, step: _Step):
        """Advance K decode-only steps with one event. K stops at the first completion, at the first
        step whose block allocation could fail, or early when :meth:`notify` interrupts the run."""
        env = self.env
        kv = self.kv
        bs = kv.block_size
        reqs = step.decode
        B = len(reqs)
        nc = np.fromiter((r.num_computed for r in reqs), dtype=np.int64, count=B)   # before step 0
        rem = np.fromiter((r.output_tokens - r.num_generated for r in reqs), dtype=np.int64, count=B)
        k_max = int(min(rem.min(), MAX_RUN_STEPS))
        # step s >= 1 allocates a block for request r when (nc_r + s) % bs == 0, i.e. at s = first_r + m*bs
        first = (bs - nc % bs) % bs
        first[first == 0] = bs
        avail = kv.hbm.num_available

        def allocs_through(s: int) -> int:   # blocks needed by steps 1..s
            return int(np.maximum((s - first) // bs + 1, 0).sum()) if s >= 1 else 0

        if allocs_through(k_max - 1) > avail:
            lo, hi = 1, k_max - 1     # largest K with allocs_through(K - 1) <= avail
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if allocs_through(mid - 1) <= avail:
                    lo = mid
                else:
                    hi = mid - 1
            k_max = lo
        K = k_max
        s_idx = np.arange(K, dtype=np.int64)
        if self.dense:
            ctx_sums = (int(nc.sum()) + B) + B * s_idx
        else:
            ctx = (nc[None, :] + 1) + s_idx[:, None]
            ctx_sums = self.sparsity.attended_tokens(ctx).sum(axis=1)
        durations, launches, syncs = self.cost.decode_run(B, ctx_sums.astype(np.float64))
        start = env.now
        ends = np.add.accumulate(np.concatenate(([start], durations)))[1:]
        starts = np.concatenate(([start], ends[:-1]))
        counts = np.maximum((K - 1 - first) // bs + 1, 0)     # allocations of steps 1..K-1 per request
        total = int(counts.sum())
        who = np.repeat(np.arange(B), counts)
        when = first[who] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)) * bs
        order = np.lexsort((who, when))
        hbm = kv.hbm
        run = _Run(reqs=reqs, nc=nc, first=first, K=K, starts=starts, ends=ends, durations=durations,
                   launches=launches, syncs=syncs, g0=self.steps.n, alloc_who=who[order],
                   alloc_when=when[order], free0=hbm.num_free, cached0=hbm.num_cached,
                   active0=hbm.num_active, held0=sum(len(r.blocks) for r in reqs),
                   dram_used=kv.dram.num_active * kv.dram.bytes_per_block,
                   nvme_used=kv.nvme.num_active * kv.nvme.bytes_per_block, inflight=self.inflight_blocks)
        self.num_runs += 1
        self._run = run
        self._in_run, self._stop_run = True, False
        done = K
        try:
            yield env.timeout(exact_delay(start, float(ends[-1])))
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
            self._in_run = False
        self._run_allocate(run, done - 1)
        self._run_progress(run, done)
        self._run = None
        self.run_steps += done

    def sync(self, now: float) -> None:
        """Bring a decode run's effects up to ``now``: allocations of steps started by now and the
        progress of steps finished by now. Called before anything else touches this replica's KV or
        reads its state mid-run (transfer completions, state-dependent routers)."""
        run = self._run
        if run is None:
            return
        started = int(np.searchsorted(run.starts, now, side="right")) - 1
        self._run_allocate(run, min(started, run.K - 1))
        finished = int(np.searchsorted(run.ends, now, side="right"))
        self._run_progress(run, min(finished, run.K))

    def _run_allocate(self, run: "_Run", through_step: int) -> None:
        """Allocate the run's blocks for steps up to ``through_step``, in step order and batch order."""
        hbm = self.kv.hbm
        i = run.next_alloc
        when, who, starts, reqs = run.alloc_when, run.alloc_who, run.starts, run.reqs
        n = when.shape[0]
        victims = self.kv._choose_hbm_victims
        while i < n and when[i] <= through_step:
            b = hbm.allocate_one(float(starts[when[i]]), victims)
            if b < 0:
                raise RuntimeError("decode run allocated more blocks than were available")
            reqs[who[i]].blocks.append(b)
            i += 1
        run.next_alloc = i

    def _run_progress(self, run: "_Run", upto: int) -> None:
        """Commit steps [run.committed, upto): step-log rows, token counts, completions."""
        c = run.committed
        if upto <= c:
            return
        kv = self.kv
        bs = kv.block_size
        bpb = kv.hbm.bytes_per_block
        B = len(run.reqs)
        s_idx = np.arange(c, upto, dtype=np.int64)
        cum = np.maximum((s_idx[:, None] - run.first[None, :]) // bs + 1, 0).sum(axis=1)
        evicted = np.maximum(cum - run.free0, 0)
        filled = int(run.nc.sum()) + B * (s_idx + 1)
        self.steps.extend(
            run.starts[c:upto], run.durations[c:upto], run.ends[c:upto], num_seqs=B, prefill_seqs=0,
            prefill_tokens=0, decode_seqs=B, tokens=B,
            hbm_active_bytes=(run.active0 + cum) * bpb, hbm_cached_bytes=(run.cached0 - evicted) * bpb,
            hbm_locked_bytes=np.minimum(run.held0 + cum + run.inflight, run.active0 + cum) * bpb,
            dram_used_bytes=run.dram_used, nvme_used_bytes=run.nvme_used,
            frag_tokens=(run.held0 + cum) * bs - filled, launches=run.launches, syncs=run.syncs,
            preemptions=0)
        m = upto - c
        self.num_launches += run.launches * m
        self.num_syncs += run.syncs * m
        g_first, g_last = run.g0 + c, run.g0 + upto - 1
        finished = []
        first_end = float(run.ends[c])
        for r in run.reqs:
            r.num_computed += m
            r.num_generated += m
            r.record_tokens(g_first, g_last)
            if r.first_token_s < 0:
                r.first_token_s = first_end
            if r.num_generated >= r.output_tokens:
                finished.append(r)
        run.committed = upto
        if finished:
            self._finish(finished, float(run.ends[upto - 1]))


@dataclass(slots=True)
class _Run:
    """A decode run in progress: K steps priced at its start, committed incrementally."""

    reqs: list
    nc: np.ndarray
    first: np.ndarray
    K: int
    starts: np.ndarray
    ends: np.ndarray
    durations: np.ndarray
    launches: int
    syncs: int
    g0: int
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
