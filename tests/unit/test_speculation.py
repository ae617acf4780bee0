"""Speculative decoding: acceptance models against their closed forms, the tokens per target step of
whole runs against the closed form, drafter pricing and memory, the KV of drafts, adaptive depth,
inter-token latency per emitted token, the trace's acceptance column and the presets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from policies.base import Drafter
from policies.speculation.acceptance import IID, Empirical, Forced, Positional
from sim.config import SimConfig, with_overrides
from sim.engine import Simulation
from tests.conftest import make_trace, run_checked, small_config


class _Req:
    """The fields acceptance models read."""

    def __init__(self, generated=0, rate=float("nan")):
        self.num_generated = generated
        self.acceptance_rate = rate
        self.req_id = 0


def closed_form(alpha: float, k: int) -> float:
    """Expected tokens per target step of a chain of k drafts, i.i.d. acceptance alpha."""
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def spec(**params) -> dict:
    return {f"policies.speculation.{k}": v for k, v in params.items()}


# ------------------------------------------------------------------------------- acceptance models
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_iid_sampling_and_expectation_follow_the_closed_form(alpha):
    m = IID(alpha)
    rng = np.random.default_rng(1)
    for k in (1, 4):
        want = closed_form(alpha, k) - 1 if alpha < 1 else k
        assert math.isclose(m.expected(None, k), want, rel_tol=1e-12, abs_tol=1e-12)
        draws = np.array([m.sample(rng, None, k) for _ in range(40_000)])
        assert draws.min() >= 0 and draws.max() <= k
        assert abs(draws.mean() - want) < 0.02 + 0.01 * want


def test_positional_rates_are_conditional_and_the_last_one_repeats():
    m = Positional([0.9, 0.5])
    assert m.survival(None, 1) == 0.9 and m.survival(None, 2) == 0.45 and math.isclose(m.survival(None, 3), 0.225)
    rng = np.random.default_rng(2)
    draws = np.array([m.sample(rng, None, 3) for _ in range(40_000)])
    assert abs(draws.mean() - (0.9 + 0.45 + 0.225)) < 0.02


def test_bundled_histograms_reproduce_the_published_means_and_truncate_exactly():
    m = Empirical.load("eagle3-llamacpp")          # llama.cpp #24536: mean acceptance length 2.92
    assert m.max_depth == 3 and math.isclose(1 + m.expected(None, 3), 2.92, abs_tol=0.005)
    # per-position acceptance rates as logged: 0.805, 0.632, 0.483
    np.testing.assert_allclose([m.survival(None, j) for j in (1, 2, 3)], [0.805, 0.632, 0.483], atol=0.001)
    rng = np.random.default_rng(3)
    draws = np.array([m.sample(rng, None, 2) for _ in range(40_000)])   # a shallower chain: min(L, 2)
    assert abs(draws.mean() - (m.survival(None, 1) + m.survival(None, 2))) < 0.02
    n = Empirical.load("ngram-vllm")               # vLLM #24127: mean acceptance length 5.44
    assert n.max_depth == 5 and math.isclose(1 + n.expected(None, 5), 5.44, abs_tol=0.005)


def test_a_histogram_file_that_is_wrong_is_refused_naming_the_key(tmp_path):
    f = tmp_path / "h.toml"
    f.write_text("counts = [1, 2]\nnum_draft_tokens = 3\n")
    with pytest.raises(ValueError, match="num_draft_tokens = 3"):
        Empirical.load(str(f))
    with pytest.raises(ValueError, match="unknown acceptance-length file 'nope'"):
        Empirical.load("nope")
    with pytest.raises(Exception, match="measured drafts of 3 tokens"):
        Simulation(small_config(**spec(name="fixed-k", k=5, acceptance="empirical", file="eagle3-llamacpp")),
                   trace=make_trace([0.0], [10], [10]))


def test_forced_rejection_rejects_every_stride_th_output_position():
    m = Forced(3)
    # before the step, g tokens generated; draft j becomes token g + j; multiples of 3 are rejected
    assert [m.sample(None, _Req(g), 4) for g in range(6)] == [2, 1, 0, 2, 1, 0]
    assert m.sample(None, _Req(0), 1) == 1 and Forced(1).sample(None, _Req(5), 4) == 0


@pytest.mark.parametrize("width, depth, alpha", [(1, 4, 0.7), (2, 4, 0.7), (3, 2, 0.5), (4, 5, 0.8)])
def test_the_tree_formula_matches_sampled_trees(width, depth, alpha):
    m = IID(alpha)
    want = sum(1 - (1 - alpha ** j) ** width for j in range(1, depth + 1))
    assert math.isclose(m.expected_tree(None, width, depth), want)
    if width == 1:
        assert math.isclose(want, closed_form(alpha, depth) - 1)
    rng = np.random.default_rng(4)
    draws = np.array([m.sample_tree(rng, None, width, depth) for _ in range(30_000)])
    assert abs(draws.mean() - want) < 0.03


# ------------------------------------------------------------------------------- the closed form, end to end
@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.6, 0.8, 0.9])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_tokens_per_target_step_equal_the_closed_form(alpha, k):
    """Over >= 10^4 target steps (8 requests decoding side by side), i.i.d. acceptance: the measured
    mean tokens per target step is (1 - a^(k+1)) / (1 - a) within 1 %."""
    want = closed_form(alpha, k)
    n, steps = 8, 10_000
    out = int(steps * want) + 2 * k
    cfg = small_config(**{"replica.num_hbm_blocks": 0, "metrics.step_log": False},
                       **spec(name="fixed-k", k=k, drafter="none", acceptance="iid", alpha=alpha))
    sp = Simulation(cfg, trace=make_trace([0.0] * n, [16] * n, [out] * n)).run().summary["speculation"]
    assert sp["verify_steps"] >= steps
    assert abs(sp["tokens_per_target_step"] / want - 1) < 0.01, (sp["tokens_per_target_step"], want)


# ------------------------------------------------------------------------------- drafters: price and memory
def _decode_trace(n=4, prompt=1500, out=60):
    return make_trace([0.0] * n, [prompt] * n, [out] * n)


def _mean_verify_step(res):
    st = res.steps
    sel = (st["decode_seqs"] > 0) & (st["prefill_seqs"] == 0) & (st["draft_tokens"] > 0)
    return float(st[sel]["duration_s"].mean()), float(st[sel]["draft_s"].mean()), float(st[sel]["verify_s"].mean())


def test_drafters_cost_what_their_size_says():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    got = {}
    for kind, extra in (("none", {}), ("ngram", {}), ("medusa", {}), ("eagle", {}), ("model", {}),
                        ("model-8b", {"draft_model": "llama-3.1-8b"})):
        p = dict(name="fixed-k", k=3, drafter=kind.split("-")[0], acceptance="iid", alpha=0.0, **extra)
        _, res = run_checked(small_config(**base, **spec(**p)), _decode_trace())
        got[kind] = _mean_verify_step(res)
    total = {k: v[0] for k, v in got.items()}
    draft = {k: v[1] for k, v in got.items()}
    assert draft["none"] == 0.0 and 0 < draft["ngram"] < 1e-4          # host cost: 4 requests x 3 us
    assert math.isclose(draft["ngram"], 4 * 3e-6)
    # one pass of four Medusa heads < three passes of one EAGLE layer < three passes of a 1B model < 8B
    assert draft["medusa"] < draft["eagle"] < draft["model"] < draft["model-8b"]
    assert total["none"] < total["eagle"] < total["model"] < total["model-8b"]
    # the verification itself does not depend on who drafted
    verify = {k: v[2] for k, v in got.items()}
    assert max(verify.values()) - min(verify.values()) < 1e-12


def test_draft_weights_and_kv_come_out_of_the_target_kv_budget():
    tr = make_trace([0.0], [16], [4])
    plain = Simulation(small_config(**{"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 0}), trace=tr)
    bs, kv_budget = 16, plain.budget.kv_bytes
    target_tok = plain.hbm_bytes_per_block // bs
    for kind, model in (("model", "llama-3.2-1b"), ("eagle", ""), ("medusa", "")):
        p = dict(name="fixed-k", drafter=kind) | ({"draft_model": model} if model else {})
        sim = Simulation(small_config(**{"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 0}, **spec(**p)),
                         trace=tr)
        fp = sim.draft_footprint
        assert fp.weight_bytes > 0
        assert sim.hbm_bytes_per_block == bs * (target_tok + fp.kv_bytes_per_token)
        assert sim.hbm_blocks == (kv_budget - fp.weight_bytes) // sim.hbm_bytes_per_block
        if kind == "model":           # Llama-3.2-1B: its own parameters, 16 layers x 8 KV heads x 64 dims of KV
            assert fp.weight_bytes == 2 * fp.params
            assert fp.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2
        if kind == "eagle":           # one Llama-3.1-8B layer + the 2h x h fusion layer: ~0.25 B parameters
            assert 0.2e9 < fp.params < 0.3e9 and fp.kv_bytes_per_token == 2 * 1 * 8 * 128 * 2
        if kind == "medusa":          # no KV: the pool loses exactly the heads' weights
            assert fp.kv_bytes_per_token == 0
            assert plain.hbm_blocks - sim.hbm_blocks == pytest.approx(fp.weight_bytes / plain.hbm_bytes_per_block,
                                                                      abs=1)


def test_a_draft_model_must_share_the_targets_vocabulary():
    with pytest.raises(Exception, match="must share the target's tokenizer"):
        Simulation(small_config(**{"model.name": "llama-3.1-8b"}, **spec(name="fixed-k", draft_model="llama-2-7b")),
                   trace=make_trace([0.0], [16], [4]))


def test_the_draft_model_prefills_every_prompt_chunk_with_the_target():
    prefill = make_trace([0.0], [2048], [1])           # a single prefill step
    _, plain = run_checked(small_config(**{"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}), prefill)
    sim, spec_run = run_checked(small_config(**{"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000},
                                             **spec(name="fixed-k")), prefill)
    p, s = plain.steps.iloc[0], spec_run.steps.iloc[0]
    drafter = sim.replicas[0].drafting.cost
    want = drafter.step(np.array([2048]), np.array([0]), 0, 0, 0, 1)[0]
    assert math.isclose(s["draft_s"], want) and math.isclose(s["duration_s"], p["duration_s"] + want)
    assert s["draft_tokens"] == 0 and s["verify_s"] == 0


def test_a_lagging_drafter_catches_up_in_its_first_pass():
    from sim.replica.drafting import Drafting

    sim = Simulation(small_config(**spec(name="fixed-k")), trace=make_trace([0.0], [16], [4]))
    cost = sim.cost_model("llama-3.2-1b", sim.build_policy("execution", 0))
    d = Drafting(Drafter(kind="model", model="llama-3.2-1b"), cost, lambda name: cost)

    class R:
        num_computed, num_draft_computed = 500, 480

    t = d.time([], [R()], [3], 1)[0]
    empty = np.empty(0, np.int64)
    want = (cost.step(np.array([21]), np.array([480]), 0, 0, 1, 1)[0]          # 20 lagging tokens + the new one
            + cost.step(empty, empty, 1, 502, 1, 1)[0] + cost.step(empty, empty, 1, 503, 1, 1)[0])
    assert math.isclose(t, want, rel_tol=1e-12)

    class Short:        # the drafter never saw the last accepted draft: a 2-token decode row, not a chunk
        num_computed, num_draft_computed = 500, 499

    t = d.time([], [Short()], [1], 1)[0]
    assert math.isclose(t, cost.step(empty, empty, 1, 501, 1, 2, 2)[0], rel_tol=1e-12)


def test_a_lazily_prefilling_drafter_pays_for_the_prompt_only_when_it_drafts():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    prompt = make_trace([0.0], [2048], [1])
    _, plain = run_checked(small_config(**base), prompt)
    _, lazy = run_checked(small_config(**base, **spec(name="fixed-k", draft_prefill="lazy")), prompt)
    assert lazy.steps.iloc[0]["duration_s"] == plain.steps.iloc[0]["duration_s"]      # no draft prefill
    sim, res = run_checked(small_config(**base, **spec(name="fixed-k", k=2, draft_prefill="lazy", alpha=0.0)),
                           make_trace([0.0], [2048], [6]))
    first, later = res.steps.iloc[1], res.steps.iloc[2]       # the first decode step catches the prompt up
    assert first["draft_s"] > 3 * later["draft_s"] > 0       # a 2,048-token 1B prefill beside the drafts


def test_a_tree_verifies_width_times_depth_tokens_and_accepts_more():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    runs = {}
    for name, p in (("chain", dict(name="fixed-k", k=4)), ("tree", dict(name="tree", width=3, depth=4))):
        _, res = run_checked(small_config(**base, **spec(**p, drafter="eagle", alpha=0.6)), _decode_trace(out=200))
        runs[name] = res
    st = {k: r.steps[(r.steps["draft_tokens"] > 0) & (r.steps["prefill_seqs"] == 0)] for k, r in runs.items()}
    assert (st["tree"]["draft_tokens"] % 3 == 0).all() and st["tree"]["draft_tokens"].max() == 4 * 3 * 4
    assert st["tree"]["verify_s"].mean() > st["chain"]["verify_s"].mean()
    sp = {k: r.summary["speculation"] for k, r in runs.items()}
    assert sp["tree"]["tokens_per_target_step"] > sp["chain"]["tokens_per_target_step"]
    assert sp["tree"]["proposed_tokens"] == 3 * sp["tree"]["draft_depth_tokens"]


def test_eagle_re_reads_the_accepted_tokens_a_draft_model_keeps(monkeypatch):
    # EAGLE's KV after a step covers only the token before it (it re-feeds every accepted token with
    # the target's features), so each draft pass 0 is a multi-token catch-up row: turning the re-read
    # off (the draft model's rule) makes the same run's drafting cheaper, and changes nothing at alpha 0
    from sim.replica import drafting

    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    init = drafting.Drafting.__init__

    def no_refeed(self, *a, **k):
        init(self, *a, **k)
        self.refeeds_accepted = False

    runs = {}
    for refeed in (True, False):
        if not refeed:
            monkeypatch.setattr(drafting.Drafting, "__init__", no_refeed)
        for alpha in (0.0, 0.9):
            cfg = small_config(**base, **spec(name="fixed-k", k=3, drafter="eagle", alpha=alpha))
            runs[refeed, alpha] = run_checked(cfg, _decode_trace(out=80))[1]
    draft = {k: _mean_verify_step(r)[1] for k, r in runs.items()}
    assert draft[True, 0.9] > draft[False, 0.9] > 0
    assert runs[True, 0.0].steps.equals(runs[False, 0.0].steps)      # nothing accepted: nothing to re-read


# ------------------------------------------------------------------------------- the KV of drafts
def test_lookahead_kv_is_reserved_before_verifying_and_released_after():
    tr = make_trace([0.0], [30], [40])
    sim, res = run_checked(small_config(**{"replica.block_size_tokens": 4, "replica.num_hbm_blocks": 200},
                                        **spec(name="fixed-k", k=5, drafter="none", acceptance="forced",
                                               reject_stride=2)), tr)
    st = res.steps[res.steps["draft_tokens"] > 0]
    bpt = sim.hbm_bytes_per_block // 4
    assert (st["draft_kv_bytes"] == st["draft_tokens"] * bpt).all()
    # the verify step holds blocks for 1 + 5 slots past the computed tokens (more than one decode needs)
    assert res.summary["speculation"]["rolled_back_blocks"] > 0
    assert res.summary["speculation"]["lookahead_kv_peak_bytes"] == 5 * bpt


def test_a_request_that_cannot_reserve_its_lookahead_drafts_less():
    # two requests of 16 + 20 tokens in blocks of 4, 14 blocks: once both hold 6 blocks, the first one's
    # 8-slot lookahead takes the last free blocks and the second one can only draft 2 deep
    tr = make_trace([0.0, 0.0], [16, 16], [20, 20])
    _, res = run_checked(small_config(**{"replica.block_size_tokens": 4, "replica.num_hbm_blocks": 14,
                                         "policies.scheduling.watermark": 0.0},
                                      **spec(name="fixed-k", k=7, drafter="none", alpha=0.0)), tr)
    sp = res.summary["speculation"]
    assert sp["shortened_drafts"] > 0
    st = res.steps[(res.steps["decode_seqs"] == 2)]
    partial = st[(st["draft_tokens"] > 7) & (st["draft_tokens"] < 14)]
    assert len(partial) > 0          # one request drafted 7, the other fewer (but some)
    assert res.summary["requests"]["finished"] == 2


# ------------------------------------------------------------------------------- adaptive depth
def test_adaptive_k_drafts_at_small_batches_and_stops_when_verification_is_compute_bound():
    base = {"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.num_hbm_blocks": 8000,
            "policies.scheduling.max_num_seqs": 512}
    chosen = {}
    for n in (1, 512):
        sim, res = run_checked(small_config(**base, **spec(name="adaptive-k", alpha=0.5, prior_alpha=0.5)),
                               make_trace([0.0] * n, [64] * n, [48] * n), guarded=False)
        chosen[n] = dict(sim.replicas[0].speculation.chosen)
    # one request: verification is memory-bound, a draft token costs a 1B step and buys 0.5 tokens
    assert max(chosen[1], key=chosen[1].get) >= 1
    # 512: verifying 2 x 512 query tokens is compute-bound; a draft no longer pays for itself
    assert max(chosen[512], key=chosen[512].get) == 0


# ------------------------------------------------------------------------------- ITL per emitted token
def test_itl_is_per_emitted_token_and_the_per_step_figure_is_vllms():
    _, res = run_checked(small_config(**{"replica.num_hbm_blocks": 600},
                                      **spec(name="fixed-k", k=4, drafter="none", alpha=0.8)),
                         make_trace(np.linspace(0, 0.5, 6), [200] * 6, [150] * 6))
    r = res.requests
    # per token, each request's mean gap is its TPOT (the gaps add up to last minus first token)
    np.testing.assert_allclose(r["itl_mean_s"], r["tpot_s"], rtol=1e-9)
    sp = res.summary["speculation"]
    assert sp["itl_per_step_s"]["mean"] > 2 * res.summary["itl_s"]["mean"]
    assert res.summary["itl_s"]["p50"] > 0


# ------------------------------------------------------------------------------- acceptance per request
def test_acceptance_per_request_comes_from_the_trace_column():
    base = make_trace([0.0, 0.0], [32, 32], [60, 60])
    tr = base.replace(acceptance_rate=np.array([1.0, 0.0]))
    sim, res = run_checked(small_config(**{"replica.num_hbm_blocks": 200},
                                        **spec(name="fixed-k", k=3, drafter="none", acceptance="column")), tr)
    steps = res.requests.set_index("request_id")
    assert sim.requests.extra_tokens[0] > 0 and sim.requests.extra_tokens[1] == 0
    assert steps.loc[0, "e2e_s"] < steps.loc[1, "e2e_s"]
    with pytest.raises(Exception, match="acceptance_rate column"):
        run_checked(small_config(**spec(name="fixed-k", acceptance="column")), base)


# ------------------------------------------------------------------------------- presets and the summary line
@pytest.mark.parametrize("preset", ["speculative_decode", "forced_rejection"])
def test_each_preset_runs_and_says_what_it_measures(preset, capsys, tmp_path):
    from sim.cli import main

    rc = main(["run", "--preset", preset, "--set", "trace.max_requests=40", "--set", "costs.backend=roofline",
               "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(f"preset {preset}: measures ")
    assert "speculation: fixed-k, draft model llama-3.2-1b | acceptance" in out


def test_the_summary_line_appears_only_when_speculating(capsys, tmp_path):
    from sim.cli import main

    assert main(["run", "--set", "trace.max_requests=30", "--set", "costs.backend=roofline", "--out",
                 str(tmp_path), "--no-progress"]) == 0
    assert "speculation:" not in capsys.readouterr().out
    assert main(["run", "--preset", "speculative_decode", "--config", "x.toml"]) == 2
    assert "use one" in capsys.readouterr().err


def test_speculative_runs_repeat_exactly():
    cfg = with_overrides(SimConfig(), {"trace.max_requests": 60, "costs.backend": "roofline",
                                       **spec(name="adaptive-k")})
    a, b = Simulation(cfg).run(), Simulation(cfg).run()
    assert a.summary["speculation"] == b.summary["speculation"] and a.summary["e2e_s"] == b.summary["e2e_s"]


def test_ngram_drafts_only_on_the_steps_whose_lookup_matches():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    got = {}
    for rate in (0.0, 0.5, 1.0):
        p = dict(name="fixed-k", k=3, drafter="ngram", ngram_match_rate=rate, acceptance="iid", alpha=0.5)
        _, res = run_checked(small_config(**base, **spec(**p)), _decode_trace(out=400))
        st = res.steps
        dec = st[(st["decode_seqs"] > 0) & (st["prefill_seqs"] == 0)]
        got[rate] = float((dec["draft_tokens"] / (3 * dec["decode_seqs"])).mean())     # share of decodes drafting
    assert got[0.0] == 0.0 and got[1.0] > 0.95          # (a request's last steps draft fewer than k)
    assert 0.4 * got[1.0] < got[0.5] < 0.6 * got[1.0], got


def test_medusa_drafts_every_depth_in_one_pass_of_its_heads():
    base = {"model.name": "llama-3.1-8b", "replica.num_hbm_blocks": 2000}
    draft = {}
    for k in (1, 4):
        p = dict(name="fixed-k", k=k, drafter="medusa", medusa_heads=4, acceptance="iid", alpha=0.0)
        _, res = run_checked(small_config(**base, **spec(**p)), _decode_trace())
        draft[k] = _mean_verify_step(res)[1]
    assert draft[1] > 0 and math.isclose(draft[1], draft[4], rel_tol=1e-9), draft
