"""Error bars from the tables' validation, and the leave-one-model-out check that backs generalised ones."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from calibration import leave_one_out
from sim.costs.accuracy import ErrorBars, shape_class
from sim.costs.table import resolve_table_dir


def test_shape_classes():
    assert shape_class("decode", 1, 4096) == "batch 1-4"
    assert shape_class("decode", 64, 128) == "batch >= 33"
    assert shape_class("prefill", 2, 512) == "<= 1,024 tokens"
    assert shape_class("prefill", 4, 2048) == "> 4,096 tokens"


def test_error_bars_of_the_h100_table():
    bars = ErrorBars.for_table(resolve_table_dir("h100-sxm-80gb"))
    b = bars.for_step("decode", "cuda-graph", 64, 1024, generalised=False)
    assert b["class"] == "batch >= 33" and b["basis"] == "validation" and b["points"] == 24
    assert 0.0 < b["median_abs_error"] < b["p95_abs_error"] < 0.2
    assert "median" in b["line"] and "p95" in b["line"]
    # the graph-mode figure over all decode steps is the validation report's
    summary = json.loads((resolve_table_dir("h100-sxm-80gb") / "validation" / "summary.json").read_text())["summary"]
    ref = next(r for r in summary if (r["source"], r["phase"], r["mode"]) == ("table run", "decode", "graph"))
    run = bars.for_run("cuda-graph", generalised=False)
    all_dec = next(r for r in run["classes"] if (r["phase"], r["class"]) == ("decode", "all"))
    assert all_dec["median_abs_error"] == pytest.approx(ref["median_abs_error"])
    # a generalised model gets the leave-one-model-out error
    g = bars.for_step("decode", "cuda-graph", 8, 1024, generalised=True)
    assert g["basis"] == "leave-one-model-out"
    assert bars.for_step("decode", "persistent", 8, 1024, generalised=False) is None


def test_table_without_a_model_keeps_what_the_other_model_shares(tmp_path):
    src = resolve_table_dir("h100-sxm-80gb")
    out = leave_one_out.table_without(src, "llama-3.1-8b", ["llama-3.2-1b"], tmp_path / "t")
    keys = set(map(tuple, pd.read_parquet(out / "ops.parquet")[["op", "key"]].drop_duplicates().to_numpy()))
    assert ("sample", "v=128256") in keys                          # both models sample the same vocabulary
    assert ("gemm", "dtype=bf16,k=4096,n=6144") not in keys        # the 8B's QKV
    assert ("gemm", "dtype=bf16,k=2048,n=3072") in keys            # the 1B's QKV
    assert (out / "raw" / "hbm_stream.parquet").exists()


@pytest.mark.slow
def test_leave_one_model_out_stays_close_to_the_full_table():
    res = leave_one_out.run("h100-sxm-80gb")
    held = {(r["phase"], r["mode"]): r for r in res["held_out_summary"]}
    full = {(r["phase"], r["mode"]): r for r in res["full_table_summary"]}
    for phase in ("decode", "prefill"):
        assert held[(phase, "graph")]["median_abs_error"] < 0.08
        assert held[(phase, "graph")]["median_abs_error"] < full[(phase, "graph")]["median_abs_error"] + 0.02
    shipped = json.loads((resolve_table_dir("h100-sxm-80gb") / "validation" / "leave_one_out.json").read_text())
    # the shipped report is what this code computes
    assert [r["median_abs_error"] for r in shipped["held_out_summary"]] == pytest.approx(
        [r["median_abs_error"] for r in res["held_out_summary"]])
