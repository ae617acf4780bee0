"""``tiersim validate``: tiersim's predicted step times against measured steps of a real model.

The measurements are the ``validation`` part of the calibration suite: a PyTorch Llama-architecture
decoder (``calibration.reference_model``) run on the GPU for prefill steps (batch × prompt length)
and decode steps (batch × cached context), eagerly (host-launched, one sync per step) and as a
CUDA-graph replay. For every measured point this module asks the simulator's cost model for the same
step — same model shapes, the cost table under test, the ``host-launched`` or ``cuda-graph``
execution policy — and reports the error: a table, percentiles per phase and mode, a
predicted-vs-measured plot, and the points themselves.

Step rows of other parts (``STEP_PARTS``: unseen model shapes, the ``torch-unfused`` engine, tensor
parallelism) say in ``extra`` which engine recipe ran (``recipe``, default ``fused``), the
tensor-parallel size (``tp``) and, for a mixed chunked-prefill step (op ``mixed``: x = decodes,
y = their context, z = the chunk's new tokens), the chunk's cached prefix (``cached``). Each point
has a stable id (:func:`point_id`). With ``--predictions FILE`` the predictions are not made now:
they are read from a file written and committed before the measurement (``calibration.gpu16.predict``),
joined on (point id, mode), so they cannot be tuned after the fact.

Nothing here runs on a GPU; it reads measurement files and a cost table.

``tiersim validate --e2e RUN_DIR`` compares whole runs instead: a reference server's measured TTFT,
ITL and E2E against tiersim's replay of the same requests (``calibration.validate_e2e``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is read: every tiersim command builds this parser
    import pandas as pd

TARGETS = {  # (phase-independent) targets from the calibration issue: |error| percentiles
    "graph": {"median": 0.03, "p95": 0.08},
    "eager": {"median": 0.10},
}
MODES = {"eager": "host-launched", "graph": "cuda-graph"}
STEP_PARTS = ("validation", "unseen_steps", "unfused_steps", "tp_steps")


def point_id(model: str, phase: str, batch: int, tokens: int, *, recipe: str = "fused", chunk: int = 0,
             cached: int = 0, tp: int = 1) -> str:
    """The stable id of a measured step (a ``make_key`` string): what committed predictions join on."""
    from sim.costs.model import make_key

    return make_key(batch=int(batch), cached=int(cached), chunk=int(chunk), model=model, phase=phase,
                    recipe=recipe, tokens=int(tokens), tp=int(tp))


def add_arguments(p) -> None:
    p.add_argument("--measurements", action="append",
                   help="validation Parquet file(s) (raw/validation.parquet of a calibration run); "
                        "default: the ones shipped with the cost table")
    p.add_argument("--table", default="h100-sxm-80gb", help="cost table name or directory to test")
    p.add_argument("--out", default=None, help="report directory (default: validation-report; with --e2e, "
                                                 "RUN_DIR/e2e)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="compare with predictions committed before the measurement (a Parquet of point, "
                        "mode, predicted_s: calibration.gpu16.predict) instead of predicting now")
    from calibration import validate_e2e

    validate_e2e.add_arguments(p)


def _measurement_files(table_dir: Path, given: list[str] | None,
                       parts: tuple[str, ...] = ("validation",)) -> list[Path]:
    from sim.errors import CostTableError

    if given:
        files = [Path(g) for g in given]
    else:   # the table's own run first, then earlier or repeat runs kept beside it
        files = [f for part in parts for f in (sorted(table_dir.glob(f"raw/{part}*.parquet"))
                                                + sorted(table_dir.glob(f"runs/*/raw/{part}*.parquet")))]
    if not given:   # quick (smoke) runs use toy shapes: not a validation of anything
        def quick(f: Path) -> bool:
            meta = (f.parent.parent / "metadata.json")
            return meta.exists() and bool(json.loads(meta.read_text()).get("quick"))

        files = [f for f in files if not quick(f)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise CostTableError(f"{missing[0]}: validation measurements not found")
    if not files and parts == ("validation",):
        raise CostTableError(f"{table_dir}: no validation measurements (raw/validation.parquet); measure them "
                             f"with `tiersim calibrate --parts validation --out DIR` on a GPU")
    if not files:   # --predictions: the parts calibration.gpu16 measures, not the table's validation part
        raise CostTableError(f"{table_dir}: no measurements of {', '.join(parts)} (raw/PART*.parquet, here or in "
                             "runs/*/) to compare --predictions with; give them with --measurements FILE, or the "
                             "table they belong to with --table")
    return files


def load_measurements(files: list[Path], parts: tuple[str, ...] = ("validation",)) -> pd.DataFrame:
    """Step rows of ``parts`` from ``files``, one per (point, mode), with the point's engine (``recipe``),
    ``tp``, mixed-step ``chunk`` and ``cached``, its ``point`` id and where it was measured (``source``)."""
    import pandas as pd

    from sim.errors import CostTableError

    frames = []
    need = {"part", "op", "variant", "key", "x", "y", "z", "median_s", "extra"}
    for f in files:
        try:
            d = pd.read_parquet(f)
        except Exception as exc:  # noqa: BLE001 - not Parquet, truncated: the user's file, said in one line
            raise CostTableError(f"{f}: cannot read as Parquet ({type(exc).__name__}: {str(exc)[:120]}); "
                                 "--measurements takes the raw/*.parquet that tiersim calibrate writes") from None
        missing = sorted(need - set(d.columns))
        if missing:
            raise CostTableError(f"{f}: not a calibration measurements file (no column {', '.join(missing)}); "
                                 "--measurements takes the raw/*.parquet that tiersim calibrate writes")
        d = d[d["part"].isin(parts) & d["op"].isin(("prefill", "decode", "mixed"))].copy()
        run = f.parent.parent if f.parent.name == "raw" else f.parent
        d["source"] = "table run" if run.parent.name != "runs" else f"runs/{run.name}"
        frames.append(d)
    m = pd.concat(frames, ignore_index=True)
    extra = [json.loads(e) if e else {} for e in m["extra"]]
    m["kernels"] = [e.get("kernels") for e in extra]
    m["attention_backend"] = [e.get("attention_backend", "") for e in extra]
    m["failed"] = [bool(e.get("error")) for e in extra]
    m["recipe"] = [str(e.get("recipe", "fused")) for e in extra]
    m["tp"] = [int(e.get("tp", 1)) for e in extra]
    m["cached"] = [int(e.get("cached", 0)) for e in extra]
    m["chunk"] = m["z"].astype(int)
    m = m[~m["failed"] & np.isfinite(m["median_s"]) & (m["median_s"] > 0)]
    m = m.rename(columns={"variant": "mode", "op": "phase", "key": "model", "x": "batch", "y": "tokens"})
    m["point"] = [point_id(r.model, r.phase, int(r.batch), int(r.tokens), recipe=r.recipe, chunk=int(r.chunk),
                           cached=int(r.cached), tp=int(r.tp)) for r in m.itertuples(index=False)]
    return m


def cost_model(table, model_name: str, mode: str, recipe: str = "fused", tp: int = 1):
    """The step cost model that prices a validation point: ``table`` (a ``CostTable``) on the GPU
    preset it was measured on, the named model under tensor parallelism ``tp``, the engine ``recipe``,
    and the execution policy of ``mode`` ("graph" or "eager")."""
    from policies import registry
    from sim.costs.model import TransformerOps
    from sim.costs.recipe import load_recipe
    from sim.costs.step import StepCostModel
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    gpu = load_gpu(table.meta.get("gpu", {}).get("preset") or "h100-sxm-80gb")
    ops = TransformerOps(load_model(model_name), tp=tp)
    backend = TableBackend(ops, gpu, table, recipe=load_recipe(recipe))
    return StepCostModel(ops, backend, registry.build("execution", MODES[mode], {}))


def point_shape(phase: str, batch: int, tokens: int, chunk: int = 0, cached: int = 0):
    """A validation point's step: ``batch`` prompts of ``tokens`` (prefill), ``batch`` decodes with
    ``tokens`` of context each (decode), or those decodes plus a ``chunk`` over ``cached`` tokens that
    finishes its prompt (mixed)."""
    from calibration.reference_model import step_shape

    return step_shape(phase, batch, tokens, chunk, cached)


def predict_one(cost, phase: str, batch: int, tokens: int, chunk: int = 0, cached: int = 0) -> tuple[float, int, bool]:
    """(step seconds, kernels per step, whether a lookup left a measured grid) of one point."""
    shape = point_shape(phase, batch, tokens, chunk, cached)
    before = sum(cost.backend.extrapolations.values())
    t, _, _ = cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum, shape.num_sampled)
    seq = cost.sequence(shape.num_tokens, shape.num_sampled, shape.num_decode == 0, shape.num_decode > 0)
    return t, seq.num_kernels, sum(cost.backend.extrapolations.values()) > before


def _with_errors(out: pd.DataFrame) -> pd.DataFrame:
    out["measured_s"] = out["median_s"]
    out["error"] = out["predicted_s"] / out["measured_s"] - 1.0
    out["abs_error"] = out["error"].abs()
    return out


def predict(m: pd.DataFrame, table_dir: Path) -> pd.DataFrame:
    """Add predicted_s, kernels_predicted and extrapolated to each measured point."""
    from sim.costs.table import CostTable

    table = CostTable(table_dir)
    models: dict = {}
    pred, kern, ext = [], [], []
    for row in m.itertuples(index=False):
        recipe, tp = getattr(row, "recipe", "fused"), int(getattr(row, "tp", 1))
        key = (row.model, row.mode, recipe, tp)
        cost = models.get(key)
        if cost is None:
            cost = models[key] = cost_model(table, row.model, row.mode, recipe, tp)
        t, k, e = predict_one(cost, row.phase, int(row.batch), int(row.tokens), int(getattr(row, "chunk", 0)),
                              int(getattr(row, "cached", 0)))
        pred.append(t)
        kern.append(k)
        ext.append(e)
    out = m.copy()
    out["predicted_s"] = pred
    out["kernels_predicted"] = kern
    out["extrapolated"] = ext
    return _with_errors(out)


def load_predictions(path: str | Path) -> pd.DataFrame:
    """The committed predictions of ``--predictions``, or a one-line error naming the file and what it lacks."""
    import pandas as pd

    from sim.errors import CostTableError

    path = Path(path)
    hint = "--predictions takes the Parquet of point, mode, predicted_s that calibration.gpu16.predict writes"
    if not path.is_file():
        raise CostTableError(f"--predictions {path}: {'is a directory' if path.is_dir() else 'no such file'}; {hint}")
    try:
        d = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - not Parquet, truncated: the user's file, said in one line
        raise CostTableError(f"--predictions {path}: cannot read as Parquet ({type(exc).__name__}: "
                             f"{str(exc).split('. ')[0][:120]}); {hint}") from None
    missing = [c for c in ("point", "mode", "predicted_s") if c not in d.columns]
    if missing:
        raise CostTableError(f"--predictions {path}: not a predictions file (no column {', '.join(missing)}); {hint}")
    return d


def with_committed(m: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Measured points joined with committed predictions on (point, mode); points without a committed
    prediction are dropped (the caller reports how many)."""
    cols = ["point", "mode", "predicted_s", "kernels_predicted", "extrapolated"]
    pred = predictions[[c for c in cols if c in predictions.columns]]
    out = m.merge(pred, on=["point", "mode"], how="inner")
    for c, default in (("kernels_predicted", -1), ("extrapolated", False)):
        if c not in out.columns:
            out[c] = default
    return _with_errors(out)


