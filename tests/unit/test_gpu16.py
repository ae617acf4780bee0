"""Issue 16's lease: the plan, the committed predictions, the one-command runner, and the ingest.

The device command runs here on the CPU (quick grids; the occupier under NUMBA_ENABLE_CUDASIM=1; the TP
launcher over gloo), and the ingest runs on synthetic returned files made from the committed predictions
(so every part's rows join their predictions, and the reports, the refit and the corrected recipe are
exercised end to end).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration.gpu16 import plan
from calibration.gpu16.predict import latest_predictions
from calibration.raw import RAW_COLUMNS, make_row, rows_to_frame
from calibration.vendor.keys import gemm_key
from sim.costs.model import make_key, parse_key
from sim.costs.table import CostTable, resolve_table_dir

ROOT = Path(__file__).resolve().parents[2]
PREDICTED_PARTS = {"unseen_steps", "unfused_steps", "tp_steps", "unfused_fused_ref", "sm_share", "fp8_gemm",
                   "unfused_ops", "allreduce"}


@pytest.fixture(scope="module")
def predictions() -> pd.DataFrame:
    path = latest_predictions()
    assert path is not None, "commit the predictions first: python -m calibration.gpu16.predict"
    return pd.read_parquet(path)


# ------------------------------------------------------------------------------------------ plan
def test_point_ids_are_unique_and_every_planned_point_has_a_committed_prediction(predictions):
    """The plan may not change after the predictions were committed: each point the lease measures is
    predicted, in the mode it is measured in, from the shipped H200 table as it is."""
    assert set(predictions["part"]) == PREDICTED_PARTS
    assert not predictions.duplicated(["part", "point", "mode"]).any()
    have = set(zip(predictions["part"], predictions["point"], predictions["mode"]))
    want = {(p.part, p.id, mode) for part in ("unseen_steps", "unfused_steps", "tp_steps")
            for p in plan.step_points(part) for mode in plan.MODES}
    want |= {("sm_share", plan.sm_point_id(m, w, r), m) for m, w, r in plan.sm_points()}
    want |= {("fp8_gemm", plan.gemm_point_id(d, n, k, m), "torch" if d == "fp8" else "torch-bf16-anchor")
             for d, n, k, m in plan.fp8_points()}
    want |= {("unfused_ops", plan.unfused_op_id(mo, op, t), op) for mo, op, t in plan.unfused_op_points()}
    want |= {("unfused_ops", plan.gemm_point_id("bf16", n, k, m), "torch") for _, n, k in plan.unfused_gemm_shapes()
             for m in plan.UNFUSED_GEMM_M}
    want |= {("allreduce", plan.allreduce_point_id(tp, b, v), v) for tp in plan.TP_SIZES for b in plan.ALLREDUCE_BYTES
             for v in ("nccl", "nccl-graph")}
    assert want <= have, sorted(want - have)[:5]
    assert (predictions["predicted_s"] > 0).all() and np.isfinite(predictions["predicted_s"]).all()
    table = CostTable(resolve_table_dir("h200"))
    assert set(predictions["table_sha256"]) == {table.identity["sha256"]}


def test_unseen_shapes_are_unseen_and_the_torch_unfused_points_are_on_the_fused_grid(predictions):
    from calibration.reference_model import validation_points

    steps = predictions[predictions["part"] == "unseen_steps"]
    det = {parse_key(p)["model"]: json.loads(d) for p, d in zip(steps["point"], steps["detail"])}
    assert len(det["qwen2.5-7b"]["generalised"]) == 17                 # nothing of Qwen's was measured
    assert set(det["mistral-7b"]["generalised"]) == {"embed", "lm_head", "sample"}   # Llama-3.1-8B's layers
    assert "attn_decode" in det["llama-2-7b"]["generalised"]            # full MHA: 4x the KV per token
    fused_grid = set(validation_points(quick=False))
    assert {(p.phase, p.batch, p.tokens) for p in plan.step_points("unfused_steps")} <= fused_grid
    assert {p.phase for p in plan.step_points("unseen_steps")} == {"prefill", "decode", "mixed"}
    # green contexts split Hopper's SMs in 8s: both mechanisms hold the same counts (0 held: no context)
    assert all((132 - r) % 8 == 0 for r in plan.SM_RESERVED if r)


def test_budgets_scale_with_what_is_left():
    from calibration.gpu16.run import MAX_SCALE, PACK_RESERVE_S, budgets

    soft, hard = budgets([60, 40], 270)
    assert soft == pytest.approx(60 * MAX_SCALE) and soft < hard <= 270 - PACK_RESERVE_S
    soft, hard = budgets([60, 40], 56)         # half the plan's time left: half the estimate
    assert soft == pytest.approx(60 * 50 / 100) and hard <= 50
    estimate = sum(p.estimate_s for p in plan.LEASE_PARTS)
    assert estimate <= 0.85 * 270          # the plan fits the 4.5-minute lease with room to spare


# ------------------------------------------------------------------------------------------ the runner
def test_the_lease_command_runs_its_parts_and_packs_three_files(tmp_path, monkeypatch):
    from calibration.gpu16 import run as lease

    calls = []

    def broken(part, ctx, sink):
        calls.append(part)
        raise RuntimeError("a sticky CUDA error")

    real = lease.part_runner
    monkeypatch.setattr(lease, "part_runner", lambda name: broken if name == "sm_share" else real(name))
    lines: list[str] = []
    meta = lease.run_lease(tmp_path / "gpu16", budget_s=120, quick=True, isolate=False, echo=lines.append,
                           parts=["unfused_steps", "sm_share", "fp8_gemm"])
    assert sorted(p.name for p in (tmp_path / "gpu16").iterdir()) == ["log.txt", "meta.json", "rows.parquet"]
    assert calls == ["sm_share"]
    status = {n: e["status"] for n, e in meta["parts"].items()}
    assert status == {"unfused_steps": "done", "sm_share": "failed", "fp8_gemm": "done"}   # a failure is contained
    rows = pd.read_parquet(tmp_path / "gpu16" / "rows.parquet")
    assert list(rows.columns) == list(RAW_COLUMNS) and set(rows["part"]) == {"unfused_steps", "fp8_gemm"}
    assert json.loads(rows.loc[rows["part"] == "unfused_steps", "extra"].iloc[0])["recipe"] == "torch-unfused"
    assert "fp8_gemm" in json.loads((tmp_path / "gpu16" / "meta.json").read_text())["parts"]
    log = (tmp_path / "gpu16" / "log.txt").read_text()
    assert log.index("est s") < log.index("== unfused_steps") < log.index("status")   # plan first, summary last
    assert "a sticky CUDA error" in log and lines[-1].startswith("rows: ")


def _run(args: list[str], env: dict | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_sm_share_and_the_occupier_in_a_child_process_under_the_simulator(tmp_path):
    out = tmp_path / "gpu16"
    proc = _run(["calibration.gpu16", "--out", str(out), "--quick", "--parts", "sm_share", "--budget-s", "200"],
                {"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    part = meta["parts"]["sm_share"]
    assert part["status"] == "done" and meta["simulated"] is True
    assert part["capabilities"]["occupier"]["smid"] == "simulator stand-in"
    rows = pd.read_parquet(out / "rows.parquet")
    assert set(rows["key"]) == set(plan.SM_WORKLOADS) and sorted(set(rows["x"])) == [0.0, 1.0]
    held = [json.loads(e) for e in rows.loc[rows["x"] == 1, "extra"]]
    assert all(e["held_sms"] == 1 and e["released_cleanly"] for e in held)
    assert all(p.name in ("log.txt", "meta.json", "rows.parquet") for p in out.iterdir())


@pytest.mark.slow
def test_tp_launcher_over_gloo_with_a_rank_outside_the_tp_group(tmp_path):
    out = tmp_path / "tp"
    proc = _run(["calibration.gpu16.tp", "--out", str(out), "--quick", "--gpus", "3", "--budget-s", "240"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = pd.read_parquet(out / "rows.parquet")
    ar = rows[rows["part"] == "allreduce"]
    assert set(ar["key"]) == {"tp=2"} and sorted(ar["x"]) == list(map(float, plan.QUICK_ALLREDUCE_BYTES))
    steps = rows[rows["part"] == "tp_steps"]
    assert len(steps) == len(plan.step_points("tp_steps", quick=True))
    assert all(json.loads(e)["tp"] == 2 for e in steps["extra"])
    assert "all-reduce tp=2" in (out / "log.txt").read_text()


# ------------------------------------------------------------------------------------------ the ingest
def synthetic_rows(predictions: pd.DataFrame, factor: dict[str, float]) -> list[dict]:
    """Returned rows for every predicted point: the prediction times ``factor[part]`` (the measurement
    the lease would make), in each part's row format."""
    rows = []
    for r in predictions.itertuples(index=False):
        k, f = parse_key(r.point), factor.get(r.part, 1.0)
        t = [r.predicted_s * f] * 5
        extra = {"point": r.point}
        if r.part in ("unseen_steps", "unfused_steps", "tp_steps"):
            extra.update(recipe=k["recipe"], cached=int(k["cached"]), tp=int(k["tp"]), kernels=r.kernels_predicted)
            rows.append(make_row(r.part, r.mode, t, op=k["phase"], key=k["model"], x=int(k["batch"]),
                                 y=int(k["tokens"]), z=int(k["chunk"]), extra=extra))
        elif r.part == "sm_share":
            base = predictions[(predictions["point"] == plan.sm_point_id(k["mechanism"], k["workload"], 0))]
            t = [base["predicted_s"].iloc[0] * r.predicted_ratio * f] * 5     # measured ratio = predicted x f
            rows.append(make_row("sm_share", r.mode, t if int(k["reserved"]) else [base["predicted_s"].iloc[0]] * 5,
                                 key=k["workload"], x=int(k["reserved"]), y=132 - int(k["reserved"]),
                                 extra={**extra, "probe_blocks": 528, "probe_on_held_sms": 0, "exclusive": True}))
        elif r.part == "fp8_gemm":
            rows.append(make_row("fp8_gemm", r.mode, t, op="gemm" if r.mode == "torch" else "", x=int(k["m"]),
                                 key=make_key(dtype=k["dtype"], k=int(k["k"]), n=int(k["n"])), extra=extra))
        elif r.part == "unfused_ops":
            if r.mode == "torch":
                rows.append(make_row("unfused_ops", "torch", t, op="gemm", key=gemm_key(int(k["n"]), int(k["k"])),
                                     x=int(k["m"]), extra={**extra, "model": r.model}))
            else:
                rows.append(make_row("unfused_ops", r.mode, t, key="x", x=int(k["tokens"]),
                                     extra={**extra, "model": k["model"]}))
        elif r.part == "allreduce" and k["tp"] == "2":
            rows.append(make_row("allreduce", r.mode, t, op="allreduce", key=make_key(tp=2), x=int(k["bytes"]),
                                 nbytes=int(k["bytes"]), extra={**extra, "busbw_bytes_per_s": 1e11}))
    return rows


