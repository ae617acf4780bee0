"""Exact scenarios of the KV hierarchy: where evicted blocks go, what a lower-tier hit costs on which
links, who waits for what, and what each mode keeps.

The base scenario: Llama-3.1-8B (2 MiB per 16-token block), an HBM of 110 blocks. Request A (1,600
tokens: 100 full blocks) finishes; B (1,600 unrelated tokens) evicts A's blocks, tail first; C repeats
A's prompt (or its head) and looks for it below HBM.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_trace, run_checked, small_config

MIB2 = 2 * 1024**2      # bytes of one 16-token block of Llama-3.1-8B at bf16


def _abc(c_shared_hash_blocks: int = 25, c_arrival: float = 2.0, extra=None):
    a = list(range(1, 26))                           # 25 hash blocks of 64 tokens = 1,600 tokens
    b = list(range(100, 125))
    c = a[:c_shared_hash_blocks] + list(range(200, 225 - c_shared_hash_blocks))
    hashes = [a, b, c] + (extra or [])
    n = len(hashes)
    arrival = [0.0, 1.0, c_arrival] + [c_arrival + 0.001 * i for i in range(1, n - 2)]
    return make_trace(arrival, [1600] * n, [2] * n, hashes, 64)


def _cfg(**kw):
    return small_config(**{"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 110,
                           "policies.scheduling.watermark": 0.0, "replica.dram_kv_bytes": 400 * MIB2, **kw})


def _reqs(res):
    return res.requests.set_index("request_id")


def test_written_back_blocks_are_hit_in_dram_and_loaded_over_pcie():
    _, drop = run_checked(_cfg(), _abc())
    sim, res = run_checked(_cfg(**{"policies.residency.hbm_evict_to": "dram"}), _abc())
    r, s = _reqs(res), res.summary
    # dropped: C finds only what B left of A in HBM (A's head); written back: all of it, the rest from DRAM
    hbm_left = int(_reqs(drop).loc[2, "prefix_hit_tokens"]) // 16
    assert 0 < hbm_left < 99
    assert r.loc[2, "prefix_hit_tokens"] == 99 * 16                  # (1600 - 1) // 16 blocks
    assert r.loc[2, "lower_hit_tokens"] == (99 - hbm_left) * 16
    bpb = sim.host_bytes_per_block
    assert bpb == MIB2
    assert s["links"]["pcie_h2d_bytes"] == (99 - hbm_left) * bpb
    # every evicted (cached, keyed) block was written back over D2H
    evicted = s["kv"]["hbm_evicted_blocks"]
    assert s["kv_tiers"]["write_blocks"]["hbm->dram"] == s["kv_tiers"]["demoted_blocks"]["hbm"] == evicted > 0
    assert s["links"]["pcie_d2h_bytes"] == evicted * bpb
    # C waited for its copy: from its admission to the copy's landing, which its TTFT includes
    t = res.transfers
    load = t[(t["what"] == "load") & (t["request"] == 2)]
    assert list(load["link"]) == ["pcie_h2d"]
    assert r.loc[2, "kv_stall_s"] == pytest.approx(float(load["end_s"].iloc[0]) - r.loc[2, "first_scheduled_s"])
    assert r.loc[2, "kv_stall_s"] > 0
    assert r.loc[2, "ttft_s"] < _reqs(drop).loc[2, "ttft_s"]         # loading 2 MiB blocks beats recomputing
    assert s["kv_tiers"]["stall"]["requests"] == 1


def test_a_block_is_findable_below_only_once_its_copy_has_landed():
    from policies.residency.config import ConfigResidency, ConfigResidencyParams
    from sim.memory.tiers import TieredKV
    from sim.request import Request

    class View:
        tiers, tier_mode = ("hbm", "dram"), "inclusive"

    lru = __import__("policies.eviction.lru", fromlist=["LRU"]).LRU()
    kv = TieredKV(block_size=16, hbm_blocks=4, dram_blocks=8, nvme_blocks=0, hbm_bytes_per_block=1,
                  host_bytes_per_block=1, prefix_caching=True, eviction=lru)
    kv.attach(residency=ConfigResidency(ConfigResidencyParams(hbm_evict_to="dram")), view=View(), links={},
              prefill_s=lambda n, c: 1.0)
    keys = np.arange(10, 14, dtype=np.int64)
    a = Request(idx=0, req_id=0, arrival_s=0.0, prompt_tokens=64, output_tokens=1, hash_keys=keys)
    assert kv.grow(a, 64, 0.0)
    a.num_computed = 64
    kv.register_computed(a, 0.0)
    kv.release(a, 1.0)                                   # 4 cached HBM blocks
    b = Request(idx=1, req_id=1, arrival_s=1.0, prompt_tokens=48, output_tokens=1)
    assert kv.grow(b, 48, 2.0)                           # evicts 3 of them, tail first: written back
    (move,) = kv.take_moves()
    assert move.kind == "write" and move.links == ("pcie_d2h",) and move.keys.tolist() == [13, 12, 11]
    assert kv.take_waits("hbm") == [move]                # b's prefill must wait for the copy
    assert kv.dram.find(keys).tolist() == [-1] * 4       # on the link: not findable yet
    assert kv.dram.num_active == 3
    kv.land(move, 2.5)
    assert (kv.dram.find(keys[1:]) >= 0).all() and kv.dram.num_cached == 3 and kv.dram.num_active == 0
    c = Request(idx=2, req_id=2, arrival_s=3.0, prompt_tokens=80, output_tokens=1, hash_keys=keys)
    lk = kv.lookup(c)
    assert (lk.found, lk.hbm_lead, lk.counts) == (4, 1, (1, 3, 0, 0))
    kv.check()


def test_nvme_hits_cross_the_nvme_read_and_pcie_links_in_turn():
    cfg = _cfg(**{"policies.residency.hbm_evict_to": "nvme", "replica.nvme_kv_bytes": 400 * MIB2,
                  "policies.residency.load": "always"})
    sim, res = run_checked(cfg, _abc())
    t = res.transfers
    wb = t[t["what"] == "writeback"]
    assert set(wb["link"]) == {"pcie_d2h", "nvme_write"}            # HBM -> host -> NVMe
    load = t[(t["what"] == "load") & (t["request"] == 2)].sort_values("start_s")
    assert list(load["link"]) == ["nvme_read", "pcie_h2d"]
    assert float(load["start_s"].iloc[1]) >= float(load["end_s"].iloc[0])
    assert res.summary["kv_tiers"]["token_hit_rate"]["nvme"] > 0


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
def test_inclusive_tiers_keep_a_promoted_copy_and_exclusive_ones_free_it(mode):
    cfg = _cfg(**{"policies.residency.name": "tiered", "replica.kv_tier_mode": mode,
                  "policies.residency.prefetch_depth": 0})
    sim, res = run_checked(cfg, _abc())
    kv = sim.replicas[0].kv
    keys = sim.replicas[0].kv.hbm.key
    a_keys = set(keys[keys >= 0].tolist())
    in_dram = {int(k) for k in kv.dram.key[kv.dram.key >= 0]}
    loaded = _reqs(res).loc[2, "lower_hit_tokens"] // 16
    assert loaded > 0
    if mode == "inclusive":
        assert res.summary["kv_tiers"]["write_blocks"]["hbm->dram"] >= 200      # written through on release
        assert len(a_keys & in_dram) >= loaded                             # promoted and still below
    else:
        assert "hbm->dram" in res.summary["kv_tiers"]["write_blocks"]     # moved down on eviction
        assert not (a_keys & in_dram)                                      # one tier at a time
    kv.check()


def test_a_load_keeps_its_lower_tier_copies_through_the_cascade_its_allocation_starts():
    # exclusive tiers, DRAM of 100 blocks: A's blocks sit in DRAM when C (A's prompt) is admitted; the
    # HBM blocks C needs for them evict B's, which move down to DRAM, whose own victims move on to NVMe.
    # The copies C loads are taken before that allocation, so the cascade cannot evict them (it did:
    # "dram: prefix key ... is not in the cache", on the whole Mooncake replay with DRAM and NVMe)
    cfg = _cfg(**{"policies.residency.name": "tiered", "replica.kv_tier_mode": "exclusive",
                  "replica.dram_kv_bytes": 100 * MIB2, "replica.nvme_kv_bytes": 400 * MIB2})
    _, res = run_checked(cfg, _abc())
    c = _reqs(res).loc[2]
    assert c["lower_hit_tokens"] == 90 * 16 and c["prefix_hit_tokens"] == 99 * 16 and c["kv_stall_s"] > 0
    kt = res.summary["kv_tiers"]
    assert kt["load_blocks"]["dram"] == 90 and kt["write_blocks"]["hbm->dram"] > 100


def test_a_step_waits_for_the_write_back_of_the_blocks_it_reuses():
    # straight to NVMe (3.8 GB/s): B's 91 evicted blocks take longer to write than B's prefill to run
    cfg = _cfg(**{"policies.residency.hbm_evict_to": "nvme", "replica.nvme_kv_bytes": 400 * MIB2})
    sim, res = run_checked(cfg, _abc())
    st = res.steps
    b_prefill = st[(st["prefill_tokens"] == 1600) & (st["start_s"] >= 1.0)].iloc[0]
    t = res.transfers
    wb = t[(t["what"] == "writeback") & (t["link"] == "nvme_write")]
    landed = float(wb["end_s"].min())
    assert b_prefill["start_s"] + b_prefill["duration_s"] == pytest.approx(landed)
    assert res.summary["kv_tiers"]["stall"]["writeback_wait_s"] > 0


def _store_cfg(bandwidth: float, **kw):
    return _cfg(**{"cluster.shared_kv_bytes": 400 * MIB2, "cluster.shared_kv_bandwidth_bytes_per_s": bandwidth,
                   "policies.residency.hbm_evict_to": "store", **kw})


def test_a_small_prefix_over_a_slow_link_is_recomputed_and_over_a_fast_one_loaded():
    # C shares A's first two hash blocks (8 engine blocks, 16 MiB) and nothing else; B (1,744 tokens)
    # evicts A's blocks into the shared store. At 1 GB/s the copy (~2 ms per block) is slower than
    # recomputing 16 tokens per block; at 50 GB/s it is not.
    a, b, c = list(range(1, 26)), list(range(100, 128)), [1, 2] + list(range(200, 223))
    tr = make_trace([0.0, 1.0, 2.0], [1600, 1744, 1600], [2, 2, 2], [a, b, c], 64)
    _, slow = run_checked(_store_cfg(1e9), tr)
    _, fast = run_checked(_store_cfg(50e9), tr)
    _, forced = run_checked(_store_cfg(1e9, **{"policies.residency.load": "always"}), tr)
    rs, rf, rx = _reqs(slow), _reqs(fast), _reqs(forced)
    lead = int(rs.loc[2, "prefix_hit_tokens"]) // 16          # what of A's head is still in HBM
    n = 8 - lead
    assert n >= 7
    assert slow.summary["kv_tiers"]["recompute_choices"] == 1 and rs.loc[2, "lower_hit_tokens"] == 0
    assert slow.summary["link_stats"]["net_read"]["bytes"] == 0
    assert fast.summary["kv_tiers"]["recompute_choices"] == 0 and rf.loc[2, "lower_hit_tokens"] == n * 16
    assert fast.summary["link_stats"]["net_read"]["bytes"] == n * MIB2
    # the choice pays: forcing the slow load delays C's first token
    assert rx.loc[2, "lower_hit_tokens"] == n * 16
    assert rx.loc[2, "ttft_s"] > rs.loc[2, "ttft_s"]


def test_replicas_share_prefixes_through_the_store():
    # A runs on replica 0 and writes its prompt through to the store; C, with A's prompt, is routed to
    # replica 1, whose own tiers have never seen it
    a = list(range(1, 26))
    tr = make_trace([0.0, 2.0], [1600, 1600], [2, 2], [a, a], 64)
    base = {"cluster.num_replicas": 2, "replica.num_hbm_blocks": 200}
    _, alone = run_checked(_cfg(**base), tr)
    sim, res = run_checked(_cfg(**base, **{"cluster.shared_kv_bytes": 400 * MIB2,
                                           "policies.residency.offload_to": "store"}), tr)
    assert list(res.requests["replica"]) == [0, 1]
    assert _reqs(alone).loc[1, "prefix_hit_tokens"] == 0
    assert _reqs(res).loc[1, "lower_hit_tokens"] == 99 * 16
    t = res.transfers
    assert set(t[t["replica"] == 0]["link"]) == {"pcie_d2h", "net_write"}
    assert set(t[t["replica"] == 1]["link"]) == {"net_read", "pcie_h2d"}
    assert res.summary["kv_tiers"]["token_hit_rate"]["store"] > 0


def _queued_c():
    """A finishes, B (11,000 tokens) pushes A's blocks down to DRAM, D (2,048 tokens, 200 outputs) runs
    while C, with A's prompt, waits behind it (one request at a time)."""
    a, b, d = list(range(1, 26)), list(range(100, 272)), list(range(300, 332))
    return make_trace([0.0, 1.0, 1.95, 1.9], [1600, 11000, 1600, 2048], [2, 2, 2, 200], [a, b, a, d], 64)


