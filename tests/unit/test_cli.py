"""The tiersim command: outputs, one-line errors, determinism."""
from __future__ import annotations

import json

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
def test_bad_config_gets_one_line_without_traceback(capsys, args, needle):
    rc, out, err = run_cli(capsys, "run", *args, "--no-progress")
    assert rc == 2
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_trace_rows_name_file_row_and_field(tmp_path, capsys):
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
    assert rc == 2 and "not a tiersim results directory" in err and "steps.parquet" in err
