"""Shape-general pricing: any decoder shape from a GPU's table, exact entries first, every source stated."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from policies import registry
from sim.cli import main
from sim.costs.generalise import GemmModel, fp8_factor, gemm_model_from_table
from sim.costs.model import StepShape, TransformerOps, parse_key
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.specs import load_gpu, load_model


@pytest.fixture(scope="module")
def h100_table():
    return CostTable(resolve_table_dir("h100-sxm-80gb"))


def backend(model, tp=1, gpu="h100", table=None, **kw):
    ops = TransformerOps(model if not isinstance(model, str) else load_model(model), tp)
    t = table or CostTable(resolve_table_dir({"h100": "h100-sxm-80gb", "a100": "a100-80gb-vidur",
                                              "h200": "h200"}[gpu]))
    return TableBackend(ops, load_gpu(gpu), t, **kw)


def step_s(b, shape: StepShape) -> float:
    cost = StepCostModel(b.ops, b, registry.build("execution", "cuda-graph", {}))
    return cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum, shape.num_sampled)[0]


@pytest.mark.parametrize("model,tp,gpu", [("qwen2.5-7b", 1, "h100"), ("llama-3.1-70b", 2, "h100"),
                                          ("llama-3.1-70b", 4, "h100"), ("llama-3.1-70b", 8, "h100"),
                                          ("llama-2-70b", 2, "a100"), ("qwen2.5-7b", 1, "h200"),
                                          ("llama-2-7b", 1, "h200"), ("mistral-7b", 1, "h200")])
def test_every_preset_shape_prices_from_the_shipped_tables(model, tp, gpu):
    b = backend(model, tp, gpu)
    rep = b.lookup_report()
    assert not rep["roofline_priced"]
    assert set(rep["classes"]) <= {"measured", "generalised", "modelled"}
    for shape in (StepShape.decode(32, 2048), StepShape.prefill(2, 1024)):
        t = step_s(b, shape)
        assert 1e-3 < t < 1.0
    # more work costs more
    assert step_s(b, StepShape.decode(64, 2048)) > step_s(b, StepShape.decode(8, 2048))


def test_exact_entries_stay_the_first_source(h100_table):
    rep = backend("llama-3.1-8b", table=h100_table).lookup_report()
    assert rep["classes"] == {"measured": 17}
    qwen = backend("qwen2.5-7b", table=h100_table).lookup_report()["ops"]
    assert qwen["qkv_proj"]["source"] == "generalised" and "GEMM model" in qwen["qkv_proj"]["from"]
    assert qwen["attn_norm"]["from"] == "rms_norm h=4096"
    assert qwen["kv_write"]["from"] == "kv_write d=64,kvh=8"        # the same bytes per token: 4 x 128 = 8 x 64


def test_an_elementwise_op_at_the_same_bytes_per_row_is_the_measured_curve(h100_table):
    gpu = load_gpu("h100")
    m8 = load_model("llama-3.1-8b")
    # KV write of 4 heads x 128 moves what 8 heads x 64 does
    fake = dataclasses.replace(m8, name="gqa4", num_kv_heads=4, head_dim=64, num_heads=32)
    b = TableBackend(TransformerOps(fake), gpu, h100_table)
    src = CostTable(resolve_table_dir("h100-sxm-80gb")).points("kv_write", "d=64,kvh=4")  \
        if h100_table.has("kv_write", "d=64,kvh=4") else None
    assert src is None
    i = b.ops.index["kv_write"]
    ref = TableBackend(TransformerOps(load_model("llama-3.2-1b")), gpu, h100_table)
    j = ref.ops.index["kv_write"]
    for tokens in (1, 64, 1000):
        half = b.fixed_times(tokens, tokens)[i]
        # half the bytes of the 1B's kv_write (8 heads x 64): the 1B's curve at half the tokens
        assert half == pytest.approx(ref.curves[j](tokens / 2)[0], rel=1e-9)
        assert ref.fixed_times(tokens, tokens)[j] >= half


def test_gemm_model_leave_one_shape_out(h100_table):
    """Each measured H100 GEMM shape predicted by a model fitted on the other nine."""
    gpu = load_gpu("h100")
    rows = [(parse_key(k), g) for (op, k), g in h100_table.groups.items() if op == "gemm"]
    errs = []
    for i, (held, g) in enumerate(rows):
        rest = [r for j, r in enumerate(rows) if j != i]
        model = GemmModel.fit(gpu, np.concatenate([r[1]["x"].to_numpy(float) for r in rest]),
                              np.concatenate([np.full(len(r[1]), float(r[0]["n"])) for r in rest]),
                              np.concatenate([np.full(len(r[1]), float(r[0]["k"])) for r in rest]),
                              np.concatenate([r[1]["time_s"].to_numpy(float) for r in rest]))
        pred = model.time(g["x"].to_numpy(float), int(held["n"]), int(held["k"]))
        errs.append(np.abs(pred / g["time_s"].to_numpy(float) - 1))
    e = np.concatenate(errs)
    assert np.median(e) < 0.08 and np.percentile(e, 95) < 0.25
    full = gemm_model_from_table(h100_table, gpu)
    assert full is gemm_model_from_table(h100_table, gpu)           # fitted once per table
    d = full.describe()
    assert 0.5 < d["compute_efficiency"] < 1.0 and len(d["fitted_on"]) == 10


def test_decode_attention_reads_the_grid_at_the_same_kv_bytes(h100_table):
    gpu = load_gpu("h100")
    m8 = load_model("llama-3.1-8b")
    b8 = TableBackend(TransformerOps(m8), gpu, h100_table)
    b4 = TableBackend(TransformerOps(dataclasses.replace(m8, name="kv4", num_kv_heads=4)), gpu, h100_table)
    ctx = np.array([2 * 2049.0])
    # 2 sequences with 4 KV heads read what 1 sequence with 8 does
    assert b4.decode_attention_times(2, ctx)[0] == pytest.approx(b8.decode_attention_times(1, ctx / 2)[0])
    assert "batch x 0.5" in b4.lookup_report()["ops"]["attn_decode"]["how"]


def test_kv_bytes_shorten_memory_bound_decode_attention(h100_table):
    gpu = load_gpu("h100")
    m8 = load_model("llama-3.1-8b")
    b16 = TableBackend(TransformerOps(m8), gpu, h100_table)
    b8 = TableBackend(TransformerOps(dataclasses.replace(m8, bytes_per_kv=1)), gpu, h100_table)
    ctx = np.array([64 * 4097.0])
    ratio = b8.decode_attention_times(64, ctx)[0] / b16.decode_attention_times(64, ctx)[0]
    assert 0.45 < ratio < 0.6                   # memory-bound: about half the time for half the bytes
    assert b8.lookup_report()["ops"]["attn_decode"]["source"] == "generalised"
    i = b16.ops.index["kv_write"]
    assert b8.fixed_times(4096, 1)[i] < b16.fixed_times(4096, 1)[i]      # the KV write moves half too


def test_fp8_weights_use_the_stated_model_with_a_warning(h100_table):
    m8 = load_model("llama-3.1-8b")
    b16 = backend(m8, table=h100_table)
    b8 = backend(dataclasses.replace(m8, bytes_per_weight=1), table=h100_table)
    rep = b8.lookup_report()
    assert any("fp8" in w and "stated model" in w for w in rep["warnings"])
    assert rep["ops"]["qkv_proj"]["how"] == "fp8 from bf16 (stated model)"
    assert rep["ops"]["qkv_proj"]["key"] == "dtype=fp8,k=4096,n=6144"
    dec = step_s(b8, StepShape.decode(1, 1024)) / step_s(b16, StepShape.decode(1, 1024))
    pre = step_s(b8, StepShape.prefill(1, 4096)) / step_s(b16, StepShape.prefill(1, 4096))
    assert 0.55 < dec < 0.75 and 0.55 < pre < 0.8
    gpu = load_gpu("h100")
    f = fp8_factor(np.array([1.0, 16384.0]), 4096, 4096, gpu)
    assert f[0] == pytest.approx(0.5, rel=0.01) and f[1] == pytest.approx(0.5, rel=0.01)
    a100 = fp8_factor(np.array([16384.0]), 4096, 4096, load_gpu("a100"))
    assert a100[0] == pytest.approx(1.0)                              # no fp8 tensor cores


def test_measured_fp8_gemm_entries_are_the_first_source(tmp_path):
    src = resolve_table_dir("h100-sxm-80gb")
    dst = tmp_path / "t"
    dst.mkdir()
    shutil.copy(src / "table.json", dst / "table.json")
    ops = pd.read_parquet(src / "ops.parquet")
    fp8 = ops[(ops.op == "gemm") & (ops.key == "dtype=bf16,k=4096,n=6144")].copy()
    fp8["key"] = "dtype=fp8,k=4096,n=6144"
    fp8["time_s"] = fp8["time_s"] * 0.6
    pd.concat([ops, fp8], ignore_index=True).to_parquet(dst / "ops.parquet", index=False)
    b = backend(dataclasses.replace(load_model("llama-3.1-8b"), bytes_per_weight=1), table=CostTable(dst))
    rep = b.lookup_report()["ops"]
    assert rep["qkv_proj"]["source"] == "measured"
    assert rep["o_proj"]["how"] == "fp8 from bf16 (stated model)"
    i = b.ops.index["qkv_proj"]
    m1 = fp8[fp8.x == 64].time_s.iloc[0]
    assert b.fixed_times(64, 64)[i] == pytest.approx(m1)


def test_allreduce_without_a_measurement_is_modelled_and_said_so():
    b = backend("llama-3.1-70b", 4)
    rep = b.lookup_report()
    assert rep["ops"]["attn_allreduce"]["source"] == "modelled"
    assert any("allreduce tp=4" in w for w in rep["warnings"])
    a = backend("llama-2-70b", 2, "a100").lookup_report()
    assert a["ops"]["attn_allreduce"]["source"] == "measured"    # Vidur's profile has it


def test_extrapolation_says_how_far(h100_table):
    b = backend("llama-3.1-8b", table=h100_table)
    b.decode_attention_times(1, np.array([65536.0]))
    ext = b.lookup_report()["extrapolated"]["attn_decode"]
    assert ext["lookups"] == 1 and ext["max_over_grid"] == pytest.approx(2.0)


def test_predict_step_and_run_work_for_qwen_without_a_fallback(capsys, tmp_path):
    assert main(["predict-step", "--model", "qwen2.5-7b", "--gpu", "h100", "--phase", "decode",
                 "--batch", "8", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "generalised" in out
    assert main(["run", "--set", "model.name=qwen2.5-7b", "--set", "trace.max_requests=40", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "costs: h100-sxm-80gb (17 generalised ops)" in out.splitlines()[0]
    assert "costs generalised from this GPU's other shapes" in out


def test_the_summary_says_which_ops_the_roofline_priced(capsys, tmp_path):
    a100 = ["--set", "hardware.gpu=a100-80gb", "--set", "costs.table=a100-80gb-vidur", "--set",
            "model.name=llama-2-70b", "--set", "replica.tensor_parallel_size=2", "--set", "trace.max_requests=30",
            "--no-progress"]
    assert main(["run", *a100, "--set", "costs.fallback=roofline", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "costs: a100-80gb-vidur (16 measured, 3 roofline ops)" in out.splitlines()[0]
    assert "costs priced by the roofline: kv_write, lm_head, sample" in out
    assert main(["run", *a100, "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "(16 measured, 1 generalised, 2 modelled ops)" in out.splitlines()[0]
    assert "error bars: this table has no validation measurements" in out
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["costs"]["ops"]["lm_head"]["source"] == "generalised"
    assert summary["costs"]["error_bars"]["classes"] == []
