"""The reference server: its engine reproduces tiersim's replay step for step when it is given tiersim's
step times; run on a tiny model its recorded times are consistent; ``validate --e2e`` reads its output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import reference_server as rs
from calibration.serving_engine import Step
from sim.config import with_overrides
from tests.conftest import make_trace

ROOT = Path(__file__).resolve().parents[2]

# prompts and outputs that share 14 blocks of 16 tokens: decodes run out of blocks and the most
# recently admitted request is preempted and recomputed; the 400-token prompt exceeds the capacity
ARRIVAL = [0.0, 0.001, 0.002, 0.004, 0.05, 0.3, 0.31]
PROMPT = [40, 70, 25, 400, 90, 12, 33]
OUTPUT = [40, 40, 40, 5, 20, 9, 25]


def tiny_config(scheduler: str = "fcfs", model: str = "tiny-llama", trace: str = "azure-conv", **params):
    return rs.case_config(model=model, trace=trace, scheduler=scheduler, params=params, num_blocks=14,
                          block_size=16, gpu="h200")


@pytest.fixture
def trace():
    return make_trace(ARRIVAL, PROMPT, OUTPUT)


# ============================================================================ engine vs tiersim
@pytest.mark.parametrize("scheduler,params", [
    ("fcfs", {"watermark": 0.0}),
    ("fcfs", {"max_num_batched_tokens": 128, "max_num_seqs": 3}),
    ("chunked-prefill", {"max_num_batched_tokens": 32}),
    ("chunked-prefill", {"max_num_batched_tokens": 48, "admission": "prompt", "watermark": 0.1}),
])
def test_priced_server_reproduces_tiersim_step_for_step(trace, scheduler, params):
    """Given tiersim's own step prices, the server's engine makes tiersim's decisions: the same steps,
    preemptions, rejections and per-request times, exactly."""
    from sim.engine import Simulation

    config = with_overrides(tiny_config(scheduler, model="llama-3.2-1b", **params), {"costs.backend": "roofline"})
    rec = rs.serve(config, rs.PricedExecutor(config), rs.VirtualClock(), trace=trace, check=True)
    res = Simulation(config, trace=trace).run()
    a, b = rec.requests, res.requests
    assert list(a["status"]) == list(b["status"].astype(str))
    assert list(a["reject_reason"]) == list(b["reject_reason"].astype(str))
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    assert list(a["preemptions"]) == list(b["preemptions"])
    np.testing.assert_array_equal(rec.steps["duration_s"].to_numpy(), res.steps["duration_s"].to_numpy())
    np.testing.assert_array_equal(rec.steps["prefill_tokens"].to_numpy(), res.steps["prefill_tokens"].to_numpy())
    np.testing.assert_array_equal(rec.steps["decode_seqs"].to_numpy(), res.steps["decode_seqs"].to_numpy())


def test_the_cases_exercise_preemption_and_rejection(trace):
    config = with_overrides(tiny_config("fcfs", model="llama-3.2-1b", watermark=0.0), {"costs.backend": "roofline"})
    rec = rs.serve(config, rs.PricedExecutor(config), rs.VirtualClock(), trace=trace)
    assert rec.meta["preemptions"] > 0
    assert list(rec.requests["reject_reason"])[3] == "exceeds KV capacity"


@pytest.mark.parametrize("over", [
    {"trace.bundled": "azure-code", "trace.start_s": 600.0, "trace.end_s": 660.0, "trace.rate_scale": 2.5},
    {"trace.bundled": "azure-conv", "trace.start_s": 100.0, "trace.max_requests": 17, "trace.rate_scale": 0.3},
    {"trace.bundled": "azure-conv", "trace.end_s": 30.0, "trace.max_total_tokens": 512},
])
def test_load_slice_is_the_engines_trace(over):
    """The server's simpy-free slice loader gives exactly the requests tiersim replays."""
    from sim.engine import load_trace_for

    config = with_overrides(tiny_config(), over)
    mine, theirs = rs.load_slice(config), load_trace_for(config)
    np.testing.assert_array_equal(mine.arrival_s, theirs.arrival_s)
    np.testing.assert_array_equal(mine.prompt_tokens, theirs.prompt_tokens)
    np.testing.assert_array_equal(mine.output_tokens, theirs.output_tokens)
    np.testing.assert_array_equal(mine.request_id, theirs.request_id)