def returned_files(where: Path, predictions: pd.DataFrame, factor: dict[str, float], lease: str) -> tuple[Path, Path]:
    gpu16, tp = where / "gpu16", where / "tp"
    for d in (gpu16, tp):
        d.mkdir(parents=True)
    rows = synthetic_rows(predictions, factor)
    multi = [r for r in rows if r["part"] in ("allreduce", "tp_steps")]
    single = [r for r in rows if r["part"] not in ("allreduce", "tp_steps")]
    rows_to_frame(single).to_parquet(gpu16 / "rows.parquet", index=False)
    rows_to_frame(multi).to_parquet(tp / "rows.parquet", index=False)
    counts = [{"model": m, "phase": ph, "batch": b, "length": n, "device": "cuda", "torch": "2.11.0+cu130",
               "kernels_per_layer": 41, "counted": "synthetic"} for m, ph, b, n in
              (("llama-3.1-8b", "decode", 2, 16), ("llama-3.2-1b", "prefill", 1, 16))]
    meta = {"issue": 16, "lease": lease, "quick": False, "simulated": False,
            "parts": {"unfused_counts": {"status": "done", "kernel_counts": counts},
                      "fp8_gemm": {"status": "done", "fp8_kv_decode": "not timed: no fused SDPA backend",
                                   "capabilities": {"fp8_kv_attention": {"bf16 q, e4m3 kv / flash": "RuntimeError"}}}}}
    (gpu16 / "meta.json").write_text(json.dumps(meta))
    (gpu16 / "log.txt").write_text("synthetic\n")
    (tp / "meta.json").write_text(json.dumps({"issue": 16, "world": 2}))
    return gpu16, tp


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, predictions):
    from calibration.gpu16 import ingest

    base = tmp_path_factory.mktemp("ingest")
    table = base / "h200"
    # without the committed leases' runs: the report then holds this fixture's two leases alone
    shutil.copytree(resolve_table_dir("h200"), table, ignore=shutil.ignore_patterns("validation", "runs", "e2e"))
    fixture = base / "torch_unfused.json"
    shutil.copy(ingest.COUNT_FIXTURE, fixture)
    first = {"unseen_steps": 1.05, "unfused_steps": 0.9, "tp_steps": 1.2, "sm_share": 1.1, "fp8_gemm": 1.25,
             "unfused_ops": 1.3, "allreduce": 0.8}
    runs = []
    for lease, factor in (("lease1", first), ("lease2", {k: v * 1.02 for k, v in first.items()})):
        gpu16, tp = returned_files(base / lease, predictions, factor, lease)
        runs.append(ingest.unpack(gpu16, lease, table, tp))
    report = ingest.write_reports(table, latest_predictions(), base / "report")
    done = ingest.refit(runs[0], table, latest_predictions(), fixture)
    return {"table": table, "runs": runs, "report": report, "done": done, "fixture": fixture, "base": base}


