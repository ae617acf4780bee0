"""``tiersim validate``: tiersim's predicted step times against measured steps of a real model.

The measurements are the ``validation`` part of the calibration suite: a PyTorch Llama-architecture
decoder (``calibration.reference_model``) run on the GPU for prefill steps (batch × prompt length)
and decode steps (batch × cached context), eagerly (host-launched, one sync per step) and as a
CUDA-graph replay. For every measured point this module asks the simulator's cost model for the same
step — same model shapes, the cost table under test, the ``host-launched`` or ``cuda-graph``
execution policy — and reports the error: a table, percentiles per phase and mode, a
predicted-vs-measured plot, and the points themselves.

Nothing here runs on a GPU; it reads measurement files and a cost table.

``tiersim validate --e2e RUN_DIR`` compares whole runs instead: a reference server's measured TTFT,
ITL and E2E against tiersim's replay of the same requests (``calibration.validate_e2e``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

TARGETS = {  # (phase-independent) targets from the calibration issue: |error| percentiles
    "graph": {"median": 0.03, "p95": 0.08},
    "eager": {"median": 0.10},
}
MODES = {"eager": "host-launched", "graph": "cuda-graph"}


def add_arguments(p) -> None:
    p.add_argument("--measurements", action="append",
                   help="validation Parquet file(s) (raw/validation.parquet of a calibration run); "
                        "default: the ones shipped with the cost table")
    p.add_argument("--table", default="h100-sxm-80gb", help="cost table name or directory to test")
    p.add_argument("--out", default=None, help="report directory (default: validation-report; with --e2e, "
                                                 "RUN_DIR/e2e)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    from calibration import validate_e2e

    validate_e2e.add_arguments(p)


def _measurement_files(table_dir: Path, given: list[str] | None) -> list[Path]:
    from sim.errors import CostTableError

    if given:
        files = [Path(g) for g in given]
    else:   # the table's own run first, then earlier or repeat runs kept beside it
        files = (sorted(table_dir.glob("raw/validation*.parquet"))
                 + sorted(table_dir.glob("runs/*/raw/validation*.parquet")))
    if not given:   # quick (smoke) runs use toy shapes: not a validation of anything
        def quick(f: Path) -> bool:
            meta = (f.parent.parent / "metadata.json")
            return meta.exists() and bool(json.loads(meta.read_text()).get("quick"))

        files = [f for f in files if not quick(f)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise CostTableError(f"{missing[0]}: validation measurements not found")
    if not files:
        raise CostTableError(f"{table_dir}: no validation measurements (raw/validation.parquet); measure them "
                             f"with `tiersim calibrate --parts validation --out DIR` on a GPU")
    return files


def load_measurements(files: list[Path]) -> pd.DataFrame:
    frames = []
    for f in files:
        d = pd.read_parquet(f)
        d = d[d["part"] == "validation"].copy()
        run = f.parent.parent if f.parent.name == "raw" else f.parent
        d["source"] = "table run" if run.parent.name != "runs" else f"runs/{run.name}"
        frames.append(d)
    m = pd.concat(frames, ignore_index=True)
    extra = [json.loads(e) if e else {} for e in m["extra"]]
    m["kernels"] = [e.get("kernels") for e in extra]
    m["attention_backend"] = [e.get("attention_backend", "") for e in extra]
    m["failed"] = [bool(e.get("error")) for e in extra]
    m = m[~m["failed"] & np.isfinite(m["median_s"]) & (m["median_s"] > 0)]
    return m.rename(columns={"variant": "mode", "op": "phase", "key": "model", "x": "batch", "y": "tokens"})


def cost_model(table, model_name: str, mode: str):
    """The step cost model that prices a validation point: ``table`` (a ``CostTable``) on the GPU
    preset it was measured on, the named model, and the execution policy of ``mode``
    ("graph" or "eager")."""
    from policies import registry
    from sim.costs.model import TransformerOps
    from sim.costs.step import StepCostModel
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    gpu = load_gpu(table.meta.get("gpu", {}).get("preset") or "h100-sxm-80gb")
    ops = TransformerOps(load_model(model_name))
    return StepCostModel(ops, TableBackend(ops, gpu, table), registry.build("execution", MODES[mode], {}))


def point_shape(phase: str, batch: int, tokens: int):
    """A validation point's step: ``batch`` prompts of ``tokens`` (prefill), or ``batch`` decodes
    with ``tokens`` of context each (decode)."""
    from sim.costs.model import StepShape

    return StepShape.prefill(batch, tokens) if phase == "prefill" else StepShape.decode(batch, tokens)


def predict(m: pd.DataFrame, table_dir: Path) -> pd.DataFrame:
    """Add predicted_s, kernels_predicted and extrapolated to each measured point."""
    from sim.costs.table import CostTable

    table = CostTable(table_dir)
    models: dict = {}
    pred, kern, ext = [], [], []
    for row in m.itertuples(index=False):
        key = (row.model, row.mode)
        cost = models.get(key)
        if cost is None:
            cost = models[key] = cost_model(table, row.model, row.mode)
        shape = point_shape(row.phase, int(row.batch), int(row.tokens))
        before = sum(cost.backend.extrapolations.values())
        t, _, _ = cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum,
                            shape.num_sampled)
        seq = cost.sequence(shape.num_tokens, shape.num_sampled, shape.num_decode == 0, shape.num_decode > 0)
        pred.append(t)
        kern.append(seq.num_kernels)
        ext.append(sum(cost.backend.extrapolations.values()) > before)
    out = m.copy()
    out["measured_s"] = out["median_s"]
    out["predicted_s"] = pred
    out["kernels_predicted"] = kern
    out["extrapolated"] = ext
    out["error"] = out["predicted_s"] / out["measured_s"] - 1.0
    out["abs_error"] = out["error"].abs()
    return out


def _stats(source: str, phase: str, mode: str, g: pd.DataFrame) -> dict:
    e = g["abs_error"].to_numpy()
    tgt = TARGETS.get(mode, {})
    r = {"source": source, "phase": phase, "mode": mode, "points": int(len(g)),
         "median_abs_error": float(np.median(e)), "p95_abs_error": float(np.percentile(e, 95)),
         "max_abs_error": float(e.max()), "mean_signed_error": float(g["error"].mean()), "targets": dict(tgt)}
    r["meets_targets"] = all((r["median_abs_error"] if k == "median" else r["p95_abs_error"]) <= v
                             for k, v in tgt.items()) if tgt else None
    return r


def summarize(points: pd.DataFrame) -> list[dict]:
    """Error percentiles per measurement source, phase and mode, and per source and mode."""
    rows = []
    for source, s in points.groupby("source", sort=False):
        for (phase, mode), g in s.groupby(["phase", "mode"], sort=True):
            rows.append(_stats(source, phase, mode, g))
        for mode, g in s.groupby("mode", sort=True):
            rows.append(_stats(source, "all", mode, g))
    return rows


def plot(points: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ax = axes[0]
    colors = {"eager": "tab:orange", "graph": "tab:blue"}
    markers = {"prefill": "s", "decode": "o"}
    lo = min(points["measured_s"].min(), points["predicted_s"].min()) * 1e3 / 1.5
    hi = max(points["measured_s"].max(), points["predicted_s"].max()) * 1e3 * 1.5
    xs = np.geomspace(lo, hi, 50)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.9", label="±10 %")
    ax.plot(xs, xs, color="0.3", lw=1)
    for (phase, mode), g in points.groupby(["phase", "mode"]):
        ax.scatter(g["measured_s"] * 1e3, g["predicted_s"] * 1e3, s=18, alpha=0.8, c=colors.get(mode, "k"),
                   marker=markers.get(phase, "x"), label=f"{phase}, {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("tiersim predicted step time (ms)")
    ax.set_title("Predicted vs measured engine steps")
    ax.legend(fontsize=8)
    ax = axes[1]
    for (phase, mode), g in points.groupby(["phase", "mode"]):
        ax.scatter(g["measured_s"] * 1e3, 100 * g["error"], s=18, alpha=0.8, c=colors.get(mode, "k"),
                   marker=markers.get(phase, "x"), label=f"{phase}, {mode}")
    ax.axhline(0, color="0.3", lw=1)
    for y in (-10, 10):
        ax.axhline(y, color="0.6", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("prediction error (%)")
    ax.set_title("Error by step size")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def write_report(points: pd.DataFrame, summary: list[dict], out: Path, table_dir: Path, files: list[Path]) -> None:
    from sim.costs.table import CostTable

    out.mkdir(parents=True, exist_ok=True)
    cols = ["model", "phase", "mode", "batch", "tokens", "measured_s", "predicted_s", "error", "kernels",
            "kernels_predicted", "extrapolated", "attention_backend", "source"]
    points[cols].sort_values(["model", "phase", "mode", "batch", "tokens"]).to_csv(out / "points.csv", index=False)
    plot(points[points["source"] == "table run"], out / "pred_vs_meas.png")
    ident = CostTable(table_dir).identity
    lines = ["# tiersim validation report", "",
             f"Cost table: `{ident['table']}` (sha256 `{ident['sha256'][:16]}…`, GPU {ident['gpu']}, "
             f"created {ident['created_utc']}).",
             f"Measurements: {', '.join(str(f) for f in files)} — {len(points)} steps of the PyTorch "
             f"reference decoder.", "",
             "| measured in | phase | mode | points | median abs. error | p95 abs. error | max abs. error | "
             "mean signed | target | met |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in summary:
        tgt = ", ".join(f"{k} ≤ {_pct(v)}" for k, v in r["targets"].items()) or "-"
        met = "-" if r["meets_targets"] is None else ("yes" if r["meets_targets"] else "no")
        lines.append(f"| {r['source']} | {r['phase']} | {r['mode']} | {r['points']} | {_pct(r['median_abs_error'])} | "
                     f"{_pct(r['p95_abs_error'])} | {_pct(r['max_abs_error'])} | {_pct(r['mean_signed_error'])} | "
                     f"{tgt} | {met} |")
    worst = points[points["source"] == "table run"].sort_values("abs_error", ascending=False).head(12)
    lines += ["", "Largest errors:", "",
              "| model | phase | mode | batch | tokens | measured ms | predicted ms | error | kernels meas./pred. |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in worst.itertuples(index=False):
        lines.append(f"| {r.model} | {r.phase} | {r.mode} | {r.batch:.0f} | {r.tokens:.0f} | "
                     f"{r.measured_s * 1e3:.3f} | "
                     f"{r.predicted_s * 1e3:.3f} | {_pct(r.error)} | {r.kernels}/{r.kernels_predicted} |")
    lines += ["", "![predicted vs measured](pred_vs_meas.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"cost_table": ident, "measurements": [str(f) for f in files],
                                                  "summary": summary}, indent=2) + "\n")


def main(args) -> int:
    from sim.costs.table import resolve_table_dir

    if getattr(args, "e2e", None):
        from calibration import validate_e2e

        return validate_e2e.main(args)
    table_dir = resolve_table_dir(args.table)
    files = _measurement_files(table_dir, args.measurements)
    points = predict(load_measurements(files), table_dir)
    summary = summarize(points)
    out = Path(args.out or "validation-report")
    write_report(points, summary, out, table_dir, files)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'measured in':26}{'phase':8}{'mode':7}{'points':>7}{'median':>9}{'p95':>9}{'max':>9}  target")
        for r in summary:
            tgt = ", ".join(f"{k} <= {_pct(v)}" for k, v in r["targets"].items())
            met = "" if r["meets_targets"] is None else ("  met" if r["meets_targets"] else "  MISSED")
            print(f"{r['source']:26}{r['phase']:8}{r['mode']:7}{r['points']:>7}{_pct(r['median_abs_error']):>9}"
                  f"{_pct(r['p95_abs_error']):>9}{_pct(r['max_abs_error']):>9}  {tgt}{met}")
        print(f"report: {out}/report.md, {out}/pred_vs_meas.png, {out}/points.csv")
    return 0
