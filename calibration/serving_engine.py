"""The reference server's scheduling state: tiersim's own schedulers, applied to a real engine.

The reference server (``calibration.reference_server``) must make the same scheduling decisions as
tiersim's replica so that an end-to-end difference comes from step pricing, not from policy. So it
does not reimplement a policy: it builds tiersim's scheduler class from the registry, shows it
:class:`ServerView` (the ``policies.base.SchedulerView`` over this module's state) and applies the
returned plan exactly as ``sim.replica.loop.Replica`` does (``_apply``, ``_commit``, ``finish``,
``_reject_reason``, ``_unblock``, and ``sim.replica.preemption.Preemption.preempt`` for recompute),
with tiersim's block accounting (``sim.memory.tiers.TieredKV``, the KV owner: the HBM pool only) and
tiersim's request record and state machine (``sim.request``). It cannot import those modules: they
bring simpy, which the device machine lacks.

Policies are built per replica as ``sim.cluster`` builds them (every kind but routing, each with its
own random generator), and those that observe hear each step's outcome, as in the simulator.

Scope, stated rather than silently narrowed: one replica, recompute preemption, no prefix caching,
no speculation, dense attention, no swapping (the Azure traces carry no prefix hashes; swap needs a
DRAM tier the server does not have). :func:`build_policies` refuses a config that asks for any of
them, and the engine refuses a residency policy that asks to swap.

Nothing here imports torch or simpy: the engine runs on the device machine (which has no simpy) and
in CPU tests, and the ``priced`` executor of ``calibration.reference_server`` drives it on a virtual
clock to check, step for step, that it reproduces tiersim's replay.

Invariants (as ``sim.replica``): ``running`` holds RUNNING requests in admission order; ``waiting``
holds WAITING requests (recompute-preempted first, then by arrival); a request is in at most one of
them or done; a RUNNING request holds ``ceil(num_computed / block_size)`` blocks after each commit.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.base import RequestState, StepOutcome, StepPlan
from sim.memory.tiers import TieredKV
from sim.metrics import REJECT_REASONS
from sim.request import Request

WAITING, RUNNING, FINISHED, REJECTED = (RequestState.WAITING, RequestState.RUNNING, RequestState.FINISHED,
                                        RequestState.REJECTED)


def policy_rng(seed: int, kind: str, replica: int) -> np.random.Generator:
    """``sim.cluster.policy_rng``, which this module cannot import (``sim.cluster`` imports simpy);
    a test checks that the two agree."""
    from policies import registry

    return np.random.default_rng([seed, registry.KINDS.index(kind), replica + 1])


def build_policies(config) -> dict:
    """One replica's policy instances for ``config``, as ``sim.cluster.Cluster`` builds replica 0's."""
    from policies import registry
    from sim.errors import ConfigError

    rc, pc = config.replica, config.policies
    if rc.preemption_mode != "recompute" or rc.prefix_caching or rc.tensor_parallel_size != 1:
        raise ConfigError("the reference server runs one GPU with recompute preemption and no prefix caching "
                          "(replica.preemption_mode, replica.prefix_caching, replica.tensor_parallel_size)")
    if config.cluster.num_replicas != 1:
        raise ConfigError("cluster.num_replicas: the reference server is one replica")
    policies = {}
    for kind in registry.KINDS:
        if kind == "routing":
            continue
        p = getattr(pc, kind)
        policy = registry.build(kind, p.name, p.params)
        policy.attach(policy_rng(config.seed, kind, 0))
        policies[kind] = policy
    if not policies["speculation"].emits_one_token:
        raise ConfigError(f"policies.speculation: the reference server does not draft tokens "
                          f"(got {pc.speculation.name!r})")
    if not policies["sparsity"].is_dense:
        raise ConfigError(f"policies.sparsity: the reference server runs dense attention (got {pc.sparsity.name!r})")
    return policies


class _ResidencyView:
    """What a residency policy sees when the server preempts (``policies.base.ResidencyView``)."""

    __slots__ = ("block_size",)
    preemption_mode = "recompute"
    num_free_dram_blocks = 0

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size


class ServerView:
    """The read-only view a scheduler gets of the server (``policies.base.SchedulerView``).

    The one adapter between tiersim's scheduler interface and the server's state: when that interface
    grows (the engine refactor may add members), this class is the only place to follow it. Answers
    equal ``sim.replica.views.SchedulerViewImpl``'s for a replica without prefix caching or swap.
    """

    __slots__ = ("_e", "_kv", "block_size", "num_blocks", "max_model_len")
    swapped: tuple = ()           # no DRAM tier: nothing is ever swapped out
    num_swapping_in: int = 0

    def __init__(self, engine: Engine) -> None:
        self._e = engine
        self._kv = engine.kv
        self.block_size = engine.kv.block_size
        self.num_blocks = engine.kv.hbm.num_blocks
        self.max_model_len = engine.max_model_len

    @property
    def waiting(self):
        return self._e.waiting

    @property
    def running(self):
        return self._e.running

    @property
    def num_free_blocks(self) -> int:
        return self._kv.hbm.num_available

    def blocks_needed(self, req, new_tokens: int) -> int:
        return self._kv.blocks_needed(req, new_tokens)

    def prefix_hit_tokens(self, req) -> int:
        return 0

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


@dataclass(slots=True)
class StepTiming:
    """What an executor reports for one step. Priced executors give ``duration_s``; measuring ones
    give the host clock (``time.perf_counter``) when the step's first input copy was issued and when
    its sampled ids were back on the host, plus whether a CUDA graph (of ``graph_batch`` rows) ran."""

    duration_s: float = math.nan
    launch_perf: float = math.nan
    done_perf: float = math.nan
    graph: bool = False
    graph_batch: int = 0


@dataclass(slots=True)
class Step:
    """An applied plan: what the step about to run computes.

    ``prefill``: (request, new tokens, tokens cached before the step); ``decode``: (request, tokens
    cached before the step) — the cached counts are taken when the plan is applied, before the step
    changes them, because the executor and the step record both need them.
    """

    prefill: list
    decode: list
    preempted: list        # requests preempted before this step

    @property
    def num_preempted(self) -> int:
        return len(self.preempted)

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n, _ in self.prefill)

    def num_sampled(self) -> int:
        """Rows that sample a token: every decode, and each chunk that completes its sequence."""
        return len(self.decode) + sum(1 for r, n, c in self.prefill if c + n == r.num_tokens)


class Engine:
    """Waiting queue, running batch, KV blocks and request progress of the reference server.

    ``policies``: one replica's policy instances (:func:`build_policies`); ``num_blocks`` ×
    ``block_size`` tokens is the KV capacity the scheduler plans against (``replica.num_hbm_blocks``).
    ``on_release(req)`` is called whenever a request gives its KV back (finish or preemption), so the
    executor can free the physical cache behind it.
    """

    def __init__(self, *, policies: dict, num_blocks: int, block_size: int, max_model_len: int,
                 on_release: Callable[[Request], None] | None = None) -> None:
        self.policies = policies
        self.scheduler = policies["scheduling"]
        self.residency = policies["residency"]
        self.kv = TieredKV(block_size=block_size, hbm_blocks=num_blocks, dram_blocks=0, nvme_blocks=0,
                           hbm_bytes_per_block=1, host_bytes_per_block=1, prefix_caching=False,
                           eviction=policies["eviction"])
        self.max_model_len = int(max_model_len)
        self.max_prompt_tokens = self.scheduler.max_prompt_tokens(self.max_model_len)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.view = ServerView(self)
        self._residency_view = _ResidencyView(block_size)
        self.observers = [p for p in policies.values() if p.observes()]
        self._evicted_seen = 0
        self.on_release = on_release or (lambda req: None)
        self.done: list[Request] = []        # finished or rejected, in the order they ended
        self.reject_reasons: dict[int, int] = {}   # request idx -> index into sim.metrics.REJECT_REASONS

    # ------------------------------------------------------------------ arrivals
    def submit(self, req: Request, now: float) -> None:
        """A request arrives (``sim.replica.loop.Replica.submit``): rejected now, or queued."""
        reason = self.reject_reason(req)
        if reason:
            self._reject(req, reason, now)
            return
        self.waiting.append(req)

    def reject_reason(self, req: Request) -> str:
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
        req.finish_s = now
        self.reject_reasons[req.idx] = REJECT_REASONS.index(reason)
        self.done.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ planning
    def plan(self, now: float) -> StepPlan:
        return self.scheduler.schedule(self.view, now)

    def apply(self, plan: StepPlan, now: float) -> Step:
        """Preemptions, admissions and block growth of ``plan`` (``Replica._apply``, recompute only)."""
        kv = self.kv
        name = self.scheduler.name
        if plan.swap_in:
            raise RuntimeError(f"scheduling policy {name!r} swapped in a request, but the reference server "
                               f"has no DRAM tier")
        preempted = []
        for req in plan.preempt:
            if req.state != RUNNING:
                raise RuntimeError(f"scheduling policy {name!r} preempted request {req.req_id}, which is not "
                                   f"running")
            self._preempt(req, now)
            preempted.append(req)
        prefill = []
        admitted = 0
        for req, n in plan.prefill:
            if req.state == WAITING:
                if not kv.can_admit(req, n):
                    break
                kv.admit(req, now)
                n = min(n, req.tokens_to_compute)
                kv.grow(req, n, now)
                req.to(RUNNING)
                if req.first_scheduled_s < 0:
                    req.first_scheduled_s = now
                self.running.append(req)
                admitted += 1
                prefill.append((req, n, req.num_computed))
            elif req.state == RUNNING:
                n = min(n, req.tokens_to_compute)
                if n > 0 and kv.grow(req, n, now):
                    prefill.append((req, n, req.num_computed))
            else:
                raise RuntimeError(f"scheduling policy {name!r} scheduled request {req.req_id} in state "
                                   f"{RequestState(req.state).name}")
        if admitted:
            w = self.waiting
            if all(w[i].state == RUNNING for i in range(min(admitted, len(w)))):
                for _ in range(admitted):
                    w.popleft()
            else:
                self.waiting = deque(r for r in w if r.state == WAITING)
        decode = []
        bs = kv.block_size
        for req in plan.decode:
            if req.state != RUNNING or req.prompt_tokens + req.num_generated - req.num_computed != 1:
                raise RuntimeError(f"scheduling policy {name!r} put request {req.req_id} in the decode list "
                                   f"but it is not decoding")
            if req.num_computed < len(req.blocks) * bs or kv.grow(req, 1, now):
                decode.append((req, req.num_computed))
        return Step(prefill=prefill, decode=decode, preempted=preempted)

    def _preempt(self, req: Request, now: float) -> None:
        """``sim.replica.preemption.Preemption.preempt`` for recompute (the only mode here)."""
        self.running.remove(req)
        req.num_preemptions += 1
        if req.blocks and self.residency.preempt_to(self._residency_view, req, now) == "swap":
            raise RuntimeError(f"residency policy {self.residency.name!r} asked to swap request {req.req_id} "
                               f"out; the reference server has no DRAM tier")
        self.kv.release(req, now)
        self.on_release(req)
        req.to(WAITING)
        req.restart()
        # preempted requests go back in front, earliest arrival first (Replica._to_waiting_front)
        i = 0
        w = self.waiting
        while i < len(w) and w[i].num_preemptions > 0 and w[i].arrival_s <= req.arrival_s:
            i += 1
        w.insert(i, req)

    def unblock(self, now: float) -> None:
        """Nothing could be planned although work is queued: reject the head if it can never run."""
        if self.running:
            name = self.scheduler.name
            raise RuntimeError(f"scheduling policy {name!r} planned no work for {len(self.running)} running "
                               f"requests")
        if self.waiting:
            self._reject(self.waiting.popleft(), "could not be scheduled", now)

    # ------------------------------------------------------------------ committing
    def commit(self, step: Step, step_idx: int, end: float) -> list[Request]:
        """Progress of a step that ended at ``end`` (``Replica._commit``); returns the finished."""
        finished = []
        for req, n, _ in step.prefill:
            req.num_computed += n
            if req.num_computed == req.num_tokens:
                req.num_generated += 1
                req.record_tokens(step_idx, step_idx)
                if req.first_token_s < 0:
                    req.first_token_s = end
                if req.num_generated >= req.output_tokens:
                    finished.append(req)
        for req, _ in step.decode:
            req.num_computed += 1
            req.num_generated += 1
            req.record_tokens(step_idx, step_idx)
            if req.first_token_s < 0:
                req.first_token_s = end
            if req.num_generated >= req.output_tokens:
                finished.append(req)
        if finished:
            gone = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in gone]
            for req in finished:
                req.finish_s = end
                req.to(FINISHED)
                self.kv.release(req, end)
                self.on_release(req)
                self.done.append(req)
        return finished

    def observe(self, step: Step, start: float, end: float, finished: list) -> None:
        """Hand the step's outcome to every observing policy (``Replica.observe``)."""
        if not self.observers:
            return
        evicted = self.kv.hbm.num_evicted
        outcome = StepOutcome(0, start, end, 1, finished, (), 0, evicted - self._evicted_seen, step.preempted)
        self._evicted_seen = evicted
        for p in self.observers:
            p.observe(outcome)

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests call this after every step)."""
        self.kv.check()
        bs = self.kv.block_size
        seen = set()
        for group, state in ((self.running, RUNNING), (self.waiting, WAITING)):
            for r in group:
                assert r.state == state, f"request {r.req_id} in the wrong queue ({r.state})"
                assert id(r) not in seen, f"request {r.req_id} queued twice"
                seen.add(id(r))
        for r in self.running:
            assert len(r.blocks) == -(-r.num_computed // bs), \
                f"request {r.req_id}: {len(r.blocks)} blocks for {r.num_computed} computed tokens"
        for r in self.waiting:
            assert not r.blocks and r.num_computed == 0
        assert self.kv.hbm.num_active == sum(len(r.blocks) for r in self.running)