_QUEUED = {"replica.num_hbm_blocks": 800, "policies.residency.hbm_evict_to": "dram",
           "policies.scheduling.max_num_seqs": 1}


def test_prefetch_loads_a_queued_requests_prefix_before_it_is_admitted():
    # prefetched while C waits, its prefix is resident by C's admission: no stall; without prefetch
    # C waits for its copy after admission
    _, lazy = run_checked(_cfg(**_QUEUED), _queued_c())
    _, eager = run_checked(_cfg(**_QUEUED, **{"policies.residency.prefetch_depth": 1,
                                             "policies.residency.prefetch_fraction": 0.3}), _queued_c())
    rl, re = _reqs(lazy), _reqs(eager)
    assert rl.loc[2, "kv_stall_s"] > 0 and re.loc[2, "kv_stall_s"] == 0
    assert re.loc[2, "ttft_s"] < rl.loc[2, "ttft_s"]
    pf = eager.summary["kv_tiers"]["prefetch"]
    assert pf["requests"] == 1 and pf["on_time_blocks"] == pf["blocks"] == 99 and pf["late_blocks"] == 0
    assert re.loc[2, "prefix_hit_tokens"] == rl.loc[2, "prefix_hit_tokens"] == 99 * 16
    assert re.loc[2, "lower_hit_tokens"] == rl.loc[2, "lower_hit_tokens"] == 99 * 16
    # held for C while it waited, not evictable; nothing prefetched without room for it
    _, tight = run_checked(_cfg(**_QUEUED, **{"policies.residency.prefetch_depth": 1,
                                             "policies.residency.prefetch_fraction": 0.05}), _queued_c())
    assert tight.summary["kv_tiers"]["prefetch"]["blocks"] == 0


