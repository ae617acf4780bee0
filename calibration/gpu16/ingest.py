"""Issue 16's returned files into the H200 table's directory, refits, and the reports against the predictions.

    python -m calibration.gpu16.ingest FILES [--tp-files TP_FILES] --name lease1 [--refit]

``FILES`` is the directory the device command wrote (``$OUT/gpu16``: ``rows.parquet``, ``meta.json``,
``log.txt``), ``TP_FILES`` the multi-GPU command's (``$OUT/tp``). The ingest

1. unpacks them into ``calibration/tables/h200/runs/<n>-gpu16-<name>/`` as the earlier runs are kept:
   ``raw/<part>.parquet`` (one per part), ``metadata.json`` (the command's meta), ``device.log``; a TP
   lease adds ``raw/allreduce.parquet``, ``raw/tp_steps.parquet``, ``tp-metadata.json``, ``tp-device.log``;
2. writes ``calibration/tables/h200/validation/gpu16/`` from every gpu16 run there, leases side by side:
   ``report.md`` (steps per recipe and unseen shape: median and p95 |error| of CUDA-graph and eager steps
   against the committed predictions; the torch-unfused slowdown; SM share measured over predicted; fp8
   GEMMs against the stated model; the torch-unfused ops against their recipe; the all-reduce curve and
   the TP 2 step; CUDA kernel counts), ``summary.json``, ``points.csv``, ``readme_rows.md`` (the rows for
   the README's validation table);
3. with ``--refit`` (after the repeat lease agrees): adds the new table entries of the first gpu16 run,
   fp8 GEMMs (``dtype=fp8`` keys), the torch-unfused recipe's GEMM shapes, the all-reduce curve and any
   fp8-KV decode attention, to the table's ``raw/`` and refits it (``calibration.fit.fit_table``: the
   entries measured before stay as they were), writes ``recipes/torch-unfused-h200.toml`` (the recipe
   with per-op corrections, measured over recipe-priced, per token count), and records the CUDA kernel
   counts in ``tests/data/kernel_counts/torch_unfused.json``.

Nothing here needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.gpu16 import plan
from calibration.gpu16.predict import OUT_DIR, latest_predictions

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_DIR = REPO_ROOT / "calibration" / "tables" / "h200"
STEP_PARTS = ("unseen_steps", "unfused_steps", "tp_steps")
COUNT_FIXTURE = REPO_ROOT / "tests" / "data" / "kernel_counts" / "torch_unfused.json"


# ------------------------------------------------------------------------------------------ unpack
def _next_run(table_dir: Path) -> int:
    nums = [int(p.name.split("-", 1)[0]) for p in (table_dir / "runs").glob("*-*") if p.name.split("-", 1)[0].isdigit()]
    return max(nums, default=0) + 1


def unpack(files: Path, name: str, table_dir: Path = TABLE_DIR, tp_files: Path | None = None,
           allow_quick: bool = False) -> Path:
    """The returned files as ``runs/<n>-gpu16-<name>/``; returns that directory."""
    meta = json.loads((files / "meta.json").read_text())
    if (meta.get("quick") or meta.get("simulated")) and not allow_quick:
        raise SystemExit(f"{files}: a quick or simulated run (tiny grids) is not a measurement to keep")
    rows = pd.read_parquet(files / "rows.parquet")
    run = table_dir / "runs" / f"{_next_run(table_dir)}-gpu16-{name}"
    (run / "raw").mkdir(parents=True)
    for part, g in rows.groupby("part", sort=False):
        g.reset_index(drop=True).to_parquet(run / "raw" / f"{part}.parquet", index=False)
    shutil.copy(files / "meta.json", run / "metadata.json")
    if (files / "log.txt").exists():
        shutil.copy(files / "log.txt", run / "device.log")
    if tp_files is not None:
        tp_rows = pd.read_parquet(tp_files / "rows.parquet")
        for part, g in tp_rows.groupby("part", sort=False):
            g.reset_index(drop=True).to_parquet(run / "raw" / f"{part}.parquet", index=False)
        shutil.copy(tp_files / "meta.json", run / "tp-metadata.json")
        if (tp_files / "log.txt").exists():
            shutil.copy(tp_files / "log.txt", run / "tp-device.log")
    return run


def gpu16_runs(table_dir: Path = TABLE_DIR) -> list[Path]:
    runs = [p for p in (table_dir / "runs").glob("*-gpu16-*") if (p / "raw").is_dir()]
    return sorted(runs, key=lambda p: int(p.name.split("-", 1)[0]))


def _raw(runs: list[Path], part: str) -> pd.DataFrame:
    frames = []
    for run in runs:
        f = run / "raw" / f"{part}.parquet"
        if f.exists():
            d = pd.read_parquet(f)
            d["source"] = f"runs/{run.name}"
            frames.append(d)
    if not frames:
        return pd.DataFrame()
    d = pd.concat(frames, ignore_index=True)
    d["extra_d"] = [json.loads(e) if e else {} for e in d["extra"]]
    d["point"] = [e.get("point", "") for e in d["extra_d"]]
    return d


def _join(measured: pd.DataFrame, predictions: pd.DataFrame, part: str, mode_col: str = "variant") -> pd.DataFrame:
    pred = predictions[predictions["part"] == part][["point", "mode", "predicted_s", "predicted_ratio"]]
    out = measured.merge(pred, left_on=["point", mode_col], right_on=["point", "mode"], how="left")
    out["error"] = out["predicted_s"] / out["median_s"] - 1.0
    return out


def _pct(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f} %"


# ------------------------------------------------------------------------------------------ reports
def step_report(runs: list[Path], predictions: pd.DataFrame,
                table_dir: Path) -> tuple[list[str], list[dict], pd.DataFrame]:
    from calibration.validate import load_measurements, point_group, summarize, with_committed

    files = [f for run in runs for p in STEP_PARTS if (f := run / "raw" / f"{p}.parquet").exists()]
    if not files:
        return ["No step measurements yet."], [], pd.DataFrame()
    m = load_measurements(files, parts=STEP_PARTS)
    pts = with_committed(m, predictions[predictions["part"].isin(STEP_PARTS)])
    missing = len(m) - len(pts)
    summary = summarize(pts, by_group=True)
    sources = list(dict.fromkeys(pts["source"]))
    lines = [f"Measured steps: {len(m)}, {len(pts)} with a committed prediction"
             + (f" ({missing} without: not in the plan the predictions were made for)" if missing else "") + ".", "",
             "| group | phase | mode | " + " | ".join(f"{s}: points, median, p95" for s in sources) + " |",
             "|---|---|---|" + "---|" * len(sources)]
    keyed = {(r["group"], r["phase"], r["mode"], r["source"]): r for r in summary}
    for group, phase, mode in dict.fromkeys((r["group"], r["phase"], r["mode"]) for r in summary):
        cells = []
        for s in sources:
            r = keyed.get((group, phase, mode, s))
            cells.append("-" if r is None else
                         f"{r['points']}, {_pct(r['median_abs_error'])}, {_pct(r['p95_abs_error'])}")
        lines.append(f"| {group} | {phase} | {mode} | " + " | ".join(cells) + " |")
    # torch-unfused over fused: measured (table run's fused steps at the same points) against predicted
    ref = predictions[predictions["part"] == "unfused_fused_ref"][["point", "mode", "predicted_s"]]
    unf = pts[pts["recipe"] == "torch-unfused"].copy()
    if len(unf) and len(ref):
        from calibration.validate import _measurement_files, point_id

        fused = load_measurements(_measurement_files(table_dir, None))
        fused = fused[fused["source"] == "table run"]
        fused["point"] = [point_id(r.model, r.phase, int(r.batch), int(r.tokens), recipe="torch-unfused")
                          for r in fused.itertuples(index=False)]
        ref = ref.assign(point=ref["point"].str.replace("recipe=fused", "recipe=torch-unfused"))
        unf = unf.merge(fused[["point", "mode", "median_s"]].rename(columns={"median_s": "fused_s"}),
                        on=["point", "mode"], how="left")
        unf = unf.merge(ref.rename(columns={"predicted_s": "fused_pred_s"}), on=["point", "mode"], how="left")
        unf["measured_slowdown"] = unf["measured_s"] / unf["fused_s"]
        unf["predicted_slowdown"] = unf["predicted_s"] / unf["fused_pred_s"]
        lines += ["", "torch-unfused over fused (fused: the table run's steps at the same points):", "",
                  "| run | model | mode | points | measured slowdown (median, range) | predicted (median, range) |",
                  "|---|---|---|---:|---|---|"]
        for (src, model, mode), g in unf.dropna(subset=["measured_slowdown"]).groupby(["source", "model", "mode"]):
            ms, ps = g["measured_slowdown"], g["predicted_slowdown"]
            lines.append(f"| {src} | {model} | {mode} | {len(g)} | {ms.median():.2f} ({ms.min():.2f}-{ms.max():.2f}) | "
                         f"{ps.median():.2f} ({ps.min():.2f}-{ps.max():.2f}) |")
    pts["group"] = [point_group(r) for r in pts.itertuples(index=False)]
    return lines, summary, pts


def sm_report(runs: list[Path], predictions: pd.DataFrame) -> tuple[list[str], list[dict]]:
    d = _raw(runs, "sm_share")
    if d.empty:
        return ["No SM-share measurements yet."], []
    d = _join(d, predictions, "sm_share")
    base = d[d["x"] == 0].set_index(["source", "variant", "key"])["median_s"]
    d["measured_ratio"] = [row.median_s / base.get((row.source, row.variant, row.key), np.nan)
                           for row in d.itertuples(index=False)]
    d["ratio_error"] = d["predicted_ratio"] / d["measured_ratio"] - 1.0
    lines = ["Time with N SMs held back over the same run's time with none, measured / predicted "
             "(`StepCostModel.for_share`, `CostBackend.for_share`); absolute error of the predicted time after.", ""]
    out = []
    for (src, mech), g in d.groupby(["source", "variant"], sort=False):
        reserved = sorted(g["x"].unique())
        lines += [f"{src}, {mech}:", "", "| workload | " + " | ".join(f"{int(r)} held" for r in reserved)
                  + " | abs. error of time, median |", "|---|" + "---:|" * (len(reserved) + 1)]
        for w in plan.SM_WORKLOADS:
            gw = g[g["key"] == w].set_index("x")
            if gw.empty:
                continue
            cells = [f"{gw.loc[r, 'measured_ratio']:.2f} / {gw.loc[r, 'predicted_ratio']:.2f}" if r in gw.index else "-"
                     for r in reserved]
            lines.append(f"| {w} | " + " | ".join(cells) + f" | {_pct(gw['error'].abs().median())} |")
            out += [{"source": src, "mechanism": mech, "workload": w, "reserved": int(r),
                     "measured_ratio": float(gw.loc[r, "measured_ratio"]),
                     "predicted_ratio": float(gw.loc[r, "predicted_ratio"]),
                     "measured_s": float(gw.loc[r, "median_s"]), "predicted_s": float(gw.loc[r, "predicted_s"])}
                    for r in gw.index]
        probe = [e for e in g["extra_d"] if e.get("probe_blocks")]
        if probe:
            lines += ["", f"Probe blocks launched during the holds that landed on a held SM: "
                          f"{sum(e['probe_on_held_sms'] for e in probe)} of {sum(e['probe_blocks'] for e in probe)}; "
                          f"exclusive holds: {all(e.get('exclusive', False) for e in g['extra_d'])}."]
        lines.append("")
    ratio_err = d["ratio_error"].abs().dropna()
    lines.append(f"Ratio error over every point with SMs held: median {_pct(ratio_err[d['x'] > 0].median())}, "
                 f"max {_pct(ratio_err[d['x'] > 0].max())}.")
    return lines, out


def fp8_report(runs: list[Path], predictions: pd.DataFrame, table_dir: Path) -> tuple[list[str], list[dict]]:
    d = _raw(runs, "fp8_gemm")
    if d.empty:
        return ["No fp8 measurements yet."], []
    g8 = _join(d[d["variant"] == "torch"], predictions, "fp8_gemm")
    anchors = _join(d[d["variant"] == "torch-bf16-anchor"], predictions, "fp8_gemm")
    lines = ["fp8 e4m3 GEMMs (`torch._scaled_mm`, per-tensor scales) against the stated model (bf16 table time x "
             "`fp8_factor`), and measured fp8 over the table's bf16 at the same shape:", "",
             "| run | n | k | points | abs. error, median | p95 | measured fp8/bf16, M=1 | M>=2048 (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    out = []
    for (src, key), g in g8.groupby(["source", "key"], sort=False):
        from sim.costs.model import parse_key

        k = parse_key(key)
        e = g["error"].abs()
        ratio = g["median_s"] / (g["predicted_s"] / g["predicted_ratio"])
        small = ratio[g["x"] == 1]
        big = ratio[g["x"] >= 2048]
        lines.append(f"| {src} | {k['n']} | {k['k']} | {len(g)} | {_pct(e.median())} | {_pct(e.quantile(0.95))} | "
                     f"{small.median() if len(small) else np.nan:.2f} | {big.median() if len(big) else np.nan:.2f} |")
        out.append({"source": src, "key": key, "points": int(len(g)), "median_abs_error": float(e.median()),
                    "p95_abs_error": float(e.quantile(0.95))})
    if len(anchors):
        drift = (anchors["median_s"] / anchors["predicted_s"] - 1.0)
        lines += ["", f"bf16 anchors against the table's bf16 (lease drift): median {_pct(drift.median())}, "
                      f"range {_pct(drift.min())} to {_pct(drift.max())} over {len(anchors)} points."]
    fast = d[d["variant"] == "torch-fast-accum"]
    if len(fast):
        exact = d[d["variant"] == "torch"].set_index(["source", "key", "x"])["median_s"]
        r = [row.median_s / exact.get((row.source, row.key, row.x), np.nan) for row in fast.itertuples(index=False)]
        lines.append(f"`use_fast_accum=True` over the default: median {np.nanmedian(r):.3f} ({len(r)} points).")
    att = d[d["op"] == "attn_decode"]
    meta = [json.loads((run / "metadata.json").read_text()) for run in runs]
    caps = [m.get("parts", {}).get("fp8_gemm", {}).get("capabilities", {}) for m in meta]
    verdict = [m.get("parts", {}).get("fp8_gemm", {}).get("fp8_kv_decode", "") for m in meta]
    lines += ["", f"fp8-KV decode attention: {'; '.join(v for v in verdict if v) or 'not recorded'}"
              + (f" ({len(att)} rows)" if len(att) else "") + "."]
    if caps and caps[0].get("fp8_kv_attention"):
        lines += ["", "| inputs / SDPA backend | what it said |", "|---|---|"]
        lines += [f"| {k} | {v[:140]} |" for k, v in caps[0]["fp8_kv_attention"].items()]
    return lines, out


def unfused_ops_report(runs: list[Path], predictions: pd.DataFrame) -> tuple[list[str], list[dict], pd.DataFrame]:
    d = _raw(runs, "unfused_ops")
    if d.empty:
        return ["No torch-unfused op measurements yet."], [], pd.DataFrame()
    d = _join(d, predictions, "unfused_ops")
    lines = ["Each op alone against what the torch-unfused recipe prices for it (GEMMs: the generalised GEMM "
             "model at shapes the table lacks):", "",
             "| run | model | op | points | measured / predicted, median | range |", "|---|---|---|---:|---:|---|"]
    out = []
    d["ratio"] = d["median_s"] / d["predicted_s"]
    d["model"] = [e.get("model", "") for e in d["extra_d"]]
    for (src, model, op), g in d.groupby(["source", "model", "variant"], sort=False):
        label = op if op != "torch" else "separate GEMMs (k/v, gate/up)"
        r = g["ratio"].dropna()
        if r.empty:
            continue
        lines.append(f"| {src} | {model} | {label} | {len(r)} | {r.median():.2f} | {r.min():.2f}-{r.max():.2f} |")
        out.append({"source": src, "model": model, "op": op, "points": int(len(r)), "median_ratio": float(r.median())})
    return lines, out, d


def allreduce_report(runs: list[Path], predictions: pd.DataFrame, step_pts: pd.DataFrame) -> list[str]:
    d = _raw(runs, "allreduce")
    lines = []
    if d.empty:
        lines.append("Not measured: the multi-GPU kinds were withheld (`python -m calibration.gpu16.tp` is ready).")
    else:
        d = _join(d, predictions, "allreduce")
        for (src, key, variant), g in d.groupby(["source", "key", "variant"], sort=False):
            g = g.sort_values("x")
            lines += [f"{src}, all-reduce {key}, {variant}:", "", "| bytes | measured us | bus GB/s | ring model us |",
                      "|---:|---:|---:|---:|"]
            for row in g.itertuples(index=False):
                bus = row.extra_d.get("busbw_bytes_per_s", 0) / 1e9
                lines.append(f"| {int(row.x)} | {row.median_s * 1e6:.1f} | {bus:.1f} | {row.predicted_s * 1e6:.1f} |")
            lines.append("")
    tp = step_pts[step_pts["tp"] > 1] if len(step_pts) else step_pts
    if len(tp):
        lines += ["TP 2 steps against tiersim's prediction (all-reduce from the ring model: the prediction was made "
                  "before any all-reduce was measured):", "", "| run | phase | mode | batch | tokens | measured ms | "
                  "predicted ms | error |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in tp.sort_values(["source", "phase", "mode", "batch"]).itertuples(index=False):
            lines.append(f"| {r.source} | {r.phase} | {r.mode} | {int(r.batch)} | {int(r.tokens)} | "
                         f"{r.measured_s * 1e3:.3f} | {r.predicted_s * 1e3:.3f} | {_pct(r.error)} |")
    return lines


def kernel_count_report(runs: list[Path]) -> tuple[list[str], list[dict]]:
    counts = []
    for run in runs:
        meta = json.loads((run / "metadata.json").read_text())
        counts += [dict(c, source=f"runs/{run.name}")
                   for c in meta.get("parts", {}).get("unfused_counts", {}).get("kernel_counts", [])]
    if not counts:
        return ["No CUDA kernel counts yet."], []
    cpu = {(c["model"], c["phase"]): c["kernels_per_layer"]
           for c in json.loads(COUNT_FIXTURE.read_text())["counts"] if c["device"] == "cpu"}
    lines = ["| run | model | phase | CUDA (CUPTI) | CPU profiler mapping | recipe |", "|---|---|---|---:|---:|---:|"]
    for c in counts:
        lines.append(f"| {c['source']} | {c['model']} | {c['phase']} | {c['kernels_per_layer']} | "
                     f"{cpu.get((c['model'], c['phase']), '-')} | 40 |")
    return lines, counts


def readme_rows(summary: list[dict]) -> list[str]:
    """Rows for the README's validation table (first gpu16 run), by group."""
    if not summary:
        return []
    first = summary[0]["source"]
    lines = ["| GPU | CUDA-graph steps: median / p95 abs. error | eager host-launched steps: median | "
             "leave-one-model-out, CUDA graphs: median / p95 |", "|---|---|---|---|"]
    for group in dict.fromkeys(r["group"] for r in summary):
        mine = {r["mode"]: r for r in summary if r["group"] == group and r["phase"] == "all" and r["source"] == first}
        if "graph" not in mine and "eager" not in mine:
            continue
        g, e = mine.get("graph"), mine.get("eager")
        if group.startswith("recipe "):
            what = f"{group[len('recipe '):]} recipe"
        elif " tp" in group:
            model, tp = group.rsplit(" tp", 1)
            what = f"{model} at TP {tp} (all-reduce from the ring model)"
        else:
            what = f"{group} (unseen shape)"
        lines.append(f"| H200, {what}, predicted before measuring | "
                     f"{_pct(g['median_abs_error']) if g else '-'} / {_pct(g['p95_abs_error']) if g else '-'} | "
                     f"{_pct(e['median_abs_error']) if e else '-'} | - |")
    return lines


