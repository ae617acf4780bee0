"""End-to-end invariants over random small traces crossed with every registered policy.

Each run uses a small HBM (tens of blocks) so that preemption, swapping, DRAM drops and prefix-cache
eviction all happen, and, with the KV hierarchy on, write-backs, loads and prefetches between HBM, DRAM,
NVMe and a shared store. After every step the replica checks its own invariants (queues, block tables,
pool conservation in every tier, no block on two tiers in exclusive mode, no request holding a block
nobody references, no running request with KV still loading — a hit is never served before its copy
lands); after the run we check:
  * each request finished exactly once with exactly its trace's output tokens, or was rejected;
  * time never decreases: per replica, steps start in order and never overlap; every request's
    arrival <= first scheduled <= first token <= finish;
  * KV blocks are conserved in every tier and nothing is held at the end (cached blocks may remain);
  * every lower-tier hit was carried by a load over the links.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import registry
from sim.config import with_overrides
from tests.conftest import examples, make_trace, run_checked, small_config


@st.composite
def traces_(draw):
    n = draw(st.integers(1, 24))
    gaps = draw(st.lists(st.floats(0.0, 0.4, allow_nan=False), min_size=n, max_size=n))
    arrival = np.cumsum(gaps)
    prompt = draw(st.lists(st.integers(1, 400), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 80), min_size=n, max_size=n))
    hashes = None
    if draw(st.booleans()):
        # chained prefix hashes over 64-token blocks drawn from a few shared "conversations"
        hashes = []
        for p in prompt:
            conv = draw(st.integers(0, 2))
            nblk = -(-p // 64)
            shared = draw(st.integers(0, nblk))
            hashes.append([conv * 1000 + j for j in range(shared)] + [10_000 + len(hashes) * 100 + j
                                                                     for j in range(nblk - shared)])
    return make_trace(arrival, prompt, output, hashes, 64 if hashes else None)


def _check_results(sim, res, trace):
    req = res.requests
    status = req["status"].to_numpy()
    assert set(status) <= {"finished", "rejected"}, "a request was lost"
    fin = status == "finished"
    assert (req["generated_tokens"][fin] == trace.output_tokens[fin]).all()
    for col_a, col_b in (("arrival_s", "first_scheduled_s"), ("first_scheduled_s", "first_token_s"),
                         ("first_token_s", "finish_s")):
        a, b = req[col_a][fin].to_numpy(), req[col_b][fin].to_numpy()
        assert (b >= a).all(), f"{col_b} before {col_a}"
    steps = res.steps
    for rid, g in steps.groupby("replica"):
        # every tier's bytes add up to its capacity in every step
        hbm, dram, nvme = sim.replicas[rid].kv.pools
        assert ((g["hbm_free_bytes"] + g["hbm_active_bytes"] + g["hbm_cached_bytes"])
                == hbm.num_blocks * hbm.bytes_per_block).all()
        assert (g["dram_free_bytes"] + g["dram_used_bytes"] + g["dram_cached_bytes"]
                == dram.num_blocks * dram.bytes_per_block).all()
        assert (g["nvme_free_bytes"] + g["nvme_used_bytes"] + g["nvme_cached_bytes"]
                == nvme.num_blocks * nvme.bytes_per_block).all()
        assert (g[["hbm_free_bytes", "dram_free_bytes", "nvme_free_bytes"]] >= 0).all().all()
        start = g["start_s"].to_numpy()
        end = start + g["duration_s"].to_numpy()
        assert (np.diff(start) >= 0).all(), "time went backwards"
        assert (start[1:] >= end[:-1] - 1e-12).all(), "steps overlap"
        assert (g["duration_s"] > 0).all()
    for r in sim.replicas:
        r.kv.check()
        for pool in r.kv.all_pools:
            assert pool.num_active == 0, f"{pool.tier}: {pool.num_active} blocks still held at the end"
            assert pool.num_free + pool.num_cached == pool.num_blocks
            assert pool.num_locked == 0 and pool.ready.all()
        assert not r.has_work()
    # a lower-tier hit is a copy over the links
    kt = res.summary["kv_tiers"]
    loaded = sum(kt["load_blocks"].values())
    assert loaded * sim.host_bytes_per_block <= res.summary["links"]["pcie_h2d_bytes"]
    assert (req["lower_hit_tokens"] <= req["prefix_hit_tokens"]).all()


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def shipped(kind: str) -> list[str]:
    """The registered policies of ``kind`` that ship with tiersim (not the tests' own plugins)."""
    return [n for n in registry.known(kind) if not registry.lookup(kind, n).__module__.startswith("tests")]


@given(trace=traces_(),
       scheduling=st.sampled_from(shipped("scheduling")),
       execution=st.sampled_from(shipped("execution")),
       eviction=st.sampled_from(shipped("eviction")),
       residency=st.sampled_from(shipped("residency")),
       routing=st.sampled_from(shipped("routing")),
       speculation=st.sampled_from(shipped("speculation")),
       sparsity=st.sampled_from(shipped("sparsity")),
       preemption=st.sampled_from(["recompute", "swap"]),
       block_size=st.sampled_from([4, 16]),
       blocks=st.integers(30, 90),
       replicas=st.integers(1, 2),
       bulk=st.booleans(),
       prefix=st.booleans(),
       budget=st.sampled_from([64, 512, 4096]),
       admission=st.sampled_from(["chunk", "prompt"]),
       tiers=st.sampled_from(["hbm", "dram", "dram+nvme", "store"]),
       mode=st.sampled_from(["inclusive", "exclusive"]), load=st.sampled_from(["when-faster", "always"]))
def test_invariants_hold_for_every_policy(trace, scheduling, execution, eviction, residency, routing, speculation,
                                          sparsity, preemption, block_size, blocks, replicas, bulk, prefix, budget,
                                          admission, tiers, mode, load):
    chunked = {"policies.scheduling.admission": admission} if scheduling == "chunked-prefill" else {}
    cfg = small_config(**chunked, **{
        "policies.scheduling.name": scheduling, "policies.execution.name": execution,
        "policies.eviction.name": eviction, "replica.preemption_mode": preemption,
        "policies.residency.name": residency, "policies.routing.name": routing,
        "policies.speculation.name": speculation, "policies.sparsity.name": sparsity,
        "replica.block_size_tokens": block_size, "replica.num_hbm_blocks": blocks * (16 // block_size),
        "replica.dram_kv_bytes": 40 * 2 * 16 * 32768, "cluster.num_replicas": replicas,
        "replica.bulk_decode": bulk, "replica.prefix_caching": prefix,
        "policies.scheduling.max_num_batched_tokens": budget if scheduling == "chunked-prefill" else 0,
    })
    cfg = with_overrides(cfg, tier_overrides(tiers, mode, load, residency))
    sim, res = run_checked(cfg, trace)
    _check_results(sim, res, trace)


def tier_overrides(tiers: str, mode: str, load: str, residency: str) -> dict:
    """Config keys for a KV hierarchy: which lower tiers exist (small, so that they evict too), the tier
    mode, and for the shipped residency policies the load rule (``always`` exercises loads even where
    recomputing is cheaper)."""
    out = {"replica.kv_tier_mode": mode}
    if tiers == "hbm":
        out["replica.dram_kv_bytes"] = 40 * 2 * 16 * 32768
    if "nvme" in tiers:
        out["replica.nvme_kv_bytes"] = 60 * 2 * 16 * 32768
    if tiers == "store":
        out["cluster.shared_kv_bytes"] = 80 * 2 * 16 * 32768
    if residency in ("config", "tiered"):
        out["policies.residency.load"] = load
        if residency == "config" and tiers != "hbm":
            below = {"dram": "dram", "dram+nvme": "dram", "store": "store"}[tiers]
            out["policies.residency.hbm_evict_to"] = below
            out["policies.residency.dram_evict_to"] = "nvme" if "nvme" in tiers else "drop"
            out["policies.residency.prefetch_depth"] = 2
    return out
