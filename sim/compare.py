"""``tiersim compare RUN ...``: the summary metrics side by side (with each run's difference from the
first) and overlaid CDFs of TTFT, token-level inter-token latency and E2E.

The ITL CDF is over every gap between two tokens of a request (from ``itl_hist.parquet``), the same
quantity whose percentiles the summary prints, not a CDF of per-request percentiles.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.results_data import Run

# (label, path into summary.json, scale, unit, lower is better)
METRICS = [
    ("TTFT p50", ("ttft_s", "p50"), 1.0, "s", True), ("TTFT p99", ("ttft_s", "p99"), 1.0, "s", True),
    ("ITL p50", ("itl_s", "p50"), 1e3, "ms", True), ("ITL p99", ("itl_s", "p99"), 1e3, "ms", True),
    ("ITL max", ("itl_s", "max"), 1e3, "ms", True), ("TPOT p50", ("tpot_s", "p50"), 1e3, "ms", True),
    ("TPOT p99", ("tpot_s", "p99"), 1e3, "ms", True), ("E2E p50", ("e2e_s", "p50"), 1.0, "s", True),
    ("E2E p99", ("e2e_s", "p99"), 1.0, "s", True), ("queueing p99", ("queueing_s", "p99"), 1.0, "s", True),
    ("throughput", ("throughput", "output_tokens_per_s"), 1.0, "tok/s", False),
    ("requests/s", ("throughput", "requests_per_s"), 1.0, "req/s", False),
    ("goodput", ("goodput", "requests_per_s"), 1.0, "req/s", False),
    ("goodput fraction", ("goodput", "fraction"), 100.0, "%", False),
    ("finished", ("requests", "finished"), 1.0, "", False), ("rejected", ("requests", "rejected"), 1.0, "", True),
    ("preemptions", ("engine", "preemptions"), 1.0, "", True), ("steps", ("engine", "steps"), 1.0, "", None),
    ("HBM KV peak", ("kv", "hbm_peak_active_bytes"), 1e-9, "GB", None),
    ("prefix hit rate", ("kv", "hbm_prefix_hit_rate"), 100.0, "%", False),
]


def _get(summary: dict, path: tuple[str, str]):
    v = (summary.get(path[0]) or {}).get(path[1])
    return None if v is None else float(v)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if float(v).is_integer() and a < 1e15:
        return f"{int(v):,}"
    return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


def compare_rows(runs: list[Run]) -> list[dict]:
    """One row per metric: label, unit, each run's value, each later run's change from the first (%)."""
    rows = []
    for label, path, scale, unit, lower in METRICS:
        vals = [_get(r.summary, path) for r in runs]
        vals = [None if v is None else v * scale for v in vals]
        if all(v is None for v in vals):
            continue
        base = vals[0]
        deltas = [None if v is None or base in (None, 0) else 100.0 * (v - base) / abs(base) for v in vals[1:]]
        rows.append({"metric": label, "unit": unit, "values": vals, "delta_pct": deltas, "lower_is_better": lower})
    return rows


def print_table(runs: list[Run], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="tiersim compare", show_lines=False)
    t.add_column("metric")
    for i, r in enumerate(runs):
        t.add_column(f"[{i}] {r.label}", justify="right")
        if i:
            t.add_column(f"Δ[{i}]", justify="right")
    for row in compare_rows(runs):
        cells = [f"{row['metric']} ({row['unit']})" if row["unit"] else row["metric"]]
        for i, v in enumerate(row["values"]):
            cells.append(_fmt(v))
            if i:
                d = row["delta_pct"][i - 1]
                if d is None:
                    cells.append("-")
                else:
                    good = row["lower_is_better"]
                    style = "" if good is None or abs(d) < 0.05 else ("green" if (d < 0) == good else "red")
                    cells.append(f"[{style}]{d:+.1f} %[/{style}]" if style else f"{d:+.1f} %")
        t.add_row(*cells)
    console.print(t)
    for i, r in enumerate(runs):
        console.print(f"[{i}] {r.path} (config {r.config_hash[:12]})", highlight=False, soft_wrap=True)


def cdf(values) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    return v, np.arange(1, v.size + 1) / max(v.size, 1)


def plot_cdfs(runs: list[Run], out: str | Path) -> Path:
    """Overlaid TTFT, token-level ITL and E2E CDFs; the file's suffix picks PNG, PDF or SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.results_io import FIGURE_SUFFIXES, check_output_file

    out = check_output_file(out, "--out", FIGURE_SUFFIXES)     # before drawing (the CLI checks it earlier too)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in runs:
        fin = r.finished()
        x, y = cdf(fin["ttft_s"])
        axes[0].plot(x, y, lw=1.2, label=r.label)
        x, y = r.itl_cdf()
        axes[1].plot(x * 1e3, y, lw=1.2, label=r.label, drawstyle="steps-post")
        x, y = cdf(fin["e2e_s"])
        axes[2].plot(x, y, lw=1.2, label=r.label)
    for ax, title, unit in zip(axes, ("TTFT", "inter-token latency (every token gap)", "E2E latency"),
                               ("seconds", "milliseconds", "seconds")):
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[1].set_ylabel("fraction of token gaps")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
