"""Every capability declared in ``policies.base`` changes a run when a policy uses it (a declared hook
that does nothing is a defect). Each test runs a small plugin against the shipped default and checks
the effect the hook is for."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policies.base import (
    AttentionPlan,
    Drafter,
    DraftPlan,
    EvictionPolicy,
    ResidencyPolicy,
    SchedulingPolicy,
    SparsityPolicy,
    SpeculationPolicy,
)
from policies.registry import register, registered
from policies.scheduling.fcfs import FCFS
from sim.engine import Simulation
from sim.errors import PolicyError
from sim.request import PolicyMutationError
from tests.conftest import make_trace, run_checked, small_config


# --------------------------------------------------------------------------------- test plugins
class _Mutating(FCFS):
    def schedule(self, view, now):
        for r in view.waiting:
            r.priority = 7          # not allowed: views are read-only
        return super().schedule(view, now)


class _Observing(FCFS):
    def __init__(self, params=None):
        super().__init__(params)
        self.finished, self.steps = [], 0

    def observe(self, outcome):
        self.finished.extend(r.req_id for r in outcome.finished)
        self.steps += outcome.num_steps


class _AlwaysSwap(ResidencyPolicy):
    def preempt_to(self, view, req, now):
        return "swap" if view.num_free_dram_blocks > 0 else "recompute"


class _MRU(EvictionPolicy):
    def evict_cached(self, view, num_blocks, now):
        order = view.lru_order(view.num_cached)
        return order[::-1][:num_blocks]

    def drop_swapped(self, view, num_blocks, now):
        return list(view.swapped)


def _drafting(name: str, drafter: str) -> type:
    declared = Drafter(kind="model", model=drafter) if drafter != "none" else Drafter()

    class _Draft(SpeculationPolicy):
        def propose(self, decodes, now, view):
            return DraftPlan(draft_tokens=(3,) * len(decodes))

        def accepted(self, rng, req, num_draft):
            return 0        # everything rejected: the output and the steps are the same for all drafters

        def drafter(self):
            return declared

    return _Draft


class _Window(SparsityPolicy):
    """Attend to the last 64 tokens only (StreamingLLM-like, without sinks)."""

    def plan(self, context):
        return AttentionPlan(tokens_read=np.minimum(context, 64))

    def attended(self, context):
        return np.minimum(context, 64)

    def steady(self):
        return True


class _Select(SparsityPolicy):
    """Score every 16-token page and keep 8 (Quest-like): a selection step each decode step."""

    def plan(self, context):
        return AttentionPlan(tokens_read=np.minimum(context, 128), selection_units=-(-context // 16),
                             selection_k=8)


class _Fetch(SparsityPolicy):
    """Every decode step reads 1 GiB of offloaded KV from host memory."""

    def plan(self, context):
        return AttentionPlan(tokens_read=context, lower_tier_bytes=2**30)


def _decode_trace():
    return make_trace([0.0, 0.0, 0.0, 0.0], [1500, 1500, 1500, 1500], [60, 60, 60, 60])


def _mean_decode_step(res):
    st = res.steps
    return float(st[(st["decode_seqs"] > 0) & (st["prefill_seqs"] == 0)]["duration_s"].mean())


# --------------------------------------------------------------------------------- the tests
def test_a_policy_that_writes_to_its_view_is_stopped():
    with pytest.raises(PolicyMutationError, match="priority"):
        run_checked(small_config(**{"policies.scheduling.name": "test-mutating", "replica.num_hbm_blocks": 600}),
                    _decode_trace())


def test_a_policy_must_subclass_its_kinds_base_class():
    class NotARouter:
        def route(self, request, replicas, now):
            return 0

    with pytest.raises(PolicyError, match="must subclass policies.base.RoutingPolicy"):
        register("routing", "test-not-a-router")(NotARouter)


def test_observe_hears_every_finished_request_and_every_step():
    cfg = small_config(**{"policies.scheduling.name": "test-observing", "replica.num_hbm_blocks": 600})
    tr = make_trace(np.linspace(0, 1, 12), [100] * 12, [30] * 12)
    sim, res = run_checked(cfg, tr, guarded=False)
    pol = sim.replicas[0].scheduler
    assert sorted(pol.finished) == sorted(res.requests["request_id"].tolist())
    assert pol.steps == res.summary["engine"]["steps"]
    assert res.summary["engine"]["decode_runs"] > 0         # observing does not turn bulk runs off


def test_the_residency_policy_decides_where_preempted_kv_goes():
    tr = make_trace([0.0, 0.0], [8, 8], [20, 20])
    base = {"replica.block_size_tokens": 4, "replica.num_hbm_blocks": 10, "replica.prefix_caching": False,
            "policies.scheduling.watermark": 0.0, "replica.preemption_mode": "recompute"}
    _, default = run_checked(small_config(**base), tr)
    _, swapping = run_checked(small_config(**base, **{"policies.residency.name": "test-always-swap"}), tr)
    assert default.summary["engine"]["preemptions"] == swapping.summary["engine"]["preemptions"] == 1
    assert default.summary["engine"]["swaps_out"] == 0 and default.summary["links"]["pcie_d2h_bytes"] == 0
    assert swapping.summary["engine"]["swaps_out"] == 1 and swapping.summary["links"]["pcie_d2h_bytes"] > 0


def test_the_eviction_policy_chooses_the_victims():
    # three requests share a prefix; a fourth, unrelated, forces evictions in between
    hashes = [[1, 2, 3, 4], [9, 8, 7, 6], [1, 2, 3, 5]]
    tr = make_trace([0.0, 1.0, 2.0], [256, 256, 256], [2, 2, 2], hashes, 64)
    base = {"replica.num_hbm_blocks": 20, "policies.scheduling.watermark": 0.0}
    _, lru = run_checked(small_config(**base), tr)
    _, mru = run_checked(small_config(**base, **{"policies.eviction.name": "test-mru"}), tr)
    assert lru.summary["kv"]["prefix_hit_tokens"] != mru.summary["kv"]["prefix_hit_tokens"]


def test_a_larger_drafter_costs_more_per_speculative_step():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    means = {}
    for name in ("test-draft-free", "test-draft-1b", "test-draft-8b"):
        _, res = run_checked(small_config(**base, **{"policies.speculation.name": name}), _decode_trace())
        means[name] = _mean_decode_step(res)
        assert res.summary["engine"]["decode_runs"] == 0     # drafting steps are priced one by one
    assert means["test-draft-free"] < means["test-draft-1b"] < means["test-draft-8b"]
    # three 1B draft steps cost well under one 8B target step; three 8B ones cost about three
    assert means["test-draft-8b"] - means["test-draft-free"] > 2 * means["test-draft-free"]


def test_a_declared_drafter_takes_its_weights_and_kv_out_of_the_kv_pool():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 0}
    tr = make_trace([0.0], [64], [8])
    free = Simulation(small_config(**base, **{"policies.speculation.name": "test-draft-free"}), trace=tr)
    one_b = Simulation(small_config(**base, **{"policies.speculation.name": "test-draft-1b"}), trace=tr)
    assert free.hbm_blocks == Simulation(small_config(**base), trace=tr).hbm_blocks
    fp = one_b.draft_footprint
    assert fp.weight_bytes == 2 * fp.params                # Llama-3.2-1B in bf16
    assert one_b.hbm_blocks == (free.budget.kv_bytes - fp.weight_bytes) // one_b.hbm_bytes_per_block
    assert one_b.hbm_blocks < free.hbm_blocks * 0.95      # 2.5 GB of weights, and a block holds the 1B's KV too


def test_propose_sees_the_price_of_each_draft_depth():
    seen = []

    class Peek(SpeculationPolicy):
        def propose(self, decodes, now, view):
            times = [view.step_time(k) for k in range(5)]
            seen.append(times)
            # draft only while a 4-token draft costs less than twice a plain step
            return DraftPlan(draft_tokens=(4 if times[4] < 2 * times[0] else 0,) * len(decodes))

        def accepted(self, rng, req, num_draft):
            return num_draft

        def drafter(self):
            return Drafter(kind="model", model="llama-3.2-1b")

    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 4000, "policies.scheduling.max_num_seqs": 512}
    with registered(("speculation", "test-peek", Peek)):
        _, small = run_checked(small_config(**base, **{"policies.speculation.name": "test-peek"}), _decode_trace())
        _, large = run_checked(small_config(**base, **{"policies.speculation.name": "test-peek"}),
                               make_trace([0.0] * 400, [32] * 400, [12] * 400))
    assert seen and all(np.all(np.diff(t) > 0) for t in seen)
    assert small.summary["speculation"]["proposed_tokens"] > 0            # 4 requests: a draft is cheap
    big = large.steps[large.steps["decode_seqs"] >= 300]
    assert len(big) and (big["draft_tokens"] == 0).all()                  # 400: it is not


def test_the_plans_tree_width_multiplies_the_tokens_verified():
    class Tree(SpeculationPolicy):
        def propose(self, decodes, now, view):
            return DraftPlan(draft_tokens=(2,) * len(decodes), width=3)

        def accepted(self, rng, req, num_draft):
            return 1

    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    with registered(("speculation", "test-tree3", Tree)):
        _, tree = run_checked(small_config(**base, **{"policies.speculation.name": "test-tree3"}), _decode_trace())
    _, chain = run_checked(small_config(**base, **{"policies.speculation.name": "test-accept-all"}), _decode_trace())
    st = tree.steps[(tree.steps["draft_tokens"] > 0) & (tree.steps["prefill_seqs"] == 0)]
    assert (st["draft_tokens"] == 6 * st["decode_seqs"]).all()            # 3 chains of 2 per decode
    assert (st["accepted_tokens"] == st["decode_seqs"]).all()
    ch = chain.steps[(chain.steps["draft_tokens"] > 0) & (chain.steps["prefill_seqs"] == 0)]
    assert st["verify_s"].mean() > ch["verify_s"].mean()                  # 7 query tokens per request, not 3


def test_attending_to_fewer_tokens_shortens_decode_steps():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    _, dense = run_checked(small_config(**base), _decode_trace())
    _, window = run_checked(small_config(**base, **{"policies.sparsity.name": "test-window"}), _decode_trace())
    assert _mean_decode_step(window) < _mean_decode_step(dense)
    assert window.summary["engine"]["decode_runs"] > 0        # a steady plan keeps bulk decode runs


def test_a_lower_tier_fetch_makes_the_step_wait_for_pcie():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    _, dense = run_checked(small_config(**base), _decode_trace())
    sim, fetch = run_checked(small_config(**base, **{"policies.sparsity.name": "test-fetch"}), _decode_trace())
    decode_steps = int(((fetch.steps["decode_seqs"] > 0) & (fetch.steps["prefill_seqs"] == 0)).sum())
    assert fetch.summary["links"]["pcie_h2d_bytes"] == decode_steps * 2**30
    h2d_s = 2**30 / sim.replicas[0].transfers.link("pcie_h2d").bandwidth_bytes_per_s
    assert _mean_decode_step(fetch) >= h2d_s > _mean_decode_step(dense)
    assert (fetch.transfers["what"] == "sparse_fetch").sum() == decode_steps


def test_scoring_units_adds_a_selection_step():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    _, window = run_checked(small_config(**base, **{"policies.sparsity.name": "test-window"}), _decode_trace())
    _, select = run_checked(small_config(**base, **{"policies.sparsity.name": "test-select"}), _decode_trace())
    # the selection keeps more tokens (128 vs 64) but the extra attention is tiny next to the top-k
    assert _mean_decode_step(select) > _mean_decode_step(window) + 32 * 1e-6


def test_max_prompt_tokens_rejects_what_the_scheduler_can_never_run():
    cfg = small_config(**{"policies.scheduling.max_num_batched_tokens": 512, "replica.num_hbm_blocks": 200})
    _, res = run_checked(cfg, make_trace([0.0, 0.1], [600, 100], [4, 4]))
    assert list(res.requests["reject_reason"]) == ["exceeds scheduler token budget", ""]


def test_steady_decode_is_what_lets_decode_steps_advance_together():
    class Unsteady(FCFS):
        def steady_decode(self, view):
            return SchedulingPolicy.steady_decode(self, view)

    tr = make_trace([0.0], [100], [200])
    _, steady = run_checked(small_config(), tr)
    with registered(("scheduling", "test-unsteady", Unsteady)):
        _, unsteady = run_checked(small_config(**{"policies.scheduling.name": "test-unsteady"}), tr)
    assert steady.summary["engine"]["decode_runs"] > 0 and unsteady.summary["engine"]["decode_runs"] == 0
    assert steady.summary["e2e_s"] == unsteady.summary["e2e_s"]


def _reserving(sms: int) -> str:
    from policies.execution.cuda_graph import CudaGraph

    class Reserving(CudaGraph):
        def reserved_sms(self, sm_count):
            return sms

    return Reserving


def test_reserved_sms_slow_compute_bound_steps_and_barely_memory_bound_ones():
    base = {"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.num_hbm_blocks": 2000}
    prefill = make_trace([0.0], [4096], [1])          # one compute-bound prefill step
    decode = make_trace([0.0], [64], [300])           # batch-1 decode steps: memory-bound
    times = {}
    for sms in (0, 66):
        cfg = small_config(**base, **{"policies.execution.name": f"test-reserve-{sms}"})
        with registered(("execution", f"test-reserve-{sms}", _reserving(sms))):
            _, p = run_checked(cfg, prefill)
            _, d = run_checked(cfg, decode)
        times[sms] = (float(p.steps["duration_s"].iloc[0]), _mean_decode_step(d))
        assert d.summary["engine"]["sm_share"] == (132 - sms) / 132
    assert times[66][0] > 1.5 * times[0][0]           # half the SMs: compute-bound prefill much slower
    assert times[66][1] < 1.10 * times[0][1]          # HBM saturates with half the SMs: decode almost the same
    assert times[66][1] > times[0][1]


class _AcceptAll(SpeculationPolicy):
    def propose(self, decodes, now, view):
        return DraftPlan(draft_tokens=(2,) * len(decodes))

    def accepted(self, rng, req, num_draft):
        return num_draft

    def drafter(self):
        return Drafter(kind="model", model="llama-3.2-1b")


class _ObservingLRU(EvictionPolicy):
    def __init__(self, params=None):
        super().__init__(params)
        self.totals = {"steps": 0, "finished": 0, "hits": 0, "evicted": 0, "preempted": 0, "accepted": 0}

    def evict_cached(self, view, num_blocks, now):
        return view.lru_order(num_blocks)

    def drop_swapped(self, view, num_blocks, now):
        return list(view.swapped)

    def observe(self, o):
        t = self.totals
        t["steps"] += o.num_steps
        t["finished"] += len(o.finished)
        t["hits"] += o.prefix_hit_tokens
        t["evicted"] += o.evicted_blocks
        t["preempted"] += len(o.preempted)
        t["accepted"] += sum(a for _, _, a in o.accepted)


def test_step_outcomes_add_up_to_the_run_summary():
    # shared prefixes, a small HBM (evictions, preemptions), accepted drafts
    hashes = [[1, 2, 3, 4 + i] for i in range(10)]
    tr = make_trace(np.linspace(0, 3.0, 10), [256] * 10, [40] * 10, hashes, 64)
    for spec in ("none", "test-accept-all"):
        cfg = small_config(**{"policies.eviction.name": "test-observing-lru", "replica.num_hbm_blocks": 30,
                              "policies.speculation.name": spec, "policies.scheduling.watermark": 0.0})
        sim, res = run_checked(cfg, tr)
        t = sim.replicas[0].kv.eviction.totals
        s = res.summary
        assert t["steps"] == s["engine"]["steps"] and t["finished"] == s["requests"]["finished"] == 10
        assert t["hits"] == s["kv"]["prefix_hit_tokens"] > 0
        assert t["evicted"] == s["kv"]["hbm_evicted_blocks"] > 0
        assert t["preempted"] == s["engine"]["preemptions"]
        if spec == "none":
            assert t["accepted"] == 0
        else:   # every accepted draft is a token that came out beside its step's own
            assert t["accepted"] == int(sim.requests.extra_tokens.sum()) > 0


# --------------------------------------------------------------------------------- the KV hierarchy
class _DemoteToDram(ResidencyPolicy):
    def demote_to(self, view, tier, now):
        return "dram" if tier == "hbm" else "drop"


class _OffloadToDram(ResidencyPolicy):
    def offload_to(self, view, req, now):
        return "dram"


class _DemoteNeverLoad(_DemoteToDram):
    def load_or_recompute(self, view, req, now):
        return "recompute"


class _DemoteAndPrefetch(_DemoteToDram):
    def prefetch(self, view, now):
        return [r for r in view.waiting if view.lower_hit_blocks(r)][:1]


def _abc():
    from tests.unit.test_kv_tiers import _abc as abc

    return abc()


def _tier_cfg(**kw):
    from tests.unit.test_kv_tiers import _cfg

    return _cfg(**kw)


def test_demote_to_decides_where_evicted_blocks_go():
    _, drop = run_checked(_tier_cfg(), _abc())
    _, kept = run_checked(_tier_cfg(**{"policies.residency.name": "test-demote-dram"}), _abc())
    assert drop.summary["links"]["pcie_d2h_bytes"] == 0 and drop.summary["kv_tiers"]["token_hit_rate"]["dram"] == 0
    assert kept.summary["links"]["pcie_d2h_bytes"] > 0 and kept.summary["kv_tiers"]["token_hit_rate"]["dram"] > 0
    assert kept.summary["kv"]["prefix_hit_tokens"] > drop.summary["kv"]["prefix_hit_tokens"]


def test_offload_to_copies_released_blocks_down():
    _, res = run_checked(_tier_cfg(**{"policies.residency.name": "test-offload-dram"}), _abc())
    t = res.transfers
    first = t.sort_values("start_s").iloc[0]
    # A's prompt goes down when A finishes, before anything is evicted
    assert first["what"] == "writeback" and first["link"] == "pcie_d2h" and first["start_s"] < 1.0
    assert res.summary["kv_tiers"]["token_hit_rate"]["dram"] > 0


def test_load_or_recompute_decides_whether_a_lower_tier_hit_is_loaded():
    _, load = run_checked(_tier_cfg(**{"policies.residency.name": "test-demote-dram"}), _abc())
    _, recompute = run_checked(_tier_cfg(**{"policies.residency.name": "test-demote-never-load"}), _abc())
    assert load.requests["lower_hit_tokens"].sum() > 0 and load.summary["kv_tiers"]["recompute_choices"] == 0
    assert recompute.requests["lower_hit_tokens"].sum() == 0 and recompute.summary["kv_tiers"]["recompute_choices"] == 1
    assert recompute.summary["links"]["pcie_h2d_bytes"] == 0


def test_prefetch_starts_loads_for_waiting_requests():
    from tests.unit.test_kv_tiers import _queued_c

    # C waits behind a long request, its prefix in DRAM
    cfg = {"replica.num_hbm_blocks": 800, "policies.scheduling.max_num_seqs": 1}
    _, lazy = run_checked(_tier_cfg(**cfg, **{"policies.residency.name": "test-demote-dram"}), _queued_c())
    _, eager = run_checked(_tier_cfg(**cfg, **{"policies.residency.name": "test-demote-prefetch"}), _queued_c())
    assert lazy.summary["kv_tiers"]["prefetch"]["blocks"] == 0
    assert eager.summary["kv_tiers"]["prefetch"]["on_time_blocks"] > 0
    assert eager.summary["kv_tiers"]["stall"]["total_s"] < lazy.summary["kv_tiers"]["stall"]["total_s"]


class _ClockedLRU(EvictionPolicy):
    """LRU that records when it is asked (a stand-in for a policy whose choice depends on the time)."""

    time_dependent = True

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = []

    def evict_cached(self, view, num_blocks, now):
        self.calls.append((num_blocks, now))
        return view.lru_order(num_blocks)


class _BatchedLRU(_ClockedLRU):
    time_dependent = False


def test_a_time_dependent_eviction_policy_is_asked_at_each_allocation_of_a_decode_run():
    # one long decode in a full cache: every new decode block evicts a cached one
    hashes = [list(range(1, 9)), list(range(20, 40))]
    tr = make_trace([0.0, 1.0], [512, 1280], [2, 300], hashes, 64)
    base = {"replica.num_hbm_blocks": 110, "policies.scheduling.watermark": 0.0}
    calls = {}
    for name in ("test-clocked-lru", "test-batched-lru"):
        sim, res = run_checked(small_config(**base, **{"policies.eviction.name": name}), tr)
        calls[name] = sim.replicas[0].kv.eviction.calls
        assert res.summary["engine"]["decode_runs"] > 0
    clocked, batched = calls["test-clocked-lru"], calls["test-batched-lru"]
    assert sum(n for n, _ in clocked) == sum(n for n, _ in batched)     # the same evictions...
    singles = [t for n, t in clocked if n == 1]
    assert len(singles) > 10 and len(set(singles)) == len(singles)     # one at a time, each at its step
    assert len(batched) < len(clocked) / 4                              # ...or asked for together


def test_an_lru_equivalent_policy_lets_the_pool_evict_from_its_lru_head_with_the_same_result():
    import pandas as pd

    hashes = [list(range(1, 9)), list(range(20, 40))]
    tr = make_trace([0.0, 1.0], [512, 1280], [2, 300], hashes, 64)
    base = {"replica.num_hbm_blocks": 110, "policies.scheduling.watermark": 0.0}
    sim, asked = run_checked(small_config(**base, **{"policies.eviction.name": "test-batched-lru"}), tr)
    _, own = run_checked(small_config(**base), tr)          # lru declares lru_equivalent
    assert sim.replicas[0].kv.eviction.calls
    pd.testing.assert_frame_equal(asked.requests, own.requests)
    pd.testing.assert_frame_equal(asked.steps, own.steps)


class _PeekingAtTheFuture(EvictionPolicy):
    def evict_cached(self, view, num_blocks, now):
        view.next_use_s(view.candidates())
        return view.lru_order(num_blocks)


class _DeepestFirst(EvictionPolicy):
    """Ranks by the ranking view's per-block fields: the deepest block of a prompt goes first."""

    def evict_cached(self, view, num_blocks, now):
        c = view.candidates()
        pos, owner, ins, cost = view.position(c), view.owner(c), view.inserted_s(c), view.recompute_s(c)
        assert (owner >= -1).all() and (ins <= now).all() and (cost >= 0).all()
        assert list(view.session(c)) == [None] * len(c)
        return c[np.argsort(-pos, kind="stable")[:num_blocks]]


