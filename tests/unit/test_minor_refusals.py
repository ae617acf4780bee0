"""Small refusals: each bad input gets one line naming the file, the config key or the option, not a
silent default or another part's error."""
from __future__ import annotations

import pytest

from sim.config import SimConfig, with_overrides
from sim.errors import ConfigError
from sim.workload import load_trace_for
from tests.unit.test_cli import run_cli


def test_trace_describe_refuses_a_file_with_only_a_header(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n")
    rc, out, err = run_cli(capsys, "trace", "describe", str(path))
    assert rc == 2 and out == ""
    assert err == "tiersim: error: empty.csv: the file holds no requests\n"   # as tiersim run says it


@pytest.mark.parametrize("name, text, fmt", [
    ("", "", "azure"),       # the default bundled Azure trace
    ("az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n", "azure"),
    ("m.jsonl", '{"timestamp": 0, "input_length": 7, "output_length": 4}\n', "mooncake"),
], ids=["bundled-azure", "azure-file", "mooncake-file"])
def test_time_unit_with_a_trace_of_another_format_names_the_key(tmp_path, name, text, fmt):
    overrides = {"trace.time_unit": "ms"}
    if name:
        (tmp_path / name).write_text(text)
        overrides["trace.path"] = str(tmp_path / name)
    with pytest.raises(ConfigError) as err:      # not the generic reader's "missing column 'arrival_s'"
        load_trace_for(with_overrides(SimConfig(), overrides))
    msg = str(err.value)
    assert msg.startswith("trace.time_unit: only the csv and parquet formats read it"), msg
    assert f"is read as {fmt}, whose reader converts its own timestamps; remove trace.time_unit" in msg


@pytest.mark.parametrize("args, needle", [
    (["--sample", "trace.rate_scale=uniform(1,8)", "--samples", "-3"],
     "--samples must be >= 1 to draw the random axes (got -3)"),
    (["--sample", "trace.rate_scale=uniform(1,8)", "--samples", "0"],
     "--samples must be >= 1 to draw the random axes (got 0)"),
    (["--grid", "trace.rate_scale=1,2", "--samples", "-3"], "--samples must be >= 0 (got -3)"),
    (["--sample", "trace.rate_scale=uniform(1,8)", "--samples", "1", "--sample-seed", "-3"],
     "--sample-seed must be >= 0 (got -3)"),        # was numpy's ValueError with a traceback
], ids=["negative", "zero-with-random-axes", "negative-grid-only", "negative-seed"])
def test_sweep_sampling_options_are_refused_by_their_option_name(tmp_path, capsys, args, needle):
    rc, _, err = run_cli(capsys, "sweep", *args, "--out", str(tmp_path / "sw"))
    assert rc == 2 and err == f"tiersim: error: {needle}\n", err
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("value", ['""', '"  "'])
def test_an_empty_output_dir_is_refused_and_the_default_is_kept(tmp_path, capsys, value):
    needle = ("output.dir: an empty path; name the results directory (or leave output.dir out for the default, "
              "tiersim-results)")
    with pytest.raises(ConfigError) as err:
        with_overrides(SimConfig(), [f"output.dir={value}"])
    assert str(err.value) == needle
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[output]\ndir = {value}\n")
    rc, _, err_text = run_cli(capsys, "run", "--config", str(cfg))
    assert rc == 2 and err_text == f"tiersim: error: {cfg}: {needle}\n"
    assert SimConfig().output.dir == "tiersim-results"
    assert with_overrides(SimConfig(), ['output.dir="elsewhere"']).output.dir == "elsewhere"


@pytest.mark.parametrize("text, key", [
    ("[replica]\nnum_blockz = 5\n", "replica.num_blockz: unknown key"),
    ("[replica]\ndram_kv_bytes = \"abc\"\n", "replica.dram_kv_bytes: expected int"),
], ids=["unknown-key", "wrong-type"])
def test_a_config_file_error_names_the_file_then_the_key(tmp_path, capsys, text, key):
    # with a base config, a sweep file and --set in one command, the key alone does not say which to fix
    path = tmp_path / "base.toml"
    path.write_text(text)
    rc, out, err = run_cli(capsys, "run", "--config", str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and not (tmp_path / "out").exists()
    assert err.startswith(f"tiersim: error: {path}: {key}")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(text.replace("[", "[base.", 1) + '[grid]\n"replica.block_size_tokens" = [16, 32]\n')
    rc, out, err = run_cli(capsys, "sweep", str(sweep), "--out", str(tmp_path / "sw"))
    assert rc == 2 and err.startswith(f"tiersim: error: {sweep}: base: {key}")


def test_an_override_error_still_names_only_the_key():
    with pytest.raises(ConfigError) as err:
        with_overrides(SimConfig(), ["replica.dram_kv_bytes=abc"])
    assert str(err.value).startswith("replica.dram_kv_bytes: expected int")


@pytest.mark.parametrize("text, key", [
    ('[policies.scheduling]\nname = "fcfz"\n', "policies.scheduling.name: unknown scheduling policy 'fcfz'"),
    ('[policies.scheduling]\nname = "fcfs"\nmax_num_seqz = 3\n', "policies.scheduling.max_num_seqz: unknown parameter"),
    ("[replica]\nmax_model_len = 10000000\n", "replica.max_model_len=10000000 exceeds the context window"),
], ids=["policy-name", "policy-parameter", "context-window"])
def test_an_error_found_while_the_run_is_built_names_the_file_that_set_the_key(tmp_path, capsys, text, key):
    # policy names and parameters are checked once the plugins are loaded, after the file was read
    path = tmp_path / "base.toml"
    path.write_text(text)
    rc, _, err = run_cli(capsys, "run", "--config", str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and not (tmp_path / "out").exists()
    assert err.startswith(f"tiersim: error: {path}: {key}"), err
    # the same key given by --set is the option's error, not the file's
    name, value = ("policies.scheduling.name", '"fcfx"') if "fcfz" in text else ("trace.max_requests", "5")
    rc, _, err = run_cli(capsys, "run", "--config", str(path), "--set", f"{name}={value}", "--out",
                         str(tmp_path / "out"))
    assert rc == 2 and err.startswith("tiersim: error: ") and (str(path) in err) == (name != "policies.scheduling.name")