def write_reports(table_dir: Path = TABLE_DIR, predictions_path: Path | None = None,
                  out_dir: Path | None = None) -> Path:
    runs = gpu16_runs(table_dir)
    predictions_path = predictions_path or latest_predictions()
    if predictions_path is None:
        raise SystemExit("no committed predictions (python -m calibration.gpu16.predict, then commit them)")
    predictions = pd.read_parquet(predictions_path)
    out = out_dir or OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    steps, step_summary, pts = step_report(runs, predictions, table_dir)
    sm, sm_rows = sm_report(runs, predictions)
    fp8, fp8_rows = fp8_report(runs, predictions, table_dir)
    ops, ops_rows, _ = unfused_ops_report(runs, predictions)
    counts, count_rows = kernel_count_report(runs)
    lines = ["# Issue 16: H200 measurements against the predictions committed before them", "",
             f"Predictions: `{predictions_path.name}` (table sha256 `{predictions['table_sha256'].iloc[0][:16]}…`, "
             f"code `{predictions['code_version'].iloc[0]}`). Runs: "
             + (", ".join(f"`runs/{r.name}`" for r in runs) or "none yet")
             + ". Made by `python -m calibration.gpu16.ingest`.",
             "", "## Steps: recipes and unseen shapes", "", *steps,
             "", "## SM share", "", *sm,
             "", "## fp8", "", *fp8,
             "", "## torch-unfused ops", "", *ops,
             "", "## Tensor parallelism", "", *allreduce_report(runs, predictions, pts),
             "", "## CUDA kernels per stock-decoder layer", "", *counts, ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "readme_rows.md").write_text("\n".join(readme_rows(step_summary)) + "\n")
    (out / "summary.json").write_text(json.dumps({"predictions": predictions_path.name, "runs": [r.name for r in runs],
                                                  "steps": step_summary, "sm_share": sm_rows, "fp8_gemm": fp8_rows,
                                                  "unfused_ops": ops_rows, "kernel_counts": count_rows},
                                                 indent=1, default=str) + "\n")
    if len(pts):
        cols = ["source", "group", "model", "recipe", "tp", "phase", "mode", "batch", "tokens", "chunk", "cached",
                "measured_s", "predicted_s", "error", "kernels", "kernels_predicted", "point"]
        pts[cols].sort_values(["group", "phase", "mode", "batch", "tokens", "source"]).to_csv(out / "points.csv",
                                                                                           index=False)
    return out / "report.md"