def _a_b_d_a():
    """A (8 blocks), B (16), D (8, evicting 7), then A again: LRU evicts A's (older) blocks, keeping B's."""
    hashes = [[1, 2], [9, 8, 7, 6], [20, 21], [1, 2]]
    return make_trace([0.0, 1.0, 2.0, 3.0], [128, 256, 128, 128], [2, 2, 2, 2], hashes, 64)


_ABDA = {"replica.num_hbm_blocks": 26, "policies.scheduling.watermark": 0.0}


def test_only_a_policy_that_declares_needs_future_sees_the_trace_future():
    with pytest.raises(RuntimeError, match="needs_future"):
        run_checked(small_config(**_ABDA, **{"policies.eviction.name": "test-peeking"}), _a_b_d_a())
    _, belady = run_checked(small_config(**_ABDA, **{"policies.eviction.name": "belady"}), _a_b_d_a())
    _, lru = run_checked(small_config(**_ABDA), _a_b_d_a())
    # B's prompt is never used again: Belady evicts it instead of A's, which the last request reuses
    assert list(lru.requests["prefix_hit_tokens"]) == [0, 0, 0, 16]
    assert list(belady.requests["prefix_hit_tokens"]) == [0, 0, 0, 112]


def test_the_ranking_view_gives_eviction_policies_each_blocks_position_and_cost():
    _, deep = run_checked(small_config(**_ABDA, **{"policies.eviction.name": "test-deepest"}), _a_b_d_a())
    # the deepest blocks (B's tail) go first: A's short prompt survives
    assert list(deep.requests["prefix_hit_tokens"]) == [0, 0, 0, 112]


