"""tiersim's predictions for every point issue 16's leases measure, made from the H200 table before any of it.

    python -m calibration.gpu16.predict [--table h200] [--date YYYY-MM-DD]

writes ``calibration/tables/h200/validation/gpu16/predictions-<date>.parquet`` and ``.md``; commit them on
their own, before the lease. ``tiersim validate --predictions FILE`` and ``calibration.gpu16.ingest``
compare measurements with this file (joined on part, point id and mode), never with predictions made
after the fact. Rows:

- step parts (``unseen_steps``, ``unfused_steps``, ``tp_steps``): one row per point and mode (``eager`` =
  the ``host-launched`` execution policy, ``graph`` = ``cuda-graph``): the step's predicted seconds, its
  kernels, whether a lookup left a measured grid, and where each op's price came from; and, as part
  ``unfused_fused_ref``, the fused recipe at the torch-unfused points (the predicted slowdown is their
  ratio; the measured one is over the table run's fused steps at the same points);
- ``sm_share``: each workload with N SMs held back, from ``for_share((132 - N) / 132)`` of the 8B model's
  backend (the GEMMs: the gate/up projection's op; the copy: the table's bytes model; the steps:
  ``StepCostModel.for_share`` with CUDA graphs), and its ratio to N = 0;
- ``fp8_gemm``: each fp8 GEMM by the stated model (the table has no fp8 entry: ``sim.costs.generalise.
  fp8_factor`` on the measured bf16 GEMM), its ratio to the table's bf16 time, and the bf16 anchors;
- ``unfused_ops``: each torch-unfused op as its recipe prices it, and its separate GEMMs from the
  generalised GEMM model;
- ``allreduce``: the ring model the backend uses without a measurement, per TP size and bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.gpu16 import plan

OUT_DIR = Path(__file__).resolve().parents[1] / "tables" / "h200" / "validation" / "gpu16"
COLUMNS = ["part", "point", "mode", "predicted_s", "predicted_ratio", "kernels_predicted", "extrapolated", "model",
           "detail"]


def latest_predictions(directory: Path = OUT_DIR) -> Path | None:
    """The newest committed predictions file, or None."""
    files = sorted(directory.glob("predictions-*.parquet"))
    return files[-1] if files else None


def _classes(backend) -> dict:
    rep = backend.lookup_report()
    return {"classes": rep["classes"], "generalised": sorted(n for n, e in rep["ops"].items()
                                                             if e["source"] != "measured")}


def step_rows(table) -> list[dict]:
    from calibration.validate import MODES, cost_model, predict_one

    rows, models = [], {}
    refs = [dataclasses.replace(p, part="unfused_fused_ref", recipe="fused") for p in plan.step_points("unfused_steps")]
    for part, points in (("unseen_steps", plan.step_points("unseen_steps")),
                         ("unfused_steps", plan.step_points("unfused_steps")),
                         ("tp_steps", plan.step_points("tp_steps")), ("unfused_fused_ref", refs)):
        for p in points:
            for mode in MODES:
                key = (p.model, mode, p.recipe, p.tp)
                if key not in models:
                    models[key] = cost_model(table, p.model, mode, p.recipe, p.tp)
                cost = models[key]
                t, k, ext = predict_one(cost, p.phase, p.batch, p.tokens, p.chunk, p.cached)
                rows.append({"part": part, "point": p.id, "mode": mode, "predicted_s": t, "kernels_predicted": k,
                             "extrapolated": ext, "model": p.model,
                             "detail": json.dumps({"recipe": p.recipe, "tp": p.tp, **_classes(cost.backend)})})
    return rows


def sm_share_rows(table) -> list[dict]:
    from policies import registry
    from sim.costs.backend import share_factor, stretch
    from sim.costs.model import StepShape, TransformerOps
    from sim.costs.step import StepCostModel
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    gpu = load_gpu("h200")
    ops = TransformerOps(load_model(plan.SM_MODEL))
    backend = TableBackend(ops, gpu, table)
    cost = StepCostModel(ops, backend, registry.build("execution", "cuda-graph", {}))
    gi = ops.index["gate_up_proj"]
    assert (ops.ops[gi].n, ops.ops[gi].k) == plan.SM_GEMM
    copy_moved = 2.0 * plan.SM_COPY_BYTES
    copy_full = float(backend._bytes().time(copy_moved))
    shapes = {"decode_step": StepShape.decode(*plan.SM_DECODE), "prefill_step": StepShape.prefill(*plan.SM_PREFILL)}

    def predicted(workload: str, f: float) -> float:
        b = backend.for_share(f)
        if workload in plan.SM_GEMM_M:
            m = plan.SM_GEMM_M[workload]
            return float(b.fixed_times(m, m)[gi])
        if workload == "copy":
            fac = share_factor(np.zeros(1), np.array([copy_moved]), gpu, backend.share_curves, f)
            return float(stretch(np.array([copy_full]), np.ones(1), fac, backend.share_curves.floor_s)[0])
        s = shapes[workload]
        return float(cost.for_share(f).step(s.prefill_q, s.prefill_c, s.num_decode, s.decode_ctx_sum,
                                            s.num_sampled)[0])

    rows = []
    for mech, workload, reserved in plan.sm_points():
        f = (gpu.sm_count - reserved) / gpu.sm_count
        t, t0 = predicted(workload, f), predicted(workload, 1.0)
        rows.append({"part": "sm_share", "point": plan.sm_point_id(mech, workload, reserved), "mode": mech,
                     "predicted_s": t, "predicted_ratio": t / t0, "model": plan.SM_MODEL,
                     "detail": json.dumps({"sm_fraction": f, "curves": backend.share_curves.source,
                                           "compute_rate": backend.share_curves.compute(f),
                                           "hbm_bandwidth": backend.share_curves.memory(f)})})
    return rows


def _gemm_backend(table, bytes_per_weight: int):
    from sim.costs.model import TransformerOps
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    model = dataclasses.replace(load_model("llama-3.1-8b"), bytes_per_weight=bytes_per_weight)
    return TableBackend(TransformerOps(model), load_gpu("h200"), table)


def fp8_rows(table) -> list[dict]:
    b8, b16 = _gemm_backend(table, 1), _gemm_backend(table, 2)
    rows = []
    for dtype, n, k, m in plan.fp8_points():
        t16 = float(b16._gemm_curve(n, k)[0].at(np.array([float(m)]))[0])
        if dtype == "fp8":
            curve, src = b8._gemm_curve(n, k)
            t8 = float(curve.at(np.array([float(m)]))[0])
            rows.append({"part": "fp8_gemm", "point": plan.gemm_point_id("fp8", n, k, m), "mode": "torch",
                         "predicted_s": t8, "predicted_ratio": t8 / t16, "model": "",
                         "detail": json.dumps({"how": src.get("how", ""), "from": src.get("from", ""),
                                               "bf16_table_s": t16})})
        else:
            rows.append({"part": "fp8_gemm", "point": plan.gemm_point_id("bf16", n, k, m), "mode": "torch-bf16-anchor",
                         "predicted_s": t16, "predicted_ratio": 1.0, "model": "",
                         "detail": json.dumps({"how": "the table's measured bf16 GEMM (a same-shape drift check)"})})
    return rows


def unfused_rows(table) -> list[dict]:
    from sim.costs.model import TransformerOps
    from sim.costs.recipe import load_recipe
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    rows, backends = [], {}
    for model, op, tokens in plan.unfused_op_points():
        if model not in backends:
            ops = TransformerOps(load_model(model))
            backends[model] = (TableBackend(ops, load_gpu("h200"), table, recipe=load_recipe("torch-unfused")),
                               TableBackend(ops, load_gpu("h200"), table))
        unf, fused = backends[model]
        i = unf.ops.index[plan.UNFUSED_OPS[op][0]]
        t = float(unf.curves[i].at(np.array([float(tokens)]))[0])
        tf = float(fused.curves[i].at(np.array([float(tokens)]))[0])
        rows.append({"part": "unfused_ops", "point": plan.unfused_op_id(model, op, tokens), "mode": op,
                     "predicted_s": t, "predicted_ratio": t / tf, "kernels_predicted": int(unf.kernels[i]),
                     "model": model,
                     "detail": json.dumps({"recipe_op": plan.UNFUSED_OPS[op][0], "fused_table_s": tf,
                                           "recipe": [k for k in unf.sources[unf.ops.ops[i].name].get("recipe", [])]})})
    for model, n, k in plan.unfused_gemm_shapes():
        unf = backends[model][0]
        curve, src = unf._gemm_curve(n, k)
        for m in plan.UNFUSED_GEMM_M:
            rows.append({"part": "unfused_ops", "point": plan.gemm_point_id("bf16", n, k, m), "mode": "torch",
                         "predicted_s": float(curve.at(np.array([float(m)]))[0]), "model": model,
                         "detail": json.dumps({"source": src["source"], "from": src.get("from", "")})})
    return rows


def allreduce_rows() -> list[dict]:
    from sim.costs.generalise import ring_allreduce_time
    from sim.specs import load_gpu

    gpu = load_gpu("h200")
    rows = []
    for tp in plan.TP_SIZES:
        for nbytes in plan.ALLREDUCE_BYTES:
            t = float(ring_allreduce_time(np.array([float(nbytes)]), tp, gpu)[0])
            for variant in ("nccl", "nccl-graph"):
                rows.append({"part": "allreduce", "point": plan.allreduce_point_id(tp, nbytes, variant),
                             "mode": variant,
                             "predicted_s": t, "model": "",
                             "detail": json.dumps({"how": "ring over NVLink at the spec bandwidth x 0.7 plus 8 us"})})
    return rows


def predictions(table_name: str = "h200") -> pd.DataFrame:
    from calibration.suite import code_version
    from sim.costs.table import CostTable, resolve_table_dir

    table = CostTable(resolve_table_dir(table_name))
    rows = step_rows(table) + sm_share_rows(table) + fp8_rows(table) + unfused_rows(table) + allreduce_rows()
    frame = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in frame:
            frame[col] = np.nan
    frame = frame[COLUMNS].copy()
    frame["kernels_predicted"] = frame["kernels_predicted"].fillna(-1).astype("int64")
    frame["extrapolated"] = frame["extrapolated"].fillna(False).astype(bool)
    frame["predicted_ratio"] = frame["predicted_ratio"].astype("float64")
    frame["table"] = table.identity["table"]
    frame["table_sha256"] = table.identity["sha256"]
    frame["code_version"] = code_version()
    frame["created_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    if frame.duplicated(["part", "point", "mode"]).any():
        raise AssertionError("two predictions for one (part, point, mode)")
    return frame


def summary_md(frame: pd.DataFrame, path: Path) -> str:
    ident = frame.iloc[0]
    lines = [f"# Issue 16: predictions made before the H200 leases ({path.name})", "",
             f"Table `{ident['table']}` (sha256 `{ident['table_sha256'][:16]}…`), code `{ident['code_version']}`, made "
             f"{ident['created_utc']} by `python -m calibration.gpu16.predict`. {len(frame)} predictions; the lease "
             f"measures the same points (`calibration/gpu16/plan.py`), and the comparison reads this file.", "",
             "| part | predictions |", "|---|---:|"]
    lines += [f"| {p} | {n} |" for p, n in frame.groupby("part", sort=False).size().items()]
    steps = frame[frame["part"].isin(("unseen_steps", "unfused_steps", "tp_steps"))]
    lines += ["", "## Steps (ms): CUDA graph / eager", "",
              "| part | model | phase | batch | tokens | chunk / cached | graph | eager | "
              "ops not measured at this shape |",
              "|---|---|---|---:|---:|---|---:|---:|---|"]
    from sim.costs.model import parse_key

    for point, g in steps.groupby("point", sort=False):
        k = parse_key(point)
        by = {r.mode: r for r in g.itertuples(index=False)}
        det = json.loads(by["graph"].detail)
        chunk = f"{k['chunk']} / {k['cached']}" if k["phase"] == "mixed" else ""
        model = k["model"] + (f" ({k['recipe']})" if k["recipe"] != "fused" else "") + \
            (f" tp{k['tp']}" if k["tp"] != "1" else "")
        lines.append(f"| {g['part'].iloc[0]} | {model} | {k['phase']} | {k['batch']} | {k['tokens']} | {chunk} | "
                     f"{by['graph'].predicted_s * 1e3:.3f} | {by['eager'].predicted_s * 1e3:.3f} | "
                     f"{len(det['generalised'])} |")
    sm = frame[frame["part"] == "sm_share"]
    lines += ["", "## SM share: predicted time over all SMs' (either mechanism)", "",
              "| workload | " + " | ".join(f"{r} held" for r in plan.SM_RESERVED) + " |",
              "|---|" + "---:|" * len(plan.SM_RESERVED)]
    for w in plan.SM_WORKLOADS:
        vals = [sm[sm["point"] == plan.sm_point_id("occupier", w, r)]["predicted_ratio"].iloc[0]
                for r in plan.SM_RESERVED]
        lines.append(f"| {w} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    f8 = frame[(frame["part"] == "fp8_gemm") & (frame["mode"] == "torch")]
    lines += ["", "## fp8 GEMMs: predicted fp8 over the table's bf16 (stated model)", "",
              "| n | k | M = 1 | M = 128 | M = 2048 | M = 16384 |", "|---:|---:|---:|---:|---:|---:|"]
    for (n, k), g in f8.groupby([f8["point"].map(lambda p: int(parse_key(p)["n"])),
                                 f8["point"].map(lambda p: int(parse_key(p)["k"]))], sort=False):
        ratio = {int(parse_key(p)["m"]): r for p, r in zip(g["point"], g["predicted_ratio"])}
        lines.append(f"| {n} | {k} | " + " | ".join(f"{ratio[m]:.2f}" if m in ratio else "-"
                                                  for m in (1, 128, 2048, 16384)) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.gpu16.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default="h200")
    ap.add_argument("--date", default=date.today().isoformat())
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = predictions(args.table)
    path = out / f"predictions-{args.date}.parquet"
    frame.to_parquet(path, index=False)
    path.with_suffix(".md").write_text(summary_md(frame, path))
    print(f"{len(frame)} predictions: {path} (and {path.with_suffix('.md').name})")
    for part, n in frame.groupby("part", sort=False).size().items():
        print(f"  {part:16}{n:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
