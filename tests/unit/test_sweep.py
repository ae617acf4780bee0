"""Sweeps keep finished runs through failures and resume without redoing them."""
from sim.sweep import grid, run_sweep
from tests.conftest import small_config


def test_a_failing_variant_is_recorded_and_the_rest_finish_then_resume_skips_them(tmp_path):
    base = small_config(**{"trace.max_requests": 30})
    variants = grid({"policies.scheduling.name": ["fcfs", "chunked-prefill", "no-such-policy"]})
    t1 = run_sweep(base, variants, tmp_path, progress=None)
    assert list(t1["status"]) == ["done", "done", "failed"]
    assert "unknown scheduling policy 'no-such-policy'" in t1["error"].iloc[2]
    assert t1["ttft_p50_s"].iloc[:2].notna().all()
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 2
    t2 = run_sweep(base, variants, tmp_path, progress=None)
    assert list(t2["status"]) == ["done (resumed)", "done (resumed)", "failed"]
    assert list(t2["ttft_p50_s"].iloc[:2]) == list(t1["ttft_p50_s"].iloc[:2])
    assert (tmp_path / "sweep.csv").exists() and len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 4


def test_a_run_that_raises_does_not_lose_the_others(tmp_path, monkeypatch):
    import sim.engine

    real_run = sim.engine.Simulation.run
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_run(self)

    monkeypatch.setattr(sim.engine.Simulation, "run", flaky)
    base = small_config(**{"trace.max_requests": 20})
    t = run_sweep(base, grid({"replica.block_size_tokens": [8, 16, 32]}), tmp_path, progress=None)
    assert list(t["status"]) == ["done", "failed", "done"]
    assert "simulated crash" in t["error"].iloc[1]