def test_the_server_runs_without_simpy():
    """Device machines have no simpy: the server's modules must not import it (nor sim.engine)."""
    code = ("import sys; import calibration.reference_server, calibration.serving_engine, calibration.e2e_cases; "
            "import calibration.serving_model; bad = [m for m in ('simpy', 'sim.engine', 'sim.replica') "
            "if m in sys.modules]; print(bad); raise SystemExit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_token_arena_first_fit_and_coalescing():
    from calibration.serving_model import TokenArena

    a = TokenArena(100)
    x, y, z = a.allocate(30), a.allocate(30), a.allocate(30)
    assert (x, y, z) == (0, 30, 60) and a.allocate(11) is None
    a.release(y, 30)
    assert a.allocate(31) is None and a.allocate(20) == 30
    a.release(x, 30)
    a.release(30, 20)          # coalesces with [0, 30) and [50, 60)
    a.check()
    assert a.free[0] == [0, 60] and a.allocate(60) == 0
    with pytest.raises(RuntimeError):
        a.release(95, 5)
    a.check()


def test_every_case_has_a_prediction_and_fits_the_budget():
    from calibration import e2e_cases

    names = [c.name for c in e2e_cases.CASES]
    assert len(names) == len(set(names)) == 8
    assert {(c.model, c.trace, c.load) for c in e2e_cases.CASES} == {
        (m, t, ld) for m in ("llama-3.2-1b", "llama-3.1-8b") for t in ("azure-conv", "azure-code")
        for ld in ("light", "near-saturation")}
    for c in e2e_cases.CASES:
        assert abs(c.predicted_utilization - e2e_cases.TARGET_UTILIZATION[c.load]) <= 0.02, c.name
    total = sum(c.predicted_wall_s() for c in e2e_cases.CASES) + sum(e2e_cases.SETUP_S.values())
    assert total < 280


# ============================================================================ the torch executor
torch_needed = pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None,
                                  reason="PyTorch is not installed")


