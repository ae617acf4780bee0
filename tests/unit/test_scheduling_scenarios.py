"""Exact engine scenarios: who is preempted, when, and what happens to them afterwards."""

from tests.conftest import make_trace, run_checked, small_config


def _cfg(**kw):
    base = {"replica.block_size_tokens": 4, "replica.num_hbm_blocks": 10, "replica.prefix_caching": False,
            "policies.scheduling.watermark": 0.0}
    return small_config(**{**base, **kw})


def test_fcfs_preempts_the_most_recently_admitted_request_and_recomputes_it():
    # A and B (8-token prompts, 20 outputs) share 10 blocks of 4 tokens. Both grow until every block
    # is held (5 each, 20 tokens each); A's next decode needs a 6th block: B, admitted last, is
    # preempted, its blocks go to A, and B is recomputed once A finishes.
    tr = make_trace([0.0, 0.0], [8, 8], [20, 20])
    sim, res = run_checked(_cfg(), tr)
    r = res.requests.set_index("request_id")
    assert list(r["preemptions"]) == [0, 1]
    assert r.loc[1, "first_token_s"] < r.loc[0, "finish_s"] < r.loc[1, "finish_s"]
    steps = res.steps
    pre = steps[steps["preemptions"] > 0]
    assert len(pre) == 1 and int(pre["preemptions"].iloc[0]) == 1
    # B held 5 blocks (20 tokens) when it was preempted: the step before shows all 10 blocks
    i = pre.index[0]
    assert steps.loc[i - 1, "hbm_active_bytes"] == 10 * sim.hbm_bytes_per_block
    # after the preemption A runs alone
    assert steps.loc[i, "decode_seqs"] == 1
    # B had KV for 20 tokens and had sampled one more (13 generated): it re-prefills 8 + 13
    later = steps[(steps.index > i) & (steps["prefill_seqs"] == 1)]
    assert int(later["prefill_tokens"].iloc[0]) == 8 + 13
    assert (res.requests["generated_tokens"] == 20).all()


def test_swap_mode_moves_the_victim_to_dram_and_back():
    tr = make_trace([0.0, 0.0], [8, 8], [20, 20])
    sim, res = run_checked(_cfg(**{"replica.preemption_mode": "swap"}), tr)
    r = res.requests.set_index("request_id")
    assert list(r["preemptions"]) == [0, 1] and list(r["swaps"]) == [0, 1]
    s = res.summary
    assert s["engine"]["swaps_out"] == 1 and s["engine"]["swaps_in"] == 1
    # 5 blocks of B went out over D2H and came back over H2D
    assert s["links"]["pcie_d2h_bytes"] == 5 * sim.hbm_bytes_per_block
    assert s["links"]["pcie_h2d_bytes"] == 5 * sim.hbm_bytes_per_block
    assert s["kv"]["dram_peak_used_bytes"] == 5 * sim.host_bytes_per_block


def test_chunked_prefill_runs_decodes_first_and_splits_long_prompts():
    tr = make_trace([0.0, 0.001], [10, 300], [30, 2])
    cfg = small_config(**{"policies.scheduling.name": "chunked-prefill",
                          "policies.scheduling.max_num_batched_tokens": 64, "replica.num_hbm_blocks": 200})
    sim, res = run_checked(cfg, tr)
    st = res.steps
    # the 300-token prompt is cut into 64-token chunks that share steps with A's decode
    mixed = st[(st["prefill_seqs"] == 1) & (st["decode_seqs"] == 1)]
    assert (mixed["tokens"] <= 64).all()
    assert list(mixed["prefill_tokens"][:4]) == [63, 63, 63, 63]
    assert int(st["prefill_tokens"].sum()) == 310
    assert (res.requests["generated_tokens"].to_numpy() == [30, 2]).all()


def test_prefix_hits_skip_cached_blocks():
    # Three requests share a 256-token prefix (two 128-token trace blocks); the later two hit it.
    hashes = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    tr = make_trace([0.0, 1.0, 2.0], [300, 300, 300], [4, 4, 4], hashes, 128)
    sim, res = run_checked(small_config(**{"replica.num_hbm_blocks": 200}), tr)
    hits = res.requests["prefix_hit_tokens"].tolist()
    assert hits == [0, 256, 256]
    assert res.summary["kv"]["hbm_prefix_hit_rate"] == (256 + 256) / (3 * (299 // 16) * 16)


def test_requests_that_can_never_fit_are_rejected_with_a_reason():
    tr = make_trace([0.0, 0.1], [2000, 10], [10, 10])
    sim, res = run_checked(small_config(**{"replica.num_hbm_blocks": 50}), tr)
    r = res.requests
    assert list(r["status"]) == ["rejected", "finished"]
    assert r["reject_reason"].iloc[0] == "exceeds KV capacity"
    assert res.summary["requests"]["rejected_by_reason"] == {"exceeds KV capacity": 1}


def test_prompt_admission_waits_for_room_for_the_whole_prompt():
    # 80 blocks of 4 tokens; A and B have 200-token prompts (50 blocks each). With per-chunk admission
    # B starts in the leftover budget of A's last chunk, runs out of blocks half-way through its
    # prompt and is preempted by A's decodes. With whole-prompt admission (Sarathi-Serve, Vidur) B
    # waits until A has finished and is never preempted.
    tr = make_trace([0.0, 0.001], [200, 200], [6, 6])
    out = {}
    for admission in ("chunk", "prompt"):
        cfg = _cfg(**{"policies.scheduling.name": "chunked-prefill", "replica.num_hbm_blocks": 80,
                      "policies.scheduling.max_num_batched_tokens": 64,
                      "policies.scheduling.admission": admission})
        sim, res = run_checked(cfg, tr)
        out[admission] = res.requests.set_index("request_id")
        assert (res.requests["generated_tokens"] == 6).all()
    chunk, prompt = out["chunk"], out["prompt"]
    assert chunk.loc[1, "first_scheduled_s"] < chunk.loc[0, "first_token_s"]
    assert int(chunk.loc[1, "preemptions"]) >= 1
    assert list(prompt["preemptions"]) == [0, 0]
    assert prompt.loc[1, "first_scheduled_s"] >= prompt.loc[0, "finish_s"]


def test_unknown_admission_mode_is_a_parameter_error():
    import pytest

    from sim.errors import TiersimError

    with pytest.raises(TiersimError, match="admission"):
        run_checked(_cfg(**{"policies.scheduling.name": "chunked-prefill",
                            "policies.scheduling.admission": "greedy"}), make_trace([0.0], [8], [2]))
