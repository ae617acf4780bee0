"""The KV of drafts over random traces: every speculation policy, drafter and acceptance model, with
preemption (recompute and swap), prefix caching and a small HBM.

After every step the replica checks its invariants (``Replica.check``): a running request holds
exactly the blocks its computed tokens need, so the lookahead slots of rejected drafts were released
through the KV owner, and the drafter's KV never runs ahead of the target's. After the run: every
request finished with its output tokens or was rejected, every block is free, and the speculation
counters add up (accepted drafts are the tokens that came out beside each step's own).
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import examples, run_checked, small_config
from tests.property.test_engine_invariants import _check_results, traces_


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=traces_(),
       policy=st.sampled_from([("fixed-k", {"k": 3}), ("fixed-k", {"k": 7}), ("adaptive-k", {"k_max": 5}),
                               ("tree", {"width": 3, "depth": 3})]),
       drafter=st.sampled_from(["none", "model", "eagle", "medusa", "ngram"]),
       acceptance=st.sampled_from([{"acceptance": "iid", "alpha": 0.6}, {"acceptance": "iid", "alpha": 1.0},
                                   {"acceptance": "forced", "reject_stride": 2},
                                   {"acceptance": "positional", "alphas": [0.9, 0.6, 0.3]},
                                   {"acceptance": "empirical", "file": "eagle3-llamacpp"}]),
       preemption=st.sampled_from(["recompute", "swap"]), block_size=st.sampled_from([4, 16]),
       blocks=st.integers(24, 90), prefix=st.booleans(), scheduling=st.sampled_from(["fcfs", "chunked-prefill"]),
       replicas=st.integers(1, 2), lazy=st.booleans())
def test_rejected_drafts_leave_no_kv_behind(trace, policy, drafter, acceptance, preemption, block_size, blocks, prefix,
                                            scheduling, replicas, lazy):
    name, own = policy
    depth = own.get("k", own.get("k_max", own.get("depth")))
    if acceptance.get("file") and depth > 3:
        own = {k: min(v, 3) if k in ("k", "k_max", "depth") else v for k, v in own.items()}
    if drafter == "medusa":
        own = {**own, "medusa_heads": 7}
    params = {"name": name, "drafter": drafter, "draft_prefill": "lazy" if lazy else "eager", **own, **acceptance}
    cfg = small_config(**{f"policies.speculation.{k}": v for k, v in params.items()}, **{
        "policies.scheduling.name": scheduling, "replica.preemption_mode": preemption,
        "replica.block_size_tokens": block_size, "replica.num_hbm_blocks": blocks * (16 // block_size),
        "replica.dram_kv_bytes": 40 * 2 * 16 * 32768 * 2, "replica.prefix_caching": prefix,
        "cluster.num_replicas": replicas, "policies.scheduling.watermark": 0.0})
    sim, res = run_checked(cfg, trace)
    _check_results(sim, res, trace)
    sp = res.summary["speculation"]
    assert 0 <= sp["accepted_tokens"] <= sp["draft_depth_tokens"] <= sp["proposed_tokens"]
    extra = int(sim.requests.extra_tokens.sum())      # accepted drafts of finished requests
    assert extra <= sp["accepted_tokens"]
    if res.summary["requests"]["rejected"] == 0:
        assert extra == sp["accepted_tokens"]
    steps = res.steps
    assert int(steps["accepted_tokens"].sum()) == sp["accepted_tokens"]
    assert (steps["draft_kv_bytes"] >= 0).all() and (steps["accepted_tokens"] <= steps["draft_tokens"]).all()