def _stats(source: str, phase: str, mode: str, g: pd.DataFrame, group: str | None = None) -> dict:
    e = g["abs_error"].to_numpy()
    tgt = TARGETS.get(mode, {})
    r = {"source": source, "phase": phase, "mode": mode, "points": int(len(g)),
         "median_abs_error": float(np.median(e)), "p95_abs_error": float(np.percentile(e, 95)),
         "max_abs_error": float(e.max()), "mean_signed_error": float(g["error"].mean()), "targets": dict(tgt)}
    r["meets_targets"] = all((r["median_abs_error"] if k == "median" else r["p95_abs_error"]) <= v
                             for k, v in tgt.items()) if tgt else None
    if group is not None:
        r["group"] = group
    return r


def point_group(row) -> str:
    """What a point validates: its engine recipe, else its model (unseen shapes), with its TP size."""
    recipe = getattr(row, "recipe", "fused")
    label = f"recipe {recipe}" if recipe != "fused" else str(row.model)
    tp = int(getattr(row, "tp", 1))
    return label if tp == 1 else f"{label} tp{tp}"


def summarize(points: pd.DataFrame, by_group: bool = False) -> list[dict]:
    """Error percentiles per measurement source, phase and mode, and per source and mode; with
    ``by_group`` per source, group (:func:`point_group`), phase and mode."""
    rows = []
    for source, s in points.groupby("source", sort=False):
        groups = [(None, s)] if not by_group else \
            list(s.assign(group=[point_group(r) for r in s.itertuples(index=False)]).groupby("group", sort=True))
        for group, gs in groups:
            for (phase, mode), g in gs.groupby(["phase", "mode"], sort=True):
                rows.append(_stats(source, phase, mode, g, group))
            for mode, g in gs.groupby("mode", sort=True):
                rows.append(_stats(source, "all", mode, g, group))
    return rows