# ------------------------------------------------------------------------------------------ refit
def refit(run: Path, table_dir: Path = TABLE_DIR, predictions_path: Path | None = None,
          fixture: Path = COUNT_FIXTURE) -> list[str]:
    """New table entries of ``run`` into the table's raw/ and a refit; the corrected recipe; CUDA counts."""
    from calibration.fit import fit_table

    done = []
    entries = {"gemm_fp8": ("fp8_gemm", lambda d: d["op"] == "gemm"),
               "gemm_unfused": ("unfused_ops", lambda d: d["op"] == "gemm"),
               "attention_fp8": ("fp8_gemm", lambda d: d["op"] == "attn_decode"),
               "allreduce": ("allreduce", lambda d: d["op"] == "allreduce")}
    for name, (part, select) in entries.items():
        f = run / "raw" / f"{part}.parquet"
        if not f.exists():
            continue
        d = pd.read_parquet(f)
        d = d[select(d)].reset_index(drop=True)
        if len(d):
            d.to_parquet(table_dir / "raw" / f"{name}.parquet", index=False)
            done.append(f"{table_dir.name}/raw/{name}.parquet: {len(d)} rows from {run.name}")
    if done:
        fit_table(table_dir)
        done.append(f"refitted {table_dir / 'table.json'}")
    recipe = _corrected_recipe(run, predictions_path or latest_predictions(), table_dir)
    if recipe:
        done.append(recipe)
    meta = json.loads((run / "metadata.json").read_text())
    counts = meta.get("parts", {}).get("unfused_counts", {}).get("kernel_counts", [])
    if counts and fixture.exists():
        data = json.loads(fixture.read_text())
        data["counts"] = [c for c in data["counts"] if c.get("device") != "cuda"] + \
            [{k: v for k, v in c.items() if k != "source"} for c in counts]
        fixture.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        per_layer = ", ".join(str(c["kernels_per_layer"]) for c in counts)
        done.append(f"{fixture.name}: {len(counts)} CUDA counts ({per_layer} "
                    f"kernels per layer; the recipe says 40)")
    return done


