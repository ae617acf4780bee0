"""Decoupled prefill/decode lanes on one GPU (``replica.lanes = "decoupled"``), after Nexus (Shi et al.,
"Nexus: Proactive Intra-GPU Disaggregation of Prefill and Decode in LLM Serving", arXiv 2507.06608).

A replica runs two independent step streams over its one KV pool (the replica's ``TieredKV``), each its
own SimPy process with its own clock, one event per step:

* the **prefill lane** runs prefill chunks: admissions of waiting requests and the unfinished prompts
  of running ones, with the scheduler's token budget (the scheduler plans it on a view that shows only
  the requests still in prefill, :class:`~sim.replica.views.LaneView`);
* the **decode lane** runs decode steps of the requests whose prompt is done (a view showing only
  those). A request moves from one lane to the other when a prefill step completes its prompt: that
  step samples its first token (its TTFT). A chunk that leaves exactly one prompt token, like a
  recompute that finds all but the last token cached, leaves that token to the decode lane, which then
  samples the first token (the engine's one progress rule: one token left is a decode).

Neither lane waits for the other's steps: a decode step is not held up by a long chunk (the lock-step
lanes of ``StepCostModel.lanes_step`` end each mixed step with its longer lane).

**SM partition.** Each lane's step is priced by the cost model confined to its share of the SMs
(``StepCostModel.for_share``: compute rate linear in SMs, HBM bandwidth from the measured blocks
sweep). ``"static"``: the prefill lane always runs on ``p = replica.prefill_sm_fraction`` of the
replica's SMs and the decode lane on ``1 - p``, whether or not the other lane is busy (a fixed split,
as with MPS or green contexts). ``"adaptive"`` (:class:`Partition`): at each prefill step the prefill
lane takes the largest ``p`` on a grid (0.10 ... 0.90) that leaves the decode lane a share on which
its step (the decode batch it will run during the chunk, the chunk's finishing prompts included) takes
at most ``replica.lanes_itl_slo_s``; with no decodes it takes 0.90. While the prefill lane is idle the
decode lane runs on all SMs. This follows Nexus's observation that a phase's latency shows
diminishing returns in SMs past a saturation point, so decode gets just what its SLO needs and the
rest goes to prefill (their greedy partitioning); it leaves out their hysteresis and their explicit
queue-length terms. A repartition takes effect at each lane's next step: a decode step in flight keeps
its SMs, so for up to one decode step the two shares may sum above 1 (not modelled as contention).

**HBM bandwidth** (:class:`HBMShare`). The two lanes' kernels draw on one HBM. Each step has a
stand-alone time ``T`` (priced on its SM share) and moves ``B`` bytes (the op list's byte counts); its
demand is ``d = B / T``. While both lanes run, the measured full-chip bandwidth ``P`` (the blocks
sweep of ``raw/hbm_stream.parquet`` at all SMs: 2.79 TB/s on the H100 table) is split max-min fairly:
a lane demanding less than ``P/2`` gets all it asks, the other the rest (each capped at its demand).
A lane granted ``g < d`` progresses at rate ``g / d``: its remaining stand-alone time stretches
accordingly, over the overlap only; when the other lane's step ends (or a new one starts) the rates
are recomputed and the ends moved. So the lanes' achieved bandwidth never sums above ``P``, and a
lane that alone would not fill it runs at its stand-alone speed. What it ignores: demand within a step
is taken as uniform (a step's compute-bound GEMMs and memory-bound attention alternate, so two
memory-bound phases can collide more, or less, than the averages say); L2 cache and SM-scheduler
interference; the bandwidth the lanes' host-side work and the KV transfers use.

Not supported (config errors): speculative decoding, sparse attention, swap preemption, schedulers
other than ``chunked-prefill`` and ``fcfs``. Bulk decode runs are off in this mode (each lane steps
one step at a time). ``max_num_seqs`` counts both lanes' requests (the prefill lane's view adds the
decode lane's to ``num_swapping_in``).

Step-log rows are written when a step ends, in the order steps end (the two lanes' rows interleave
and overlap in time); ``lane`` and ``sm_share`` say which lane ran it on what share.

Invariants: a request is in at most one lane's step at a time; a lane's steps never overlap and its
clock never decreases; every block a step reads is allocated before it starts (by the KV owner, in
``Replica.apply``); ``HBMShare``'s granted bandwidths sum to at most ``P`` while both lanes run.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from policies.base import StepOutcome
from sim.clock import exact_delay, exact_time, on_time, woken_or_at
from sim.errors import PolicyAnswerError
from sim.replica.step import log_step
from sim.replica.views import LaneView

if TYPE_CHECKING:
    from sim.replica.loop import Replica
    from sim.replica.step import Step

PREFILL, DECODE = 0, 1
LANE_CODE = (1, 2)          # the step log's ``lane`` column (0: the one stream)
_NO_CHUNKS = np.empty(0, dtype=np.int64)


def decoding(r) -> bool:
    """A request with exactly one token left to compute decodes (the engine's progress rule)."""
    return r.prompt_tokens + r.num_generated - r.num_computed == 1


class HBMShare:
    """Max-min fair split of the measured HBM bandwidth between the two lanes' steps in flight (see the
    module docstring). Per lane: remaining stand-alone seconds, demand (bytes/s), progress rate and
    planned end; ``changed[i]`` is triggered when lane ``i``'s planned end moves.

    Invariants: rates are in (0, 1]; granted bandwidths (rate x demand) sum to at most ``peak`` while
    both lanes are active; an inactive lane has no remaining work."""

    def __init__(self, env, peak_bytes_per_s: float) -> None:
        self.env = env
        self.peak = float(peak_bytes_per_s)
        self.active = [False, False]
        self.rem = [0.0, 0.0]
        self.demand = [0.0, 0.0]
        self.rate = [1.0, 1.0]
        self.end = [math.inf, math.inf]
        self.t = 0.0
        self.changed = [None, None]
        self.stretch_s = [0.0, 0.0]     # seconds the sharing added to each lane's steps, summed

    def rates(self) -> tuple[float, float]:
        """Progress rates of the two lanes now (1 for a lane running alone or not at all)."""
        a, d = self.active, self.demand
        if not (a[0] and a[1]) or d[0] + d[1] <= self.peak:
            return 1.0, 1.0
        half = self.peak / 2.0
        if d[0] <= half:
            g = (d[0], self.peak - d[0])
        elif d[1] <= half:
            g = (self.peak - d[1], d[1])
        else:
            g = (half, half)
        return min(1.0, g[0] / d[0]), min(1.0, g[1] / d[1])

    def _advance(self, now: float) -> None:
        dt = now - self.t
        if dt > 0:
            for i in (0, 1):
                if self.active[i]:
                    self.rem[i] = max(0.0, self.rem[i] - dt * self.rate[i])
        self.t = max(self.t, now)

    def _reprice(self, now: float, me: int) -> None:
        new = self.rates()
        for j in (0, 1):
            if not self.active[j]:
                continue
            if j == me or new[j] != self.rate[j]:
                self.rate[j] = new[j]
                end = now + self.rem[j] / new[j]
                if j != me and end != self.end[j]:
                    ev = self.changed[j]
                    if ev is not None and not ev.triggered:
                        ev.succeed()
                self.end[j] = end

    def run(self, lane: int, start: float, alone_s: float, nbytes: float):
        """Run one step of ``lane`` from ``start`` (SimPy's now, to the ulp) that alone takes
        ``alone_s`` and moves ``nbytes``; returns (a generator's value) its end time."""
        env = self.env
        self._advance(start)
        self.active[lane] = True
        self.rem[lane] = alone_s
        self.demand[lane] = min(nbytes / alone_s, self.peak) if alone_s > 0 else 0.0
        self.rate[lane] = 1.0
        self.end[lane] = start + alone_s
        self._reprice(start, lane)
        while True:
            ev = self.changed[lane] = env.event()
            end = self.end[lane]
            yield env.any_of([env.timeout(exact_delay(env.now, end)), ev])
            if not ev.triggered:
                break
        self.changed[lane] = None
        self._advance(end)
        self.active[lane] = False
        self.rem[lane] = 0.0
        self.rate[lane] = 1.0
        self.end[lane] = math.inf
        self._reprice(end, lane)
        self.stretch_s[lane] += (end - start) - alone_s
        return end


class Partition:
    """The prefill lane's share of the replica's SMs, per prefill step (see the module docstring)."""

    GRID = tuple(round(0.05 * k, 2) for k in range(2, 19))     # 0.10, 0.15, ..., 0.90

    def __init__(self, builder, mode: str, fraction: float, itl_slo_s: float) -> None:
        self.builder = builder
        self.adaptive = mode == "adaptive"
        self.fraction = fraction
        self.slo = itl_slo_s
        self.current = fraction if not self.adaptive else self.GRID[-1]
        self._cache: dict[tuple[int, int], float] = {}

    def choose(self, decode_batch: int, ctx_mean: int) -> float:
        """``p`` for a prefill step during which the decode lane runs ``decode_batch`` decodes of
        about ``ctx_mean`` tokens of KV each."""
        if not self.adaptive:
            return self.fraction
        if decode_batch == 0:
            p = self.GRID[-1]
        else:
            key = (decode_batch, -(-ctx_mean // 64) * 64)
            p = self._cache.get(key)
            if p is None:
                p = self.GRID[0]
                ctx = key[1]
                for cand in reversed(self.GRID):      # the most SMs for prefill that the decode SLO allows
                    cost = self.builder.lane_cost(1.0 - cand)
                    t = cost.step(_NO_CHUNKS, _NO_CHUNKS, decode_batch, decode_batch * (ctx + 1), decode_batch,
                                  num_seqs=decode_batch)[0]
                    if t <= self.slo:
                        p = cand
                        break
                self._cache[key] = p
        self.current = p
        return p

    def decode_share(self, prefill_busy: bool) -> float:
        """The decode lane's share of the replica's SMs for a step starting now."""
        if self.adaptive:
            return 1.0 - self.current if prefill_busy else 1.0
        return 1.0 - self.fraction


class Lane:
    """One lane's state: its clock, its step in flight (requests and tokens allocated ahead of their
    progress), its wake-up event and its counters."""

    __slots__ = ("index", "t_end", "ahead", "wake", "busy", "steps", "share_sum")

    def __init__(self, index: int) -> None:
        self.index = index
        self.t_end = -1.0
        self.ahead: dict[int, int] = {}     # id(request) -> tokens of its blocks not yet computed
        self.wake = None
        self.busy = False
        self.steps = 0
        self.share_sum = 0.0


class _Row:
    """Collects one step's log row at its start (``log_step``'s columns), written when it ends."""

    __slots__ = ("values",)

    def append_row(self, start_s, duration_s, end_s, values: tuple) -> None:
        self.values = values


class DecoupledLanes:
    """The two lane processes of one replica (see the module docstring)."""

    def __init__(self, replica: Replica, *, mode: str, fraction: float, itl_slo_s: float) -> None:
        self.r = replica
        self.env = replica.env
        builder = replica.builder
        self.partition = Partition(builder, mode, fraction, itl_slo_s)
        self.hbm = HBMShare(self.env, builder.cost.backend.hbm_peak_bytes_per_s)
        self.lanes = (Lane(PREFILL), Lane(DECODE))
        self.views = (LaneView(replica, self, PREFILL, replica.guarded), LaneView(replica, self, DECODE,
                                                                                  replica.guarded))
        self.env.process(self._prefill_loop())
        self.env.process(self._decode_loop())

    # ------------------------------------------------------------------ what each lane sees
    def requests(self, lane: int) -> list:
        """Running requests of ``lane``'s phase that the other lane's step in flight does not hold."""
        other = self.lanes[1 - lane].ahead
        want = lane == DECODE
        return [r for r in self.r.running if decoding(r) == want and id(r) not in other]

    def others(self, lane: int) -> int:
        """Running requests not shown to ``lane`` (the other lane's)."""
        return len(self.r.running) - len(self.requests(lane))

    def clock(self, lane: Lane) -> float:
        """The lane's time: the exact end of its last step when it has just finished one, else SimPy's
        (as ``Replica.clock``)."""
        return exact_time(self.env.now, lane.t_end)

    def notify(self) -> None:
        for lane in self.lanes:
            if lane.wake is not None and not lane.wake.triggered:
                lane.wake.succeed()

    def _wait(self, lane: Lane):
        env = self.env
        feed = self.r.feed
        t = feed.next_s() if lane.index == PREFILL and feed is not None else math.inf
        lane.wake = env.event()
        yield from woken_or_at(env, lane.wake, t)
        lane.wake = None
        if t < math.inf and on_time(env.now, t):
            lane.t_end = t      # the arrival's exact time (as ``Replica._wait``): SimPy's can be an ulp off

    def _plan(self, lane: int, now: float):
        r = self.r
        view = self.views[lane]
        plan = view.unwrap_plan(r.scheduler.schedule(view, now))
        wrong = plan.decode if lane == PREFILL else plan.prefill
        if wrong or plan.swap_in:
            raise PolicyAnswerError(f"scheduling policy {r.scheduler.name!r} planned "
                               f"{'decodes' if lane == PREFILL else 'prefill chunks or swap-ins'} for the "
                               f"{'prefill' if lane == PREFILL else 'decode'} lane (replica.lanes = 'decoupled')")
        return plan

    # ------------------------------------------------------------------ the lanes
    def _prefill_loop(self):
        r = self.r
        lane = self.lanes[PREFILL]
        dec = self.lanes[DECODE]
        while True:
            now = self.clock(lane)
            if r.feed is not None:
                r.feed.pull(now)
            if not (r.waiting or self.requests(PREFILL)):
                yield from self._wait(lane)
                continue
            r.kv.at(now)
            r.moves.prefetch(now)
            plan = self._plan(PREFILL, now)
            step = r.apply(plan, now)
            if step.preempted:
                self.notify()
            if not step.prefill:
                if (dec.busy or self.requests(DECODE) or r.num_swapping_in or r.num_swapping_out
                        or r.moves.loading or r.moves.in_flight):
                    yield from self._wait(lane)     # the decode lane frees blocks, a copy lands
                elif plan.is_empty() or not plan.prefill:
                    r.unblock(now)
                continue
            yield from self._run(lane, step)

    def _decode_loop(self):
        r = self.r
        lane = self.lanes[DECODE]
        pre = self.lanes[PREFILL]
        while True:
            now = self.clock(lane)
            if not self.requests(DECODE):
                yield from self._wait(lane)
                continue
            r.kv.at(now)
            plan = self._plan(DECODE, now)
            step = r.apply(plan, now)
            if step.preempted:
                self.notify()           # the prefill lane re-admits them
            if not step.decode:
                if step.preempted:
                    continue
                if pre.busy:
                    yield from self._wait(lane)
                    continue
                raise PolicyAnswerError(f"replica {r.replica_id}: scheduling policy {r.scheduler.name!r} planned no "
                                   f"work for the decode lane's {len(self.requests(DECODE))} requests")
            yield from self._run(lane, step)

    def _run(self, lane: Lane, step: Step):
        """One step of ``lane``: price it on the lane's share, log its row, run it under the HBM share
        (and after the write-backs of the blocks it reuses), commit its progress, wake the other lane."""
        r = self.r
        env = self.env
        start = self.clock(lane)
        if lane.index == PREFILL:
            nd = sum(1 for q, n in step.prefill if q.num_computed + n == q.num_tokens)
            nd += len(self.requests(DECODE))
            ctx = sum(q.num_computed for q in self.requests(DECODE))
            share = self.partition.choose(nd, ctx // nd if nd else 0)
            lane.ahead = {id(q): n for q, n in step.prefill}
        else:
            share = self.partition.decode_share(self.lanes[PREFILL].busy)
            lane.ahead = {id(q): 1 for q in step.decode}
        lane.busy = True
        priced, nbytes = r.builder.price_lane(step, share)
        row = _Row()
        log_step(row, r.kv, r.running, step, start, priced.duration_s, start + priced.duration_s, priced.launches,
                 priced.syncs, len(r.moves.loading), padded_tokens=priced.padded_tokens)
        r.num_launches += priced.launches
        r.num_padded_tokens += priced.padded_tokens
        r.num_syncs += priced.syncs
        end = yield from self.hbm.run(lane.index, start, priced.duration_s, nbytes)
        waits = [m for m in step.waits if m.landed_s < 0] if step.waits else None
        if waits:
            yield env.all_of([m.event for m in waits])
            landed = max(m.landed_s for m in waits)
            if landed > end:
                r.moves.writeback_wait_s += landed - end
                end = landed
        lane.t_end = end
        r.steps.append_row(start, end - start, end, row.values)
        r.steps.set_last(lane=LANE_CODE[lane.index], sm_share=share * r.builder.sm_share)
        lane.steps += 1
        lane.share_sum += share
        accepted, finished = r.commit(step, r.step_id_base + r.steps.n - 1, end)
        lane.ahead = {}
        lane.busy = False
        if r.observers:
            r.observe(StepOutcome(r.replica_id, start, end, 1, finished, accepted, step.prefix_hit_tokens, 0,
                                  step.preempted))
        if r.check_invariants:
            r.check(self.lanes[1 - lane.index].ahead)
        self.notify()

    def summary(self) -> dict:
        """Per-lane counters of this replica (``summary["lanes"]``)."""
        p, d = self.lanes
        return {"prefill_steps": p.steps, "decode_steps": d.steps,
                "prefill_share_mean": p.share_sum / p.steps if p.steps else 0.0,
                "decode_share_mean": d.share_sum / d.steps if d.steps else 0.0,
                "prefill_hbm_stretch_s": float(self.hbm.stretch_s[PREFILL]),
                "decode_hbm_stretch_s": float(self.hbm.stretch_s[DECODE])}