def test_ingest_unpacks_as_the_earlier_runs_are_kept(ingested):
    run1, run2 = ingested["runs"]
    assert run1.name.endswith("-gpu16-lease1") and int(run2.name.split("-")[0]) == int(run1.name.split("-")[0]) + 1
    names = sorted(p.name for p in (run1 / "raw").iterdir())
    assert names == ["allreduce.parquet", "fp8_gemm.parquet", "sm_share.parquet", "tp_steps.parquet",
                     "unfused_ops.parquet", "unfused_steps.parquet", "unseen_steps.parquet"]
    assert {"metadata.json", "device.log", "tp-metadata.json"} <= {p.name for p in run1.iterdir()}
    # tiersim validate's default (the table's own validation files) does not pick these up
    from calibration.validate import _measurement_files

    assert all("gpu16" not in str(f) for f in _measurement_files(ingested["table"], None))


def test_the_report_sets_each_lease_against_the_committed_predictions(ingested):
    text = ingested["report"].read_text()
    summary = json.loads((ingested["report"].parent / "summary.json").read_text())
    steps = {(r["source"].split("-gpu16-")[1], r["group"], r["phase"], r["mode"]): r for r in summary["steps"]}
    # measured = predicted x 1.05: |error| = 1 - 1/1.05 everywhere, in both modes, for every unseen shape
    for model in ("qwen2.5-7b", "mistral-7b", "llama-2-7b"):
        for mode in ("graph", "eager"):
            r = steps[("lease1", model, "all", mode)]
            assert r["median_abs_error"] == pytest.approx(1 - 1 / 1.05) and r["points"] == 16
    unfused = steps[("lease1", "recipe torch-unfused", "decode", "graph")]
    assert unfused["median_abs_error"] == pytest.approx(1 / 0.9 - 1)
    assert steps[("lease2", "qwen2.5-7b", "mixed", "graph")]["median_abs_error"] == pytest.approx(1 - 1 / 1.071)
    assert ("lease1", "llama-3.1-8b tp2", "decode", "eager") in steps
    assert "lease1: points, median, p95" in text and "lease2: points, median, p95" in text   # side by side
    assert "torch-unfused over fused" in text
    sm = [r for r in summary["sm_share"] if r["reserved"] > 0 and r["source"].endswith("lease1")]
    assert sm and all(r["measured_ratio"] == pytest.approx(1.1 * r["predicted_ratio"]) for r in sm)
    assert "landed on a held SM: 0 of" in text
    fp8 = [r for r in summary["fp8_gemm"] if r["source"].endswith("lease1")]
    assert len(fp8) == 10 and all(r["median_abs_error"] == pytest.approx(1 - 1 / 1.25) for r in fp8)
    assert "all-reduce tp=2, nccl-graph" in text and "TP 2 steps against tiersim's prediction" in text
    rows = (ingested["report"].parent / "readme_rows.md").read_text()
    assert "H200, qwen2.5-7b (unseen shape), predicted before measuring | 4.8 % / 4.8 % | 4.8 %" in rows
    assert "H200, torch-unfused recipe" in rows and "llama-3.1-8b at TP 2" in rows