PLUGINS = [
    ("scheduling", "test-mutating", _Mutating),
    ("scheduling", "test-observing", _Observing),
    ("residency", "test-always-swap", _AlwaysSwap),
    ("eviction", "test-mru", _MRU),
    ("sparsity", "test-window", _Window),
    ("sparsity", "test-select", _Select),
    ("sparsity", "test-fetch", _Fetch),
    ("speculation", "test-accept-all", _AcceptAll),
    ("eviction", "test-observing-lru", _ObservingLRU),
    ("speculation", "test-draft-1b", _drafting("test-draft-1b", "llama-3.2-1b")),
    ("speculation", "test-draft-8b", _drafting("test-draft-8b", "llama-3.1-8b")),
    ("speculation", "test-draft-free", _drafting("test-draft-free", "none")),
    ("residency", "test-demote-dram", _DemoteToDram),
    ("residency", "test-offload-dram", _OffloadToDram),
    ("residency", "test-demote-never-load", _DemoteNeverLoad),
    ("residency", "test-demote-prefetch", _DemoteAndPrefetch),
    ("eviction", "test-clocked-lru", _ClockedLRU),
    ("eviction", "test-batched-lru", _BatchedLRU),
    ("eviction", "test-peeking", _PeekingAtTheFuture),
    ("eviction", "test-deepest", _DeepestFirst),
]


