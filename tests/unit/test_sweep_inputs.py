"""Sweeps refuse bad input before anything runs and never clear a directory that is not theirs."""
import pandas as pd
import pytest

from sim.errors import ConfigError
from sim.sweep import SweepError, SweepSpec, load_sweep_file, parse_axis, run_sweep
from tests.conftest import small_config
from tests.unit.test_cli import run_cli

SMALL_SET = ["--set", "model.name=llama-3.2-1b", "--set", "costs.backend=roofline", "--set",
             "replica.num_hbm_blocks=64", "--set", "trace.max_requests=10"]


def test_force_never_clears_a_directory_that_is_not_a_sweep(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("keep me")
    spec = SweepSpec(base=small_config(**{"trace.max_requests": 10}), grid={"trace.rate_scale": [1.0, 2.0]})
    with pytest.raises(SweepError, match="not a sweep directory"):
        run_sweep(spec, out_dir=out, jobs=1, force=True)
    assert (out / "chapter1.tex").read_text() == "keep me"
    # a sweep's own directory is cleared by --force and run again
    sweep = tmp_path / "sw"
    run_sweep(spec, out_dir=sweep, jobs=1)
    (sweep / "stale.txt").write_text("x")
    run_sweep(spec, out_dir=sweep, jobs=1, force=True)
    assert not (sweep / "stale.txt").exists()


def test_an_empty_out_is_refused(capsys):
    rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--grid", "trace.rate_scale=1,2", "--out", "", "--force")
    assert rc == 2 and "--out: an empty path" in err


def test_grid_values_split_at_top_level_commas_only():
    assert parse_axis("policies.execution.capture_sizes=[1,2,4],[8,16]") == (
        "policies.execution.capture_sizes", [[1, 2, 4], [8, 16]])
    assert parse_axis('policies.scheduling.name="a,b",fcfs')[1] == ["a,b", "fcfs"]
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_axis("policies.execution.capture_sizes=[1,2")


def test_an_axis_mixing_kinds_of_value_gets_a_text_column(tmp_path):
    spec = SweepSpec(base=small_config(**{"trace.max_requests": 10}),
                     grid={"policies.execution.capture_sizes": ["all", [1, 2, 4, 8]]})
    table = run_sweep(spec, out_dir=tmp_path, jobs=1)
    assert list(table["status"]) == ["done", "done"]
    back = pd.read_parquet(tmp_path / "summary.parquet")
    assert list(back["execution_capture_sizes"]) == ["all", "[1, 2, 4, 8]"]


def test_a_resume_after_the_trace_file_changed_is_refused(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{i * 0.5},100,10\n" for i in range(40)))
    base = small_config(**{"trace.path": str(trace)})
    spec = SweepSpec(base=base, grid={"trace.rate_scale": [1.0, 2.0]})
    run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)
    assert list(run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)["status"]) == ["done (resumed)"] * 2
    trace.write_text(trace.read_text()[:400])
    with pytest.raises(SweepError, match="t.csv: changed since"):
        run_sweep(spec, out_dir=tmp_path / "sw", jobs=1)
    assert list(run_sweep(spec, out_dir=tmp_path / "sw", jobs=1, force=True)["status"]) == ["done"] * 2


@pytest.mark.parametrize("body, message", [
    ("set = 5", "set: expected a table"),
    ("points = [1, 2]", "points: expected tables"),
    ('samples = "abc"', "samples: expected a whole number"),
    ("samples = 2.7", "samples: expected a whole number"),
    ('plugins = "x.py"', "plugins: expected a list"),
    ("grid = 3", "grid: expected a table"),
])
def test_sweep_file_values_of_the_wrong_type_name_the_file_and_key(tmp_path, body, message):
    f = tmp_path / "s.toml"
    f.write_text(body + '\n[random]\n"trace.rate_scale" = {uniform = [1, 2]}\n')
    with pytest.raises(ConfigError, match=f"s.toml: {message}"):
        load_sweep_file(f)


def test_an_axis_given_twice_or_a_value_repeated_is_refused(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--grid", "trace.rate_scale=1,2", "--grid",
                         "trace.rate_scale=3", "--out", str(tmp_path / "a"))
    assert rc == 2 and "given twice" in err
    for values in ("1,1", "1,1.0"):
        rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--grid", f"trace.rate_scale={values}",
                             "--out", str(tmp_path / "b"))
        assert rc == 2 and "is given twice" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_trace_plugin_or_policy_parameter_is_refused_before_any_run(tmp_path, capsys):
    cases = [(["--trace", str(tmp_path / "nope.csv")], "nope.csv: no such file"),
             (["--plugin", str(tmp_path / "nope.py")], "nope.py: no such file"),
             (["--set", "policies.scheduling.nme=3"], "unknown parameter")]
    for extra, message in cases:
        rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--grid", "trace.rate_scale=1,2", *extra, "--quiet",
                             "--out", str(tmp_path / "sw"))
        assert rc == 2 and message in err, err
        assert not (tmp_path / "sw").exists()


def test_quiet_sweeps_still_say_why_a_run_failed(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "sweep", *SMALL_SET, "--set", "replica.dram_kv_bytes=0", "--grid",
                           "replica.preemption_mode=recompute,swap", "--quiet", "--jobs", "1",
                           "--out", str(tmp_path / "sw"))
    assert rc == 1 and out == ""
    assert "preemption_mode=swap: failed:" in err


def test_an_unreachable_dask_scheduler_is_one_line_and_the_sweep_resumes_later(tmp_path, capsys):
    pytest.importorskip("distributed")
    rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--grid", "trace.rate_scale=1,2", "--scheduler", "foo://bar",
                         "--quiet", "--out", str(tmp_path / "sw"))
    assert rc == 2 and "--scheduler foo://bar: cannot reach a Dask scheduler" in err and "Traceback" not in err


def test_a_sample_without_a_distribution_and_an_empty_grid_axis_say_where(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sweep", *SMALL_SET, "--sample", "trace.rate_scale", "--samples", "2",
                         "--out", str(tmp_path / "sw"))
    assert rc == 2 and "--sample 'trace.rate_scale': expected KEY=DIST" in err
    f = tmp_path / "s.toml"
    f.write_text('[grid]\n"trace.rate_scale" = []\n')
    with pytest.raises(ConfigError, match="s.toml: grid.trace.rate_scale: expected a list of values"):
        load_sweep_file(f)


def test_samples_on_the_command_line_completes_a_file_with_random_axes_and_no_samples(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[random]\n"replica.num_hbm_blocks" = {int = [2000, 24000]}\n')
    with pytest.raises(ConfigError, match=r"s.toml: \[random\] axes need draws: add samples = N .* --samples N"):
        load_sweep_file(f)
    spec = load_sweep_file(f, samples=3)
    assert spec.samples == 3 and len(spec.draws()) == 3
    f.write_text('samples = 5\n[random]\n"replica.num_hbm_blocks" = {int = [2000, 24000]}\n')
    assert load_sweep_file(f).samples == 5 and load_sweep_file(f, samples=2).samples == 2   # the option wins
