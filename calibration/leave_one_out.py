"""Leave-one-model-out: how well generalised pricing predicts a model the table never measured.

    python -m calibration.leave_one_out --table h100-sxm-80gb [--out DIR]

For each model of the table's validation measurements (the reference decoder's Llama-3.1-8B and
Llama-3.2-1B steps), a copy of the table is made without every grid entry that only that model needs
(its GEMM shapes, attention and elementwise keys; entries the other model needs too, such as the
sampler over the shared vocabulary, stay), and the held-out model's measured steps are predicted from
that copy, so every op of theirs is generalised from the other model's shapes (``sim.costs.generalise``).
The error per phase and mode is reported next to the full table's error on the same steps.

Writes ``leave_one_out.md`` and ``leave_one_out.json`` (default: the table's ``validation/``; the
JSON's ``held_out_summary`` is what ``sim.costs.accuracy`` reports as the error bar of a generalised
model). Reads measurement files and tables only; no GPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.validate import _measurement_files, load_measurements, predict


def model_entries(model: str) -> set[tuple[str, str]]:
    from sim.costs.model import TransformerOps
    from sim.specs import load_model

    return set(TransformerOps(load_model(model)).required_table_entries())


def table_without(table_dir: Path, model: str, others: list[str], out: Path) -> Path:
    """A copy of ``table_dir`` (table.json, ops.parquet, the microkernels' raw files) without the grid
    entries only ``model`` needs."""
    drop = model_entries(model) - set().union(*(model_entries(o) for o in others))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(table_dir / "table.json", out / "table.json")
    ops = pd.read_parquet(table_dir / "ops.parquet")
    keep = ~np.array([(op, key) in drop for op, key in zip(ops["op"], ops["key"])])
    ops[keep].to_parquet(out / "ops.parquet", index=False)
    (out / "raw").mkdir(exist_ok=True)
    for name in ("hbm_stream", "sm_fma", "launch", "topk"):
        src = table_dir / "raw" / f"{name}.parquet"
        if src.exists():
            shutil.copy(src, out / "raw" / src.name)
    return out


def _stats(g: pd.DataFrame) -> dict:
    e = g["abs_error"].to_numpy()
    return {"points": int(e.size), "median_abs_error": float(np.median(e)),
            "p95_abs_error": float(np.percentile(e, 95)), "mean_signed_error": float(g["error"].mean())}


def run(table: str) -> dict:
    from sim.costs.table import resolve_table_dir

    table_dir = resolve_table_dir(table)
    m = load_measurements(_measurement_files(table_dir, None))
    m = m[m["source"] == "table run"]
    models = sorted(m["model"].unique())
    full = predict(m, table_dir)
    rows, held_points = [], []
    with tempfile.TemporaryDirectory(prefix="tiersim-loo-") as tmp:
        for model in models:
            others = [o for o in models if o != model]
            loo_dir = table_without(table_dir, model, others, Path(tmp) / model)
            mine = m[m["model"] == model]
            pts = predict(mine, loo_dir)
            held_points.append(pts)
            ref = full[full["model"] == model]
            for (phase, mode), g in pts.groupby(["phase", "mode"], sort=True):
                f = ref[(ref["phase"] == phase) & (ref["mode"] == mode)]
                rows.append({"held_out": model, "phase": phase, "mode": mode, "loo": _stats(g), "full": _stats(f)})
            for mode, g in pts.groupby("mode", sort=True):
                f = ref[ref["mode"] == mode]
                rows.append({"held_out": model, "phase": "all", "mode": mode, "loo": _stats(g), "full": _stats(f)})
    held = pd.concat(held_points, ignore_index=True)
    summary = []
    for (phase, mode), g in held.groupby(["phase", "mode"], sort=True):
        summary.append({"phase": phase, "mode": mode, **_stats(g)})
    for mode, g in held.groupby("mode", sort=True):
        summary.append({"phase": "all", "mode": mode, **_stats(g)})
    full_summary = []
    for (phase, mode), g in full.groupby(["phase", "mode"], sort=True):
        full_summary.append({"phase": phase, "mode": mode, **_stats(g)})
    for mode, g in full.groupby("mode", sort=True):
        full_summary.append({"phase": "all", "mode": mode, **_stats(g)})
    return {"table": table_dir.name, "models": models, "rows": rows, "held_out_summary": summary,
            "full_table_summary": full_summary,
            "method": "each model's measured steps predicted from the table without the grid entries only that "
                      "model needs (python -m calibration.leave_one_out)"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def format_markdown(res: dict) -> str:
    lines = [f"# Leave-one-model-out on `{res['table']}`", "",
             "Each model's measured reference-decoder steps (the table's own run) predicted from a copy of the "
             "table without the grid entries only that model needs, so every one of its ops is generalised from "
             "the other model's shapes; next to the full table's error on the same steps. Command: "
             f"`python -m calibration.leave_one_out --table {res['table']}`.", "",
             "| held out | phase | mode | steps | median (held out) | p95 (held out) | mean signed (held out) | "
             "median (full table) | p95 (full table) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lo, fu = r["loo"], r["full"]
        lines.append(f"| {r['held_out']} | {r['phase']} | {r['mode']} | {lo['points']} | "
                     f"{_pct(lo['median_abs_error'])} | {_pct(lo['p95_abs_error'])} | "
                     f"{_pct(lo['mean_signed_error'])} | {_pct(fu['median_abs_error'])} | "
                     f"{_pct(fu['p95_abs_error'])} |")
    lines += ["", "Both models held out in turn, together (the error bar `predict-step` and the run summary give a "
              "generalised model):", "", "| phase | mode | steps | median | p95 | full table: median | p95 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    full = {(r["phase"], r["mode"]): r for r in res["full_table_summary"]}
    for r in res["held_out_summary"]:
        f = full[(r["phase"], r["mode"])]
        lines.append(f"| {r['phase']} | {r['mode']} | {r['points']} | {_pct(r['median_abs_error'])} | "
                     f"{_pct(r['p95_abs_error'])} | {_pct(f['median_abs_error'])} | {_pct(f['p95_abs_error'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from sim.costs.table import resolve_table_dir

    p = argparse.ArgumentParser(prog="python -m calibration.leave_one_out", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="h100-sxm-80gb")
    p.add_argument("--out", help="directory for leave_one_out.{md,json} (default: the table's validation/)")
    args = p.parse_args(argv)
    res = run(args.table)
    out = Path(args.out) if args.out else resolve_table_dir(args.table) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "leave_one_out.json").write_text(json.dumps(res, indent=1) + "\n")
    text = format_markdown(res)
    (out / "leave_one_out.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
