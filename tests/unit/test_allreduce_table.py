"""A measured all-reduce curve (the TP lease's rows) becomes table entries that price a TP model's all-reduces."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from calibration.fit import fit_table
from calibration.raw import make_row, rows_to_frame
from sim.costs.model import StepShape, TransformerOps, make_key
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.specs import load_gpu, load_model

LAT_S, BW = 12e-6, 320e9      # the synthetic curve: 12 us + bytes / 320 GB/s


def synthetic_rows(tp: int = 2) -> list[dict]:
    rows = []
    for k in range(12, 30):
        nbytes = 2.0 ** k
        t = LAT_S + nbytes / BW
        for variant, f in (("nccl-graph", 1.0), ("nccl", 1.3)):   # eager is slower: the graph rows must win
            rows.append(make_row("allreduce", variant, [t * f] * 5, op="allreduce", key=make_key(tp=tp), x=nbytes,
                                 nbytes=nbytes))
    return rows


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("h200") / "h200"
    shutil.copytree(resolve_table_dir("h200"), d, ignore=shutil.ignore_patterns("runs", "validation", "logs"))
    rows_to_frame(synthetic_rows()).to_parquet(d / "raw" / "allreduce.parquet", index=False)
    fit_table(d)
    return CostTable(d)


def test_refitting_the_shipped_table_changes_nothing_but_the_new_entries(table):
    old = CostTable(resolve_table_dir("h200"))
    new = table.frame[table.frame["op"] != "allreduce"].reset_index(drop=True)
    assert new.drop(columns=["kernels"]).equals(old.frame.drop(columns=["kernels"]))
    new_fits = {k: v for k, v in table.meta["fits"].items() if k != "allreduce"}
    assert new_fits.keys() == old.meta["fits"].keys()
    for op, keys in old.meta["fits"].items():   # the same up to the last digits (another NumPy fitted them)
        for key, fit in keys.items():
            assert new_fits[op][key] == {f: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v
                                         for f, v in fit.items()}
    assert set(table.frame.loc[table.frame["op"] == "allreduce", "variant"]) == {"nccl-graph"}


def test_a_tp2_model_prices_its_allreduces_from_the_measured_curve(table):
    ops = TransformerOps(load_model("llama-3.1-8b"), tp=2)
    b = TableBackend(ops, load_gpu("h200"), table)
    src = b.lookup_report()["ops"]["attn_allreduce"]
    assert src["source"] == "measured" and not [w for w in b.warnings if "allreduce" in w]
    i = ops.index["attn_allreduce"]
    for tokens in (1, 64, 2048):
        nbytes = tokens * 4096 * 2
        assert b.fixed_times(tokens, tokens)[i] == pytest.approx(LAT_S + nbytes / BW, rel=0.02)
    # a TP 2 decode step costs 2 x 32 all-reduces more than the same shard without them would
    kern = b.kernel_counts(8, 8, False, True)
    assert kern[i] >= 1


def test_another_tp_size_is_read_at_equal_link_traffic(table):
    ops = TransformerOps(load_model("llama-3.1-70b"), tp=4)
    b = TableBackend(ops, load_gpu("h200"), table)
    src = b.lookup_report()["ops"]["ffn_allreduce"]
    assert src["source"] == "generalised" and src["from"] == "allreduce tp=2"
    i = ops.index["ffn_allreduce"]
    tokens = 1024
    nbytes = tokens * 8192 * 2
    ratio = (3 / 4) / (1 / 2)
    assert b.fixed_times(tokens, tokens)[i] == pytest.approx(LAT_S + nbytes * ratio / BW, rel=0.02)


def test_without_a_measurement_the_ring_model_warns():
    ops = TransformerOps(load_model("llama-3.1-8b"), tp=2)
    b = TableBackend(ops, load_gpu("h200"), CostTable(resolve_table_dir("h200")))
    assert b.lookup_report()["ops"]["attn_allreduce"]["source"] == "modelled"
    assert any("ring all-reduce" in w for w in b.warnings)
    t = b.fixed_times(16, 16)[ops.index["attn_allreduce"]]
    assert np.isfinite(t) and t > 0
    assert StepShape.decode(1, 16).num_tokens == 1
