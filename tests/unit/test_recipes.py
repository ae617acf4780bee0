"""Engine recipes: the kernels per op as data; torch-unfused matches the stock-PyTorch layer's profiled count."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies import registry
from sim.costs.model import StepShape, TransformerOps
from sim.costs.recipe import format_recipe, load_recipe, parse_recipe, shipped_recipes
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.errors import ConfigError
from sim.specs import load_gpu, load_model

FIXTURE = Path(__file__).parent.parent / "data" / "kernel_counts" / "torch_unfused.json"


def backend(model: str, recipe: str) -> TableBackend:
    return TableBackend(TransformerOps(load_model(model)), load_gpu("h100"),
                        CostTable(resolve_table_dir("h100-sxm-80gb")), recipe=load_recipe(recipe))


def step_s(b: TableBackend, shape: StepShape, mode: str = "cuda-graph") -> float:
    cost = StepCostModel(b.ops, b, registry.build("execution", mode, {}))
    return cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum, shape.num_sampled)[0]


def test_shipped_recipes():
    assert {"fused", "torch-unfused"} <= set(shipped_recipes())
    assert all(r.is_table for r in load_recipe("fused").ops.values())


def test_torch_unfused_kernels_per_layer_match_the_recorded_profiler_counts():
    counts = json.loads(FIXTURE.read_text())["counts"]
    assert {c["device"] for c in counts} >= {"cpu"}
    for c in counts:
        if c.get("kernels_per_layer") is None:
            continue
        b = backend(c["model"], "torch-unfused")
        assert b.recipe_kernels_per_layer() == c["kernels_per_layer"], c
        if c["device"] == "cpu":
            # and kind by kind: the GEMMs are the profile's aten::linear calls
            layer_gemms = sum(int(b.kernels[i]) for i, op in enumerate(b.ops.ops)
                              if op.per_layer and op.table_op == "gemm")
            assert layer_gemms == c["kernels_by_op"]["aten::linear"]
    assert backend("llama-3.1-8b", "fused").recipe_kernels_per_layer() == 23


def test_the_stock_layer_still_counts_what_the_fixture_says():
    pytest.importorskip("torch")
    from calibration.torch_unfused import record

    recorded = {(c["model"], c["phase"]): c["kernels_per_layer"]
                for c in json.loads(FIXTURE.read_text())["counts"] if c["device"] == "cpu"}
    for c in record("cpu"):
        if c["model"] == "llama-3.2-1b":
            assert c["kernels_per_layer"] == recorded[(c["model"], c["phase"])]


def test_torch_unfused_takes_longer_in_every_phase():
    fused, unfused = backend("llama-3.1-8b", "fused"), backend("llama-3.1-8b", "torch-unfused")
    for mode in ("cuda-graph", "host-launched"):
        for shape in (StepShape.decode(1, 1024), StepShape.decode(64, 2048), StepShape.prefill(1, 1024),
                      StepShape.prefill(4, 2048)):
            assert step_s(unfused, shape, mode) > 1.03 * step_s(fused, shape, mode)
    rep = unfused.lookup_report()
    assert rep["recipe"] == "torch-unfused"
    assert rep["ops"]["attn_norm"]["recipe"][0] == "to_fp32"
    assert unfused.identity["recipe"] == "torch-unfused" and "recipe" not in fused.identity
    # bytes follow the kernels: the fp32 norm moves ~9x the fused norm's bytes
    shape = StepShape.prefill(1, 1024)
    i = fused.ops.index["attn_norm"]
    assert unfused.flops_bytes(shape)[1][i] > 8 * fused.flops_bytes(shape)[1][i]


def test_recipe_errors_name_the_key(tmp_path):
    good = {"name": "x", "ops": {"rms_norm": {"kernels": [{"price": "bytes", "elements": "hidden", "read": 2}]}}}
    assert parse_recipe(good, "t").for_op(TransformerOps(load_model("llama-3.2-1b")).ops[1]).kernels[0].read == 2
    bad = [
        ({"name": "x", "ops": {"nope": {}}}, "ops.nope: unknown op"),
        ({"name": "x", "ops": {"add": {"kernels": [{"price": "fast"}]}}}, r"ops.add.kernels\[0\].price"),
        ({"name": "x", "ops": {"add": {"kernels": [{"price": "bytes", "elements": "wide", "read": 1}]}}},
         "unknown extent 'wide'"),
        ({"name": "x", "ops": {"add": {"kernels": [{"price": "bytes", "elements": "hidden"}]}}}, "read and/or write"),
        ({"name": "x", "ops": {"qkv_proj": {"kernels": [{"price": "gemm", "n": "q"}]}}}, r"kernels\[0\].k"),
        ({"name": "x", "ops": {"attn_decode": {"kernels": [{"price": "gemm", "n": "q", "k": "hidden"}]}}},
         "attention ops take table and bytes kernels only"),
        ({"name": "x", "ops": {"add": {"scale": 0}}}, "ops.add.scale"),
        ({"ops": {}}, "needs a name"),
    ]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_recipe(data, "t")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*fused"):
        load_recipe("nope")
    # a written recipe reads back the same
    r = load_recipe("torch-unfused")
    path = tmp_path / "r.toml"
    path.write_text(format_recipe(r, "written by a test"))
    again = load_recipe(str(path))
    assert again.ops == r.ops and again.name == r.name


def test_config_and_predict_step_take_a_recipe(capsys):
    from sim.cli import main
    from sim.config import SimConfig, with_overrides

    cfg = with_overrides(SimConfig(), {"costs.recipe": "torch-unfused"})
    assert cfg.costs.recipe == "torch-unfused"
    assert main(["predict-step", "--phase", "decode", "--batch", "4", "--context", "512",
                 "--recipe", "torch-unfused"]) == 0
    out = capsys.readouterr().out
    assert "recipe torch-unfused" in out.splitlines()[0]
