"""One-page picture of a run: latency distributions, and batch and KV memory over simulated time.

``plot_run(DIR)`` reads a results directory written by ``tiersim run`` (``requests.parquet``,
``steps.parquet``, ``summary.json``) and writes ``DIR/overview.png``: TTFT and E2E CDFs, the
inter-token latency CDF over every token gap (``itl_hist.parquet``: the quantity whose percentiles the
summary prints) beside each request's TPOT, sequences per step, and KV bytes per tier over time.
Per-step series are reduced to at most ``MAX_POINTS`` time bins (mean per bin; the HBM panel also
shows each bin's maximum) so a million-step run plots in about a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_POINTS = 2000


def _cdf(ax, values, label: str, scale: float = 1.0) -> None:
    v = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)]) * scale
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label, lw=1.2)


def _binned(t: np.ndarray, cols: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, dict, dict]:
    """Mean and max of each column in ``n`` equal time bins (empty bins dropped)."""
    if t.size == 0:
        return t, cols, cols
    edges = np.linspace(t.min(), t.max() + 1e-9, n + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n - 1)
    counts = np.bincount(idx, minlength=n)
    keep = counts > 0
    mid = ((edges[:-1] + edges[1:]) / 2)[keep]
    mean, peak = {}, {}
    for k, v in cols.items():
        v = np.asarray(v, dtype=float)
        mean[k] = (np.bincount(idx, weights=v, minlength=n)[keep] / counts[keep])
        m = np.full(n, -np.inf)
        np.maximum.at(m, idx, v)
        peak[k] = m[keep]
    return mid, mean, peak


def plot_run(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the overview figure of one run; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.results_data import COLUMNS, load_run
    from sim.results_io import FIGURE_SUFFIXES, check_output_file

    run = load_run(results_dir)       # a finished run (its DONE marker verifies), or a clear error
    d = run.path
    path = check_output_file(out if out is not None else d / "overview.png", "--out", FIGURE_SUFFIXES)
    summary = run.summary
    req = run.requests
    steps = run.read("steps.parquet", columns=list(COLUMNS["steps.parquet"]))
    fin = req[req["status"] == "finished"]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    cfg = summary.get("config", {})
    pol = cfg.get("policies", {})
    title = (f"{summary.get('trace', {}).get('name', '?')}: {cfg.get('model', {}).get('name', '?')} on "
             f"{cfg.get('hardware', {}).get('gpu', '?')} x{cfg.get('cluster', {}).get('num_replicas', 1)}, "
             f"{pol.get('scheduling', {}).get('name', '?')} / {pol.get('execution', {}).get('name', '?')}"
             f"  (config {summary.get('config_hash', '')[:12]})")
    fig.suptitle(title, fontsize=10)

    ax = axes[0, 0]
    _cdf(ax, fin["ttft_s"].to_numpy(), "TTFT")
    _cdf(ax, fin["e2e_s"].to_numpy(), "E2E")
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of finished requests")
    ax.set_title(f"latency CDF ({len(fin):,} finished, {len(req) - len(fin):,} rejected)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    if (d / "itl_hist.parquet").exists():
        x, y = run.itl_cdf()
        ax.step(x * 1e3, y, where="post", lw=1.2, label="every token gap")
    _cdf(ax, fin["tpot_s"].to_numpy(), "TPOT (per request)", 1e3)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("fraction of token gaps / requests")
    ax.set_title("inter-token latency CDF", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax_b, ax_k = axes[1, 0], axes[1, 1]
    for rid, g in steps.groupby("replica"):
        t = g["start_s"].to_numpy()
        mid, mean, peak = _binned(t, {"seqs": g["num_seqs"].to_numpy(),
                                      "active": g["hbm_active_bytes"].to_numpy() / 1e9,
                                      "cached": g["hbm_cached_bytes"].to_numpy() / 1e9,
                                      "dram": g["dram_used_bytes"].to_numpy() / 1e9,
                                      "nvme": g["nvme_used_bytes"].to_numpy() / 1e9}, MAX_POINTS)
        tag = f" r{rid}" if steps["replica"].nunique() > 1 else ""
        ax_b.plot(mid, mean["seqs"], lw=0.8, label=f"mean{tag}")
        line, = ax_k.plot(mid, mean["active"], lw=0.8, label=f"HBM active{tag}")
        ax_k.fill_between(mid, mean["active"], peak["active"], color=line.get_color(), alpha=0.2, lw=0)
        if (peak["cached"] > 0).any():
            ax_k.plot(mid, mean["cached"], lw=0.8, ls="--", label=f"HBM prefix cache{tag}")
        if (peak["dram"] > 0).any():
            ax_k.plot(mid, mean["dram"], lw=0.8, ls=":", label=f"DRAM{tag}")
        if (peak["nvme"] > 0).any():
            ax_k.plot(mid, mean["nvme"], lw=0.8, ls="-.", label=f"NVMe{tag}")
    ax_b.set_xlabel("simulated time (s)")
    ax_b.set_ylabel("sequences per step")
    ax_b.set_title("batch size (binned mean)", fontsize=9)
    ax_b.grid(alpha=0.3)
    kv = summary.get("kv", {})
    cap = kv.get("hbm_blocks_per_replica", 0) * kv.get("hbm_bytes_per_block", 0) / 1e9
    if cap:
        ax_k.axhline(cap, color="k", lw=0.6, ls="--", label=f"HBM KV capacity {cap:.1f} GB")
    ax_k.set_xlabel("simulated time (s)")
    ax_k.set_ylabel("GB per replica")
    ax_k.set_title("KV memory (binned mean; band up to the bin's peak)", fontsize=9)
    ax_k.grid(alpha=0.3)
    ax_k.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