def test_tiersim_validate_reads_the_committed_predictions(ingested, capsys):
    from sim.cli import main

    run1 = ingested["runs"][0]
    out = ingested["base"] / "validate"
    assert main(["validate", "--table", str(ingested["table"]), "--out", str(out), "--predictions",
                 str(latest_predictions()), "--measurements", str(run1 / "raw" / "unseen_steps.parquet")]) == 0
    printed = capsys.readouterr().out
    assert "made before the measurement" in printed and "qwen2.5-7b" in printed and "mixed" in printed
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert {r["group"] for r in summary} == {"qwen2.5-7b", "mistral-7b", "llama-2-7b"}


def test_refit_adds_the_new_entries_and_a_corrected_recipe(ingested):
    from policies import registry
    from sim.costs.model import StepShape, TransformerOps
    from sim.costs.recipe import load_recipe
    from sim.costs.step import StepCostModel
    from sim.costs.table import TableBackend
    from sim.specs import load_gpu, load_model

    table = CostTable(ingested["table"])
    keys = {k for (op, k) in table.groups if op == "gemm"}
    assert make_key(dtype="fp8", k=4096, n=28672) in keys and gemm_key(1024, 4096) in keys
    assert table.has("allreduce", make_key(tp=2))
    import dataclasses

    fp8 = TransformerOps(dataclasses.replace(load_model("llama-3.1-8b"), bytes_per_weight=1))
    b = TableBackend(fp8, load_gpu("h200"), table)
    assert b.lookup_report()["ops"]["gate_up_proj"]["source"] == "measured"
    assert not [w for w in b.warnings if "fp8" in w]
    recipe_path = ingested["table"] / "recipes" / "torch-unfused-h200.toml"
    rec = load_recipe(str(recipe_path))
    scales = {op: r.scale for op, r in rec.ops.items() if isinstance(r.scale, tuple)}
    assert set(scales) == {"rms_norm", "rope", "kv_write", "act", "embed"}
    assert all(f == pytest.approx(1.3) for pts in scales.values() for _, f in pts)
    ops = TransformerOps(load_model("llama-3.2-1b"))
    unf = TableBackend(ops, load_gpu("h200"), table, recipe=load_recipe("torch-unfused"))
    cor = TableBackend(ops, load_gpu("h200"), table, recipe=rec)
    ex = registry.build("execution", "cuda-graph", {})
    s = StepShape.decode(8, 1024)
    assert StepCostModel(ops, cor, ex).step(s.prefill_q, s.prefill_c, s.num_decode, s.decode_ctx_sum, 8)[0] > \
        StepCostModel(ops, unf, ex).step(s.prefill_q, s.prefill_c, s.num_decode, s.decode_ctx_sum, 8)[0]
    counts = json.loads(ingested["fixture"].read_text())["counts"]
    assert {c["device"] for c in counts} == {"cpu", "cuda"}
    assert any("CUDA counts (41, 41 kernels per layer; the recipe says 40)" in d for d in ingested["done"])
