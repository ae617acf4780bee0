"""Error bars: how far the cost model was from measured steps, for the shape class a prediction is in.

From a table's ``validation/points.csv`` (``tiersim validate``: every measured step of the reference
decoder on that GPU, its prediction and the error; only the table's own run counts) and, when present,
``validation/leave_one_out.json`` (``python -m calibration.leave_one_out``: the error on a model whose
exact entries were left out of the table, i.e. the error of *generalised* pricing). Steps are grouped by
phase, execution mode and shape class:

- decode: batch 1-4, 5-32, 33 and more sequences;
- prefill: up to 1,024, 1,025-4,096, more than 4,096 tokens in the step.

A model whose ops were all measured at its exact shapes gets the validation error of its class; a model
priced by generalisation gets the leave-one-model-out error of the phase and mode (the better estimate:
the validation points themselves were measured on the exact-shape models).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODES = {"cuda-graph": "graph", "host-launched": "eager"}
DECODE_CLASSES = ((1, 4, "batch 1-4"), (5, 32, "batch 5-32"), (33, 1 << 30, "batch >= 33"))
PREFILL_CLASSES = ((1, 1024, "<= 1,024 tokens"), (1025, 4096, "1,025-4,096 tokens"),
                   (4097, 1 << 40, "> 4,096 tokens"))


def shape_class(phase: str, batch: int, tokens: int) -> str:
    """The class of a step: decode by batch, prefill by the step's tokens (batch × prompt tokens)."""
    if phase == "decode":
        return next(label for lo, hi, label in DECODE_CLASSES if lo <= batch <= hi)
    n = batch * tokens
    return next(label for lo, hi, label in PREFILL_CLASSES if lo <= n <= hi)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


class ErrorBars:
    """Median and p95 absolute step-time error per (phase, mode, shape class) of one table."""

    def __init__(self, rows: list[dict], models: list[str], loo: dict | None, source: str) -> None:
        self.rows = rows
        self.models = models
        self.loo = loo
        self.source = source

    @classmethod
    def for_table(cls, table_dir: Path) -> ErrorBars | None:
        path = Path(table_dir) / "validation" / "points.csv"
        if not path.exists():
            return None
        import csv

        # read with the csv module, not pandas (every run reports its error bars; pandas would be the
        # costliest import of a run). Groups are sorted by their keys, as pandas' groupby(sort=True)
        with open(path, newline="") as fh:
            pts = [r for r in csv.DictReader(fh) if r.get("source", "table run") == "table run"]
        if not pts:
            return None
        errors: dict[tuple, list[float]] = {}
        for r in pts:
            phase, mode = r["phase"], r["mode"]
            e = abs(float(r["error"]))
            errors.setdefault((phase, mode, shape_class(phase, int(float(r["batch"])), int(float(r["tokens"])))),
                              []).append(e)
            errors.setdefault((phase, mode), []).append(e)
        rows = []
        for key in sorted(k for k in errors if len(k) == 3) + sorted(k for k in errors if len(k) == 2):
            e = np.array(errors[key], dtype=float)
            rows.append({"phase": key[0], "mode": key[1], "class": key[2] if len(key) == 3 else "all",
                         "points": int(e.size), "median_abs_error": float(np.median(e)),
                         "p95_abs_error": float(np.percentile(e, 95))})
        loo_path = Path(table_dir) / "validation" / "leave_one_out.json"
        loo = json.loads(loo_path.read_text()) if loo_path.exists() else None
        return cls(rows, sorted({r["model"] for r in pts}), loo,
                   f"{Path(table_dir).name}/validation/points.csv")

    def _find(self, phase: str, mode: str, c: str) -> dict | None:
        return next((r for r in self.rows if (r["phase"], r["mode"], r["class"]) == (phase, mode, c)), None)

    def _loo(self, phase: str, mode: str) -> dict | None:
        if not self.loo:
            return None
        return next((r for r in self.loo.get("held_out_summary", [])
                     if (r["phase"], r["mode"]) == (phase, mode)), None)

    def for_step(self, phase: str, execution: str, batch: int, tokens: int, generalised: bool) -> dict | None:
        """The error bar of one step: ``{"line": ..., ...}`` or None when nothing was validated."""
        mode = MODES.get(execution)
        if mode is None or phase not in ("decode", "prefill"):
            return None
        c = shape_class(phase, batch, tokens)
        if generalised:
            r = self._loo(phase, mode)
            if r is not None:
                return {**r, "class": "all", "basis": "leave-one-model-out",
                        "line": f"error bar: {phase} {execution} steps of a model priced by generalisation "
                                f"(leave-one-model-out on this GPU): median {_pct(r['median_abs_error'])}, "
                                f"p95 {_pct(r['p95_abs_error'])} against measurement ({r['points']} steps)"}
        r = self._find(phase, mode, c)
        if r is None:
            return None
        note = "" if not generalised else (" (validated on " + ", ".join(self.models) +
                                           "; this model's shapes are generalised)")
        return {**r, "basis": "validation",
                "line": f"error bar: {phase} {execution} steps of this shape class ({c}): median "
                        f"{_pct(r['median_abs_error'])}, p95 {_pct(r['p95_abs_error'])} against measurement "
                        f"({r['points']} steps){note}"}

    def for_run(self, execution: str, generalised: bool) -> dict | None:
        """Error bars of a run: per phase for its execution mode (all classes), one summary line."""
        mode = MODES.get(execution)
        if mode is None:
            return {"line": f"error bars: the execution policy {execution!r} was not validated on this table",
                    "mode": execution, "classes": []}
        classes = [r for r in self.rows if r["mode"] == mode]
        parts = []
        for phase in ("decode", "prefill"):
            r = self._loo(phase, mode) if generalised else None
            basis = "leave-one-model-out" if r is not None else "validation"
            r = r or self._find(phase, mode, "all")
            if r is not None:
                parts.append(f"{phase} median {_pct(r['median_abs_error'])}, p95 {_pct(r['p95_abs_error'])}"
                             + (" (leave-one-model-out)" if basis != "validation" else ""))
        basis_note = "" if not generalised or self.loo else " (validated on " + ", ".join(self.models) + ")"
        return {"mode": execution, "source": self.source, "classes": classes,
                "leave_one_out": self._loo_rows(mode) if generalised else None,
                "line": f"error bars ({execution} steps against measurement on this GPU{basis_note}): "
                        + "; ".join(parts)}

    def _loo_rows(self, mode: str) -> list[dict] | None:
        if not self.loo:
            return None
        return [r for r in self.loo.get("held_out_summary", []) if r["mode"] == mode]