@pytest.fixture(autouse=True, scope="module")
def _plugins():
    with registered(*PLUGINS):
        yield


def test_a_quantized_kv_cache_shortens_memory_bound_decode_attention(tmp_path):
    # Llama-3.1-8B with an 8-bit KV cache, priced from the H100 table (measured at bf16)
    spec = (Path(__file__).resolve().parents[2] / "sim" / "presets" / "models" / "llama-3.1-8b.toml").read_text()
    fp8 = tmp_path / "llama-3.1-8b-kv8.toml"
    fp8.write_text(spec.replace('name = "llama-3.1-8b"', 'name = "llama-3.1-8b-kv8"')
                   .replace("bytes_per_kv = 2", "bytes_per_kv = 1"))
    base = {"costs.backend": "table", "replica.num_hbm_blocks": 17000}
    long_decode = make_trace([0.0] * 32, [8000] * 32, [40] * 32)   # 32 x 8K context: KV reads dominate
    sims, means = {}, {}
    for name in ("llama-3.1-8b", str(fp8)):
        sims[name], res = run_checked(small_config(**base, **{"model.name": name}), long_decode)
        means[name] = _mean_decode_step(res)
    assert means[str(fp8)] < 0.85 * means["llama-3.1-8b"]
    # and the same HBM holds twice the tokens
    assert sims[str(fp8)].hbm_bytes_per_block * 2 == sims["llama-3.1-8b"].hbm_bytes_per_block
