"""One serving instance: the per-iteration SimPy process that asks the scheduler for a plan, applies
it (preemptions, swaps, admissions, block allocation through the KV owner), has the step builder
price it, advances time and records what the step did.

Time advances by one SimPy event per engine step — or, when the scheduler says the batch is in a
steady decode run, by one event for the whole run (``sim.replica.decode_run``), exactly as if stepped
one by one. An arrival or a finished transfer interrupts the run; the step in progress completes and
the replica plans afresh.

Copies between KV tiers (loads of lower-tier prefix hits, prefetch, write-back) are decided by the KV
owner and carried out by ``sim.replica.prefetch``; an admitted request whose prefix is still loading
waits there (LOADING) and joins ``running`` when it has landed; a step that reuses blocks whose old
contents are being written back ends only after that copy.

A replica has a role (``sim.cluster.ROLES``): ``mixed`` serves whole requests; ``prefill`` hands
every request whose first token it sampled to the cluster's hand-off queue (``sim.handoff``), where it
waits, holding its blocks here (``handing_off``), until its KV has landed on a ``decode`` replica; a
decode replica takes such requests straight into ``running`` (its scheduler never admits a prompt,
but recomputes one it preempted) and counts those on their way in (``num_incoming``).

Invariants: ``running`` holds RUNNING requests in admission order; ``waiting`` holds WAITING
requests (recompute-preempted first, then by arrival); ``swapped`` holds SWAPPED requests in
swap-out order; ``moves.loading`` holds LOADING requests; ``handing_off`` holds HANDING_OFF requests;
a request is in at most one of them, or in flight on a link, or done. Every block of a RUNNING
request is ready (no step reads KV that has not landed).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import simpy

from policies.base import RequestState, StepOutcome, StepPlan
from sim.clock import exact_delay, exact_time, on_time, woken_or_at
from sim.errors import PolicyAnswerError
from sim.memory.tiers import TieredKV
from sim.memory.transfers import Transfers
from sim.metrics import REASON_CODE, RequestLog, StepLog, TokenLog
from sim.replica.decode_run import DecodeRuns
from sim.replica.lanes import DecoupledLanes
from sim.replica.preemption import Preemption
from sim.replica.prefetch import KVMoves
from sim.replica.step import Step, StepBuilder, log_step
from sim.replica.views import RouterView, SchedulerViewImpl, SpeculationViewImpl
from sim.request import STEP_ID_BITS, Request

WAITING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN, FINISHED, REJECTED, LOADING, HANDING_OFF = (
    RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPING_OUT, RequestState.SWAPPED,
    RequestState.SWAPPING_IN, RequestState.FINISHED, RequestState.REJECTED, RequestState.LOADING,
    RequestState.HANDING_OFF)


class Replica:
    def __init__(self, *, env: simpy.Environment, replica_id: int, kv: TieredKV, builder: StepBuilder,
                 transfers: Transfers, policies: dict, preemption_mode: str, max_model_len: int,
                 requests: RequestLog, step_log: StepLog, token_log: TokenLog, rng: np.random.Generator,
                 bulk_decode: bool, guarded: bool = False, lanes: dict | None = None,
                 role: str = "mixed") -> None:
        self.env = env
        self.replica_id = replica_id
        self.kv = kv
        self.builder = builder
        self.transfers = transfers
        transfers.clock = self.clock       # copies started at a step's end are timed from that exact end
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
        self.role = role
        self.handoffs = None            # the cluster's hand-off queue (sim.handoff), in a disaggregated cluster
        self.handing_off: dict[int, Request] = {}   # prefilled here, waiting or in flight to a decode replica
        self.num_incoming = 0           # hand-offs on their way here (blocks reserved)
        self.num_prefill_tokens = 0     # prompt and recompute tokens this replica computed
        self.guarded = guarded
        self.view = SchedulerViewImpl(self, guarded)
        self.state_view = RouterView(self)
        self.spec_view = SpeculationViewImpl(self)
        self.drafting = builder.drafting
        self.spec = SpecStats()
        self.preemption_mode = preemption_mode
        self.preemption = Preemption(self)
        self.moves = KVMoves(self)
        kv.attach(residency=policies["residency"], view=self.preemption.view, links=transfers.links,
                  prefill_s=builder.prefill_s)
        # a prefill replica hands off every request at its first token: no steady decode batch
        self.runs = DecodeRuns(self, bulk_decode and self.speculation.emits_one_token
                               and policies["sparsity"].steady() and lanes is None and role != "prefill")
        self.observers = [p for p in policies.values() if p.observes()]
        self.watches_arrivals = any(p.watches_arrivals for p in policies.values())
        self._evicted_seen = 0
        self._wake: simpy.Event | None = None
        self.t_end = -1.0          # exact end of the last step (see _clock)
        self.next_arrival_s = lambda: math.inf   # the cluster sets this: when the next request arrives
        self.feed = None            # the cluster's ArrivalFeed when this replica pulls its own arrivals
        self.check_invariants = False   # tests turn this on: O(blocks) checks after every step
        # decoupled prefill/decode lanes (sim.replica.lanes): two step processes instead of the one loop
        self.lanes = None if lanes is None else DecoupledLanes(self, **lanes)
        self.process = env.process(self._loop()) if lanes is None else None
        # counters
        self.num_launches = 0
        self.num_padded_tokens = 0     # query rows captured graphs ran beyond the steps' own
        self.num_syncs = 0
        self.fetch_bytes = 0
        self.fetch_wait_s = 0.0

    # ================================================================== arrivals and wake-ups
    def submit(self, req: Request, notify: bool = True) -> None:
        """A request routed here: by the cluster's arrival process at its arrival time, or pulled by
        this replica from its feed (``notify=False``: the replica is the one asking)."""
        req.replica = self.replica_id
        reason = self._reject_reason(req)
        if reason:
            self._reject(req, reason, req.arrival_s)
            return
        self.waiting.append(req)
        if notify:
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
        self.kv.drop_prefetch(req, now)
        req.to(REJECTED)
        self.log.reject(req, REASON_CODE[reason], now)

    def notify(self) -> None:
        """Something changed (arrival, transfer done): wake an idle replica, or cut a decode run short
        (unless the run already ends with the step in progress)."""
        if self.lanes is not None:
            self.lanes.notify()
        elif self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        else:
            self.runs.interrupt()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.num_swapping_in
                    or self.num_swapping_out or self.moves.loading or self.moves.in_flight
                    or self.handing_off or self.num_incoming)

    def sync(self, now: float) -> None:
        """Bring a decode run in progress up to ``now`` (see ``DecodeRuns.sync``)."""
        self.runs.sync(now)

    # ================================================================== main loop
    def _loop(self):
        feed = self.feed
        while True:
            if feed is not None:
                feed.pull(self.clock())
            if not (self.waiting or self.running or self.swapped):
                yield from self._wait()
                continue
            now = self.clock()
            self.kv.at(now)
            self.moves.prefetch(now)
            plan = self.view.unwrap_plan(self.scheduler.schedule(self.view, now))
            step = self.apply(plan, now)
            if self.role == "decode" and self.handoffs.queue:
                self.handoffs.dispatch(now)     # blocks its preemptions freed and the step left
            if not (step.prefill or step.decode):
                if (self.num_swapping_in or self.num_swapping_out or self.moves.loading or self.moves.in_flight
                        or self.handing_off or self.num_incoming):
                    yield from self._wait()
                    continue
                if plan.is_empty() or not (plan.prefill or plan.decode):
                    self.unblock(now)
                continue
            how = self.runs.plan_for(step)
            if how is not None:
                yield from self.runs.run(step, *how)
            else:
                yield from self._single_step(step)
            if self.role == "decode" and self.handoffs.queue:
                self.handoffs.dispatch(self.clock())     # blocks this step freed may take a hand-off
            if self.check_invariants:
                self.check()

    def _wait(self):
        """Sleep until notified (a transfer landed, a request was submitted) or, with a feed, until the
        next request routed here arrives."""
        env = self.env
        t = self.feed.next_s() if self.feed is not None else math.inf
        if t < math.inf and not (self.num_swapping_in or self.num_swapping_out or self.moves.loading
                                 or self.moves.in_flight or self.handing_off):
            yield env.timeout(exact_delay(env.now, t))      # nothing in flight can wake it sooner
            self.t_end = t      # the arrival's exact time: SimPy's clock can land one ulp off it
            return
        self._wake = env.event()
        yield from woken_or_at(env, self._wake, t)
        self._wake = None
        if t < math.inf and on_time(env.now, t):
            self.t_end = t

    def clock(self) -> float:
        """The replica's time: the exact end of its last step when it has just finished one, or the exact
        arrival time it slept until (SimPy's clock can sit one ulp off either: for some pairs no delay d
        makes now + d round to the planned time), otherwise SimPy's. Step arithmetic thus never depends
        on how SimPy rounded."""
        return exact_time(self.env.now, self.t_end)

    def unblock(self, now: float) -> None:
        """The scheduler planned nothing although work is queued and nothing is in flight: if the
        head of the queue can never run, reject it rather than wait forever."""
        if self.running:
            raise PolicyAnswerError(f"replica {self.replica_id}: scheduling policy {self.scheduler.name!r} planned "
                               f"no work for {len(self.running)} running requests")
        if self.waiting:
            self._reject(self.waiting.popleft(), "could not be scheduled", now)
        elif self.swapped:
            req = self.swapped.pop(0)
            self.kv.drop_dram_copy(req, now)
            self._reject(req, "could not be scheduled", now)

    # ================================================================== applying a plan
    def apply(self, plan: StepPlan, now: float) -> Step:
        kv = self.kv
        preempted = []
        for req in plan.preempt:
            if req.state != RUNNING:
                raise PolicyAnswerError(f"scheduling policy {self.scheduler.name!r} preempted request "
                                   f"{req.req_id}, which is not running")
            self.preemption.preempt(req, now)
            preempted.append(req)
        for req in plan.swap_in:
            self.preemption.start_swap_in(req, now)
        prefill = []
        admitted = hit = loaded = 0
        for req, n in plan.prefill:
            if req.state == WAITING:
                if not kv.can_admit(req, n):
                    break       # blocks ran short (e.g. prefix hits were evicted since planning)
                lower0 = req.lower_hit_tokens
                hit += kv.admit(req, now)
                loaded += req.lower_hit_tokens - lower0
                self.drafting.admitted(req)
                if req.first_scheduled_s < 0:
                    req.first_scheduled_s = now
                if kv.waiting_on_load(req):
                    self.moves.wait(req, now)       # its prefill starts when its prefix has landed
                    admitted += 1
                    continue
                n = min(n, req.tokens_to_compute)
                kv.grow(req, n, now)
                req.to(RUNNING)
                self.running.append(req)
                admitted += 1
                prefill.append((req, n))
            elif req.state == RUNNING:
                n = min(n, req.tokens_to_compute)
                if n > 0 and kv.grow(req, n, now):
                    prefill.append((req, n))
            else:
                raise PolicyAnswerError(f"scheduling policy {self.scheduler.name!r} scheduled request "
                                   f"{req.req_id} in state {RequestState(req.state).name}")
        if admitted:
            self._dequeue_admitted(admitted)
        decode = []
        bs = kv.block_size
        for req in plan.decode:
            if req.state != RUNNING or req.prompt_tokens + req.num_generated - req.num_computed != 1:
                raise PolicyAnswerError(f"scheduling policy {self.scheduler.name!r} put request {req.req_id} "
                                   f"in the decode list but it is not decoding")
            if req.num_computed < len(req.blocks) * bs or kv.grow(req, 1, now):
                decode.append(req)
        if decode and not self.speculation.emits_one_token:
            spec = self.speculation
            draft_plan = spec.propose(self.view.frozen(decode), now, self.spec_view.of(decode))
            width = int(draft_plan.width)
            if width < 1:
                raise PolicyAnswerError(f"speculation policy {spec.name!r} proposed a tree of width {width}")
            drafts = self._reserve_drafts(decode, draft_plan.draft_tokens, width, now)
            accepted = [max(0, min(int(spec.accepted(self.rng, self.view.show(r), d)), d)) if d else 0
                        for r, d in zip(decode, drafts)]
        else:
            drafts, width, accepted = None, 1, None
        waits = kv.take_waits("hbm")
        self.moves.start_pending()
        if self.check_invariants:
            for req in decode + [r for r, _ in prefill]:
                assert not kv.waiting_on_load(req), f"request {req.req_id} runs before its prefix landed"
        return Step(prefill=prefill, decode=decode, drafts=drafts, preempted=preempted, prefix_hit_tokens=hit,
                    loaded_tokens=loaded, waits=waits or None, width=width, accepted=accepted)

    def _dequeue_admitted(self, admitted: int) -> None:
        w = self.waiting
        head_ok = all(w[i].state != WAITING for i in range(min(admitted, len(w))))
        if head_ok:
            for _ in range(admitted):
                w.popleft()
        else:
            self.waiting = deque(r for r in w if r.state == WAITING)

    def _reserve_drafts(self, decode: list, depths, width: int, now: float) -> list:
        """KV slots for each decode's lookahead (``width`` x depth draft tokens besides its own) through
        the KV owner, before verification. A draft never goes past the request's last output token;
        a request whose lookahead does not fit drafts as deep as the blocks it can get allow, or not
        at all."""
        if len(depths) > len(decode):
            raise PolicyAnswerError(f"speculation policy {self.speculation.name!r} proposed drafts for "
                               f"{len(depths)} of {len(decode)} decodes")
        k = list(depths) + [0] * (len(decode) - len(depths))
        kv = self.kv
        bs = kv.block_size
        out = []
        for req, d in zip(decode, k):
            d = max(0, min(int(d), req.output_tokens - req.num_generated - 1))
            if d and not kv.grow(req, 1 + width * d, now):
                room = (len(req.blocks) + kv.hbm.num_available) * bs - req.num_computed - 1
                d = max(0, min(d, room // width))
                if d and not kv.grow(req, 1 + width * d, now):
                    d = 0
                self.spec.shortened += 1
            out.append(d)
        return out

    # ================================================================== one step
    def _single_step(self, step: Step):
        env = self.env
        start = self.clock()
        priced = self.builder.price(step)
        end = start + priced.duration_s
        waits = [m for m in step.waits if m.landed_s < 0] if step.waits else None
        if priced.fetch_bytes or waits:
            # KV the step reads from host memory, and write-backs of the blocks it overwrites: the step
            # ends when compute and the copies are done
            got = {}
            events = [env.timeout(exact_delay(env.now, end))]
            if priced.fetch_bytes:
                events.append(self.transfers.start("pcie_h2d", priced.fetch_bytes, lambda t: got.setdefault("t", t),
                                                   what="sparse_fetch"))
            if waits:
                events += [m.event for m in waits]
            self._log_step(start, priced, end, step)
            yield env.all_of(events)
            if priced.fetch_bytes:
                self.fetch_bytes += priced.fetch_bytes
                if got["t"] > end:
                    self.fetch_wait_s += got["t"] - end
                    end = got["t"]
            if waits:
                landed = max(m.landed_s for m in waits)
                if landed > end:
                    self.moves.writeback_wait_s += landed - end
                    end = landed
            if end > start + priced.duration_s:
                self.steps.extend_last(end)
        else:
            self._log_step(start, priced, end, step)
            yield env.timeout(exact_delay(env.now, end))
        self.t_end = end
        accepted, finished = self.commit(step, self.step_id_base + self.steps.n - 1, end)
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

    def _log_step(self, start, priced, end, step: Step) -> None:
        launches, syncs = priced.launches, priced.syncs
        log_step(self.steps, self.kv, self.running, step, start, priced.duration_s, end, launches, syncs,
                 len(self.moves.loading), priced.draft_s, priced.verify_s, priced.padded_tokens)
        self.num_launches += launches
        self.num_padded_tokens += priced.padded_tokens
        self.num_syncs += syncs
        if step.drafts is not None or priced.draft_s:
            self.spec.add_step(step, priced, self.kv.hbm.bytes_per_block // self.kv.block_size)

    def commit(self, step: Step, step_id: int, end: float) -> tuple[list, list]:
        kv = self.kv
        finished = []
        accepted = []
        drafting = self.drafting
        for req, n in step.prefill:
            req.num_computed += n
            self.num_prefill_tokens += n
            drafting.prefilled(req)
            kv.register_computed(req, end)
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
            spec = self.spec
            for req, d, a in zip(step.decode, step.drafts, step.accepted):
                before = req.num_computed
                req.num_computed += 1 + a
                req.num_generated += 1 + a
                req.record_tokens(step_id, step_id, extra=a)
                if req.first_token_s < 0:
                    req.first_token_s = end
                if d:
                    held = len(req.blocks)
                    kv.truncate(req, end)           # roll back the KV slots of rejected drafts
                    spec.rolled_back_blocks += held - len(req.blocks)
                    drafting.commit(req, before, d)
                    accepted.append((req, d, a))
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        if finished:
            self.finish(finished, end)
        if self.role == "prefill":
            self._hand_off(step, end)
        return accepted, finished

    def _hand_off(self, step: Step, end: float) -> None:
        """Requests that sampled their first token in this step and are not finished leave for a
        decode replica (a prefill replica never decodes): they wait in ``handing_off``, holding their
        blocks, until their KV has landed there."""
        # (a prompt whose last token is left for a one-token step has not sampled anything yet)
        leaving = [r for r in [q for q, _ in step.prefill] + step.decode
                   if r.state == RUNNING and r.num_generated > 0]
        if not leaving:
            return
        gone = set(map(id, leaving))
        self.running = [r for r in self.running if id(r) not in gone]
        for req in leaving:
            self.handing_off[req.idx] = req
            self.handoffs.ready(self, req, end)

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
        self.moves.start_pending()          # copies of the released prompt blocks (write-through)

    def check(self, ahead: dict | None = None) -> None:
        """Assert the replica's invariants (see the module docstring and ``TieredKV``); ``ahead``: tokens
        whose blocks a decoupled lane's step in flight holds before it has computed them, by request."""
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
            n = r.num_computed + (ahead.get(id(r), 0) if ahead else 0)
            assert len(r.blocks) == -(-n // bs), \
                f"request {r.req_id}: {len(r.blocks)} blocks for {r.num_computed} computed tokens"
            assert 0 <= r.num_computed <= r.num_tokens
            assert 0 <= r.num_draft_computed <= r.num_computed or not self.drafting.keeps_kv, \
                f"request {r.req_id}: drafter KV for {r.num_draft_computed} of {r.num_computed} tokens"
        for r in self.waiting:
            assert not r.blocks and r.num_computed == 0
        ready = self.kv.hbm.ready
        rc = self.kv.hbm.refcount
        for r in self.running:
            assert all(ready[b] for b in r.blocks), f"request {r.req_id} is running with KV still loading"
        for r in self.moves.loading:
            assert r.state == LOADING and id(r) not in seen, f"request {r.req_id} loading twice or in a queue"
            seen.add(id(r))
            assert len(r.blocks) == -(-r.num_computed // bs)
        for r in list(self.running) + self.moves.loading:
            assert all(rc[b] > 0 for b in r.blocks), f"request {r.req_id} holds a block nobody references"
        for r in self.handing_off.values():
            assert r.state == HANDING_OFF and id(r) not in seen, f"request {r.req_id} handing off twice or queued"
            seen.add(id(r))
            assert len(r.blocks) == -(-r.num_computed // bs) and all(ready[b] and rc[b] > 0 for b in r.blocks)
        assert self.role != "prefill" or all(r.num_generated == 0 for r in self.running)
        assert self.kv.num_importing >= 0 and (self.kv.num_importing > 0) == (self.num_incoming > 0)
        held = (sum(len(r.blocks) for r in self.running) + sum(len(r.blocks) for r in self.moves.loading)
                + self.kv.num_held + sum(len(r.blocks) for r in self.handing_off.values()) + self.kv.num_importing)
        assert self.kv.hbm.num_active <= held + self.kv.hbm.num_locked


class SpecStats:
    """Speculative-decoding counters of one replica, summed over its steps (``summary["speculation"]``)."""

    __slots__ = ("steps", "verify_steps", "drafting_decodes", "decodes", "depth", "proposed", "accepted",
                 "verify_rows", "draft_s", "verify_s", "kv_peak_bytes", "kv_byte_seconds", "rolled_back_blocks",
                 "shortened")

    def __init__(self) -> None:
        self.steps = 0                # steps of a speculating policy (or with drafter work)
        self.verify_steps = 0         # steps that verified drafts
        self.drafting_decodes = 0     # (request, step) pairs that drafted
        self.decodes = 0              # (request, step) pairs decoding under a speculating policy
        self.depth = 0                # draft depths summed: the most that could be accepted
        self.proposed = 0             # draft tokens verified (tree nodes)
        self.accepted = 0
        self.verify_rows = 0          # query tokens of verified decodes (1 + nodes each)
        self.draft_s = 0.0
        self.verify_s = 0.0
        self.kv_peak_bytes = 0        # lookahead slots of one step, largest
        self.kv_byte_seconds = 0.0    # lookahead slot bytes x step duration
        self.rolled_back_blocks = 0   # blocks released by rolling back rejected drafts
        self.shortened = 0            # drafts cut short because their lookahead KV did not fit

    def add_step(self, step: Step, priced, bytes_per_token: int) -> None:
        self.steps += 1
        self.draft_s += priced.draft_s
        if step.drafts is None:
            return
        w = step.width
        self.decodes += len(step.decode)
        depth = sum(step.drafts)
        if not depth:
            return
        self.verify_steps += 1
        self.verify_s += priced.verify_s
        self.drafting_decodes += sum(1 for d in step.drafts if d)
        self.depth += depth
        self.proposed += w * depth
        self.accepted += sum(step.accepted)
        self.verify_rows += sum(1 + w * d for d in step.drafts if d)
        kv = w * depth * bytes_per_token
        self.kv_peak_bytes = max(self.kv_peak_bytes, kv)
        self.kv_byte_seconds += kv * priced.duration_s