def plot(points: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ax = axes[0]
    colors = {"eager": "tab:orange", "graph": "tab:blue"}
    markers = {"prefill": "s", "decode": "o", "mixed": "^"}
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


def _first_source(points: pd.DataFrame) -> pd.DataFrame:
    """The table's own run, else the first run measured (what the plot and the worst points show)."""
    if (points["source"] == "table run").any():
        return points[points["source"] == "table run"]
    return points[points["source"] == points["source"].iloc[0]] if len(points) else points


def write_report(points: pd.DataFrame, summary: list[dict], out: Path, table_dir: Path, files: list[Path],
                 note: str = "") -> None:
    from sim.costs.table import CostTable

    out.mkdir(parents=True, exist_ok=True)
    grouped = any("group" in r for r in summary)
    cols = ["model", "recipe", "tp", "phase", "mode", "batch", "tokens", "chunk", "cached", "measured_s",
            "predicted_s", "error", "kernels", "kernels_predicted", "extrapolated", "attention_backend", "source",
            "point"]
    points[[c for c in cols if c in points.columns]].sort_values(["model", "phase", "mode", "batch", "tokens"]) \
        .to_csv(out / "points.csv", index=False)
    first = _first_source(points)
    plot(first, out / "pred_vs_meas.png")
    ident = CostTable(table_dir).identity
    lines = ["# tiersim validation report", "",
             f"Cost table: `{ident['table']}` (sha256 `{ident['sha256'][:16]}…`, GPU {ident['gpu']}, "
             f"created {ident['created_utc']}).",
             f"Measurements: {', '.join(str(f) for f in files)} — {len(points)} steps of the PyTorch "
             f"reference decoder.", ""]
    if note:
        lines += [note, ""]
    lines += ["| measured in |" + (" group |" if grouped else "") + " phase | mode | points | median abs. error | "
              "p95 abs. error | max abs. error | mean signed | target | met |",
              "|---|" + ("---|" if grouped else "") + "---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in summary:
        tgt = ", ".join(f"{k} ≤ {_pct(v)}" for k, v in r["targets"].items()) or "-"
        met = "-" if r["meets_targets"] is None else ("yes" if r["meets_targets"] else "no")
        lines.append(f"| {r['source']} |" + (f" {r.get('group', '')} |" if grouped else "") +
                     f" {r['phase']} | {r['mode']} | {r['points']} | {_pct(r['median_abs_error'])} | "
                     f"{_pct(r['p95_abs_error'])} | {_pct(r['max_abs_error'])} | {_pct(r['mean_signed_error'])} | "
                     f"{tgt} | {met} |")
    worst = first.sort_values("abs_error", ascending=False).head(12)
    lines += ["", "Largest errors:", "",
              "| model | phase | mode | batch | tokens | measured ms | predicted ms | error | kernels meas./pred. |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in worst.itertuples(index=False):
        tokens = f"{r.tokens:.0f}" if r.phase != "mixed" else f"{r.tokens:.0f} + chunk {r.chunk:.0f}/{r.cached:.0f}"
        lines.append(f"| {r.model} | {r.phase} | {r.mode} | {r.batch:.0f} | {tokens} | "
                     f"{r.measured_s * 1e3:.3f} | "
                     f"{r.predicted_s * 1e3:.3f} | {_pct(r.error)} | {r.kernels}/{r.kernels_predicted} |")
    lines += ["", "![predicted vs measured](pred_vs_meas.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"cost_table": ident, "measurements": [str(f) for f in files],
                                                  "summary": summary}, indent=2) + "\n")


def _check_options(args) -> None:
    """Refuse options the chosen mode would ignore: those of --e2e without it, and the step options with it."""
    from sim.errors import TiersimError

    if getattr(args, "e2e", None):
        given = [o for o, v in (("--measurements", args.measurements), ("--predictions", args.predictions)) if v]
        if given:
            raise TiersimError(f"{', '.join(given)}: not used with --e2e (it compares a reference-server run's "
                               "requests); leave them out, or drop --e2e to validate engine steps")
        return
    # step validation prices each point on the GPU its --table was measured on, in both execution modes
    given = [o for o, v in (("--gpu", args.gpu), ("--execution", args.execution != "auto"), ("--costs", args.costs),
                            ("--cases", args.cases)) if v]
    if given:
        raise TiersimError(f"{', '.join(given)}: only with --e2e RUN_DIR (whole-run validation); step validation "
                           "takes the GPU from --table and checks both execution modes")


def main(args) -> int:
    from sim.costs.table import resolve_table_dir
    from sim.results_io import check_output_dir

    _check_options(args)
    if getattr(args, "e2e", None):
        from calibration import validate_e2e

        if args.out:    # before any work: a report directory that cannot be written fails now, in one line
            check_output_dir(args.out, "--out")
        return validate_e2e.main(args)
    out = check_output_dir(args.out or "validation-report", "--out")     # likewise
    table_dir = resolve_table_dir(args.table)
    committed = getattr(args, "predictions", None)
    predictions = load_predictions(committed) if committed else None
    files = _measurement_files(table_dir, args.measurements,
                               tuple(p for p in STEP_PARTS if p != "validation") if committed else ("validation",))
    note = ""
    if committed:
        measured = load_measurements(files, parts=STEP_PARTS)
        points = with_committed(measured, predictions)
        if not len(points):
            from sim.errors import CostTableError

            raise CostTableError(f"--predictions {committed}: none of the {len(measured)} measured steps of "
                                 f"{', '.join(str(f) for f in files)} has a prediction there (joined on point, "
                                 "mode); give the measurements these predictions were made for")
        note = (f"Predictions: `{committed}`, made before the measurement (table sha256 "
                f"`{str(predictions['table_sha256'].iloc[0])[:16]}…`); {len(points)} of {len(measured)} measured "
                f"steps have one." if "table_sha256" in predictions.columns and len(predictions) else
                f"Predictions: `{committed}`; {len(points)} of {len(measured)} measured steps have one.")
    else:
        points = predict(load_measurements(files), table_dir)
    summary = summarize(points, by_group=bool(committed))
    write_report(points, summary, out, table_dir, files, note)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if note:
            print(note)
        width = max([len(r.get("group", "")) for r in summary] + [0])
        print(f"{'measured in':26}{'':{width + 1 if width else 0}}{'phase':8}{'mode':7}{'points':>7}{'median':>9}"
              f"{'p95':>9}{'max':>9}  target")
        for r in summary:
            tgt = ", ".join(f"{k} <= {_pct(v)}" for k, v in r["targets"].items())
            met = "" if r["meets_targets"] is None else ("  met" if r["meets_targets"] else "  MISSED")
            group = f"{r.get('group', ''):{width + 1}}" if width else ""
            print(f"{r['source']:26}{group}{r['phase']:8}{r['mode']:7}{r['points']:>7}{_pct(r['median_abs_error']):>9}"
                  f"{_pct(r['p95_abs_error']):>9}{_pct(r['max_abs_error']):>9}  {tgt}{met}")
        print(f"report: {out}/report.md, {out}/pred_vs_meas.png, {out}/points.csv")
    return 0