@pytest.mark.parametrize("dtype,ratio", [("fp8", 0.5), ("int4", 0.3125)])
def test_kv_dtype_changes_capacity_transfer_bytes_and_attention_time(dtype, ratio):
    from sim.engine import Simulation

    def kv(d):
        return {"replica.kv_dtype": d} if d else {}

    full = {d: Simulation(_cfg(**{"replica.num_hbm_blocks": 0}, **kv(d)), trace=_abc()) for d in ("", dtype)}
    assert full[dtype].hbm_bytes_per_block == ratio * full[""].hbm_bytes_per_block
    assert full[dtype].hbm_blocks == pytest.approx(full[""].hbm_blocks / ratio, rel=1e-3)
    moved = {d: run_checked(_cfg(**{"policies.residency.hbm_evict_to": "dram"}, **kv(d)), _abc())[1]
             for d in ("", dtype)}
    for link in ("pcie_d2h_bytes", "pcie_h2d_bytes"):
        assert moved[dtype].summary["links"][link] == ratio * moved[""].summary["links"][link] > 0
    long_decode = make_trace([0.0] * 16, [8000] * 16, [30] * 16)
    steps = {}
    for d in ("", dtype):
        _, res = run_checked(_cfg(**{"replica.num_hbm_blocks": 9000}, **kv(d)), long_decode)
        st = res.steps
        steps[d] = float(st[(st["decode_seqs"] == 16) & (st["prefill_seqs"] == 0)]["duration_s"].mean())
    assert steps[dtype] < 0.9 * steps[""]
    assert np.isfinite(steps[dtype])


