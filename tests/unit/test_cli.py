"""The tiersim command: outputs, one-line errors, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sim.cli import main

SMALL = ["--set", "costs.backend=roofline", "--set", "trace.max_requests=200", "--no-progress"]


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_run_writes_results_and_prints_a_summary(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), *SMALL)
    assert rc == 0, err
    assert "TTFT (s)" in out and "ITL (ms)" in out and "throughput" in out
    for f in ("summary.json", "requests.parquet", "steps.parquet", "config.toml", "timing.json"):
        assert (tmp_path / "r" / f).exists()
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["requests"]["finished"] == 200
    assert len(s["config_hash"]) == 64 and s["cost_table"]["backend"] == "roofline"
    assert s["trace"]["name"] and s["config"]["trace"]["max_requests"] == 200


def test_same_config_and_seed_give_byte_identical_results(tmp_path, capsys):
    for d in ("a", "b"):
        assert run_cli(capsys, "run", "--out", str(tmp_path / d), "--seed", "3", *SMALL)[0] == 0
    for f in ("summary.json", "requests.parquet", "steps.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # the written configs differ only in where they were written
    a, b = ((tmp_path / d / "config.toml").read_text().replace(str(tmp_path / d), "OUT") for d in "ab")
    assert a == b


def test_progress_display_does_not_change_results(tmp_path, capsys):
    assert run_cli(capsys, "run", "--out", str(tmp_path / "a"), *SMALL)[0] == 0
    args = [a for a in SMALL if a != "--no-progress"]
    rc, out, err = run_cli(capsys, "run", "--out", str(tmp_path / "b"), *args)
    assert rc == 0
    # not a terminal: one line at the end (and every 10 s): requests of the total, simulated time, ETA
    assert "run: 200/200 requests (100.0 %) | simulated " in err and "(last arrival at " in err
    assert "ETA 0:00:00" in err
    for f in ("summary.json", "requests.parquet", "steps.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_written_config_reproduces_the_run(tmp_path, capsys):
    assert run_cli(capsys, "run", "--out", str(tmp_path / "a"), *SMALL)[0] == 0
    assert run_cli(capsys, "run", "--config", str(tmp_path / "a" / "config.toml"), "--out",
                   str(tmp_path / "b"), "--no-progress")[0] == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["config_hash"] == b["config_hash"]
    assert a["ttft_s"] == b["ttft_s"]


@pytest.mark.parametrize("args, needle", [
    (["--set", "policies.scheduling.name=fifo"], "unknown scheduling policy 'fifo' (known: chunked-prefill, fcfs)"),
    (["--set", "model.name=llama-3.1-70b"], "does not fit on h100-sxm-80gb"),
    (["--set", "replica.block_size_tokens=0"], "replica.block_size_tokens: must be >= 1"),
    (["--set", "replica.nonsense=1"], "replica.nonsense: unknown key"),
    (["--set", "policies.scheduling.max_num_seqs=x"], "policies.scheduling.max_num_seqs: expected int"),
    (["--set", "costs.table=/nonexistent/table"], "unknown cost table"),
    (["--set", "hardware.gpu=h300"], "unknown gpu 'h300'"),
])
def test_bad_config_gets_one_line_without_traceback(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)     # (a checkout where `tiersim run` already wrote tiersim-results/ is refused first)
    rc, out, err = run_cli(capsys, "run", *args, "--no-progress")
    assert rc == 2
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_trace_rows_name_file_row_and_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
                   "2023-11-16 18:15:47.6805900,-5,5\n")
    rc, out, err = run_cli(capsys, "run", "--trace", str(bad), "--set", "costs.backend=roofline")
    assert rc == 2 and err.strip() == ("tiersim: error: bad.csv: row 2 (line 3), field 'ContextTokens': "
                                       "negative token count -5")
    missing = tmp_path / "missing.csv"
    missing.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,10\n")
    rc, out, err = run_cli(capsys, "run", "--trace", str(missing), "--set", "costs.backend=roofline")
    assert rc == 2 and "missing column 'GeneratedTokens'" in err and "missing.csv" in err


def test_list_and_trace_describe(capsys):
    rc, out, _ = run_cli(capsys, "list")
    assert rc == 0 and "chunked-prefill" in out and "h100-sxm-80gb" in out and "azure-conv" in out
    assert "watermark =" not in out
    rc, out, _ = run_cli(capsys, "list", "policies")
    assert rc == 0 and "admission = 'chunk'" in out and "max_num_batched_tokens = 2048" in out
    rc, out, _ = run_cli(capsys, "trace", "describe", "azure-code")
    assert rc == 0 and "8,819" in out


def test_mooncake_trace_runs_end_to_end_with_prefix_hits(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "run", "--trace", "mooncake-conversation", "--format", "mooncake",
                           "--set", "costs.backend=roofline", "--set", "trace.max_requests=300",
                           "--out", str(tmp_path), "--no-progress")
    assert rc == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["requests"]["finished"] + s["requests"]["rejected"] == 300
    assert s["kv"]["prefix_hit_tokens"] > 0


def test_plot_draws_a_run_and_refuses_a_directory_that_is_not_one(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), "--plot", *SMALL,
                           "--set", "trace.rate_scale=8", "--set", "cluster.num_replicas=2")
    assert rc == 0, err
    png = tmp_path / "r" / "overview.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rc, out, _ = run_cli(capsys, "plot", str(tmp_path / "r"), "--out", str(tmp_path / "again.png"))
    assert rc == 0 and (tmp_path / "again.png").exists()
    rc, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert rc == 2 and "not a tiersim results directory" in err
    # figure paths are checked before any work: the suffix, the folder
    for cmd in (["plot", str(tmp_path / "r")], ["compare", str(tmp_path / "r")]):
        rc, out, err = run_cli(capsys, *cmd, "--out", str(tmp_path / "x.jpg2"))
        assert rc == 2 and "cannot write a .jpg2 file; use .png" in err and out == ""
        rc, _, err = run_cli(capsys, *cmd, "--out", str(tmp_path / "nodir" / "x.png"))
        assert rc == 2 and "nodir does not exist" in err
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "r"), "--out", str(tmp_path / "nodir" / "r.html"))
    assert rc == 2 and "nodir does not exist" in err
    (tmp_path / "afile").write_text("")
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "r"), "--figures", str(tmp_path / "afile"))
    assert rc == 2 and "is a file; name a folder" in err
    # a run without its DONE marker (killed, or still being written) is not a finished run, for every reader
    (tmp_path / "r" / "DONE").unlink()
    for cmd in (["plot", str(tmp_path / "r")], ["compare", str(tmp_path / "r"), "--out", "none"],
                ["report", str(tmp_path / "r")]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and "not a finished run (no DONE marker" in err, cmd


def test_settings_that_would_quietly_do_something_else_are_refused(tmp_path, capsys):
    cases = {
        ("--set", "replica.preemption_mode=swap", "--set", "replica.dram_kv_bytes=0"): "needs DRAM to swap to",
        ("--set", "policies.residency.hbm_evict_to=dram", "--set", "replica.dram_kv_bytes=0"):
            "policies.residency.hbm_evict_to = 'dram', but replica.dram_kv_bytes = 0",
        ("--set", "policies.residency.name=tiered", "--set", "policies.residency.dram_evict_to=nvme"):
            "policies.residency.dram_evict_to = 'nvme', but replica.nvme_kv_bytes = 0",
        ("--trace", "azure-code", "--set", "trace.synthetic=poisson rate=5 n=50"): "a run replays one workload",
        ("--plugin", "no_such_plugin_module"): "cannot import",
    }
    for args, want in cases.items():
        rc, _, err = run_cli(capsys, "run", "--out", str(tmp_path / "o"), *SMALL, *args)
        assert rc == 2 and want in err, (args, err)
        assert not (tmp_path / "o").exists()
    # a tier too small for one block is no tier either, and the message gives the bytes set
    rc, _, err = run_cli(capsys, "run", "--out", str(tmp_path / "o"), *SMALL, "--set", "replica.dram_kv_bytes=1000",
                         "--set", "policies.residency.hbm_evict_to=dram")
    assert rc == 2 and "replica.dram_kv_bytes = 1000 holds no" in err, err
    # every reason a request can be rejected has its advice
    from sim.cli import _REJECT_ADVICE
    from sim.metrics.requests import REJECT_REASONS
    assert set(_REJECT_ADVICE) == set(REJECT_REASONS) - {""}


def test_version_and_every_option_states_its_default(capsys):
    import sim
    from sim.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tiersim {sim.__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name in ("run", "plot", "config", "compare", "report", "sweep", "predict-step", "list"):
        sp = sub.choices[name]
        text = sp.format_help()
        for a in sp._actions:
            if a.option_strings and a.help != "==SUPPRESS==" and not a.required and "-h" not in a.option_strings:
                helptext = sp._get_formatter()._expand_help(a) if a.help else ""
                if "default" not in sp.formatter_class(sp.prog)._get_help_string(a) % {**vars(a), "default": 0} \
                        and "default" not in helptext:
                    missing.append(f"{name} {a.option_strings[0]}")
        assert "usage" in text
    assert not missing, missing


def test_an_existing_output_directory_is_kept_unless_forced(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_cli(capsys, "run", "--out", out, *SMALL)[0] == 0
    before = (tmp_path / "r" / "summary.json").read_bytes()
    rc, _, err = run_cli(capsys, "run", "--out", out, *SMALL, "--set", "trace.max_requests=50")
    assert rc == 2 and "already holds a finished run" in err and "--force" in err
    assert (tmp_path / "r" / "summary.json").read_bytes() == before
    # rerunning the saved config would write where it came from: refused too
    rc, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "r" / "config.toml"), "--no-progress")
    assert rc == 2 and "already holds a finished run" in err
    assert run_cli(capsys, "run", "--out", out, *SMALL, "--set", "trace.max_requests=50", "--force")[0] == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["requests"]["total"] == 50
    from sim import results_io

    assert results_io.verify(tmp_path / "r") is None


def test_saved_config_after_trace_name_holds_the_trace_once_and_reproduces_the_run(tmp_path, capsys):
    import tomllib

    args = ["--trace", "azure-code", *SMALL]
    assert run_cli(capsys, "run", "--out", str(tmp_path / "a"), *args)[0] == 0
    saved = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert saved["trace"]["bundled"] == "azure-code" and saved["trace"]["path"] == ""
    assert run_cli(capsys, "run", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b"),
                   "--no-progress")[0] == 0
    for f in ("summary.json", "requests.parquet", "steps.parquet", "itl_hist.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_config_defaults_document_every_key(capsys):
    import tomllib

    from sim.config import SimConfig, from_dict
    from sim.config_docs import undocumented_keys

    rc, out, _ = run_cli(capsys, "config", "--defaults")
    assert rc == 0 and "slo_itl_stat = \"p99\"" in out and "# tokens per paged-KV block" in out
    assert from_dict(tomllib.loads(out)).hash() == SimConfig().hash()    # the printout is a valid config
    assert undocumented_keys() == []
    # every key is printed, those to_dict leaves out at their defaults (plugins, the lanes keys) commented
    import dataclasses

    from sim.config import SECTIONS
    keys = {line.lstrip("# ").split(" = ")[0] for line in out.splitlines() if " = " in line}
    for name, cls in {**SECTIONS, "": SimConfig}.items():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.default):
                assert f.name in keys, f"{name}.{f.name} missing from tiersim config --defaults"
    assert "# lanes = " in out and "# plugins = " in out


def test_per_token_goodput_slo_counts_a_long_stall_that_the_mean_hides(tmp_path, capsys):
    base = ["--out", str(tmp_path / "m"), *SMALL, "--set", "trace.max_requests=100"]
    assert run_cli(capsys, "run", *base, "--json")[0] == 0
    mean_only = json.loads((tmp_path / "m" / "summary.json").read_text())["goodput"]
    strict = ["--set", "metrics.slo_itl_s=0.02", "--set", "metrics.slo_itl_stat=max"]
    rc, out, _ = run_cli(capsys, "run", *base, *strict, "--force")
    assert rc == 0 and "per-request max ITL <= 20 ms" in out
    gp = json.loads((tmp_path / "m" / "summary.json").read_text())["goodput"]
    assert gp["definition"] == "TTFT <= 2 s, TPOT (mean per request) <= 100 ms, per-request max ITL <= 20 ms"
    import pandas as pd

    req = pd.read_parquet(tmp_path / "m" / "requests.parquet")
    fin = req[req["status"] == "finished"]
    good = ((fin["ttft_s"] <= 2) & ((fin["tpot_s"] <= 0.1) | fin["tpot_s"].isna())
            & ((fin["itl_max_s"] <= 0.02) | fin["itl_max_s"].isna()))
    assert gp["fraction"] == good.sum() / len(req) < mean_only["fraction"]


def test_compare_prints_differences_and_draws_token_level_itl_cdfs(tmp_path, capsys):
    for d, sched in (("fcfs", "fcfs"), ("chunked", "chunked-prefill")):
        assert run_cli(capsys, "run", "--out", str(tmp_path / d), *SMALL,
                       "--set", f"policies.scheduling.name={sched}", "--set", "trace.rate_scale=4")[0] == 0
    rc, out, _ = run_cli(capsys, "compare", str(tmp_path / "fcfs"), str(tmp_path / "chunked"), "--out",
                         str(tmp_path / "cmp.svg"))
    assert rc == 0 and "TTFT p99 (s)" in out and "Δ[1]" in out and "ITL p99 (ms)" in out and " %" in out
    svg = (tmp_path / "cmp.svg").read_text()
    assert svg.count("<path") > 10 and "every token gap" in svg
    from sim.results_data import load_run

    run = load_run(tmp_path / "fcfs")
    x, y = run.itl_cdf()
    p99 = run.summary["itl_s"]["p99"]
    assert abs(np.interp(0.99, y, x) / p99 - 1) < 0.01     # the CDF is the quantity the summary reports


def test_validate_names_a_measurements_file_it_cannot_read(tmp_path, capsys):
    bad = tmp_path / "m.csv"
    bad.write_text("a,b\n1,2\n")
    rc, _, err = run_cli(capsys, "validate", "--measurements", str(bad), "--out", str(tmp_path / "v"))
    assert rc == 2 and f"{bad}: cannot read as Parquet" in err and "raw/*.parquet" in err


def test_a_run_that_rejects_requests_says_which_key_to_raise(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "run", "--out", str(tmp_path / "o"), *SMALL, "--set", "trace.max_requests=20",
                         "--set", "policies.scheduling.max_num_batched_tokens=64")
    assert rc == 0 and "were rejected" in out and "as 'exceeds scheduler token budget'" in out
    assert "raise policies.scheduling.max_num_batched_tokens" in out
    rc, out, _ = run_cli(capsys, "run", "--out", str(tmp_path / "p"), *SMALL, "--set", "trace.max_requests=20")
    assert rc == 0 and "warning" not in out


def test_compare_says_which_sweep_runs_it_left_out_and_an_empty_out_is_refused(tmp_path, capsys):
    from sim.sweep import SweepSpec, run_sweep
    from tests.conftest import small_config

    spec = SweepSpec(base=small_config(**{"trace.max_requests": 20}),
                     grid={"policies.scheduling.name": ["fcfs", "no-such-scheduler"]})
    run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)
    rc, _, err = run_cli(capsys, "compare", str(tmp_path / "sw"), "--out", "none")
    assert rc == 0 and "1 of 2 runs did not finish and are left out" in err
    rc, _, err = run_cli(capsys, "run", "--out", "", *SMALL)
    assert rc == 2 and "--out: an empty path" in err
