"""One serving instance: the per-iteration SimPy process that asks the scheduler for a plan, applies
it (preemptions, swaps, admissions, block allocation through the KV owner), has the step builder
price it, advances time and records what the step did.

Time advances by one SimPy event per engine step — or, when the scheduler says the batch is in a
steady decode run, by one event for the whole run (``sim.replica.decode_run``), exactly as if stepped
one by one. An arrival or a finished transfer interrupts the run; the step in progress completes and
the replica plans afresh.

Invariants: ``running`` holds RUNNING requests in admission order; ``waiting`` holds WAITING
requests (recompute-preempted first, then by arrival); ``swapped`` holds SWAPPED requests in
swap-out order; a request is in at most one of them, or in flight on a link, or done.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import simpy

from policies.base import RequestState, StepOutcome, StepPlan
from sim.clock import exact_delay
from sim.memory.tiers import TieredKV
from sim.memory.transfers import Transfers
from sim.metrics import REASON_CODE, RequestLog, StepLog, TokenLog
from sim.replica.decode_run import DecodeRuns
from sim.replica.preemption import Preemption
from sim.replica.step import Step, StepBuilder, log_step
from sim.replica.views import RouterView, SchedulerViewImpl
from sim.request import STEP_ID_BITS, Request

WAITING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN, FINISHED, REJECTED = (
    RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPING_OUT, RequestState.SWAPPED,
    RequestState.SWAPPING_IN, RequestState.FINISHED, RequestState.REJECTED)


class Replica:
    def __init__(self, *, env: simpy.Environment, replica_id: int, kv: TieredKV, builder: StepBuilder,
                 transfers: Transfers, policies: dict, preemption_mode: str, max_model_len: int,
                 requests: RequestLog, step_log: StepLog, token_log: TokenLog, rng: np.random.Generator,
                 bulk_decode: bool, guarded: bool = False) -> None:
        self.env = env
        self.replica_id = replica_id
        self.kv = kv
        self.builder = builder
        self.transfers = transfers
        self.policies = policies
        self.scheduler = policies["scheduling"]
        self.speculation = policies["speculation"]
        self.max_model_len = max_model_len
        self.max_prompt_tokens = self.scheduler.max_prompt_tokens(max_model_len)
        self.log = requests
        self.steps = step_log
        self.tokens = token_log
        self.rng = rng
        self.step_id_base = replica_id << STEP_ID_BITS
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_swapping_in = 0
        self.num_swapping_out = 0
        self.view = SchedulerViewImpl(self, guarded)
        self.state_view = RouterView(self)
        self.preemption_mode = preemption_mode
        self.preemption = Preemption(self)
        self.runs = DecodeRuns(self, bulk_decode and self.speculation.emits_one_token
                               and policies["sparsity"].steady())
        self.observers = [p for p in policies.values() if p.observes()]
        self._evicted_seen = 0
        self._wake: simpy.Event | None = None
        self.t_end = -1.0          # exact end of the last step (see _clock)
        self.next_arrival_s = lambda: math.inf   # the cluster sets this: when the next request arrives
        self.check_invariants = False   # tests turn this on: O(blocks) checks after every step
        self.process = env.process(self._loop())
        # counters
        self.num_launches = 0
        self.num_syncs = 0
        self.fetch_bytes = 0
        self.fetch_wait_s = 0.0

    # ================================================================== arrivals and wake-ups
    def submit(self, req: Request) -> None:
        """A request routed here (called by the cluster's arrival process at its arrival time)."""
        req.replica = self.replica_id
        reason = self._reject_reason(req)
        if reason:
            self._reject(req, reason, self.env.now)
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

    def _reject(self, req: Request, reason: str, now: float) -> None:
        req.to(REJECTED)
        self.log.reject(req, REASON_CODE[reason], now)

    def notify(self) -> None:
        """Something changed (arrival, transfer done): wake an idle replica, or cut a decode run short
        (unless the run already ends with the step in progress)."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        else:
            self.runs.interrupt()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.num_swapping_in
                    or self.num_swapping_out)

    def sync(self, now: float) -> None:
        """Bring a decode run in progress up to ``now`` (see ``DecodeRuns.sync``)."""
        self.runs.sync(now)

    # ================================================================== main loop
    def _loop(self):
        env = self.env
        while True:
            if not (self.waiting or self.running or self.swapped):
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            now = self.clock()
            plan = self.view.unwrap_plan(self.scheduler.schedule(self.view, now))
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
            how = self.runs.plan_for(step)
            if how is not None:
                yield from self.runs.run(step, *how)
            else:
                yield from self._single_step(step)
            if self.check_invariants:
                self.check()

    def clock(self) -> float:
        """The replica's time: the exact end of its last step when it has just finished one (SimPy's
        clock can sit one ulp off it: for some pairs no delay d makes now + d round to the planned
        end), otherwise SimPy's. Step arithmetic thus never depends on how SimPy rounded."""
        now = self.env.now
        t = self.t_end
        return t if abs(now - t) <= 4.0 * math.ulp(t) else now

    def _unblock(self, now: float) -> None:
        """The scheduler planned nothing although work is queued and nothing is in flight: if the
        head of the queue can never run, reject it rather than wait forever."""
        if self.running:
            raise RuntimeError(f"replica {self.replica_id}: scheduling policy {self.scheduler.name!r} planned "
                               f"no work for {len(self.running)} running requests")
        if self.waiting:
            self._reject(self.waiting.popleft(), "could not be scheduled", now)
        elif self.swapped:
            req = self.swapped.pop(0)
            self.kv.drop_dram_copy(req, now)
            self._reject(req, "could not be scheduled", now)

    # ================================================================== applying a plan
    def _apply(self, plan: StepPlan, now: float) -> Step:
        kv = self.kv
        preempted = []
        for req in plan.preempt:
            if req.state != RUNNING:
                raise RuntimeError(f"scheduling policy {self.scheduler.name!r} preempted request "
                                   f"{req.req_id}, which is not running")
            self.preemption.preempt(req, now)
            preempted.append(req)
        for req in plan.swap_in:
            self.preemption.start_swap_in(req, now)
        prefill = []
        admitted = hit = 0
        for req, n in plan.prefill:
            if req.state == WAITING:
                if not kv.can_admit(req, n):
                    break       # blocks ran short (e.g. prefix hits were evicted since planning)
                hit += kv.admit(req, now)
                n = min(n, req.tokens_to_compute)
                kv.grow(req, n, now)
                req.to(RUNNING)
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
        drafts = draft_plan = None
        if decode and not self.speculation.emits_one_token:
            draft_plan = self.speculation.propose(self.view.frozen(decode), now)
            drafts = self._reserve_drafts(decode, draft_plan, now)
        return Step(prefill=prefill, decode=decode, drafts=drafts, draft_plan=draft_plan, preempted=preempted,
                    prefix_hit_tokens=hit)

    def _dequeue_admitted(self, admitted: int) -> None:
        w = self.waiting
        head_ok = all(w[i].state == RUNNING for i in range(min(admitted, len(w))))
        if head_ok:
            for _ in range(admitted):
                w.popleft()
        else:
            self.waiting = deque(r for r in w if r.state == WAITING)

    def _reserve_drafts(self, decode: list, plan, now: float) -> list:
        """KV slots for each decode's draft tokens (its lookahead), before verification; a request
        that cannot get them drafts nothing this step."""
        k = list(plan.draft_tokens) + [0] * (len(decode) - len(plan.draft_tokens))
        out = []
        for req, d in zip(decode, k):
            d = max(0, min(int(d), req.output_tokens - req.num_generated - 1))
            if d and not self.kv.grow(req, 1 + d, now):
                d = 0
            out.append(d)
        return out

    # ================================================================== one step
    def _single_step(self, step: Step):
        env = self.env
        start = self.clock()
        priced = self.builder.price(step)
        end = start + priced.duration_s
        if priced.fetch_bytes:
            # KV the step reads from host memory: the step ends when both compute and the copy are done
            got = {}
            copy = self.transfers.start("pcie_h2d", priced.fetch_bytes, lambda t: got.setdefault("t", t),
                                        what="sparse_fetch")
            self._log_step(start, priced.duration_s, end, step, priced.launches, priced.syncs,
                           priced.padded_tokens)
            yield env.all_of([env.timeout(exact_delay(env.now, end)), copy])
            self.fetch_bytes += priced.fetch_bytes
            if got["t"] > end:
                self.fetch_wait_s += got["t"] - end
                end = got["t"]
                self.steps.extend_last(end)
        else:
            self._log_step(start, priced.duration_s, end, step, priced.launches, priced.syncs,
                           priced.padded_tokens)
            yield env.timeout(exact_delay(env.now, end))
        self.t_end = end
        accepted, finished = self._commit(step, self.step_id_base + self.steps.n - 1, end)
        if self.observers:
            self.observe(StepOutcome(self.replica_id, start, end, 1, finished, accepted, step.prefix_hit_tokens,
                                     0, step.preempted))

    def observe(self, outcome: StepOutcome) -> None:
        """Hand ``outcome`` to every observing policy, with the HBM evictions since the last one."""
        evicted = self.kv.hbm.num_evicted
        outcome.evicted_blocks = evicted - self._evicted_seen
        self._evicted_seen = evicted
        for p in self.observers:
            p.observe(outcome)

    def _log_step(self, start, duration, end, step: Step, launches, syncs, padded_tokens=0) -> None:
        log_step(self.steps, self.kv, self.running, step, start, duration, end, launches, syncs, padded_tokens)
        self.num_launches += launches
        self.num_syncs += syncs

    def _commit(self, step: Step, step_id: int, end: float) -> tuple[list, list]:
        kv = self.kv
        finished = []
        accepted = []
        for req, n in step.prefill:
            req.num_computed += n
            kv.register_computed(req)
            if req.num_computed == req.num_tokens:
                req.num_generated += 1
                req.record_tokens(step_id, step_id)
                if req.first_token_s < 0:
                    req.first_token_s = end
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        if step.drafts is None:
            for req in step.decode:
                req.num_computed += 1
                req.num_generated += 1
                req.record_tokens(step_id, step_id)
                if req.first_token_s < 0:     # the prompt's last token ran as a one-token step
                    req.first_token_s = end
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        else:
            for req, d in zip(step.decode, step.drafts):
                a = max(0, min(int(self.speculation.accepted(self.rng, self.view.show(req), d)), d)) if d else 0
                req.num_computed += 1 + a
                req.num_generated += 1 + a
                req.record_tokens(step_id, step_id, extra=a)
                if req.first_token_s < 0:
                    req.first_token_s = end
                kv.truncate(req, end)           # roll back the KV slots of rejected drafts
                if d:
                    accepted.append((req, d, a))
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        if finished:
            self.finish(finished, end)
        return accepted, finished

    def finish(self, finished: list, end: float) -> None:
        kv = self.kv
        done = set(map(id, finished))
        self.running = [r for r in self.running if id(r) not in done]
        log = self.log
        for req in finished:
            req.finish_s = end
            req.to(FINISHED)
            kv.release(req, end)
            log.finish(req)
            log.seg_off[req.idx] = self.tokens.add(req)
            log.seg_cnt[req.idx] = len(req.seg_start)

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
        assert self.kv.hbm.num_active <= held + self.kv.hbm.num_locked