def test_prefix_keys_are_the_mix_of_each_blocks_trace_hash_and_offset():
    from sim.memory.tiers import prefix_keys

    def reference(hashes, hbt, prompt, bs):       # the definition, vectorised
        ends = (np.arange(prompt // bs, dtype=np.int64) + 1) * bs
        t = (ends - 1) // hbt
        ends, t = ends[t < hashes.size], t[t < hashes.size]
        h = hashes[t].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= (ends - t * hbt).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        return (h & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64)

    rng = np.random.default_rng(0)
    for _ in range(200):
        hbt, bs, prompt = int(rng.choice([16, 64, 100, 512])), int(rng.choice([4, 16, 512])), int(rng.integers(1, 5000))
        hashes = rng.integers(-2**63, 2**63 - 1, int(rng.integers(0, -(-prompt // hbt) + 1)), dtype=np.int64)
        assert np.array_equal(prefix_keys(hashes, hbt, prompt, bs), reference(hashes, hbt, prompt, bs))


# ------------------------------------------------------------------ the Mooncake conversation trace
def _mooncake(n: int, **kw):
    """The first n requests at a quarter of the trace's rate, unguarded (the per-step checks of
    run_checked would take minutes on these prompts; the property tests cover the invariants)."""
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    cfg = with_overrides(SimConfig(), {"trace.bundled": "mooncake-conversation", "trace.max_requests": n,
                                       "trace.rate_scale": 0.25, "metrics.step_log": False, **kw})
    return Simulation(cfg).run()


def test_dram_and_nvme_below_hbm_raise_the_mooncake_hit_rate_and_lower_ttft():
    # the first 300 requests at a quarter of the trace's rate (one 8B replica on an H100 about 90 % busy;
    # at its own rate it is overloaded): HBM alone against the tiered policy over 200 GB DRAM and 2 TB NVMe
    hbm = _mooncake(300)
    tiers = _mooncake(300, **{"policies.residency.name": "tiered", "replica.dram_kv_bytes": 200 * 10**9,
                              "replica.nvme_kv_bytes": 2 * 10**12})
    h, t = hbm.summary["kv_tiers"], tiers.summary["kv_tiers"]
    assert t["token_hit_rate"]["hbm"] == h["token_hit_rate"]["hbm"]          # the same HBM cache
    assert t["token_hit_rate_all"] > 2 * h["token_hit_rate_all"] > 0.06     # 3.5 % -> 8.0 %
    assert t["token_hit_rate"]["dram"] > 0 and t["token_hit_rate"]["nvme"] > 0
    assert tiers.summary["ttft_s"]["mean"] < 0.97 * hbm.summary["ttft_s"]["mean"]
    assert t["prefill_tokens_saved"] > 2 * h["prefill_tokens_saved"]
    # what pays for it: the copies over PCIe and NVMe, and the requests that waited for them
    ln = tiers.summary["links"]
    assert ln["pcie_h2d_bytes"] >= sum(t["load_blocks"].values()) * tiers.summary["kv"]["host_bytes_per_block"]
    assert ln["nvme_read_bytes"] > 0 and ln["nvme_write_bytes"] > 0 and ln["pcie_d2h_bytes"] > 0
    assert t["stall"]["requests"] > 0 and t["stall"]["total_s"] > 0
    assert abs(tiers.requests["kv_stall_s"].sum() - t["stall"]["total_s"]) < 1e-9
    assert hbm.summary["links"]["pcie_h2d_bytes"] == 0 and h["stall"]["total_s"] == 0


def test_ttl_beats_lru_on_the_mooncake_conversation_trace():
    # LRU keeps a block about as long as HBM takes to fill with new prompts (~45 s here: 448 K tokens at
    # ~10 K prompt tokens/s), while most reused prefixes come back minutes later; ttl pins each finished
    # turn for ttl_s, so the turns pinned first survive until their follow-up (see README, KV memory)
    lru = _mooncake(600)
    ttl = _mooncake(600, **{"policies.eviction.name": "ttl", "policies.eviction.ttl_s": 120.0})
    a, b = lru.summary["kv"]["hbm_prefix_hit_rate"], ttl.summary["kv"]["hbm_prefix_hit_rate"]
    assert b > a + 0.002, (a, b)                                            # 3.64 % -> 3.94 %
    assert ttl.summary["ttft_s"]["mean"] < lru.summary["ttft_s"]["mean"]


def test_a_replica_with_a_load_in_flight_wakes_when_it_lands_not_at_the_next_arrival():
    """A replica pulling its arrivals from a feed slept until the next arrival even while a prefix
    load was in flight: the loaded request's first token came at t = 100 s, its stall read 0.1 ms."""
    h = lambda base, n: [base + j for j in range(n)]  # noqa: E731
    # A fills the prefix cache; B and C evict it to DRAM; D (A's prefix) loads it; E arrives much later
    tr = make_trace([0.0, 1.0, 2.0, 3.0, 100.0], [256, 256, 256, 256, 16], [2, 2, 2, 2, 2],
                    hashes=[h(0, 4), h(100, 4), h(200, 4), h(0, 4), h(300, 1)], hash_block_tokens=64)
    cfg = small_config(**{"replica.num_hbm_blocks": 40, "policies.residency.hbm_evict_to": "dram",
                          "policies.residency.load": "always"})
    _, res = run_checked(cfg, tr)
    d = res.requests.iloc[3]
    assert d["lower_hit_tokens"] > 0
    assert d["first_token_s"] - d["first_scheduled_s"] < 0.1