@torch_needed
def test_ragged_forward_equals_the_reference_decoder():
    """Two sequences in one packed step (a whole prompt, a chunk), then a mixed step (the first one's
    decode, the rest of the chunked prompt): each sampled row's logits equal the reference decoder's
    run of that sequence alone."""
    import torch

    from calibration.reference_model import ReferenceModel
    from calibration.serving_model import AttnMeta, ServingModel, pack_step
    from sim.request import Request
    from sim.specs import ModelSpec

    spec = ModelSpec(name="test-llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                     ffn_size=48, vocab_size=97, max_context_tokens=512)
    ref = ReferenceModel(spec, device="cpu", dtype=torch.float32, kv_capacity_tokens=64, weight_std=0.2)
    model = ServingModel(spec, device="cpu", dtype=torch.float32, arena_tokens=200, max_positions=64, weight_std=0.2)
    pool = np.random.default_rng(0).integers(0, spec.vocab_size, 1 << 16)
    a = Request(idx=0, req_id=0, arrival_s=0.0, prompt_tokens=9, output_tokens=5)
    b = Request(idx=1, req_id=1, arrival_s=0.0, prompt_tokens=12, output_tokens=5)
    regions, last = {0: 100, 1: 7}, {}

    def run(step):
        inp = pack_step(step, regions, last, pool, 201)
        t = torch.from_numpy
        meta = AttnMeta(t(inp.cu_q), t(inp.k_start), t(inp.k_used), inp.max_q, inp.max_k, inp.seqs)
        return model.forward(t(inp.ids), t(inp.pos), t(inp.dest), meta, None if inp.rows is None else t(inp.rows),
                             logits=True)

    ids1, logits1 = run(Step(prefill=[(a, 9, 0), (b, 5, 0)], decode=[], preempted=[]))
    assert logits1.shape == (1, spec.vocab_size)           # only the whole prompt samples
    a.num_computed, a.num_generated, b.num_computed = 9, 1, 5
    last[0] = int(ids1[0])
    _, logits2 = run(Step(prefill=[(b, 7, 5)], decode=[(a, 9)], preempted=[]))
    a_ids = np.take(pool, np.arange(9), mode="wrap").tolist()
    b_ids = np.take(pool, np.arange(12) + 7919, mode="wrap").tolist()

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    assert rel(logits1[0], ref.logits(torch.tensor([a_ids]), start=0, cap=16)[0]) < 1e-5
    assert rel(logits2[0], ref.logits(torch.tensor([a_ids + [last[0]]]), start=0, cap=16)[0]) < 1e-5
    assert rel(logits2[1], ref.logits(torch.tensor([b_ids]), start=0, cap=16)[0]) < 1e-5


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny model served on the CPU under both schedulers (KV small enough to preempt)."""
    pytest.importorskip("torch")
    import pyarrow.parquet as pq

    from calibration.serving_model import TorchExecutor

    path = tmp_path_factory.mktemp("trace") / "tiny.parquet"
    pq.write_table(make_trace(ARRIVAL, PROMPT, OUTPUT).to_arrow(), path)
    configs = {"fcfs": tiny_config("fcfs", trace=str(path), watermark=0.0),
               "chunked": tiny_config("chunked-prefill", trace=str(path), max_num_batched_tokens=32)}
    ex = TorchExecutor("tiny-llama", device="cpu", arena_tokens=2048, max_positions=1024, graphs=False)
    runs = {}
    for name, config in configs.items():
        clock = rs.WallClock(fast_forward=True)
        rec = rs.serve(config, ex, clock, check=True)
        rec.meta = {**rs.case_meta(config, ex, {"fast_forward": True}), **rec.meta}
        runs[name] = rec
    out = tmp_path_factory.mktemp("run") / "RUN"
    rs.write_run(out, runs)
    return out, runs


@torch_needed
def test_tiny_run_times_are_consistent(tiny_runs):
    _, runs = tiny_runs
    for name, rec in runs.items():
        r = rec.requests
        ok = r[r["status"] == "finished"]
        assert len(ok) == len(r) - 1, name               # the 400-token prompt exceeds the KV capacity
        assert (ok["arrival_s"] <= ok["first_scheduled_s"]).all(), name
        assert (ok["first_scheduled_s"] <= ok["first_token_s"]).all(), name
        assert (ok["first_token_s"] <= ok["finish_s"]).all(), name
        assert (ok["generated_tokens"] == ok["output_tokens"]).all(), name
        s = rec.steps
        assert (s["step"].to_numpy() == np.arange(len(s))).all()
        assert (s["duration_s"] > 0).all() and (s["forward_s"] > 0).all() and (s["host_s"] >= 0).all()
        ends = (s["start_s"] + s["duration_s"]).to_numpy()
        assert (s["start_s"].to_numpy()[1:] >= ends[:-1]).all(), f"{name}: steps overlap"
        # every finished request emitted exactly its output tokens, in distinct, increasing steps
        t = rec.tokens
        emitted = (t["seg_last"] - t["seg_first"] + 1).groupby(t["idx"]).sum()
        assert (emitted.reindex(ok["idx"]).to_numpy() == ok["output_tokens"].to_numpy()).all(), name
        assert rec.meta["preemptions"] > 0, name
        # a step's sampled rows: its decodes and the chunks that complete a sequence
        assert (s["sampled"] >= s["decode_seqs"]).all()
        assert not s["graph"].any()


@torch_needed
def test_validate_e2e_reports_on_the_tiny_run(tiny_runs, capsys):
    from sim.cli import main

    run_dir, _ = tiny_runs
    assert main(["validate", "--e2e", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "fcfs" in out and "chunked" in out
    e2e = run_dir / "e2e"
    assert (e2e / "report.md").exists() and (e2e / "fcfs.png").exists() and (e2e / "chunked.png").exists()
    summary = json.loads((e2e / "summary.json").read_text())
    for c in summary["cases"]:
        assert set(c["latency"]) == {"ttft", "itl", "e2e"}
        assert c["slice"] == "identical to the config's trace slice"
        assert c["steps"]["measured"] > 0 and c["steps"]["simulated"] > 0
        assert c["backend"] == "table"          # the h200 table, generalised to the tiny shape
        assert set(c["step_pricing"]) >= {"all"}


@torch_needed
def test_realtime_clock_waits_for_arrivals():
    """Real time: after an idle gap the next step starts no earlier than the arrival that ends it."""
    from calibration.serving_model import TorchExecutor

    tr = make_trace([0.0, 0.08], [20, 20], [3, 3])
    ex = TorchExecutor("tiny-llama", device="cpu", arena_tokens=256, max_positions=128, graphs=False)
    rec = rs.serve(tiny_config(), ex, rs.WallClock(fast_forward=False), trace=tr)
    first = rec.steps[rec.steps["prefill_seqs"] > 0]["start_s"].to_numpy()
    assert first[1] >= 0.08 and rec.meta["idle_skipped_s"] == 0.0
    fast = rs.serve(tiny_config(), ex, rs.WallClock(fast_forward=True), trace=tr)
    assert fast.meta["idle_skipped_s"] > 0.05


# ============================================================================ --cases
def test_cases_mode_records_each_case_isolates_failures_and_skips_done_ones(tmp_path, monkeypatch, capsys):
    from calibration import e2e_cases

    small = [c for c in e2e_cases.CASES if c.name in ("1b-code-light", "8b-code-light")]
    monkeypatch.setattr(e2e_cases, "CASES", tuple(small))
    real = rs.run_case

    def flaky(config, executor, **kw):
        if config.model.name == "llama-3.1-8b":
            raise RuntimeError("boom")
        return real(config, executor, **kw)

    monkeypatch.setattr(rs, "run_case", flaky)
    out = tmp_path / "e2e"
    assert rs.main(["--cases", "--executor", "priced", "--out", str(out)]) == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cases"]["1b-code-light"]["status"] == "ok"
    assert meta["cases"]["8b-code-light"]["status"] == "failed" and "boom" in meta["cases"]["8b-code-light"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "requests.parquet", "steps.parquet", "tokens.parquet"]
    monkeypatch.setattr(rs, "run_case", real)
    capsys.readouterr()
    assert rs.main(["--cases", "--executor", "priced", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already in" in printed and "1b-code-light" in printed.split("already in")[1]
    runs = rs.read_run(out)
    assert set(runs) == {"1b-code-light", "8b-code-light"}
    assert runs["1b-code-light"].meta["steps"] == small[0].predicted_steps


class _FixedStepClock(rs.VirtualClock):
    """Every step lasts 1 ms: schedules no longer depend on how fast this machine is."""

    def end_step(self, start, timing):
        self.t = start + 1e-3
        return self.t


@torch_needed
@pytest.mark.parametrize("scheduler,params,match", [("fcfs", {"watermark": 0.0}, "pad"),
                                                    ("chunked-prefill", {"max_num_batched_tokens": 32}, "exact")])
def test_the_gpu_data_path_samples_the_reference_tokens(trace, scheduler, params, match):
    """The device path (varlen inputs: query offsets, key offsets and counts; decode graphs with padding
    rows and the dummy region), emulated on the CPU, samples exactly the tokens that the reference
    attention per sequence does, step by step."""
    from calibration.serving_model import CAPTURE_SIZES, TorchExecutor

    class Recording(TorchExecutor):
        log = None              # set after construction: the warm-up's steps are not recorded

        def run(self, step):
            timing = super().run(step)
            if self.log is not None:
                self.log.append(dict(self.last_token))
            return timing

    config = tiny_config(scheduler, **params)
    logs, recs = [], []
    for attention, graphs in (("loop", False), ("emulated", True)):
        ex = Recording("tiny-llama", device="cpu", arena_tokens=2048, max_positions=1024, graphs=graphs,
                       graph_match=match, max_graph_batch=8, attention=attention)
        ex.log = []
        recs.append(rs.serve(config, ex, _FixedStepClock(), trace=trace, check=True))
        logs.append(ex.log)
    assert logs[0] == logs[1]
    s = recs[1].steps
    decode_only = (s["prefill_seqs"] == 0).to_numpy()
    graph = s["graph"].to_numpy()
    assert not graph[~decode_only].any()
    if match == "pad":
        assert graph[decode_only & (s["decode_seqs"] <= 8).to_numpy()].all()
        assert (s["graph_batch"][graph] >= s["decode_seqs"][graph]).all()
    else:
        assert (graph[decode_only] == s["decode_seqs"][decode_only].isin(CAPTURE_SIZES).to_numpy()).all()
        assert (s["graph_batch"][graph] == s["decode_seqs"][graph]).all()
    assert graph.any() and (~graph & decode_only).any() == (match == "exact")


def test_validate_e2e_finds_no_error_in_a_priced_run(trace, tmp_path, capsys):
    """A dry run is tiersim's replay, so the comparison must report exactly zero everywhere: the
    comparison's own bookkeeping (percentiles, token gaps, per-request matching, shape pricing) is right."""
    import pyarrow.parquet as pq

    from sim.cli import main

    path = tmp_path / "t.parquet"
    pq.write_table(trace.to_arrow(), path)
    config = tiny_config("chunked-prefill", model="llama-3.2-1b", trace=str(path), max_num_batched_tokens=32)
    rec = rs.run_case(config, rs.PricedExecutor(config))
    rs.write_run(tmp_path / "run", {"dry": rec})
    assert main(["validate", "--e2e", str(tmp_path / "run")]) == 0
    c = json.loads((tmp_path / "run" / "e2e" / "summary.json").read_text())["cases"][0]
    for metric in ("ttft", "itl", "e2e"):
        for q in ("p50", "p90", "p99"):
            assert c["latency"][metric][q]["error"] == 0.0, (metric, q)
    assert all(v["median_abs"] == 0.0 for v in c["per_request"].values())
    assert c["steps"]["measured"] == c["steps"]["simulated"]
    assert c["step_pricing"]["all"]["median_abs"] == 0.0 and c["execution"] == "cuda-graph"


def test_policy_instances_are_seeded_as_the_cluster_seeds_them():
    from calibration.serving_engine import policy_rng
    from policies import registry
    from sim.cluster import policy_rng as cluster_rng

    for kind in registry.KINDS:
        assert policy_rng(7, kind, 0).integers(1 << 30, size=4).tolist() == \
            cluster_rng(7, kind, 0).integers(1 << 30, size=4).tolist()
