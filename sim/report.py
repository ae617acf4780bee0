"""``tiersim report RUN|SWEEP``: one self-contained HTML file (inline CSS, JS and data; opens offline).

A run's report: the config, the summary, CDFs of TTFT, token-level inter-token latency and E2E, and
timelines over simulated time (batch size, queue length, KV bytes per tier, link utilisation, prefix
hit rate) that zoom by dragging across them. A sweep's report: the summary table, each metric against
each swept parameter, and the runs' CDFs overlaid.

Every figure is a plot spec (series of x/y points, axis scales); ``report_assets/plot.js`` draws the
specs as SVG in the page, and :func:`export_figures` draws the same specs with matplotlib as PDF, SVG
or PNG for papers (``tiersim report DIR --figures FIGDIR --format pdf``).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from sim.results_data import Run, Sweep, is_sweep, load_run, load_sweep

ASSETS = Path(__file__).parent / "report_assets"
MAX_BINS = 1200
MAX_CDF_POINTS = 800

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: left; background: #f6f6f6; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
.fig { border: 1px solid #e4e4e4; padding: 4px; position: relative; }
.svg-link { position: absolute; right: 8px; bottom: 4px; font-size: 10px; color: #888; }
pre { background: #f7f7f7; padding: 8px; font-size: 11px; max-height: 420px; overflow: auto; }
.note { color: #666; font-size: 12px; }
"""


def _cdf_points(values) -> tuple[list, list]:
    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [], []
    y = np.arange(1, v.size + 1) / v.size
    if v.size > MAX_CDF_POINTS:
        idx = np.unique(np.linspace(0, v.size - 1, MAX_CDF_POINTS).astype(int))
        v, y = v[idx], y[idx]
    return _r(v), _r(y)


def _r(a) -> list:
    return [None if not np.isfinite(x) else float(f"{x:.6g}") for x in np.asarray(a, dtype=float)]


def _itl_points(run: Run) -> tuple[list, list]:
    x, y = run.itl_cdf()
    if x.size > MAX_CDF_POINTS:
        idx = np.unique(np.concatenate([np.searchsorted(y, np.linspace(0, 1, MAX_CDF_POINTS)).clip(0, x.size - 1),
                                        [x.size - 1]]))
        x, y = x[idx], y[idx]
    return _r(x * 1e3), _r(y)


def _bins(t0: float, t1: float) -> np.ndarray:
    return np.linspace(t0, max(t1, t0 + 1e-9), MAX_BINS + 1)