def _corrected_recipe(run: Path, predictions_path: Path | None, table_dir: Path) -> str:
    """``recipes/torch-unfused-h200.toml``: torch-unfused with measured / recipe-priced per op and token count."""
    from sim.costs.recipe import OpRecipe, format_recipe, load_recipe

    if predictions_path is None or not (run / "raw" / "unfused_ops.parquet").exists():
        return ""
    d = _raw([run], "unfused_ops")
    d = _join(d[d["op"] != "gemm"], pd.read_parquet(predictions_path), "unfused_ops").dropna(subset=["predicted_s"])
    if d.empty:
        return ""
    base = load_recipe("torch-unfused")
    ops = dict(base.ops)
    notes = []
    for op, g in d.groupby("variant"):
        table_op = plan.UNFUSED_OPS[op][1]      # the recipe's entry for the table op (every norm, ...)
        factors = g.groupby("x")["median_s"].median() / g.groupby("x")["predicted_s"].median()
        ops[table_op] = OpRecipe(ops[table_op].kernels, tuple((float(x), float(f)) for x, f in factors.items()))
        notes.append(f"{table_op}: x{factors.min():.2f}-{factors.max():.2f}")
    recipe = type(base)(name="torch-unfused-h200", description=base.description + "; per-op corrections measured on "
                        f"the H200 ({run.name})", ops=ops)
    path = table_dir / "recipes" / "torch-unfused-h200.toml"
    path.parent.mkdir(exist_ok=True)
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    path.write_text(format_recipe(recipe, f"Written by python -m calibration.gpu16.ingest from {run.name}: the\n"
                                          f"torch-unfused recipe, each op's time scaled by its measured / "
                                          f"recipe-priced time alone\n(calibration/gpu16/unfused_ops.py) at each token "
                                          f"count. Use it as costs.recipe = \"{shown}\"."))
    return f"{shown}: " + ", ".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.gpu16.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="?", help="the device command's returned directory (rows.parquet, meta.json, "
                                             "log.txt); without it only the reports are rewritten")
    ap.add_argument("--tp-files", default=None, help="the multi-GPU command's returned directory")
    ap.add_argument("--name", default="lease", help="run name: runs/<n>-gpu16-<name>")
    ap.add_argument("--table", default=str(TABLE_DIR))
    ap.add_argument("--predictions", default=None, help="default: the newest committed predictions file")
    ap.add_argument("--refit", action="store_true", help="add the first gpu16 run's new entries to the table")
    ap.add_argument("--allow-quick", action="store_true", help="accept quick (tiny) runs (tests)")
    args = ap.parse_args(argv)
    table_dir = Path(args.table)
    if args.files:
        run = unpack(Path(args.files), args.name, table_dir, Path(args.tp_files) if args.tp_files else None,
                     args.allow_quick)
        print(f"unpacked into {run}")
    pred = Path(args.predictions) if args.predictions else None
    if args.refit:
        runs = gpu16_runs(table_dir)
        if not runs:
            raise SystemExit("nothing to refit from: no runs/*-gpu16-* yet")
        for line in refit(runs[0], table_dir, pred):
            print(line)
        print("then: tiersim validate --table h200 --out calibration/tables/h200/validation; "
              "python -m calibration.leave_one_out --table h200")
    report = write_reports(table_dir, pred, OUT_DIR if table_dir == TABLE_DIR else table_dir / "validation" / "gpu16")
    print(f"report: {report}")
    print(Path(report).read_text().split("## SM share")[0][-3000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
