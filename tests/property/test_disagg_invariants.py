"""End-to-end invariants of a disaggregated cluster (``cluster.prefill_replicas``): random small traces
on 3 replicas, 1 or 2 of them prefill-only, crossed with the shipped schedulers, routers (arrival and
decode), preemption modes, bulk decode and prefix caching, with and without lower KV tiers and a shared
store, in an HBM small enough that hand-offs wait for room. Besides every invariant of
``test_engine_invariants`` (each request finished once with its tokens or rejected, time monotone, KV
conserved on every tier of every replica and nothing held at the end, checked after every step too),
here:
  * a request with more than one output token sampled its first token on a prefill replica and
    finished on a decode replica, after exactly one hand-off; one with a single token never left;
  * prefill replicas never decode and decode replicas prefill only what they recompute after a
    preemption; the hand-off bytes are the request's prompt blocks, and the network link's bytes,
    transfers and busy time are the sum of the hand-offs';
  * each hand-off's wait = backpressure + link queueing + transfer, all >= 0.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import with_overrides
from tests.conftest import examples, run_checked, small_config
from tests.property.test_engine_invariants import _check_results, shipped, tier_overrides, traces_


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=traces_(), prefill=st.sampled_from([1, 2]),
       scheduling=st.sampled_from(shipped("scheduling")), routing=st.sampled_from(shipped("routing")),
       decode_routing=st.sampled_from(shipped("routing")), preemption=st.sampled_from(["recompute", "swap"]),
       block_size=st.sampled_from([4, 16]), blocks=st.integers(30, 90), bulk=st.booleans(),
       prefix=st.booleans(), budget=st.sampled_from([64, 512, 4096]), max_running=st.sampled_from([1, 3, 256]),
       bandwidth=st.sampled_from([0.0, 1e9]), residency=st.sampled_from(shipped("residency")),
       tiers=st.sampled_from(["hbm", "dram", "store"]), mode=st.sampled_from(["inclusive", "exclusive"]))
def test_disaggregated_invariants(trace, prefill, scheduling, routing, decode_routing, preemption, block_size,
                                  blocks, bulk, prefix, budget, max_running, bandwidth, residency, tiers, mode):
    cfg = small_config(**{
        "cluster.num_replicas": 3, "cluster.prefill_replicas": prefill,
        "cluster.decode_routing": decode_routing, "cluster.decode_max_running": max_running,
        "cluster.handoff_bandwidth_bytes_per_s": bandwidth,
        "policies.scheduling.name": scheduling, "policies.routing.name": routing,
        "replica.preemption_mode": preemption, "replica.block_size_tokens": block_size,
        "replica.num_hbm_blocks": blocks * (16 // block_size), "replica.dram_kv_bytes": 40 * 2 * 16 * 32768,
        "replica.bulk_decode": bulk, "replica.prefix_caching": prefix,
        "policies.scheduling.max_num_batched_tokens": budget if scheduling == "chunked-prefill" else 0,
        "policies.residency.name": residency,
    })
    # lower KV tiers: evictions written back, write-through on release (the sender's prompt blocks
    # after a hand-off), loads and prefetch of prefix hits on the prefill replicas
    cfg = with_overrides(cfg, tier_overrides(tiers, mode, "always", residency))
    sim, res = run_checked(cfg, trace)
    _check_results(sim, res, trace)
    req = res.requests
    fin = (req.status == "finished").to_numpy()
    out = trace.output_tokens
    moved = fin & (out > 1)
    src, dst = req.prefill_replica.to_numpy(), req.decode_replica.to_numpy()
    assert ((src[moved] >= 0) & (src[moved] < prefill)).all(), "first token not sampled on a prefill replica"
    assert ((dst[moved] >= prefill) & (req.replica.to_numpy()[moved] == dst[moved])).all()
    single = fin & (out == 1)
    assert (dst[single] == -1).all() and (req.replica.to_numpy()[single] < prefill).all()
    t = res.transfers
    ho = t[t.what == "handoff"] if len(t) else t
    counts = ho.request.value_counts() if len(ho) else {}
    assert all(c == 1 for c in dict(counts).values()), "a request handed off twice"
    assert set(dict(counts)) == set(np.flatnonzero(moved).tolist())
    bs, bpb = sim.config.replica.block_size_tokens, sim.host_bytes_per_block
    nbytes = req.handoff_bytes.to_numpy()
    want = -(-trace.prompt_tokens // bs) * bpb
    assert (nbytes[moved] == want[moved]).all() and (nbytes[~moved] == 0).all()
    net = res.summary["link_stats"].get("network", {"bytes": 0, "transfers": 0, "busy_s": 0.0})
    assert net["bytes"] == nbytes.sum() and net["transfers"] == moved.sum()
    assert math.isclose(net["busy_s"], float((ho.end_s - ho.start_s).sum()) if len(ho) else 0.0,
                        rel_tol=1e-9, abs_tol=1e-15)
    h = sim.cluster.handoffs
    bp, xfer = req.handoff_backpressure_s.to_numpy()[moved], req.handoff_transfer_s.to_numpy()[moved]
    queue = (h.start_s - h.reserved_s)[moved]
    assert (bp >= 0).all() and (queue >= 0).all() and (xfer > 0).all()
    assert np.allclose(req.handoff_wait_s.to_numpy()[moved], bp + queue + xfer, rtol=1e-9, atol=1e-15)
    steps = res.steps
    # a prefill replica decodes at most a prompt's last token (a one-token step that samples the first
    # token); each replica's check() asserts after every step that nothing there has generated more
    assert steps[steps.replica < prefill].decode_seqs.sum() <= len(trace), "a prefill replica decoded"
    if not req.preemptions.to_numpy()[fin].any():
        assert (steps[steps.replica >= prefill].prefill_tokens == 0).all(), "a decode replica prefilled"
    assert not h.queue and h.in_flight == 0
