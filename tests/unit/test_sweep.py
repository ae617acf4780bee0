"""Sweeps: axes (grid, explicit points, random draws), failures recorded, resume, and the results
dataset read in one call by pandas, pyarrow and DuckDB."""
import json

import pandas as pd
import pytest

from sim.errors import ConfigError, TiersimError
from sim.results_data import load_sweep
from sim.sweep import SweepError, SweepSpec, column_name, grid, hive_value, load_sweep_file, run_sweep
from tests.conftest import small_config


def test_a_failing_variant_is_recorded_and_the_rest_finish_then_resume_skips_them(tmp_path):
    base = small_config(**{"trace.max_requests": 30, "replica.dram_kv_bytes": 0})
    # swap preemption with no DRAM passes the config and fails when the run builds its replicas
    variants = [{"policies.scheduling.name": "fcfs"}, {"policies.scheduling.name": "chunked-prefill"},
                {"replica.preemption_mode": "swap"}]
    t1 = run_sweep(base, variants, tmp_path, jobs=1)
    assert list(t1["status"]) == ["done", "done", "failed"]
    assert "replica.preemption_mode" in t1["error"].iloc[2]
    assert t1["ttft_p50_s"].iloc[:2].notna().all()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["scheduling_name=chunked-prefill",
                                                                      "scheduling_name=fcfs"]
    t2 = run_sweep(base, variants, tmp_path, jobs=1)
    assert list(t2["status"]) == ["done (resumed)", "done (resumed)", "failed"]
    assert list(t2["ttft_p50_s"].iloc[:2]) == list(t1["ttft_p50_s"].iloc[:2])
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["done", "done", "failed", "failed"]   # failures are retried
    assert "Traceback" in index[2]["traceback"]


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
    t = run_sweep(base, grid({"replica.block_size_tokens": [8, 16, 32]}), tmp_path, jobs=1)
    assert list(t["status"]) == ["done", "failed", "done"]
    assert "simulated crash" in t["error"].iloc[1]
    assert not (tmp_path / "runs" / "replica_block_size_tokens=16").exists()


def test_axes_grid_points_and_seeded_random_draws():
    spec = SweepSpec(base=small_config(), grid={"trace.rate_scale": [1.0, 2.0]},
                     points=[{"policies.scheduling.name": "fcfs"},
                             {"policies.scheduling.name": "chunked-prefill",
                              "policies.scheduling.max_num_batched_tokens": 512}],
                     random={"seed": {"int": [0, 1000]}}, samples=3, sample_seed=7)
    v = spec.variants()
    assert len(v) == 2 * 2 * 3
    again = SweepSpec(base=small_config(), grid={"trace.rate_scale": [1.0, 2.0]}, points=spec.points,
                      random={"seed": {"int": [0, 1000]}}, samples=3, sample_seed=7).variants()
    assert v == again                                     # the draws are seeded
    assert {x["seed"] for x in v[:6]} == {x["seed"] for x in v[6:]}   # every grid point sees the same draws
    # a point that does not set an axis says so, so every path has the same depth
    assert spec.run_path(v[0]) == ("trace_rate_scale=1.0/scheduling_name=fcfs/"
                                   f"scheduling_max_num_batched_tokens=unset/seed={v[0]['seed']}")
    assert column_name("policies.scheduling.max_num_batched_tokens") == "scheduling_max_num_batched_tokens"
    assert hive_value("tests/a b=c.csv") == "tests%2Fa%20b%3Dc.csv" and hive_value(True) == "true"
    with pytest.raises(ConfigError, match="on two axes"):
        SweepSpec(grid={"seed": [1]}, random={"seed": {"int": [0, 3]}}, samples=1)
    with pytest.raises(ConfigError, match="lo < hi"):
        SweepSpec(random={"trace.rate_scale": {"uniform": [4, 1]}}, samples=1)


def test_dataset_reads_in_one_call_with_parameter_columns(tmp_path):
    import duckdb
    import pyarrow.dataset as ds

    f = tmp_path / "s.toml"
    f.write_text('[set]\n"model.name" = "llama-3.2-1b"\n"costs.backend" = "roofline"\n'
                 '"replica.num_hbm_blocks" = 64\n"trace.max_requests" = 25\n'
                 '[grid]\n"policies.scheduling.name" = ["fcfs", "chunked-prefill"]\n'
                 'trace = ["azure-conv", "azure-code"]\n')
    spec = load_sweep_file(f)
    table = run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)
    assert (table["status"] == "done").all() and list(table.columns[:2]) == ["scheduling_name", "trace"]
    req = pd.read_parquet(tmp_path / "sw" / "requests")
    assert len(req) == 4 * 25 and {"scheduling_name", "trace", "config_hash", "ttft_s"} <= set(req.columns)
    assert ds.dataset(tmp_path / "sw" / "requests", partitioning="hive").count_rows() == 100
    got = duckdb.sql(f"select trace, scheduling_name, count(*) n from '{tmp_path}/sw/requests/**/*.parquet' "
                     "group by all order by all").fetchall()
    assert got == [("azure-code", "chunked-prefill", 25), ("azure-code", "fcfs", 25),
                   ("azure-conv", "chunked-prefill", 25), ("azure-conv", "fcfs", 25)]
    sw = load_sweep(tmp_path / "sw")
    assert sw.params == ["scheduling_name", "trace"] and len(sw.summary) == 4
    run = sw.run(scheduling_name="fcfs", trace="azure-code")
    assert run.summary["trace"]["name"].startswith("AzureLLMInferenceTrace_code") and len(run.requests) == 25
    assert run.config["trace"]["bundled"] == "azure-code" and run.config["trace"]["path"] == ""
    with pytest.raises(TiersimError, match="2 finished runs match"):
        sw.run(scheduling_name="fcfs")
    from sim.cli import main

    assert main(["plot", str(tmp_path / "sw")]) == 0 and (tmp_path / "sw" / "overview.png").stat().st_size > 10_000
    # the same directory refuses a different sweep
    other = SweepSpec(base=spec.base, grid={"seed": [1]})
    with pytest.raises(SweepError, match="holds a different sweep"):
        run_sweep(other, out_dir=tmp_path / "sw", jobs=1)


