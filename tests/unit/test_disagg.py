"""Prefill/decode disaggregation (``cluster.prefill_replicas``, ``sim.handoff``): the hand-off's time is
its bytes over the link plus the latency, exactly, and sits in the gap between the first and the second
token; backpressure holds a request's KV on its prefill replica until a decode replica has room; the
prefill pool only prefills, the decode pool only decodes; bad combinations fail naming the key."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sim.errors import ConfigError
from tests.conftest import make_trace, run_checked, small_config

BW, LAT = 25e9, 20e-6        # an RDMA-class hand-off link, so the transfer is visible in the times


def _disagg(**kw):
    return small_config(**{"cluster.num_replicas": 2, "cluster.prefill_replicas": 1,
                           "cluster.handoff_bandwidth_bytes_per_s": BW, "cluster.handoff_latency_s": LAT, **kw})


def test_handoff_takes_bytes_over_bandwidth_plus_latency_and_sits_in_the_second_token_gap():
    tr = make_trace([0.0], [100], [2])
    sim, res = run_checked(_disagg(), tr)
    mixed_sim, mixed = run_checked(small_config(), tr)
    req, steps = res.requests.iloc[0], res.steps
    nbytes = -(-100 // 16) * sim.host_bytes_per_block
    assert req["handoff_bytes"] == nbytes
    assert req["prefill_replica"] == 0 and req["decode_replica"] == 1 and req["replica"] == 1
    hand = LAT + nbytes / BW
    assert math.isclose(req["handoff_wait_s"], hand, rel_tol=1e-12)
    assert req["handoff_backpressure_s"] == 0.0
    # TTFT ends on the prefill replica, with the same prefill step a mixed replica runs
    pre = steps[steps.replica == 0]
    dec = steps[steps.replica == 1]
    assert len(pre) == 1 and len(dec) == 1
    assert req["first_token_s"] == pre.start_s.iloc[0] + pre.duration_s.iloc[0]
    assert req["ttft_s"] == mixed.requests.ttft_s.iloc[0]
    # the decode replica starts its step when the KV lands; the second token's gap holds the hand-off
    landed = req["first_token_s"] + hand
    assert math.isclose(dec.start_s.iloc[0], landed, rel_tol=1e-12)
    gap = req["finish_s"] - req["first_token_s"]
    assert math.isclose(req["itl_max_s"], gap, rel_tol=1e-12)
    assert math.isclose(gap, hand + dec.duration_s.iloc[0], rel_tol=1e-12)
    mixed_gap = mixed.requests.finish_s.iloc[0] - mixed.requests.first_token_s.iloc[0]
    assert math.isclose(gap - mixed_gap, hand, rel_tol=1e-6)
    # the bytes and the busy time are the network link's, in the transfer log and the link stats
    t = res.transfers
    assert list(t.what) == ["handoff"] and list(t.link) == ["network"] and t.bytes.iloc[0] == nbytes
    net = res.summary["link_stats"]["network"]
    assert net["bytes"] == nbytes and net["transfers"] == 1 and math.isclose(net["busy_s"], hand, rel_tol=1e-12)
    assert res.summary["links"]["network_bytes"] == nbytes
    ho = res.summary["handoff"]
    assert ho["requests"] == 1 and ho["bytes"] == nbytes and ho["link_bandwidth_bytes_per_s"] == BW
    assert math.isclose(ho["wait_s"]["max"], hand, rel_tol=1e-12)


def test_default_link_is_the_gpus_nvlink_times_tensor_parallel_shards():
    tr = make_trace([0.0], [100], [2])
    sim, res = run_checked(small_config(**{"cluster.num_replicas": 2, "cluster.prefill_replicas": 1}), tr)
    assert res.summary["handoff"]["link_bandwidth_bytes_per_s"] == sim.gpu.nvlink_bandwidth_bytes_per_s
    sim2, res2 = run_checked(small_config(**{"cluster.num_replicas": 2, "cluster.prefill_replicas": 1,
                                             "replica.tensor_parallel_size": 2}), tr)
    assert res2.summary["handoff"]["link_bandwidth_bytes_per_s"] == 2 * sim.gpu.nvlink_bandwidth_bytes_per_s
    # the same bytes (two shards of half the KV heads each), each GPU sending its own: half the time
    nbytes = res.requests.handoff_bytes.iloc[0]
    assert res2.requests.handoff_bytes.iloc[0] == nbytes
    bw = sim.gpu.nvlink_bandwidth_bytes_per_s
    assert math.isclose(res2.requests.handoff_transfer_s.iloc[0], 5e-6 + nbytes / (2 * bw), rel_tol=1e-12)
    assert math.isclose(res.requests.handoff_transfer_s.iloc[0], 5e-6 + nbytes / bw, rel_tol=1e-12)


def test_a_request_with_one_output_token_never_hands_off():
    tr = make_trace([0.0, 0.0], [100, 60], [1, 4])
    sim, res = run_checked(_disagg(), tr)
    r = res.requests
    assert r.replica.tolist() == [0, 1]
    assert r.decode_replica.tolist() == [-1, 1] and r.handoff_bytes.iloc[0] == 0
    assert np.isnan(r.handoff_wait_s.iloc[0]) and np.isfinite(r.handoff_wait_s.iloc[1])
    assert res.summary["handoff"]["requests"] == 1 and len(res.transfers) == 1


@pytest.mark.parametrize("bulk", [True, False])
def test_backpressure_holds_the_kv_on_the_prefill_replica_until_the_decode_replica_has_room(bulk):
    # 20 blocks of 16 tokens per replica; each prompt takes 13. A lands first and decodes; B's 13 blocks
    # do not fit beside A's on the decode replica, so B waits at the prefill side holding them, and C
    # (13 more) cannot prefill there until B's KV has left
    tr = make_trace([0.0, 0.001, 0.002], [200, 200, 200], [60, 5, 5])
    sim, res = run_checked(_disagg(**{"replica.num_hbm_blocks": 20, "replica.bulk_decode": bulk}), tr)
    a, b, c = (res.requests.iloc[i] for i in range(3))
    assert (res.requests.status == "finished").all()
    assert a.handoff_backpressure_s == 0.0
    assert b.handoff_backpressure_s > 0
    # B is taken the moment A's last step ends and frees A's blocks
    assert math.isclose(b.first_token_s + b.handoff_backpressure_s, a.finish_s, rel_tol=1e-12)
    landed_b = b.first_token_s + b.handoff_wait_s
    assert c.first_scheduled_s >= landed_b - 1e-12 > a.finish_s
    # the wait is part of B's hand-off and of its second token's gap
    assert b.itl_max_s >= b.handoff_wait_s
    ho = res.summary["handoff"]
    assert ho["backpressured_requests"] >= 1 and ho["times_blocked"] >= 1
    assert math.isclose(ho["backpressure_s"]["max"], max(b.handoff_backpressure_s, c.handoff_backpressure_s))
    # the decode replica decodes only; the prefill replica only prefills
    steps = res.steps
    assert (steps[steps.replica == 1].prefill_tokens == 0).all()
    assert (steps[steps.replica == 0].decode_seqs == 0).all()
    assert ho["decode_prefill_tokens"] == 0


def test_a_decode_replica_that_preempts_prefills_the_request_again_itself():
    # two 100-token prompts (7 blocks each) decode 150 tokens each on a 20-block decode replica: they
    # outgrow it, the later one is recompute-preempted there, and that replica prefills its prompt
    # and the tokens it had generated again (no second hand-off)
    tr = make_trace([0.0, 0.001], [100, 100], [150, 150])
    sim, res = run_checked(_disagg(**{"replica.num_hbm_blocks": 20}), tr)
    r = res.requests
    assert (r.status == "finished").all() and r.decode_replica.tolist() == [1, 1]
    assert r.preemptions.tolist() == [0, 1]
    again = res.summary["handoff"]["decode_prefill_tokens"]
    steps = res.steps
    assert again == steps[steps.replica == 1].prefill_tokens.sum() > 100     # the prompt and what it had made
    assert res.summary["handoff"]["requests"] == 2 and len(res.transfers[res.transfers.what == "handoff"]) == 2


def test_bulk_decode_runs_on_the_decode_replica_match_single_steps():
    rng = np.random.default_rng(3)
    n = 30
    tr = make_trace(np.cumsum(rng.uniform(0, 0.02, n)), rng.integers(20, 300, n), rng.integers(1, 120, n))
    got = []
    for bulk in (True, False):
        _, res = run_checked(_disagg(**{"replica.num_hbm_blocks": 60, "replica.bulk_decode": bulk,
                                        "cluster.num_replicas": 3}), tr)
        got.append(res.requests)
    for col in ("first_token_s", "finish_s", "handoff_wait_s", "decode_replica", "itl_p99_s"):
        assert np.allclose(got[0][col].to_numpy(float), got[1][col].to_numpy(float), rtol=1e-9, equal_nan=True), col


def test_decode_max_running_makes_hand_offs_wait():
    tr = make_trace([0.0, 0.0], [50, 50], [40, 40])
    _, res = run_checked(_disagg(**{"cluster.decode_max_running": 1}), tr)
    a, b = res.requests.iloc[0], res.requests.iloc[1]
    first, second = (a, b) if a.first_token_s <= b.first_token_s else (b, a)
    assert second.handoff_backpressure_s > 0
    assert math.isclose(second.first_token_s + second.handoff_backpressure_s, first.finish_s, rel_tol=1e-12)
    _, free = run_checked(_disagg(), tr)
    assert (free.requests.handoff_backpressure_s == 0).all()


def test_decode_routing_spreads_hand_offs_over_the_decode_pool():
    tr = make_trace([0.0, 0.0, 0.0, 0.0], [50, 50, 50, 50], [30, 30, 30, 30])
    for name in ("most-free-kv", "round-robin"):
        _, res = run_checked(_disagg(**{"cluster.num_replicas": 3, "cluster.decode_routing": name}), tr)
        assert sorted(res.requests.decode_replica.tolist()) == [1, 1, 2, 2], name
        assert set(res.transfers.replica) == {0}
        assert res.summary["handoff"]["decode_routing"] == name


def test_mixed_runs_carry_no_hand_off_figures():
    _, res = run_checked(small_config(**{"cluster.num_replicas": 2}), make_trace([0.0, 0.0], [100, 60], [3, 4]))
    assert "handoff" not in res.summary and "network_bytes" not in res.summary["links"]
    assert "handoff_wait_s" not in res.requests.columns and "network" not in res.summary["link_stats"]


@pytest.mark.parametrize("overrides, match", [
    ({"cluster.prefill_replicas": 1}, "cluster.prefill_replicas.*leave no decode replica"),
    ({"cluster.num_replicas": 2, "cluster.prefill_replicas": 2}, "cluster.prefill_replicas"),
    ({"cluster.num_replicas": 2, "cluster.prefill_replicas": -1}, "cluster.prefill_replicas"),
    ({"cluster.handoff_bandwidth_bytes_per_s": -1.0}, "cluster.handoff_bandwidth_bytes_per_s"),
    ({"cluster.handoff_latency_s": -1e-6}, "cluster.handoff_latency_s"),
    ({"cluster.decode_max_running": 0}, "cluster.decode_max_running"),
])
def test_bad_combinations_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        small_config(**overrides)


def test_speculation_and_unknown_decode_routers_are_refused_with_the_key():
    from sim.engine import Simulation

    tr = make_trace([0.0], [10], [2])
    with pytest.raises(ConfigError, match="cluster.prefill_replicas.*speculat"):
        Simulation(_disagg(**{"policies.speculation.name": "fixed-k"}), trace=tr)
    with pytest.raises(ConfigError, match=r"cluster.decode_routing.*'nope'.*round-robin"):
        Simulation(_disagg(**{"cluster.decode_routing": "nope"}), trace=tr)


def test_a_prompt_whose_last_token_runs_alone_hands_off_after_its_first_token():
    # a 64-token chunk leaves the prompt's 65th token for a one-token step: the request must sample its
    # first token on the prefill replica, not leave with 64 tokens of KV (found by the property test)
    tr = make_trace([0.0], [65], [3])
    sim, res = run_checked(_disagg(**{"policies.scheduling.name": "chunked-prefill",
                                      "policies.scheduling.max_num_batched_tokens": 64,
                                      "replica.block_size_tokens": 4, "replica.num_hbm_blocks": 120}), tr)
    r = res.requests.iloc[0]
    assert r.handoff_bytes == 17 * sim.host_bytes_per_block
    pre = res.steps[res.steps.replica == 0]
    assert len(pre) == 2 and r.first_token_s == pre.start_s.iloc[1] + pre.duration_s.iloc[1]
    assert (res.steps[res.steps.replica == 1].prefill_tokens == 0).all()
