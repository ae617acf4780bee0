"""Bad user input gets one line that names the user's own file (not a preset, not the wrong column) and
advice that can work: spec files, CSV delimiters, cut JSON lines, and arrival order in ``trace describe``."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import traces
from sim import specs
from sim.cli import main
from sim.errors import ConfigError
from traces import Trace, TraceError, load_trace

PRESETS = Path(specs.__file__).parent / "presets"


def _edited(src: Path, dst: Path, key: str, value: str) -> Path:
    text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", src.read_text())
    assert n == 1, f"{key} not in {src}"
    dst.write_text(text)
    return dst


# --- D20: range errors in a user's spec file name that file ------------------------------------------
@pytest.mark.parametrize("kind, preset, key, value, load", [
    ("gpus", "h100-sxm-80gb", "hbm_bytes", "0", specs.load_gpu),
    ("models", "llama-3.2-1b", "num_layers", "0", specs.load_model),
])
def test_range_error_in_a_users_spec_file_names_the_file(tmp_path, kind, preset, key, value, load):
    path = _edited(PRESETS / kind / f"{preset}.toml", tmp_path / "mine.toml", key, value)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert str(err.value) == f"{path}: {key} must be > 0 (got 0)"


def test_range_error_in_a_users_pcie_table_and_head_ratio_name_the_file(tmp_path):
    gpu = _edited(PRESETS / "gpus" / "h100-sxm-80gb.toml", tmp_path / "g.toml", "h2d_bandwidth_bytes_per_s", "0")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(gpu))} \[pcie\]: h2d_bandwidth_bytes_per_s must "
                                          r"be > 0 \(got 0\)$"):
        specs.load_gpu(str(gpu))
    model = _edited(PRESETS / "models" / "llama-3.2-1b.toml", tmp_path / "m.toml", "num_kv_heads", "5")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(model))}: num_heads \(\d+\) must be a multiple of "
                                          r"num_kv_heads \(5\)$"):
        specs.load_model(str(model))


def test_range_error_in_a_preset_keeps_the_preset_name(tmp_path, monkeypatch):
    (tmp_path / "gpus").mkdir()
    _edited(PRESETS / "gpus" / "h100-sxm-80gb.toml", tmp_path / "gpus" / "broken.toml", "hbm_bytes", "0")
    monkeypatch.setattr(specs, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"^gpu\[h100-sxm-80gb\]\.hbm_bytes must be > 0 \(got 0\)$"):
        specs.load_gpu("broken")


def test_range_error_in_a_users_gpu_file_from_the_cli(tmp_path, capsys):
    gpu = _edited(PRESETS / "gpus" / "h100-sxm-80gb.toml", tmp_path / "g.toml", "hbm_bytes", "0")
    rc = main(["run", "--set", f"hardware.gpu={gpu}", "--set", "costs.backend=roofline", "--set",
               "trace.max_requests=20", "--quiet", "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"tiersim: error: {gpu}: hbm_bytes must be > 0 (got 0)"


# --- D21: a header separated by ';' or tabs ----------------------------------------------------------
@pytest.mark.parametrize("name, sep, shown, code, out", [
    ("s.csv", ";", "';'", ";", "s-comma.csv"),
    ("t.tsv", "\t", "tabs", "\\t", "t.csv"),
])
@pytest.mark.parametrize("format", [None, "csv", "azure"])
def test_a_header_separated_by_another_delimiter_says_so(tmp_path, name, sep, shown, code, out, format):
    path = tmp_path / name
    path.write_text(sep.join(["arrival_s", "prompt_tokens", "output_tokens"]) + "\n" + sep.join("0 10 5".split())
                    + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path, format=format)
    assert str(err.value) == (
        f"{name}: the header is separated by {shown}, not ','; tiersim reads comma-separated files: convert it "
        f"(e.g. python -c \"import pandas as pd; pd.read_csv('{path}', sep='{code}')"
        f".to_csv('{tmp_path / out}', index=False)\")")


def test_the_suggested_conversion_works(tmp_path):
    import pandas as pd

    path = tmp_path / "s.csv"
    path.write_text("arrival_s;prompt_tokens;output_tokens\n0;10;5\n1;3;4\n")
    pd.read_csv(path, sep=";").to_csv(tmp_path / "s-comma.csv", index=False)
    assert list(load_trace(tmp_path / "s-comma.csv").prompt_tokens) == [10, 3]


# --- D22: invalid JSON lines name the column within the line, once -----------------------------------
@pytest.mark.parametrize("line, detail", [
    ('{"timestamp": 0, "input_length": 74, "output_length": 44',
     "invalid JSON: Expecting ',' delimiter at the end of the line (column 57); is the line cut short?"),
    ('{"timestamp": 0, "input_le\tngth": 74, "output_length": 44}',
     "invalid JSON: Invalid control character at column 27"),
    ('{"timestamp": 0, "input_length": 74, "output_length": 44}}', "invalid JSON: Extra data at column 58"),
])
@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_invalid_json_names_the_column_in_the_line(tmp_path, line, detail, ending):
    path = tmp_path / "tr.jsonl"
    path.write_bytes(f'{{"timestamp": 0, "input_length": 7, "output_length": 4}}{ending}{line}{ending}'.encode())
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert str(err.value) == f"tr.jsonl: row 2 (line 2): {detail}"


# --- arrival times going backwards are counted and shown ---------------------------------------------
def test_out_of_order_rows_are_counted_and_described(tmp_path, capsys):
    t = Trace(arrival_s=[0.0, 2.0, 1.0, 0.5, 3.0], prompt_tokens=[1] * 5, output_tokens=[1] * 5)
    assert t.meta["sorted"] is True and t.meta["out_of_order_rows"] == 2
    assert list(t.arrival_s) == [0.0, 0.5, 1.0, 2.0, 3.0]
    assert "out_of_order_rows" not in Trace(arrival_s=np.arange(3.0), prompt_tokens=[1] * 3,
                                            output_tokens=[1] * 3).meta
    assert traces.describe(t)["out_of_order_rows"] == 2
    path = tmp_path / "o.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n2,1,1\n1,1,1\n")
    assert main(["trace", "describe", str(path)]) == 0
    assert "arrival order   1 row given earlier than the row before; re-sorted by arrival (stable)" in (
        capsys.readouterr().out)
