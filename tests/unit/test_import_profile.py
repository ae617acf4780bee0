"""import-profile: an engine's profiled steps → a recipe; tested on the traced H100 steps kept with the table."""
from __future__ import annotations

import gzip
import json

import pytest

from calibration.import_profile import import_profile, read_trace
from calibration.validate import cost_model, point_shape
from sim.cli import main
from sim.costs.recipe import load_recipe
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.specs import load_gpu

TABLE = resolve_table_dir("h100-sxm-80gb")
TRACE = TABLE / "runs" / "4-diagnostics" / "trace.json.gz"


def ops_error(recipe, points) -> float:
    """Mean |predicted ops / traced span - 1| over the traced graph replays."""
    errs = []
    for p in points:
        cost = cost_model(CostTable(TABLE), p["model"], "graph")
        cost.backend = TableBackend(cost.ops, load_gpu("h100"), CostTable(TABLE), recipe=recipe)
        _, rows, _, _, _ = cost.breakdown(point_shape(p["phase"], p["batch"], p["length"]))
        g = p["graph"]
        span = (g[-1][1] + g[-1][2] - g[0][1]) * 1e-6
        errs.append(abs(sum(r.time_s for r in rows) / span - 1))
    return sum(errs) / len(errs)


@pytest.fixture(scope="module")
def points():
    with gzip.open(TRACE, "rt") as fh:
        return json.load(fh)["points"]


def test_the_reference_engine_imports_as_the_table_counts_it_with_corrections(points):
    recipe, details = import_profile(TRACE, TABLE)
    d = details["ops"]
    # the table's own kernel counts per op at every traced shape...
    for op in ("qkv_proj", "rope", "kv_write", "o_proj", "attn_residual", "ffn_norm", "gate_up_proj", "act",
               "down_proj", "attn_norm", "lm_head", "sample"):
        assert d[op]["kernels"] == d[op]["table_kernels"], op
    assert d["rope"]["kernels"][0] == 10 and d["kv_write"]["kernels"][0] == 2
    # ...except the embedding: the two per-step rotary-table gathers the table does not price
    assert d["embed"]["kernels"] == [3] * 5 and recipe.ops["embed"].kernels[0].count == 3
    # small-batch decode: the norm runs slower in the model than alone (in_model.md: 6.1 against 4.1 us)
    assert dict(d["attn_norm"]["scale"])[1.0] > 1.15
    # and the corrected recipe predicts the traced steps better than the table alone
    assert ops_error(recipe, points) < 0.5 * ops_error(load_recipe("fused"), points)


def test_an_unfused_engine_is_counted_from_its_kernels(points, tmp_path):
    """The same steps with every norm kernel replaced by the 8 kernels of an fp32 RMSNorm (in the same
    time: the count changes, the correction does not)."""
    p = next(q for q in points if q["model"] == "llama-3.2-1b" and q["phase"] == "decode")
    out = []
    for name, start, dur in p["graph"]:
        if "layer_norm" in name:
            for j, k in enumerate(("copy_to_fp32", "pow", "mean_reduce", "add", "rsqrt", "mul", "copy_bf16", "mul")):
                out.append([f"void at::native::elementwise_kernel_{k}", start + j * dur / 8, dur / 8 * 1.5])
        else:
            out.append([name, start, dur])
    trace = tmp_path / "unfused.json"
    trace.write_text(json.dumps({"points": [{**p, "graph": out}]}))
    recipe, details = import_profile(trace, TABLE)
    for op in ("attn_norm", "ffn_norm", "final_norm"):
        assert details["ops"][op]["kernels"] == [8]
        assert recipe.ops[op].kernels[0].count == 8
    b = TableBackend(cost_model(CostTable(TABLE), "llama-3.2-1b", "graph").ops, load_gpu("h100"), CostTable(TABLE),
                     recipe=recipe)
    assert b.kernel_counts(1, 1, False, True)[b.ops.index["attn_norm"]] == 8


def test_kineto_traces_split_at_profiler_steps(points, tmp_path):
    p = next(q for q in points if q["model"] == "llama-3.2-1b" and q["phase"] == "decode")
    events, corr = [], 0
    for step in range(2):
        t0 = 10_000.0 * step
        events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{step}", "ts": t0, "dur": 9000.0})
        for name, start, dur in p["graph"]:
            corr += 1
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t0 + 1 + start / 10,
                           "dur": 0.1, "args": {"correlation": corr}})
            cat = "gpu_memset" if name.startswith("Memset") else "kernel"
            events.append({"ph": "X", "cat": cat, "name": name, "ts": t0 + 50 + start, "dur": dur,
                           "args": {"correlation": corr}})
    trace = tmp_path / "kineto.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    steps = read_trace(trace, model="llama-3.2-1b", phase="decode", batch=1, length=1024)
    assert len(steps) == 2 and len(steps[0].kernels) == len(p["graph"])
    with pytest.raises(ValueError, match="give --model"):
        read_trace(trace)
    _, details = import_profile(trace, TABLE, model="llama-3.2-1b", phase="decode", batch=1, length=1024)
    assert details["ops"]["rope"]["kernels"] == [10, 10]


def test_cli(tmp_path, capsys):
    out = tmp_path / "engine.toml"
    assert main(["calibrate", "import-profile", str(TRACE), "--out", str(out), "--name", "ref-h100"]) == 0
    assert "op(s) corrected" in capsys.readouterr().out
    recipe = load_recipe(str(out))
    assert recipe.name == "ref-h100" and "embed" in recipe.ops
    assert main(["predict-step", "--phase", "decode", "--batch", "1", "--context", "1024", "--recipe", str(out)]) == 0
    assert main(["calibrate", "import-profile", str(tmp_path / "missing.json")]) == 2
    assert main(["calibrate", "import-profile"]) == 2