def test_a_path_valued_axis_is_percent_encoded_and_pyarrow_and_duckdb_decode_it(tmp_path):
    import duckdb
    import pyarrow.dataset as ds

    src = tmp_path / "a b=c"          # a directory name that needs encoding ("/", " ", "=")
    src.mkdir()
    path = src / "conv.csv"
    rows = [f"2023-11-16 18:15:{i:02d}.0000000,{100 + 7 * i},{20 + i}" for i in range(20)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    f = tmp_path / "s.toml"
    f.write_text('[set]\n"model.name" = "llama-3.2-1b"\n"costs.backend" = "roofline"\n'
                 '"replica.num_hbm_blocks" = 64\n"trace.format" = "azure"\n'
                 f'[grid]\n"trace.path" = ["{path}"]\n"seed" = [1, 2]\n')
    table = run_sweep(load_sweep_file(f), out_dir=tmp_path / "sw", jobs=1)
    assert (table["status"] == "done").all()
    got = ds.dataset(tmp_path / "sw" / "requests", partitioning="hive").to_table(columns=["trace_path"])
    assert set(got.column("trace_path").to_pylist()) == {str(path)}
    rows = duckdb.sql(f"select distinct trace_path from '{tmp_path}/sw/requests/**/*.parquet'").fetchall()
    assert rows == [(str(path),)]


def test_plugins_load_in_workers_of_the_parallel_path(tmp_path):
    from pathlib import Path

    plugin = str(Path(__file__).resolve().parents[2] / "configs" / "plugins" / "least_loaded.py")
    spec = SweepSpec(base=small_config(**{"trace.max_requests": 20, "cluster.num_replicas": 2}),
                     grid={"policies.routing.name": ["round-robin", "least-loaded"]}, plugins=[plugin])
    table = run_sweep(spec, out_dir=tmp_path, jobs=2)
    assert list(table["status"]) == ["done", "done"], table["error"].tolist()
    cfg = (tmp_path / "runs" / "routing_name=least-loaded" / "config.toml").read_text()
    assert f'plugins = ["{plugin}"]' in cfg              # the saved config reproduces the run


def test_the_same_sweep_on_a_dask_local_cluster_gives_byte_identical_runs(tmp_path):
    pytest.importorskip("distributed", reason="the Dask path needs the [dask] extra (pip install 'tiersim[dask]')")
    spec = SweepSpec(base=small_config(**{"trace.max_requests": 30}),
                     grid={"policies.scheduling.name": ["fcfs", "chunked-prefill"]})
    local = run_sweep(spec, out_dir=tmp_path / "local", jobs=1)
    dask = run_sweep(spec, out_dir=tmp_path / "dask", jobs=2, scheduler="local")
    assert list(dask["status"]) == ["done", "done"], dask["error"].tolist()
    for rel in local["run"]:
        for f in ("requests.parquet", "steps.parquet", "itl_hist.parquet", "summary.json", "config.toml", "DONE"):
            a, b = (tmp_path / d / "runs" / rel / f for d in ("local", "dask"))
            assert a.read_bytes() == b.read_bytes(), f"{rel}/{f}"


def test_a_sweep_with_nothing_to_run_says_why_once_and_writes_nothing(tmp_path):
    spec = SweepSpec(grid={"replica.block_size_token": [16, 32]})
    with pytest.raises(ConfigError, match=r"every point of the sweep is invalid \(2 of 2\).*did you mean "
                                          r"'block_size_tokens'"):
        run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)
    assert not (tmp_path / "sw").exists()
    with pytest.raises(ConfigError, match="--jobs 0: must be >= 1"):
        run_sweep(SweepSpec(grid={"seed": [1, 2]}), out_dir=tmp_path / "sw", jobs=0)
    f = tmp_path / "s.toml"
    f.write_text('plugins = ["nope.py"]\n[grid]\n"seed" = [1, 2]\n')
    with pytest.raises(ConfigError, match=r"plugins\[0\] = 'nope.py': no such file"):
        load_sweep_file(f)
