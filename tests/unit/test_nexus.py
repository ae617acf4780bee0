"""Decoupled prefill/decode lanes (``replica.lanes = "decoupled"``, ``sim.replica.lanes``): two independent
step streams over one KV pool, on an SM partition (static or adaptive), sharing HBM bandwidth."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import ConfigError
from sim.replica.lanes import DECODE, PREFILL, HBMShare, Partition
from tests.conftest import examples, make_trace, run_checked, small_config

H100 = {"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.num_hbm_blocks": 6000,
        "policies.scheduling.name": "chunked-prefill", "metrics.step_log": True}
DECOUPLED = {"replica.lanes": "decoupled", "replica.prefill_sm_fraction": 0.5}


def _one_decoder_and_long_prompts(n_long: int = 6):
    """One request decoding 200 tokens while long prompts keep arriving behind it: every lock-step
    mixed step makes its decode wait for a 2,048-token chunk."""
    arrival = [0.0] + [0.05 + 0.1 * k for k in range(n_long)]
    prompt = [64] + [8000] * n_long
    output = [200] + [2] * n_long
    return make_trace(arrival, prompt, output)


def test_a_decode_step_does_not_wait_for_a_long_prefill_chunk():
    tr = _one_decoder_and_long_prompts()
    lock = run_checked(small_config(**H100, **{"replica.prefill_sm_fraction": 0.5}), tr)[1]
    dec = run_checked(small_config(**H100, **DECOUPLED), tr)[1]
    assert dec.summary["requests"]["finished"] == lock.summary["requests"]["finished"] == len(tr)
    # the decoder's worst gap: a whole chunk under lock-step, one decode step on its lane decoupled
    req_l, req_d = lock.requests.set_index("request_id"), dec.requests.set_index("request_id")
    assert req_d.loc[0, "itl_max_s"] < 0.5 * req_l.loc[0, "itl_max_s"]
    assert dec.summary["itl_s"]["p99"] < 0.5 * lock.summary["itl_s"]["p99"]
    # the decode lane's steps overlap the prefill lane's chunks in time, and carry their lane and share
    s = dec.steps
    pre, de = s[s.lane == 1], s[s.lane == 2]
    assert len(pre) and len(de) and (pre.decode_seqs == 0).all() and (de.prefill_seqs == 0).all()
    assert (pre.sm_share == 0.5).all() and (de.sm_share == 0.5).all()
    p0, p1 = pre.start_s.to_numpy(), (pre.start_s + pre.duration_s).to_numpy()
    inside = [((de.start_s > a) & (de.start_s < b)).sum() for a, b in zip(p0, p1)]
    assert max(inside) >= 2
    # each lane's own steps never overlap and its clock never goes back
    for g in (pre, de):
        st_, en = g.start_s.to_numpy(), (g.start_s + g.duration_s).to_numpy()
        assert (np.diff(st_) > 0).all() and (st_[1:] >= en[:-1] - 1e-12).all()
    # lock-step logs one stream (lane 0), as before
    assert (lock.steps.lane == 0).all() and (lock.steps.sm_share == 0).all()


def test_hbm_share_stretches_only_when_the_lanes_together_exceed_the_peak():
    import simpy

    env = simpy.Environment()
    hbm = HBMShare(env, peak_bytes_per_s=1000.0)
    ends = {}

    def lane(i, start, alone, nbytes):
        yield env.timeout(start)
        ends[i] = yield from hbm.run(i, env.now, alone, nbytes)

    # decode alone 1 s at 800 B/s; prefill 0.5..1.5 s at 800 B/s: overlap 0.5 s at 500 B/s each
    env.process(lane(DECODE, 0.0, 1.0, 800.0))
    env.process(lane(PREFILL, 0.5, 1.0, 800.0))
    env.run()
    # over the overlap each progresses at 500/800; decode has 0.5 s of work left at 0.5 s
    assert ends[DECODE] == pytest.approx(0.5 + 0.5 / (500 / 800))
    t_d = ends[DECODE]
    done_p = (t_d - 0.5) * (500 / 800)
    assert ends[PREFILL] == pytest.approx(t_d + 1.0 - done_p)
    assert hbm.stretch_s[DECODE] > 0.2 and hbm.stretch_s[PREFILL] > 0.2
    # a light lane (below half the peak) keeps its speed; the heavy one gets the rest
    env2 = simpy.Environment()
    hbm = HBMShare(env2, 1000.0)
    got = {}

    def lane2(i, alone, nbytes):
        got[i] = yield from hbm.run(i, env2.now, alone, nbytes)

    env2.process(lane2(PREFILL, 1.0, 200.0))
    env2.process(lane2(DECODE, 1.0, 900.0))
    env2.run()
    assert got[PREFILL] == 1.0
    # decode runs at 800/900 while the prefill step lasts (1 s), then alone for what is left
    assert got[DECODE] == pytest.approx(1.0 + (1.0 - 800 / 900))
    # together below the peak: nobody is stretched
    env3 = simpy.Environment()
    hbm = HBMShare(env3, 1000.0)
    got.clear()

    def lane3(i, alone, nbytes):
        got[i] = yield from hbm.run(i, env3.now, alone, nbytes)

    env3.process(lane3(PREFILL, 1.0, 400.0))
    env3.process(lane3(DECODE, 0.5, 300.0))
    env3.run()
    assert got == {PREFILL: 1.0, DECODE: 0.5}


def test_a_decode_step_overlapping_a_memory_bound_chunk_takes_longer_than_alone():
    # short prompts: each prefill chunk is weight-bound (it reads all the weights for few tokens), so
    # the lanes' demands together exceed the measured peak and the decode steps that overlap stretch
    n = 40
    tr = make_trace(np.concatenate([[0.0], np.linspace(0.05, 2.0, n)]), np.r_[32, np.full(n, 24)],
                    np.r_[300, np.full(n, 2)])
    sim, res = run_checked(small_config(**H100, **DECOUPLED), tr)
    lanes = res.summary["lanes"]["replicas"][0]
    assert lanes["decode_hbm_stretch_s"] > 1e-3 and lanes["prefill_hbm_stretch_s"] > 1e-3
    s = res.steps
    de = s[s.lane == 2]
    builder = sim.replicas[0].builder
    # the same one-decode step alone on the decode lane's share
    alone = builder.lane_cost(0.5).step(np.empty(0, np.int64), np.empty(0, np.int64), 1, 400, 1, num_seqs=1)[0]
    assert de.duration_s.max() > 1.05 * alone
    # with the prefill lane idle the decode steps cost what they cost alone (to the step's context)
    assert de.duration_s.min() < 1.01 * alone


def test_adaptive_partition_follows_the_decode_batch():
    cfg = small_config(**H100, **{"replica.lanes": "decoupled", "replica.lanes_partition": "adaptive",
                                  "replica.lanes_itl_slo_s": 0.02})
    from sim.engine import Simulation
    from sim.replica.step import StepBuilder

    sim = Simulation(cfg, trace=make_trace([0.0], [10], [2]))

    cost = sim.cost_model(sim.model.name, sim.build_policy("execution", 0))
    builder = StepBuilder(cost=cost, sparsity=sim.build_policy("sparsity", 0), sm_share=1.0,
                          drafter_cost=lambda name: cost)
    part = Partition(builder, "adaptive", 0.0, 0.02)
    assert part.choose(0, 0) == Partition.GRID[-1]
    small, big = part.choose(4, 1000), part.choose(256, 4000)
    assert big < small
    # the chosen share is the largest that meets the SLO: one grid step more breaks it
    for b, ctx, p in ((4, 1000, small), (256, 4000, big)):
        t = builder.lane_cost(1.0 - p).step(np.empty(0, np.int64), np.empty(0, np.int64), b, b * (ctx + 1), b,
                                            num_seqs=b)[0]
        assert t <= 0.02 or p == Partition.GRID[0]
        if p < Partition.GRID[-1]:
            t2 = builder.lane_cost(1.0 - round(p + 0.05, 2)).step(np.empty(0, np.int64), np.empty(0, np.int64),
                                                                  b, b * (ctx + 1), b, num_seqs=b)[0]
            assert t2 > 0.02
    # in a run, the logged prefill share changes as the decode batch grows
    n = 120
    tr = make_trace(np.linspace(0, 1.5, n), np.full(n, 1500), np.full(n, 120))
    res = run_checked(cfg, tr)[1]
    pre = res.steps[res.steps.lane == 1]
    assert pre.sm_share.nunique() >= 2 and pre.sm_share.min() < Partition.GRID[-1]


def test_unsupported_combinations_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="replica.prefill_sm_fraction"):
        small_config(**{"replica.lanes": "decoupled"})
    with pytest.raises(ConfigError, match="replica.preemption_mode"):
        small_config(**DECOUPLED, **{"replica.preemption_mode": "swap"})
    with pytest.raises(ConfigError, match="replica.lanes_partition"):
        small_config(**{"replica.lanes_partition": "adaptive"})
    with pytest.raises(ConfigError, match="replica.lanes"):
        small_config(**{"replica.lanes": "sideways"})
    with pytest.raises(ConfigError, match="replica.prefill_sm_fraction"):
        small_config(**{"replica.lanes": "decoupled", "replica.lanes_partition": "adaptive",
                        "replica.prefill_sm_fraction": 0.5})
    from policies.registry import registered
    from sim.engine import Simulation
    from tests.unit.test_policy_hooks import _Observing, _Window

    tr = make_trace([0.0], [10], [2])
    with registered(("sparsity", "test-nexus-window", _Window), ("scheduling", "test-nexus-sched", _Observing)):
        for key, name in (("policies.speculation.name", "fixed-k"), ("policies.sparsity.name", "test-nexus-window"),
                          ("policies.scheduling.name", "test-nexus-sched")):
            cfg = small_config(**DECOUPLED, **{key: name})
            with pytest.raises(ConfigError, match=key):
                Simulation(cfg, trace=tr)
        cfg = small_config(**DECOUPLED, **{"cluster.num_replicas": 2, "cluster.prefill_replicas": 1})
        with pytest.raises(ConfigError, match="cluster.prefill_replicas"):
            Simulation(cfg, trace=tr)
        Simulation(small_config(**DECOUPLED), trace=tr)     # the supported combination builds


def test_lockstep_configs_keep_their_hash():
    a = small_config()
    b = small_config(**{"replica.lanes": "lockstep"})
    assert a.hash() == b.hash() and "lanes" not in a.to_dict()["replica"]
    assert small_config(**DECOUPLED).hash() != a.hash()


def test_a_lanes_key_set_reads_back_the_same_and_an_unused_one_is_refused(tmp_path):
    """Found by the config fuzz test: lock-step configs dropped the lanes keys when written, so a set
    ``replica.lanes_itl_slo_s`` was lost on the way through TOML. Under lock-step lanes it is unused
    and now refused; set with adaptive lanes it reads back."""
    from sim.config import load_config

    with pytest.raises(ConfigError, match="replica.lanes_itl_slo_s"):
        small_config(**{"replica.lanes_itl_slo_s": 1.0})
    c = small_config(**{"replica.lanes": "decoupled", "replica.lanes_partition": "adaptive",
                        "replica.lanes_itl_slo_s": 1.0})
    (tmp_path / "c.toml").write_text(c.to_toml())
    assert load_config(tmp_path / "c.toml") == c and c.hash() != small_config().hash()


@st.composite
def _traces(draw):
    n = draw(st.integers(1, 20))
    gaps = draw(st.lists(st.floats(0.0, 0.3, allow_nan=False), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 700), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    return make_trace(np.cumsum(gaps), prompt, output)


@settings(max_examples=examples(25))
@given(tr=_traces(), sched=st.sampled_from(["chunked-prefill", "fcfs"]),
       part=st.sampled_from([("static", 0.3), ("static", 0.8), ("adaptive", 0.0)]),
       blocks=st.sampled_from([48, 400]))
def test_decoupled_lanes_lose_nothing_and_conserve_blocks(tr, sched, part, blocks):
    over = {"replica.lanes": "decoupled", "replica.lanes_partition": part[0], "replica.prefill_sm_fraction": part[1],
            "policies.scheduling.name": sched, "replica.num_hbm_blocks": blocks, "metrics.step_log": True}
    if sched == "chunked-prefill":
        over["policies.scheduling.max_num_batched_tokens"] = 256
    sim, res = run_checked(small_config(**over), tr)
    req = res.requests
    status = req["status"].to_numpy()
    assert set(status) <= {"finished", "rejected"}, "a request was lost"
    fin = status == "finished"
    assert (req["generated_tokens"][fin] == tr.output_tokens[fin]).all()
    assert len(req) == len(tr) and req["request_id"].is_unique
    for a, b in (("arrival_s", "first_scheduled_s"), ("first_scheduled_s", "first_token_s"),
                 ("first_token_s", "finish_s")):
        assert (req[b][fin].to_numpy() >= req[a][fin].to_numpy()).all()
    s = res.steps
    hbm = sim.replicas[0].kv.hbm
    assert ((s.hbm_free_bytes + s.hbm_active_bytes + s.hbm_cached_bytes) == hbm.num_blocks * hbm.bytes_per_block).all()
    for lane in (1, 2):
        g = s[s.lane == lane]
        st_, en = g.start_s.to_numpy(), (g.start_s + g.duration_s).to_numpy()
        assert (np.diff(st_) >= 0).all() and (st_[1:] >= en[:-1] - 1e-12).all()
        assert (g.duration_s > 0).all()
    assert set(s.lane) <= {1, 2}
    r = sim.replicas[0]
    r.kv.check()
    for pool in r.kv.all_pools:
        assert pool.num_active == 0 and pool.num_free + pool.num_cached == pool.num_blocks
    assert not r.has_work()


def test_decoupled_runs_are_deterministic():
    tr = _one_decoder_and_long_prompts(3)
    cfg = small_config(**H100, **{"replica.lanes": "decoupled", "replica.lanes_partition": "adaptive"})
    a, b = run_checked(cfg, tr)[1], run_checked(cfg, tr)[1]
    assert a.summary["ttft_s"] == b.summary["ttft_s"] and a.summary["itl_s"] == b.summary["itl_s"]
    assert a.steps.equals(b.steps)


def test_a_lane_that_sleeps_until_an_arrival_schedules_it_at_the_arrivals_exact_time():
    """Found by a search over small traces: the prefill lane slept from a step end to the next arrival
    and woke one ulp past it, so the request's first_scheduled_s was an ulp after its arrival (the
    replica's own sleep had the same defect, fixed in 6381368). The lane now takes the arrival's exact
    time as its clock."""
    arrival = [float.fromhex(x) for x in ("0x1.0f865ac5d0d78p-8", "0x1.7cca43b308abdp-2", "0x1.19f37b74af474p+0")]
    tr = make_trace(arrival, [192, 45, 225], [33, 7, 11])
    res = run_checked(small_config(**DECOUPLED, **{"policies.scheduling.name": "chunked-prefill"}), tr)[1]
    wait = res.requests.first_scheduled_s.to_numpy() - res.requests.arrival_s.to_numpy()
    ulps = 4 * np.spacing(res.requests.arrival_s.to_numpy())
    assert ((wait == 0) | (wait > ulps)).all(), wait
    assert (wait == 0).any()
