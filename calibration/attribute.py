"""Where a step's prediction error comes from: each op's time inside the model against the table.

    python -m calibration.attribute --table h100-sxm-80gb \\
        --trace calibration/tables/h100-sxm-80gb/runs/4-diagnostics/trace.json.gz --out in_model.md

Input: the CUDA-graph kernel traces that ``python -m calibration.diagnose trace`` records on the GPU
(every kernel of one graph replay of the reference decoder: name, start, duration in µs). Each
kernel is assigned to an op of ``sim.costs.model.TransformerOps`` by walking the op list in order
with the table's kernel count per op (the counts the vendor parts measured per op in isolation); a
GEMM op must land on a GEMM kernel, or the point is reported as not aligned. An op's in-model time is
the time from its first kernel's start to the next op's first kernel's start: kernel time plus the
gaps after its kernels, which is what the table's back-to-back timings include.

No GPU is needed: this reads a recorded trace and the table. Output: a per-op table per traced point
(predicted and in-model µs per step, and the difference as a share of the step), in Markdown, plus
JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np

GEMM_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|ampere_|hopper", re.I)
STEP_TABLE_KERNEL = re.compile(r"index|gather", re.I)   # per-step gathers of the rotary cos/sin rows
# prefill: each sequence's last row, copied out to sample (trace names are cut at 100 characters)
LAST_ROW_KERNEL = re.compile(r"direct_co|copy|gather|index", re.I)


def _load_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def attribute_point(point: dict, table_dir: Path) -> dict:
    """Per-op predicted vs in-model time for one traced point (graph replay)."""
    from calibration.validate import cost_model, point_shape
    from sim.costs.table import CostTable

    cost = cost_model(CostTable(table_dir), point["model"], "graph")
    ops = cost.ops
    shape = point_shape(point["phase"], int(point["batch"]), int(point["length"]))
    _, rows, _, _, _ = cost.breakdown(shape)
    predicted = {r.name: r.time_s * 1e6 for r in rows}
    has_p, has_d = shape.prefill_q.size > 0, shape.num_decode > 0
    kern = cost.backend.kernel_counts(shape.num_tokens, shape.num_sampled, has_p, has_d)
    layers = cost.num_layers

    # the op sequence of one step, as (op name, kernels) in launch order
    seq: list[tuple[str, int]] = []
    per_layer = [(op.name, int(kern[i])) for i, op in enumerate(ops.ops) if op.per_layer and kern[i] > 0]
    first_layer_op = next(i for i, op in enumerate(ops.ops) if op.per_layer)
    before = [(op.name, int(kern[i])) for i, op in enumerate(ops.ops[:first_layer_op])
              if not op.per_layer and kern[i] > 0]
    after = [(op.name, int(kern[i])) for i, op in enumerate(ops.ops[first_layer_op:], first_layer_op)
             if not op.per_layer and kern[i] > 0]
    seq = before + per_layer * layers + after
    gemm_ops = {op.name for op in ops.ops if op.table_op == "gemm"}

    k = point["graph"]
    names = [r[0] for r in k]
    start = np.array([r[1] for r in k], float)
    dur = np.array([r[2] for r in k], float)
    slot = np.append(np.diff(start), dur[-1])          # kernel plus the gap before the next one
    expected = sum(n for _, n in seq)
    extra = len(k) - expected
    out = {"model": point["model"], "phase": point["phase"], "batch": point["batch"], "length": point["length"],
           "kernels_measured": len(k), "kernels_predicted": expected,
           "span_us": float(start[-1] + dur[-1] - start[0]), "kernel_us": float(dur.sum()),
           "predicted_ops_us": float(sum(predicted.values())), "aligned": False, "ops": []}
    # walk the sequence; after the step's first op, per-step rotary-table gathers may sit in front of the
    # first layer (the table prices them inside rope's per-layer count or not at all)
    j = 0
    got: dict[str, list[float]] = {}
    step_extra_us = 0.0
    last_layer_end = len(before) + len(per_layer) * layers
    for pos, (name, n) in enumerate(seq):
        boundary = {len(before): STEP_TABLE_KERNEL, last_layer_end: LAST_ROW_KERNEL}.get(pos)
        if boundary is not None:
            while extra > 0 and j < len(k) and boundary.search(names[j]):
                step_extra_us += slot[j]
                j += 1
                extra -= 1
        if j + n > len(k):
            return out
        if name in gemm_ops and not any(GEMM_KERNEL.search(x) for x in names[j:j + n]):
            out["misaligned_at"] = f"{name} (kernel {j}: {names[j][:60]})"
            return out
        acc = got.setdefault(name, [0.0, 0.0])
        acc[0] += float(slot[j:j + n].sum())
        acc[1] += float(dur[j:j + n].sum())
        j += n
    if j != len(k):
        out["misaligned_at"] = f"{len(k) - j} kernels left over after the last op"
        return out
    out["aligned"] = True
    out["step_extra_us"] = step_extra_us
    span = out["span_us"]
    gemm_diff = sum(predicted.get(n, 0.0) - got[n][0] for n in got if n in gemm_ops)
    other_diff = sum(predicted.get(n, 0.0) - got[n][0] for n in got if n not in gemm_ops)
    out["gemm_diff_us"], out["other_diff_us"] = gemm_diff, other_diff
    for name in dict.fromkeys([n for n, _ in seq]):
        slot_us, kern_us = got[name]
        p = predicted.get(name, 0.0)
        out["ops"].append({"op": name, "predicted_us": p, "in_model_us": slot_us, "kernel_only_us": kern_us,
                           "diff_us": p - slot_us, "diff_share_of_step": (p - slot_us) / span})
    return out


def format_markdown(results: list[dict], table: str, trace: str) -> str:
    lines = ["# In-model attribution of the CUDA-graph step error", "",
             f"Table `{table}`; trace `{trace}` (one graph replay per point, recorded by "
             "`python -m calibration.diagnose trace`). Per op: the table's prediction for the whole step "
             "(all layers) and the time the op took inside the model (its kernels plus the gaps after "
             "them), in µs; the difference as a share of the measured span. Negative: the table is "
             "faster than the model.", ""]
    for r in results:
        head = (f"## {r['model']} {r['phase']}, batch {r['batch']}, "
                f"{'prompt' if r['phase'] == 'prefill' else 'context'} {r['length']}")
        lines += [head, ""]
        lines.append(f"Measured span {r['span_us']:,.1f} µs ({r['kernels_measured']} kernels, "
                     f"{r['kernel_us']:,.1f} µs inside kernels); predicted ops {r['predicted_ops_us']:,.1f} µs "
                     f"({r['kernels_predicted']} kernels): {100 * (r['predicted_ops_us'] / r['span_us'] - 1):+.1f} %.")
        if not r["aligned"]:
            lines += ["", f"Not aligned: {r.get('misaligned_at', 'kernel counts differ')}.", ""]
            continue
        if r.get("step_extra_us"):
            lines.append(f"Per-step kernels the table does not price (rotary-table gathers, the last-row "
                         f"selection of a prefill): {r['step_extra_us']:.1f} µs.")
        lines.append(f"Gaps between kernels: {r['span_us'] - r['kernel_us']:,.1f} µs "
                     f"({100 * (1 - r['kernel_us'] / r['span_us']):.1f} % of the span). Predicted minus in-model: "
                     f"GEMM ops {r['gemm_diff_us']:+,.1f} µs, all other ops {r['other_diff_us']:+,.1f} µs.")
        lines += ["", "| op | predicted µs | in model µs | kernels only µs | difference µs | share of step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for o in sorted(r["ops"], key=lambda o: o["diff_us"]):
            lines.append(f"| {o['op']} | {o['predicted_us']:,.1f} | {o['in_model_us']:,.1f} | "
                         f"{o['kernel_only_us']:,.1f} | {o['diff_us']:+,.1f} | "
                         f"{100 * o['diff_share_of_step']:+.2f} % |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from sim.costs.table import resolve_table_dir

    p = argparse.ArgumentParser(prog="python -m calibration.attribute", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True, help="cost table name or directory")
    p.add_argument("--trace", required=True, help="trace JSON (.gz) from python -m calibration.diagnose trace")
    p.add_argument("--out", help="write the Markdown report here (default: stdout)")
    p.add_argument("--json", help="also write the per-op figures as JSON here")
    args = p.parse_args(argv)
    table_dir = resolve_table_dir(args.table)
    trace_path = Path(args.trace)
    if not trace_path.exists():
        print(f"python -m calibration.attribute: error: {trace_path}: no such trace file", file=sys.stderr)
        return 2
    results = [attribute_point(pt, table_dir) for pt in _load_trace(trace_path)["points"]]
    text = format_markdown(results, table_dir.name, args.trace)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
