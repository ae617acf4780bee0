"""Parameter sweeps that never lose finished runs.

    from sim.sweep import grid, run_sweep
    variants = grid({"policies.scheduling.name": ["fcfs", "chunked-prefill"], "trace.rate_scale": [1, 2, 4]})
    table = run_sweep(SimConfig(), variants, "sweeps/sched")      # a pandas DataFrame, one row per run

Every run writes its results into ``OUT/<config hash>/`` as soon as it finishes and appends one line to
``OUT/sweep.jsonl``; a run that raises is recorded there with its error and the sweep goes on. Running
the same sweep again skips every run whose results are already on disk, so an interrupted or crashed
sweep resumes where it stopped.
"""
from __future__ import annotations

import itertools
import json
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sim.config import SimConfig, with_overrides

SUMMARY_COLUMNS = {  # column name -> path into summary.json
    "ttft_p50_s": ("ttft_s", "p50"), "ttft_p99_s": ("ttft_s", "p99"),
    "itl_p50_s": ("itl_s", "p50"), "itl_p99_s": ("itl_s", "p99"),
    "tpot_p50_s": ("tpot_s", "p50"), "e2e_p50_s": ("e2e_s", "p50"), "e2e_p99_s": ("e2e_s", "p99"),
    "throughput_tok_s": ("throughput", "output_tokens_per_s"), "requests_per_s": ("throughput", "requests_per_s"),
    "goodput_req_s": ("goodput", "requests_per_s"), "goodput_fraction": ("goodput", "fraction"),
    "preemptions": ("engine", "preemptions"), "steps": ("engine", "steps"),
    "finished": ("requests", "finished"), "rejected": ("requests", "rejected"),
}


def grid(axes: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of dotted-key axes, as override dicts (in axis order)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


def _row(overrides: dict, config_hash: str, summary: dict | None, status: str, error: str = "") -> dict:
    row = {**{f"set:{k}": v for k, v in overrides.items()}, "config_hash": config_hash, "status": status,
           "error": error}
    if summary is not None:
        for col, (a, b) in SUMMARY_COLUMNS.items():
            row[col] = summary.get(a, {}).get(b)
    return row


def run_sweep(base: SimConfig, variants: list[Mapping[str, Any]], out_dir: str | Path,
              progress: Callable[[str], None] | None = print) -> "Any":
    """Run every variant of ``base``; returns a DataFrame with the overrides, status and key metrics."""
    import pandas as pd

    from sim.engine import Simulation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep.jsonl"
    rows = []
    for i, overrides in enumerate(variants):
        overrides = dict(overrides)
        try:
            cfg = with_overrides(base, overrides)
        except Exception as exc:  # noqa: BLE001 - a bad variant is recorded, not fatal
            row = _row(overrides, "", None, "invalid", f"{type(exc).__name__}: {exc}")
            rows.append(row)
            with log.open("a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
            continue
        h = cfg.hash()
        run_dir = out / h[:16]
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            rows.append(_row(overrides, h, json.loads(summary_path.read_text()), "done (resumed)"))
            if progress:
                progress(f"[{i + 1}/{len(variants)}] {overrides}: already done")
            continue
        try:
            res = Simulation(cfg).run()
            res.write(run_dir)
            (run_dir / "config.toml").write_text(cfg.to_toml())
            row = _row(overrides, h, res.summary, "done")
        except Exception as exc:  # noqa: BLE001 - one failed run must not cost the others
            row = _row(overrides, h, None, "failed", f"{type(exc).__name__}: {exc}")
            row["traceback"] = traceback.format_exc(limit=6)[-3000:]
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        if progress:
            progress(f"[{i + 1}/{len(variants)}] {overrides}: {row['status']}"
                     + (f" ({row['error']})" if row["error"] else ""))
    table = pd.DataFrame(rows)
    table.to_csv(out / "sweep.csv", index=False)
    return table


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,v3`` → (key, [v1, v2, v3]) with TOML-literal values."""
    from sim.config import parse_override

    key, _, values = text.partition("=")
    if not values:
        from sim.errors import ConfigError

        raise ConfigError(f"--grid {text!r}: expected key=value1,value2,...")
    return key, [parse_override(f"{key}={v}")[1] for v in values.split(",")]
