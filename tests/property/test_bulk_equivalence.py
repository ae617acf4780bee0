"""Advancing a steady decode run as one event gives exactly what stepping one step at a time gives:
the same step start times and durations, token counts, KV columns, per-request metrics, the same
block ids allocated in the same order from every pool, and — with the KV hierarchy on — the same copies
between tiers at the same times (every eviction policy, both residency policies, inclusive and
exclusive tiers, a shared store)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.memory.block_pool import BlockPool
from tests.conftest import examples, run_checked, small_config
from tests.property.test_engine_invariants import shipped, tier_overrides, traces_


def _run_recording(cfg, trace):
    seqs: dict[int, list] = {}
    orig_one, orig_many = BlockPool.allocate_one, BlockPool.allocate

    def one(self, now, choose=None, owner=-1):
        b = orig_one(self, now, choose, owner)
        seqs.setdefault(id(self), []).append((self.tier, b, now))
        return b

    def many(self, n, now, choose=None, owner=-1):
        got = orig_many(self, n, now, choose, owner)
        if got:
            seqs.setdefault(id(self), []).extend((self.tier, b, now) for b in got)
        return got

    orig_run = BlockPool.allocate_run

    def run(self, times, owners, choose=None):
        got = orig_run(self, times, owners, choose)
        seqs.setdefault(id(self), []).extend((self.tier, b, float(t)) for b, t in zip(got, times))
        return got

    BlockPool.allocate_one, BlockPool.allocate, BlockPool.allocate_run = one, many, run
    try:
        sim, res = run_checked(cfg, trace)
    finally:
        BlockPool.allocate_one, BlockPool.allocate, BlockPool.allocate_run = orig_one, orig_many, orig_run
    per_pool = sorted((seq[0][0], tuple(seq)) for seq in seqs.values())
    return sim, res, per_pool


def assert_equivalent(cfg_overrides: dict, trace) -> int:
    single = small_config(**cfg_overrides, **{"replica.bulk_decode": False})
    bulk = small_config(**cfg_overrides, **{"replica.bulk_decode": True})
    s_sim, s_res, s_alloc = _run_recording(single, trace)
    b_sim, b_res, b_alloc = _run_recording(bulk, trace)
    pd.testing.assert_frame_equal(s_res.requests, b_res.requests, check_exact=True)
    pd.testing.assert_frame_equal(s_res.steps, b_res.steps, check_exact=True)
    assert s_alloc == b_alloc, "block allocation sequences differ"
    pd.testing.assert_frame_equal(s_res.transfers, b_res.transfers, check_exact=True)
    for key in ("ttft_s", "itl_s", "e2e_s", "throughput", "kv", "links", "kv_tiers"):
        assert s_res.summary[key] == b_res.summary[key], key
    assert s_res.summary["engine"]["decode_runs"] == 0
    return b_res.summary["engine"]["decode_runs"]


# every execution mode, with the per-step work each adds outside the kernels: capture buckets (padding,
# eager fallback above the largest), the engine's host work serial and overlapped, the persistent
# kernel's dispatch, doorbells and reserved SMs
EXECUTIONS = [
    {"policies.execution.name": "cuda-graph"},
    {"policies.execution.name": "host-launched"},
    {"policies.execution.name": "cuda-graph", "policies.execution.capture_sizes": [1, 2, 4, 8],
     "policies.execution.host": "reference-h200"},
    {"policies.execution.name": "cuda-graph", "policies.execution.capture_sizes": "vllm",
     "policies.execution.host_step_s": 3e-3, "policies.execution.host_per_seq_s": 1e-4,
     "policies.execution.host_overlap": True},
    {"policies.execution.name": "host-launched", "policies.execution.host": "reference-h200",
     "policies.execution.host_overlap": True},
    {"policies.execution.name": "persistent"},
    {"policies.execution.name": "persistent", "policies.execution.scheduler_sms": 32,
     "policies.execution.queue_depth": 2, "policies.execution.poll_interval_s": 1e-5,
     "policies.execution.host_per_token_s": 2e-4, "policies.execution.host_overlap": True},
]


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def bulk_schedulers() -> list[str]:
    """Shipped schedulers that declare they can advance steady decode runs together."""
    from policies import registry
    from policies.base import SchedulingPolicy

    return [n for n in registry.known("scheduling")
            if not registry.lookup("scheduling", n).__module__.startswith("tests")
            and registry.lookup("scheduling", n).steady_decode is not SchedulingPolicy.steady_decode]


@given(trace=traces_(), scheduling=st.sampled_from(bulk_schedulers()),
       execution=st.sampled_from(EXECUTIONS),
       preemption=st.sampled_from(["recompute", "swap"]), blocks=st.integers(24, 200),
       replicas=st.integers(1, 2), prefix=st.booleans(), admission=st.sampled_from(["chunk", "prompt"]),
       eviction=st.sampled_from(shipped("eviction")), residency=st.sampled_from(shipped("residency")),
       tiers=st.sampled_from(["hbm", "dram", "dram+nvme", "store"]),
       mode=st.sampled_from(["inclusive", "exclusive"]), load=st.sampled_from(["when-faster", "always"]))
def test_decode_runs_equal_single_stepping(trace, scheduling, execution, preemption, blocks, replicas, prefix,
                                           admission, eviction, residency, tiers, mode, load):
    chunked = {"policies.scheduling.admission": admission} if scheduling == "chunked-prefill" else {}
    assert_equivalent({"policies.scheduling.name": scheduling, **execution,
                       "replica.preemption_mode": preemption, "replica.num_hbm_blocks": blocks,
                       "cluster.num_replicas": replicas, "replica.prefix_caching": prefix, **chunked,
                       "policies.eviction.name": eviction, "policies.residency.name": residency,
                       **tier_overrides(tiers, mode, load, residency)}, trace)


def test_equivalence_on_a_real_trace_slice_with_preemption():
    """The first 300 requests of the Azure conv trace, 8x compressed, in a small HBM: long decode
    runs, arrivals cutting them short, and preemptions."""
    import traces

    tr = traces.scale_rate(traces.head(traces.load_trace("azure-conv"), 300), 8.0)
    runs = assert_equivalent({"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 900,
                              "replica.preemption_mode": "swap", "replica.dram_kv_bytes": 2 * 1024**3}, tr)
    assert runs > 50


@pytest.mark.parametrize("execution", EXECUTIONS, ids=lambda e: "-".join(str(v) for v in e.values())[:60])
@pytest.mark.parametrize("scheduling", ["fcfs", "chunked-prefill"])
def test_equivalence_in_every_execution_mode(execution, scheduling):
    """Each execution mode on one fixed trace of staggered arrivals (decode runs cut by arrivals,
    chunked prompts beside decodes, batches that cross capture buckets), FCFS and chunked prefill."""
    from tests.conftest import make_trace

    rng = np.random.default_rng(7)
    n = 24
    tr = make_trace(np.sort(rng.uniform(0, 0.05, n)), rng.integers(16, 700, n), rng.integers(1, 90, n))
    runs = assert_equivalent({"policies.scheduling.name": scheduling, "replica.num_hbm_blocks": 200, **execution},
                             tr)
    assert runs > 0


def test_a_write_through_at_a_runs_last_step_starts_at_that_steps_exact_end():
    """Found by the property test: a request finishing at a run's last step wrote its prompt through
    to DRAM from SimPy's clock, which sat one ulp off the step's end on the run's path and not on the
    single-stepping one (the two reach the end by different delays); copies are now timed from the
    replica's exact clock."""
    from traces.schema import Trace

    trace = Trace(arrival_s=np.array([0.0, 0.00641296, 0.01240732, 0.01240732] + [0.11033091] * 7),
                  prompt_tokens=np.array([50, 1, 143] + [1] * 8), output_tokens=np.array([49, 1, 37] + [1] * 8),
                  request_id=np.arange(11), hash_offsets=np.array([0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
                  hash_values=np.array([10000, 10100, 10200, 10201, 10202] + [10300 + 100 * k for k in range(8)]),
                  hash_block_tokens=64, name="test", source="test")
    assert_equivalent({"policies.scheduling.name": "chunked-prefill", "policies.execution.name": "host-launched",
                       "replica.preemption_mode": "recompute", "replica.num_hbm_blocks": 24,
                       "cluster.num_replicas": 2, "replica.prefix_caching": True,
                       "policies.scheduling.admission": "chunk", "policies.eviction.name": "2q",
                       "policies.residency.name": "tiered",
                       **tier_overrides("hbm", "inclusive", "when-faster", "tiered")}, trace)


def test_a_replica_that_sleeps_until_an_arrival_schedules_it_at_the_arrivals_exact_time():
    """Found by the thorough fuzz campaign (seed 3): a decode run ended where SimPy's clock sat one ulp
    past its exact end, the replica slept from there to the next arrival and woke one ulp past that
    too, so the arrivals' first_scheduled_s differed from single stepping's by an ulp. A replica that
    sleeps until an arrival now takes the arrival's exact time as its clock."""
    from tests.conftest import make_trace

    a0, a1 = float.fromhex("0x1.99604f00de99cp-7"), float.fromhex("0x1.8ccb027806f4dp-2")
    trace = make_trace([a0, a0, a1, a1, a1, a1, a1], [1, 197, 1, 1, 1, 1, 1], [4, 31, 1, 1, 1, 1, 1])
    assert_equivalent({"policies.scheduling.name": "chunked-prefill", "policies.execution.name": "persistent",
                       "replica.preemption_mode": "recompute", "replica.num_hbm_blocks": 24,
                       "replica.prefix_caching": True, "policies.scheduling.admission": "chunk",
                       "policies.eviction.name": "2q", "policies.residency.name": "tiered",
                       "replica.kv_tier_mode": "inclusive", "replica.dram_kv_bytes": 41943040,
                       "policies.residency.load": "when-faster"}, trace)


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=traces_(), scheduling=st.sampled_from(bulk_schedulers()), prefill=st.sampled_from([1, 2]),
       preemption=st.sampled_from(["recompute", "swap"]), blocks=st.integers(24, 120), prefix=st.booleans(),
       decode_routing=st.sampled_from(shipped("routing")), max_running=st.sampled_from([2, 256]))
def test_decode_runs_equal_single_stepping_in_a_disaggregated_cluster(trace, scheduling, prefill, preemption, blocks,
                                                                      prefix, decode_routing, max_running):
    """Decode replicas advance runs while hand-offs land, reserve blocks and wait for room (the run stops
    at its first finish while one waits): the same as stepping one by one."""
    assert_equivalent({"policies.scheduling.name": scheduling, "cluster.num_replicas": 3,
                       "cluster.prefill_replicas": prefill, "cluster.decode_routing": decode_routing,
                       "cluster.decode_max_running": max_running, "cluster.handoff_bandwidth_bytes_per_s": 2e9,
                       "replica.preemption_mode": preemption, "replica.num_hbm_blocks": blocks,
                       "replica.prefix_caching": prefix}, trace)


def test_belady_on_two_replicas_sees_the_other_replicas_admissions_in_order():
    """Found by the suite under a newer Hypothesis: Belady ranks blocks by the next use of their
    prefix after the requests admitted so far, cluster-wide. One replica admitted a request while the
    other was in a decode run whose allocations were not yet made; made later, they ranked victims
    with that admission already counted and chose other blocks than single stepping. An admission now
    first brings every replica's run up to its time."""
    from tests.conftest import make_trace

    vals = [10000, 10100, 10200, 10300, 10400, 10500, 10600, 10700, 10701, 10702, 10703, 10704, 10705, 10800,
            10900, 11000, 11100, 11200, 1000, 1001, 1002, 1003, 11400, 11500, 11600, 11700, 11800, 11900, 11901,
            11902, 11903, 1000, 1001, 1002, 12000, 12001, 12002]
    off = [0, 1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16, 17, 18, 22, 23, 24, 25, 26, 27, 31, 37]
    trace = make_trace([0.0] * 15 + [0.32576264] * 5 + [0.52159948],
                       [1, 1, 1, 1, 1, 1, 1, 380, 1, 1, 1, 1, 1, 240, 1, 1, 1, 1, 1, 213, 374],
                       [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 47, 75, 76, 26, 78, 23, 55, 67, 63, 18],
                       hashes=[vals[off[i]:off[i + 1]] for i in range(len(off) - 1)], hash_block_tokens=64)
    assert_equivalent({"policies.scheduling.name": "chunked-prefill", "policies.execution.name": "cuda-graph",
                       "policies.execution.capture_sizes": "vllm", "policies.execution.host_step_s": 0.003,
                       "policies.execution.host_per_seq_s": 0.0001, "policies.execution.host_overlap": True,
                       "replica.preemption_mode": "recompute", "replica.num_hbm_blocks": 47,
                       "cluster.num_replicas": 2, "replica.prefix_caching": True,
                       "policies.scheduling.admission": "chunk", "policies.eviction.name": "belady",
                       **tier_overrides("hbm", "inclusive", "when-faster", "config")}, trace)


def test_a_hand_off_sent_at_a_decode_run_s_end_is_timed_from_that_end():
    """Found by the thorough Hypothesis profile: a backpressured hand-off sent when a decode run ends
    started its copy at SimPy's clock, one ulp past the run's exact end (the sender's clock is not at a
    step end), so its landing and the request's finish differed from single stepping by an ulp."""
    from tests.conftest import make_trace

    trace = make_trace([0.0] * 5, [1, 1, 1, 7, 5], [1, 1, 5, 2, 4])
    runs = assert_equivalent({"policies.scheduling.name": "chunked-prefill", "cluster.num_replicas": 3,
                              "cluster.prefill_replicas": 2, "cluster.decode_routing": "most-free-kv",
                              "cluster.decode_max_running": 2, "cluster.handoff_bandwidth_bytes_per_s": 2e9,
                              "replica.preemption_mode": "recompute", "replica.num_hbm_blocks": 24,
                              "replica.prefix_caching": False}, trace)
    assert runs > 0
