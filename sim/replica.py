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
from sim.decode_run import plan_run, run_ends
from sim.hardware.gpu import GPUGroup
from sim.hardware.links import PCIeLink
from sim.memory.tiers import TieredKV
from sim.metrics import REJECT_REASONS, RequestLog, StepLog, TokenLog, fill_run_rows
from sim.request import Request

WAITING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN = (RequestState.WAITING, RequestState.RUNNING,
                                                         RequestState.SWAPPING_OUT, RequestState.SWAPPED,
                                                         RequestState.SWAPPING_IN)
_REASON = {r: i for i, r in enumerate(REJECT_REASONS)}
MAX_RUN_STEPS = 4096
_NO_CHUNKS = np.empty(0, dtype=np.int64)


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

    def decode_blocks_needed(self, reqs) -> list[int]:
        bs = self.block_size
        return [1 if r.num_computed >= len(r.blocks) * bs else 0 for r in reqs]

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
                 token_log: TokenLog,
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
        self.tokens = token_log
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
        self._last_step_s = 0.0
        self._t_end = -1.0          # exact end of the last step (see _clock)
        self.next_arrival_s = lambda: math.inf   # the cluster sets this: when the next request arrives
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
        """Something changed (arrival, transfer done): wake an idle replica, or cut a decode run short
        (unless the run already ends with the step in progress)."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._in_run and not self._stop_run:
            run = self._run
            if run is not None and (run.K == 1 or run.ends[run.K - 2] <= self.env.now):
                return      # the step in progress is the run's last: the replica plans again after it
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
            now = self._clock()
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

    def _clock(self) -> float:
        """The replica's time: the exact end of its last step when it has just finished one (SimPy's
        clock can sit one ulp off it: for some pairs no delay d makes now + d round to the planned
        end), otherwise SimPy's. Step arithmetic thus never depends on how SimPy rounded."""
        now = self.env.now
        t = self._t_end
        return t if abs(now - t) <= 4.0 * math.ulp(t) else now

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
        bs = kv.block_size
        for req in plan.decode:
            if req.state != RUNNING or req.prompt_tokens + req.num_generated - req.num_computed != 1:
                raise RuntimeError(f"scheduling policy {self.scheduler.name!r} put request {req.req_id} "
                                   f"in the decode list but it is not decoding")
            if req.num_computed < len(req.blocks) * bs or kv.grow(req, 1, now):
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
                self._start_transfer(req, self.pcie.d2h, self._swapped_out)
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

    def _start_transfer(self, req: Request, channel, done) -> None:
        """Move ``req``'s KV over ``channel`` as a process of its own; ``done(req, now)`` applies the
        result when the bytes have arrived."""
        self.inflight_blocks += len(req.blocks)
        self.env.process(self._transfer(req, len(req.blocks) * self.kv.hbm.bytes_per_block, channel, done))

    def _transfer(self, req: Request, nbytes: int, channel, done):
        yield from channel.transfer(nbytes)
        now = self.env.now
        self.sync(now)          # a decode run in progress first catches up to now
        self.inflight_blocks -= len(req.blocks)
        done(req, now)
        self.notify()

    def _swapped_out(self, req: Request, now: float) -> None:
        self.kv.finish_swap_out(req, now)
        req.state = SWAPPED
        self.num_swapping_out -= 1
        self.swapped.append(req)

    def _swapped_in(self, req: Request, now: float) -> None:
        self.kv.finish_swap_in(req, now)
        req.state = RUNNING
        self.num_swapping_in -= 1
        self.running.append(req)

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
        self._start_transfer(req, self.pcie.h2d, self._swapped_in)

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
        start = self._clock()
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
        yield env.timeout(exact_delay(env.now, end))
        self._t_end = end
        self._commit(step, self.steps.n - 1, end)

    def _log_step(self, start, duration, end, step, pq, launches, syncs) -> None:
        kv = self.kv
        hbm = kv.hbm
        bpb = hbm.bytes_per_block
        nseq = len(step.prefill) + len(step.decode)
        n_prefill = sum(n for _, n in step.prefill)
        tokens = n_prefill + len(step.decode) + (sum(step.drafts) if step.drafts else 0)
        # fragmentation: token slots allocated to running requests but empty at the end of the step;
        # locked: blocks of the step's batch plus blocks in flight on a link
        held = computed = 0
        for r in self.running:
            held += len(r.blocks)
            computed += r.num_computed
        filled = computed + tokens
        batch = sum(len(r.blocks) for r, _ in step.prefill) + sum(len(r.blocks) for r in step.decode)
        active = hbm.num_active
        locked = min(batch + self.inflight_blocks, active)
        dram, nvme = kv.dram, kv.nvme
        self.steps.append(start, duration, end, (
            nseq, len(step.prefill), n_prefill, len(step.decode), tokens,
            active * bpb, len(hbm._lru) * bpb, locked * bpb,
            dram.num_active * dram.bytes_per_block, nvme.num_active * nvme.bytes_per_block,
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
            log = self.log
            log.seg_off[req.idx] = self.tokens.add(req)
            log.seg_cnt[req.idx] = len(req.seg_start)

    # ================================================================== decode runs
    def _decode_run(self, step: _Step):
        """Advance K decode-only steps with one event. K stops at the first completion, at the first
        step whose block allocation could fail, or early when :meth:`notify` interrupts the run."""
        env = self.env
        kv = self.kv
        hbm = kv.hbm
        bs = kv.block_size
        reqs = step.decode
        B = len(reqs)
        ncs = [r.num_computed for r in reqs]
        nc = np.array(ncs, dtype=np.int64)                                           # KV before step 0
        rem = np.array([r.output_tokens - r.num_generated for r in reqs], dtype=np.int64)
        now = self._clock()
        t_next = self.next_arrival_s()
        K, allocs, who, when, held0 = plan_run(nc, rem, bs, hbm.num_available, self._run_cap(now, t_next))
        nc_sum = sum(ncs)
        if self.dense:
            ctx_sums = np.arange(nc_sum + B, nc_sum + B + B * K, B, dtype=np.float64)
        else:
            s_idx = np.arange(K, dtype=np.int64)
            ctx_sums = self.sparsity.attended_tokens((nc[None, :] + 1) + s_idx[:, None]).sum(axis=1).astype(np.float64)
        durations, launches, syncs = self.cost.decode_run(B, ctx_sums)
        self._last_step_s = float(durations[-1])
        # end with the step in progress when the next request arrives: exactly where an interrupt at
        # that arrival would end the run, without the interrupt
        ends, keep = run_ends(now, durations, t_next)
        if keep < K:
            K = keep
            ends, durations, allocs = ends[:K], durations[:K], allocs[:K]
            n_alloc = int(when.searchsorted(K))
            who, when = who[:n_alloc], when[:n_alloc]
        dram, nvme = kv.dram, kv.nvme
        run = _Run(reqs, nc_sum, allocs, K, now, ends, durations, launches, syncs, self.steps.n, who, when,
                   len(hbm._free), hbm.num_cached, hbm.num_active, held0,
                   dram.num_active * dram.bytes_per_block, nvme.num_active * nvme.bytes_per_block,
                   self.inflight_blocks)
        self.num_runs += 1
        self._run = run
        self._in_run, self._stop_run = True, False
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
            self._in_run = False
        self._t_end = float(ends[done - 1])
        self._run_allocate(run, done - 1)
        self._run_progress(run, done)
        self._run = None
        self.run_steps += done

    def _run_cap(self, now: float, t_next: float) -> int:
        """How many steps to plan. A run ending early is exact (the replica plans again and finds the
        same steady batch), so planning far past the next arrival, which will cut the run anyway,
        only wastes work: plan a quarter more than the steps expected until then."""
        if t_next == math.inf or self._last_step_s <= 0:
            return MAX_RUN_STEPS
        return int(min(MAX_RUN_STEPS, (t_next - now) / self._last_step_s * 1.25 + 2))

    def sync(self, now: float) -> None:
        """Bring a decode run's effects up to ``now``: allocations of steps started by now and the
        progress of steps finished by now. Called before anything else touches this replica's KV or
        reads its state mid-run (transfer completions, state-dependent routers)."""
        run = self._run
        if run is None:
            return
        started = int(np.searchsorted(run.ends, now, side="right"))    # step `started` began at ends[started-1]
        self._run_allocate(run, min(started, run.K - 1))
        self._run_progress(run, min(int(np.searchsorted(run.ends, now, side="right")), run.K))

    def _run_allocate(self, run: "_Run", through_step: int) -> None:
        """Allocate the run's blocks for steps up to ``through_step``, in step order and batch order."""
        i = run.next_alloc
        when = run.alloc_when
        if i >= when.shape[0] or when[i] > through_step:
            return
        j = int(when.searchsorted(through_step, side="right"))
        hbm = self.kv.hbm
        who, reqs = run.alloc_who, run.reqs
        if j - i <= len(hbm._free):
            # the free stack covers them all: the same blocks, in the same order, as one at a time
            got = hbm.take_free(j - i, run.ends[when[i:j] - 1])
            for k, w in enumerate(who[i:j].tolist()):
                reqs[w].blocks.append(got[k])
        else:
            victims = self.kv._choose_hbm_victims
            ends = run.ends
            for k in range(i, j):
                b = hbm.allocate_one(float(ends[when[k] - 1]), victims)
                if b < 0:
                    raise RuntimeError("decode run allocated more blocks than were available")
                reqs[who[k]].blocks.append(b)
        run.next_alloc = j

    def _run_progress(self, run: "_Run", upto: int) -> None:
        """Commit steps [run.committed, upto): step-log rows, token counts, completions."""
        c = run.committed
        if upto <= c:
            return
        kv = self.kv
        B = len(run.reqs)
        steps = self.steps
        row0 = steps.reserve_block(upto - c)
        busy = fill_run_rows(steps.f, steps.i, steps.ends.a, row0, steps.n, c, upto, run.start, run.ends,
                             run.durations, run.allocs, run.free0, run.cached0, run.active0, run.held0,
                             run.inflight, run.nc_sum, B, kv.block_size, kv.hbm.bytes_per_block,
                             run.dram_used, run.nvme_used, run.launches, run.syncs)
        steps.commit_block(upto - c, busy)
        m = upto - c
        self.num_launches += run.launches * m
        self.num_syncs += run.syncs * m
        g_first, g_last = run.g0 + c, run.g0 + upto - 1
        first_end = float(run.ends[c])
        finished = []
        prev = g_first - 1
        for r in run.reqs:
            r.num_computed += m
            g = r.num_generated = r.num_generated + m
            se = r.seg_end              # Request.record_tokens, inlined: this loop is the hot path
            if se and se[-1] == prev:
                se[-1] = g_last
            else:
                r.seg_start.append(g_first)
                se.append(g_last)
            if r.first_token_s < 0:
                r.first_token_s = first_end
            if g >= r.output_tokens:
                finished.append(r)
        run.committed = upto
        if finished:
            self._finish(finished, float(run.ends[upto - 1]))


@dataclass(slots=True)
class _Run:
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