def _binned_mean(t, v, edges) -> np.ndarray:
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    cnt = np.bincount(idx, minlength=len(edges) - 1)
    s = np.bincount(idx, weights=np.asarray(v, dtype=float), minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def run_specs(run: Run, prefix: str = "run") -> tuple[list[dict], list[dict]]:
    """(CDF specs, timeline specs) of one run."""
    fin = run.finished()
    cdfs = []
    x, y = _cdf_points(fin["ttft_s"])
    cdfs.append({"id": f"{prefix}-ttft", "title": "TTFT", "xlabel": "seconds", "ylabel": "fraction of requests",
                 "xlog": True, "ymin": 0, "ymax": 1, "series": [{"name": "TTFT", "x": x, "y": y}]})
    x, y = _itl_points(run)
    cdfs.append({"id": f"{prefix}-itl", "title": "inter-token latency (every token gap)", "xlabel": "milliseconds",
                 "ylabel": "fraction of token gaps", "xlog": True, "ymin": 0, "ymax": 1,
                 "series": [{"name": "ITL", "x": x, "y": y, "step": True}]})
    x, y = _cdf_points(fin["e2e_s"])
    cdfs.append({"id": f"{prefix}-e2e", "title": "E2E latency", "xlabel": "seconds", "ylabel": "fraction of requests",
                 "xlog": True, "ymin": 0, "ymax": 1, "series": [{"name": "E2E", "x": x, "y": y}]})

    steps = run.steps
    req = run.requests
    t_end = float(np.nanmax([steps["start_s"].max() if len(steps) else 0.0, np.nanmax(req["finish_s"]) if len(req)
                             else 0.0]))
    edges = _bins(0.0, t_end)
    mid = (edges[:-1] + edges[1:]) / 2
    tl = []
    nrep = int(steps["replica"].nunique()) if len(steps) else 1
    batch = [{"name": f"replica {r}" if nrep > 1 else "sequences per step",
              "x": _r(mid), "y": _r(_binned_mean(g["start_s"], g["num_seqs"], edges))}
             for r, g in steps.groupby("replica")]
    tl.append({"id": f"{prefix}-batch", "title": "batch size (mean per bin)", "xlabel": "simulated time (s)",
               "ylabel": "sequences per step", "series": batch})
    arr = np.sort(req["arrival_s"].to_numpy())
    sch = np.sort(req["first_scheduled_s"].dropna().to_numpy())
    end = np.sort(req["finish_s"].dropna().to_numpy())
    waiting = np.searchsorted(arr, mid, "right") - np.searchsorted(sch, mid, "right")
    running = np.searchsorted(sch, mid, "right") - np.searchsorted(end, mid, "right")
    tl.append({"id": f"{prefix}-queue", "title": "queue length (arrived, not yet scheduled)",
               "xlabel": "simulated time (s)", "ylabel": "requests",
               "series": [{"name": "waiting", "x": _r(mid), "y": _r(waiting)},
                          {"name": "scheduled, not finished", "x": _r(mid), "y": _r(running), "dash": True}]})
    kv = []
    for col, name in (("hbm_active_bytes", "HBM active"), ("hbm_cached_bytes", "HBM prefix cache"),
                      ("dram_used_bytes", "DRAM"), ("nvme_used_bytes", "NVMe")):
        if len(steps) and steps[col].max() > 0:
            per = [_binned_mean(g["start_s"], g[col], edges) for _, g in steps.groupby("replica")]
            kv.append({"name": name, "x": _r(mid), "y": _r(np.nansum(per, axis=0) / 1e9)})
    tl.append({"id": f"{prefix}-kv", "title": "KV bytes per tier (all replicas)", "xlabel": "simulated time (s)",
               "ylabel": "GB", "series": kv})
    links = []
    tr = run.transfers
    if tr is not None and len(tr):
        width = edges[1] - edges[0]
        for (link), g in tr.groupby("link"):
            busy = np.zeros(MAX_BINS)
            reps = max(int(g["replica"].nunique()), 1)
            for s, e in zip(g["start_s"].to_numpy(), g["end_s"].to_numpy()):
                a, b = np.searchsorted(edges, [s, e], "right") - 1
                for k in range(max(a, 0), min(b, MAX_BINS - 1) + 1):
                    busy[k] += max(0.0, min(e, edges[k + 1]) - max(s, edges[k]))
            links.append({"name": str(link), "x": _r(mid), "y": _r(np.minimum(busy / (width * reps), 1.0) * 100)})
    tl.append({"id": f"{prefix}-links", "title": "link utilisation (busy time per bin)", "xlabel": "simulated time (s)",
               "ylabel": "% busy", "ymin": 0, "series": links or [{"name": "no transfers", "x": _r(mid),
                                                                  "y": [0.0] * len(mid)}]})
    hit = np.full(MAX_BINS, np.nan)
    if len(req) and req["prefix_hit_tokens"].sum() > 0:
        ok = req["first_scheduled_s"].notna()
        t = req.loc[ok, "first_scheduled_s"].to_numpy()
        idx = np.clip(np.searchsorted(edges, t, "right") - 1, 0, MAX_BINS - 1)
        hits = np.bincount(idx, weights=req.loc[ok, "prefix_hit_tokens"].to_numpy(float), minlength=MAX_BINS)
        toks = np.bincount(idx, weights=req.loc[ok, "prompt_tokens"].to_numpy(float), minlength=MAX_BINS)
        with np.errstate(invalid="ignore", divide="ignore"):
            hit = np.where(toks > 0, 100 * hits / toks, np.nan)
    tl.append({"id": f"{prefix}-hits", "title": "prefix-cache hit rate (prompt tokens, by first schedule)",
               "xlabel": "simulated time (s)", "ylabel": "% of prompt tokens", "ymin": 0,
               "series": [{"name": "hit rate", "x": _r(mid), "y": _r(np.nan_to_num(hit, nan=0.0))}]})
    return cdfs, tl


SWEEP_METRICS = [("ttft_p99_s", "TTFT p99 (s)"), ("itl_p99_s", "ITL p99 (s)"), ("e2e_p99_s", "E2E p99 (s)"),
                 ("throughput_tok_s", "throughput (output tok/s)"), ("goodput_fraction", "goodput (fraction)"),
                 ("preemptions", "preemptions")]


def sweep_specs(sw: Sweep) -> list[dict]:
    """Each metric against each swept parameter, one line per combination of the other parameters."""
    s = sw.summary[sw.summary["status"].str.startswith("done")]
    specs = []
    params = [p for p in sw.params if s[p].nunique(dropna=False) > 1]
    for p in params:
        vals = list(dict.fromkeys(s[p].tolist()))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        cats = None if numeric else [str(v) for v in vals]
        others = [q for q in params if q != p]
        groups = s.groupby(others, dropna=False) if others else [((), s)]
        for metric, label in SWEEP_METRICS:
            if metric not in s or s[metric].isna().all():
                continue
            series = []
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                g = g.sort_values(p) if numeric else g
                x = g[p].tolist() if numeric else [cats.index(str(v)) for v in g[p]]
                series.append({"name": ", ".join(f"{q}={v}" for q, v in zip(others, key)) or metric,
                               "x": _r(x), "y": _r(g[metric].to_numpy(float)), "markers": True})
            specs.append({"id": f"sweep-{p}-{metric}", "title": f"{label} vs {p}", "xlabel": p, "ylabel": label,
                          "xcats": cats, "xlog": bool(numeric and min(vals) > 0 and max(vals) / min(vals) >= 16),
                          "series": series, "legendLeft": True})
    return specs


def _overlay(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        c, _ = run_specs_cdf_only(r)
        out.append(c)
    specs = []
    for k, (title, unit, ylabel) in enumerate((("TTFT", "seconds", "fraction of requests"),
                                               ("inter-token latency (every token gap)", "milliseconds",
                                                "fraction of token gaps"),
                                               ("E2E latency", "seconds", "fraction of requests"))):
        specs.append({"id": f"overlay-{k}", "title": title, "xlabel": unit, "ylabel": ylabel, "xlog": True, "ymin": 0,
                      "ymax": 1, "legendLeft": True,
                      "series": [{**c[k]["series"][0], "name": r.label} for c, r in zip(out, runs)]})
    return specs


def run_specs_cdf_only(run: Run) -> tuple[list[dict], None]:
    fin = run.finished()
    x1, y1 = _cdf_points(fin["ttft_s"])
    x2, y2 = _itl_points(run)
    x3, y3 = _cdf_points(fin["e2e_s"])
    return [{"series": [{"x": x1, "y": y1}]}, {"series": [{"x": x2, "y": y2, "step": True}]},
            {"series": [{"x": x3, "y": y3}]}], None


# ====================================================================== HTML
def _summary_table(summary: dict) -> str:
    from sim.cli import format_summary

    return f"<pre>{html.escape(format_summary(summary, None, None))}</pre>"


def _frame_table(df) -> str:
    cols = list(df.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append(f'<td class="num">{"" if v != v else f"{v:.4g}"}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div style='overflow:auto'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _figs(specs: list[dict]) -> str:
    return '<div class="grid">' + "".join(f'<div class="fig"><div data-plot="{s["id"]}"></div></div>'
                                          for s in specs) + "</div>"


def _page(title: str, body: str, specs: list[dict]) -> str:
    js = (ASSETS / "plot.js").read_text()
    data = json.dumps(specs, separators=(",", ":")).replace("</", "<\\/")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n"
            f"<script type='application/json' id='tiersim-plots'>{data}</script>\n<script>{js}</script>\n"
            "</body></html>\n")


def run_html(run: Run) -> str:
    cdfs, tl = run_specs(run)
    cfg = (run.path / "config.toml")
    config_text = cfg.read_text() if cfg.exists() else json.dumps(run.config, indent=2)
    s = run.summary
    title = f"tiersim report: {s.get('trace', {}).get('name', '?')} ({run.config_hash[:12]})"
    body = (f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(str(run.path))} | tiersim "
            f"{html.escape(str(s.get('tiersim_version', '')))} | goodput: "
            f"{html.escape(s.get('goodput', {}).get('definition', ''))}</p>"
            f"<h2>Summary</h2>{_summary_table(s)}"
            f"<h2>Latency distributions</h2>{_figs(cdfs)}"
            f"<h2>Timelines</h2><p class='note'>Drag across a timeline to zoom into that time range; "
            f"double-click to reset. Each point is a time bin's mean.</p>{_figs(tl)}"
            f"<h2>Config</h2><details open><summary>config.toml</summary><pre>{html.escape(config_text)}</pre>"
            f"</details>")
    return _page(title, body, cdfs + tl)


def sweep_html(sw: Sweep) -> str:
    specs = sweep_specs(sw)
    runs = sw.runs()
    overlay = _overlay(runs) if 0 < len(runs) <= 16 else []
    s = sw.summary
    keep = [c for c in s.columns if c in sw.params or c in ("status", "config_hash") or c in dict(SWEEP_METRICS)
            or c in ("ttft_p50_s", "itl_p50_s", "goodput_req_s")]
    s = s.assign(config_hash=s["config_hash"].str[:16])
    title = f"tiersim sweep report: {sw.path.name} ({len(s)} runs)"
    body = (f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(str(sw.path))}</p>"
            f"<h2>Runs</h2>{_frame_table(s[keep])}"
            f"<h2>Metrics against parameters</h2>{_figs(specs) if specs else '<p>one run only</p>'}"
            + (f"<h2>Latency distributions of the runs</h2>{_figs(overlay)}" if overlay else "")
            + f"<h2>Sweep</h2><pre>{html.escape((sw.path / 'sweep.toml').read_text())}</pre>")
    return _page(title, body, specs + overlay)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    from sim import results_io

    path = Path(path)
    data = load_sweep(path) if is_sweep(path) else load_run(path)
    # before the page is built: a report beside a run on a read-only disk fails now, in one line
    dest = results_io.check_output_file(out if out else path / "report.html", "--out")
    text = sweep_html(data) if isinstance(data, Sweep) else run_html(data)
    results_io.write_text_atomic(dest, text)
    return dest


# ====================================================================== figures for papers
def export_figures(path: str | Path, out_dir: str | Path, fmt: str = "pdf") -> list[Path]:
    """Every figure of the report as its own ``fmt`` file (pdf, svg or png), drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.results_io import check_output_dir

    path = Path(path)
    out = check_output_dir(out_dir, "--figures")     # before drawing anything
    if is_sweep(path):
        sw = load_sweep(path)
        runs = sw.runs()
        specs = sweep_specs(sw) + (_overlay(runs) if runs else [])
    else:
        cdfs, tl = run_specs(load_run(path))
        specs = cdfs + tl
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for spec in specs:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for s in spec["series"]:
            x = np.array([np.nan if v is None else v for v in s["x"]], dtype=float)
            y = np.array([np.nan if v is None else v for v in s["y"]], dtype=float)
            ax.plot(x, y, lw=1.2, label=s.get("name"), ls="--" if s.get("dash") else "-",
                    drawstyle="steps-post" if s.get("step") else "default", marker="o" if s.get("markers") else None,
                    ms=3)
        if spec.get("xlog"):
            ax.set_xscale("log")
        if spec.get("xcats"):
            ax.set_xticks(range(len(spec["xcats"])), spec["xcats"])
        if "ymin" in spec or "ymax" in spec:
            ax.set_ylim(spec.get("ymin"), spec.get("ymax"))
        ax.set_title(spec.get("title", ""), fontsize=10)
        ax.set_xlabel(spec.get("xlabel", ""))
        ax.set_ylabel(spec.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if len(spec["series"]) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / f"{spec['id']}.{fmt}"
        fig.savefig(f, dpi=150)
        plt.close(fig)
        files.append(f)
    return files
