"""In-model attribution: kernels are assigned to ops in order, and a misaligned trace is refused."""
from __future__ import annotations

import numpy as np

from calibration import attribute as A
from calibration.validate import cost_model, point_shape
from sim.costs.table import CostTable, resolve_table_dir


def _synthetic_point(names_for_gemm="nvjet_sm90_tst_gemm", extra_front=0):
    """A graph trace of llama-3.2-1b decode (batch 1, context 1024) built from the table itself: each
    op's kernels take exactly the op's predicted time, back to back with no gaps."""
    table = resolve_table_dir("h100-sxm-80gb")
    cost = cost_model(CostTable(table), "llama-3.2-1b", "graph")
    shape = point_shape("decode", 1, 1024)
    _, rows, _, _, _ = cost.breakdown(shape)
    pred = {r.name: r.time_s * 1e6 for r in rows}
    kern = cost.backend.kernel_counts(shape.num_tokens, shape.num_sampled, False, True)
    gemm = {op.name for op in cost.ops.ops if op.table_op == "gemm"}
    seq = []
    per_layer = [(op.name, int(kern[i])) for i, op in enumerate(cost.ops.ops) if op.per_layer and kern[i] > 0]
    for i, op in enumerate(cost.ops.ops):
        if kern[i] <= 0:
            continue
        if not op.per_layer and op.name == "embed":
            seq.append(("embed", int(kern[i]), pred[op.name]))
            seq += [("gather", 1, 0.0)] * extra_front
            for _ in range(cost.num_layers):
                seq += [(n, c, pred[n] / cost.num_layers) for n, c in per_layer]
        elif not op.per_layer:
            seq.append((op.name, int(kern[i]), pred[op.name]))
    kernels, t = [], 0.0
    for name, count, total in seq:
        for _ in range(count):
            label = (names_for_gemm if name in gemm else f"elementwise {name}") if name != "gather" \
                else "vectorized_gather_kernel"
            d = total / count if count else 0.0
            kernels.append([label, t, d if d > 0 else 1.0])
            t += d if d > 0 else 1.0
    return {"model": "llama-3.2-1b", "phase": "decode", "batch": 1, "length": 1024, "graph": kernels}, pred


def test_a_trace_made_of_the_tables_own_times_attributes_to_zero_difference():
    point, pred = _synthetic_point(extra_front=2)
    r = A.attribute_point(point, resolve_table_dir("h100-sxm-80gb"))
    assert r["aligned"], r.get("misaligned_at")
    assert r["kernels_measured"] == r["kernels_predicted"] + 2 and r["step_extra_us"] == 2.0
    by_op = {o["op"]: o for o in r["ops"]}
    assert set(by_op) == set(pred)
    for name, o in by_op.items():
        assert abs(o["diff_us"]) < 1e-6 * max(1.0, pred[name]), name
    assert abs(r["gemm_diff_us"]) < 1e-6 and abs(r["other_diff_us"]) < 1e-3
    text = A.format_markdown([r], "h100-sxm-80gb", "synthetic")
    assert "| gate_up_proj |" in text and "Not aligned" not in text


def test_a_gemm_op_that_lands_on_a_non_gemm_kernel_is_reported_not_aligned():
    point, _ = _synthetic_point(names_for_gemm="elementwise something")
    r = A.attribute_point(point, resolve_table_dir("h100-sxm-80gb"))
    assert not r["aligned"] and r["misaligned_at"].startswith("qkv_proj")
    assert "Not aligned: qkv_proj" in A.format_markdown([r], "t", "synthetic")
    assert np.isfinite(r["span_us"])
