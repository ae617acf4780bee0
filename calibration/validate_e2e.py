"""``tiersim validate --e2e RUN_DIR``: a reference server's measured run against tiersim's replay of it.

For each case of a RUN_DIR written by ``calibration.reference_server``, tiersim replays the same
requests (the run's own recorded arrivals and lengths, which must equal the config's trace slice —
the report says whether they do) with the run's config: model, scheduler and its parameters,
``replica.num_hbm_blocks``, ``block_size_tokens``, recompute preemption, the GPU's shipped cost table
(``h200`` for an H200 run). It then reports, side by side:

- TTFT, ITL and E2E at p50/p90/p99, measured and simulated, with the relative error
  (``simulated / measured - 1``); ITL is pooled over all gaps between consecutive token-emitting
  steps of each request, exactly as tiersim computes it;
- the per-request error distribution: median and p90 of ``|simulated / measured - 1|`` for TTFT, E2E
  and mean ITL, request by request;
- steps: how many and their mean duration in each, busy time and utilization;
- step pricing on the measured shapes: every measured step priced by tiersim's cost model from its
  own shape and in its own mode (``cuda-graph`` for a replayed graph, ``host-launched`` for an eager
  step), against its measured duration — schedule-independent, so it separates pricing error from
  divergence of the two schedules;
- a second replay with the server's measured host time per step (the median of scheduling and input
  preparation before the launch plus committing the tokens after it, as the execution policy's
  ``cpu_overhead_s``): tiersim as shipped prices GPU steps only, while a Python engine spends host
  time around each of them.

Execution mode: tiersim has ``cuda-graph`` and ``host-launched`` policies (no capture buckets yet),
while the server replays graphs for decode-only steps and runs the rest eagerly. The replay uses the
policy under which most of the measured busy time ran (``--execution`` overrides); the report states
the shares. Plots (``RUN_DIR/e2e/<case>.png``): CDF overlays of TTFT, ITL and E2E, the per-request
error histogram, and step durations.

Runs on the CPU; nothing here touches a GPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

QUANTILES = (50, 90, 99)
STEP_KINDS = ("decode graph", "decode eager", "prefill", "mixed")


# ============================================================================ measured side
def step_ends(steps) -> np.ndarray:
    return (steps["start_s"] + steps["duration_s"]).to_numpy(float)


def itl_gaps(tokens, ends: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every inter-token gap (pooled) and each request's mean gap, from token-emission runs
    (``idx``, ``seg_first``, ``seg_last``: consecutive step indices, inclusive)."""
    gaps: list[np.ndarray] = []
    mean = np.full(n, np.nan)
    if len(tokens) == 0:
        return np.empty(0), mean
    t = tokens.sort_values(["idx", "seg_first"])
    for idx, g in t.groupby("idx", sort=False):
        emit = np.concatenate([np.arange(a, b + 1) for a, b in zip(g["seg_first"], g["seg_last"])])
        e = np.diff(ends[emit])
        if e.size:
            gaps.append(e)
            mean[int(idx)] = e.mean()
    return (np.concatenate(gaps) if gaps else np.empty(0)), mean


def measured(rec) -> dict:
    """Per-request TTFT, E2E, mean ITL and the pooled ITL gaps of a recorded case."""
    r = rec.requests
    n = len(r)
    ok = (r["status"] == "finished").to_numpy()
    ttft = np.where(ok, r["first_token_s"] - r["arrival_s"], np.nan)
    e2e = np.where(ok, r["finish_s"] - r["arrival_s"], np.nan)
    gaps, itl_mean = itl_gaps(rec.tokens, step_ends(rec.steps), n)
    return {"ttft": ttft, "e2e": e2e, "itl_mean": np.where(ok, itl_mean, np.nan), "itl": gaps}


def step_kind(steps) -> np.ndarray:
    p = steps["prefill_seqs"].to_numpy() > 0
    d = steps["decode_seqs"].to_numpy() > 0
    g = steps["graph"].to_numpy().astype(bool)
    kind = np.where(p & d, "mixed", np.where(p, "prefill", np.where(g, "decode graph", "decode eager")))
    return kind


# ============================================================================ replay
def _model_name(meta: dict, out: Path) -> str:
    """A preset name as is; any other model (``tiny-llama``) as a TOML file written from its spec."""
    from sim.specs import available_presets

    name = meta["model"]
    if name in available_presets("models"):
        return name
    spec = dict(meta["model_spec"])
    path = out / f"{name}.toml"
    lines = [f"# {name}: written by validate --e2e from the run's model spec"]
    for k, v in spec.items():
        lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def replay_config(meta: dict, *, out: Path, gpu: str | None, table: str | None, execution: str,
                  cpu_overhead_s: float = 0.0, backend: str = "table"):
    """The tiersim config that replays a case: the run's own config with the GPU, cost table and
    execution policy of the comparison."""
    from sim.config import from_dict, with_overrides

    cfg = from_dict({k: v for k, v in meta["config"].items() if k != "output"}, "meta.json config")
    gpu = gpu or cfg.hardware.gpu
    over = {"model.name": _model_name(meta, out), "hardware.gpu": gpu, "costs.backend": backend,
            "costs.table": table or gpu, "policies.execution.name": execution}
    if cpu_overhead_s:
        over["policies.execution.cpu_overhead_s"] = float(cpu_overhead_s)
    return with_overrides(cfg, over)


def recorded_trace(rec, name: str):
    from traces import Trace

    r = rec.requests
    return Trace(arrival_s=r["arrival_s"].to_numpy(float), prompt_tokens=r["prompt_tokens"].to_numpy(np.int64),
                 output_tokens=r["output_tokens"].to_numpy(np.int64), request_id=r["request_id"].to_numpy(np.int64),
                 name=name, source="reference-server run")


def slice_check(config, rec) -> str:
    """Whether the config's trace slice is exactly the recorded requests."""
    from sim.engine import load_trace_for

    try:
        tr = load_trace_for(config)
    except Exception as exc:  # noqa: BLE001 - reported, the comparison uses the recorded requests
        return f"could not load the config's slice ({type(exc).__name__}: {exc})"
    r = rec.requests
    same = (len(tr) == len(r) and np.array_equal(tr.prompt_tokens, r["prompt_tokens"].to_numpy())
            and np.array_equal(tr.output_tokens, r["output_tokens"].to_numpy())
            and np.allclose(tr.arrival_s, r["arrival_s"].to_numpy(), rtol=0, atol=1e-9))
    return "identical to the config's trace slice" if same else "DIFFERS from the config's trace slice"


def replay(rec, config, name: str):
    """tiersim's replay of the recorded requests: (results, every inter-token gap, pooled)."""
    import pandas as pd

    from sim.engine import Simulation

    sim = Simulation(config, trace=recorded_trace(rec, name))
    res = sim.run()
    from sim.request import STEP_ID_BITS

    rep = sim.replicas[0]           # one replica: its token log and step end times give the gaps
    log = rep.tokens
    local = (1 << STEP_ID_BITS) - 1     # global step ids -> the replica's own step indices
    # each request's runs lie contiguous in the token log, from the request log's seg_off, so the
    # requests in seg_off order, each repeated seg_cnt times, are the log's rows' requests
    reqs = sim.cluster.requests
    has = np.flatnonzero(reqs.seg_cnt)
    has = has[np.argsort(reqs.seg_off[has], kind="stable")]
    idx = np.repeat(has, reqs.seg_cnt[has])
    runs = pd.DataFrame({"idx": idx, "seg_first": log.first.view().astype(np.int64) & local,
                         "seg_last": log.last.view().astype(np.int64) & local})
    gaps, _ = itl_gaps(runs, rep.steps.end_s, len(rec.requests))
    return res, gaps


# ============================================================================ comparing
def _q(x: np.ndarray, q: float) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else math.nan


def _err(sim: float, meas: float) -> float:
    return sim / meas - 1.0 if meas and math.isfinite(meas) and math.isfinite(sim) else math.nan


def simulated(res, gaps: np.ndarray) -> dict:
    req = res.requests
    return {"ttft": req["ttft_s"].to_numpy(float), "e2e": req["e2e_s"].to_numpy(float),
            "itl_mean": req["itl_mean_s"].to_numpy(float), "itl": gaps}


def latency_table(meas: dict, sim: dict) -> dict:
    """{metric: {p50: (measured, simulated, error), ...}} for ttft, itl, e2e: the same percentile
    (numpy's linear interpolation, tiersim's too) of the same quantities on both sides."""
    out = {}
    for metric in ("ttft", "itl", "e2e"):
        row = {}
        for q in QUANTILES:
            m, s = _q(meas[metric], q), _q(sim[metric], q)
            row[f"p{q}"] = (m, s, _err(s, m))
        out[metric] = row
    return out


def per_request(meas: dict, sim: dict) -> dict:
    """Request-by-request relative errors: median and p90 of |error|, median signed error."""
    out = {}
    for metric in ("ttft", "e2e", "itl_mean"):
        e = sim[metric] / meas[metric] - 1.0
        e = e[np.isfinite(e)]
        out[metric] = {"n": int(e.size), "median_abs": _q(np.abs(e), 50), "p90_abs": _q(np.abs(e), 90),
                       "median": _q(e, 50), "errors": e}
    return out


def price_measured_steps(steps, config, trace, mode: str | None = None) -> np.ndarray:
    """tiersim's price of every measured step from its own shape, in its own mode (or all in ``mode``:
    a ``priced`` run's steps ran in its config's execution policy): the step builder a replica of
    this config gets, under the ``cuda-graph`` or the ``host-launched`` policy."""
    from calibration.reference_server import step_builder
    from policies import registry
    from sim.engine import Simulation

    sim = Simulation(config, trace=trace)
    base = config.policies.execution
    models = {}
    for g, name in ((True, "cuda-graph"), (False, "host-launched")):
        params = base.params if name == base.name else {}
        models[g] = step_builder(sim, execution=registry.build("execution", name, params)).cost
    out = np.empty(len(steps))
    empty = np.empty(0, np.int64)
    graph = steps["graph"] if mode is None else [mode == "cuda-graph"] * len(steps)
    for i, (g, pq, pc, nd, ctx, smp) in enumerate(zip(graph, steps["prefill_q"], steps["prefill_c"],
                                                      steps["decode_seqs"], steps["decode_ctx_sum"], steps["sampled"])):
        q = np.asarray(pq, np.int64) if len(pq) else empty
        c = np.asarray(pc, np.int64) if len(pc) else empty
        out[i] = models[bool(g)].step(q, c, int(nd), int(ctx), int(smp), 1)[0]
    return out


def step_agreement(steps, priced: np.ndarray) -> dict:
    kind = step_kind(steps)
    meas = steps["duration_s"].to_numpy(float)
    fwd = steps["forward_s"].to_numpy(float)
    out = {}
    for k in ("all",) + STEP_KINDS:
        sel = np.ones(len(steps), bool) if k == "all" else kind == k
        if not sel.any():
            continue
        e = priced[sel] / meas[sel] - 1.0
        ef = priced[sel] / fwd[sel] - 1.0
        out[k] = {"steps": int(sel.sum()), "measured_s": float(meas[sel].sum()), "priced_s": float(priced[sel].sum()),
                  "median_abs": _q(np.abs(e), 50), "p90_abs": _q(np.abs(e), 90), "median": _q(e, 50),
                  "median_vs_forward": _q(ef, 50)}
    return out


def choose_execution(steps) -> tuple[str, dict]:
    d = steps["duration_s"].to_numpy(float)
    g = steps["graph"].to_numpy().astype(bool)
    share = {"graph_steps": float(g.mean()) if len(g) else 0.0,
             "graph_time": float(d[g].sum() / d.sum()) if d.sum() > 0 else 0.0}
    return ("cuda-graph" if share["graph_time"] >= 0.5 else "host-launched"), share


def compare_case(name: str, rec, *, out: Path, gpu: str | None = None, table: str | None = None,
                 execution: str = "auto", backend: str | None = None) -> dict:
    """Everything the report shows for one case (see the module docstring)."""
    from sim.errors import CostTableError

    meta = rec.meta
    steps = rec.steps
    auto, share = choose_execution(steps)
    priced_run = meta.get("executor") == "priced"
    if priced_run:     # a dry run: its steps were priced in its config's policy, not measured
        auto = meta["config"]["policies"]["execution"]["name"]
    mode = auto if execution == "auto" else execution
    gpu = gpu or meta.get("gpu_preset") or meta["config"]["hardware"]["gpu"]
    notes = []
    backend = backend or "table"
    config = replay_config(meta, out=out, gpu=gpu, table=table, execution=mode, backend=backend)
    try:
        res, gaps = replay(rec, config, name)
    except CostTableError as exc:
        if backend != "table":
            raise
        notes.append(f"the cost table has no entries for {meta['model']} ({str(exc).splitlines()[0][:120]}); "
                     f"priced with the roofline backend")
        backend = "roofline"
        config = replay_config(meta, out=out, gpu=gpu, table=table, execution=mode, backend=backend)
        res, gaps = replay(rec, config, name)
    meas = measured(rec)
    sim = simulated(res, gaps)
    # the server's host work per step: scheduling and inputs before the launch, committing after
    hs = (steps["host_s"] + steps["post_s"]).to_numpy(float)
    hs = hs[np.isfinite(hs)]          # a priced run has none
    host = float(np.median(hs)) if hs.size else math.nan
    host_res = None
    if math.isfinite(host) and host > 0:
        host_res = simulated(*replay(rec, replay_config(meta, out=out, gpu=gpu, table=table, execution=mode,
                                                        backend=backend, cpu_overhead_s=host), name))
    priced = price_measured_steps(steps, config, recorded_trace(rec, name), mode=auto if priced_run else None)
    en = res.summary["engine"]
    sim_steps = res.steps
    measured_busy = float(steps["duration_s"].sum())
    r = rec.requests
    span = float(r["finish_s"].max() - r["arrival_s"].min()) if len(r) else math.nan
    return {
        "case": name, "meta": meta, "execution": mode, "execution_auto": auto, "graph_share": share,
        "backend": backend, "table": config.costs.table if backend == "table" else None, "gpu": gpu,
        "notes": notes, "slice": slice_check(config, rec),
        "latency": latency_table(meas, sim), "per_request": per_request(meas, sim),
        "steps": {"measured": len(steps), "simulated": int(en["steps"]),
                  "mean_step_measured_s": measured_busy / max(len(steps), 1),
                  "mean_step_simulated_s": float(en["busy_s"]) / max(int(en["steps"]), 1),
                  "busy_measured_s": measured_busy, "busy_simulated_s": float(en["busy_s"]),
                  "utilization_measured": measured_busy / span if span > 0 else math.nan,
                  "utilization_simulated": en["utilization"],
                  "preemptions_measured": int(r["preemptions"].sum()), "preemptions_simulated": int(en["preemptions"]),
                  "host_median_s": host, "host_mean_s": float(hs.mean()) if hs.size else math.nan},
        "step_pricing": step_agreement(steps, priced),
        "with_host": None if host_res is None else {"cpu_overhead_s": host, "latency": latency_table(meas, host_res)},
        "_plot": {"meas": meas, "sim": sim, "priced": priced, "sim_durations": sim_steps["duration_s"].to_numpy(float)},
        "_rec": rec,
    }


# ============================================================================ report
def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} %"


def _apct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{1e3 * x:.2f}"


def plot_case(c: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    meas, sim, priced = c["_plot"]["meas"], c["_plot"]["sim"], c["_plot"]["priced"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))

    def cdf(a, x, label, scale):
        v = np.sort(np.asarray(x, float)[np.isfinite(x)]) * scale
        if v.size:
            a.plot(v, np.arange(1, v.size + 1) / v.size, label=label, lw=1.3)

    for a, metric, unit, scale in ((ax[0, 0], "TTFT", "ms", 1e3), (ax[0, 1], "ITL", "ms", 1e3),
                                   (ax[0, 2], "E2E", "s", 1.0)):
        cdf(a, meas[metric.lower()], "measured (reference server)", scale)
        cdf(a, sim[metric.lower()], f"tiersim ({c['execution']})", scale)
        a.set_xlabel(f"{metric} ({unit})")
        a.set_ylabel("fraction")
        a.set_xscale("log")
        a.set_title(f"{metric} CDF")
        a.legend(fontsize=8)
    a = ax[1, 0]
    bins = np.linspace(-50, 50, 41)
    for metric in ("ttft", "e2e", "itl_mean"):
        e = c["per_request"][metric]["errors"]
        if e.size:
            a.hist(np.clip(100 * e, -50, 50), bins=bins, histtype="step", lw=1.3, label=metric)
    a.axvline(0, color="0.3", lw=1)
    a.set_xlabel("per-request error, simulated / measured - 1 (%; clipped at ±50)")
    a.set_ylabel("requests")
    a.set_title("Per-request error")
    a.legend(fontsize=8)
    a = ax[1, 1]
    steps = c["_rec"].steps
    kind = step_kind(steps)
    d = steps["duration_s"].to_numpy(float) * 1e3
    lo, hi = max(min(d.min(), priced.min() * 1e3), 1e-3), max(d.max(), priced.max() * 1e3)
    xs = np.geomspace(lo, hi, 20)
    a.fill_between(xs, xs * 0.9, xs * 1.1, color="0.9", label="±10 %")
    a.plot(xs, xs, color="0.3", lw=1)
    for k in STEP_KINDS:
        sel = kind == k
        if sel.any():
            a.scatter(d[sel], priced[sel] * 1e3, s=4, alpha=0.4, label=k)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("measured step (ms)")
    a.set_ylabel("tiersim price of the same shape (ms)")
    a.set_title("Steps: measured vs priced")
    a.legend(fontsize=8, markerscale=3)
    a = ax[1, 2]
    cdf(a, d / 1e3, "measured", 1e3)
    cdf(a, c["_plot"]["sim_durations"], "tiersim replay", 1e3)
    a.set_xscale("log")
    a.set_xlabel("step duration (ms)")
    a.set_ylabel("fraction")
    a.set_title("Step durations")
    a.legend(fontsize=8)
    m = c["meta"]
    for a in ax.flat:       # log axes: major labels only (minor ones overlap)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"{c['case']}: {m['model']} on {m.get('gpu_name', m.get('device', '?'))}, "
                 f"{m['scheduler']['name']}, {len(c['_rec'].requests)} requests", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cases: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# End-to-end validation: reference server vs tiersim", "",
             "Errors are simulated / measured - 1. Per-request: median (p90) of |error| over requests. "
             "Steps: count and mean duration, measured / simulated.", ""]
    lines += summary_table(cases, markdown=True)
    for c in cases:
        m = c["meta"]
        graphs = m.get("graphs", {})
        idle = "fast-forwarded" if m.get("fast_forward", True) else "slept through (real time)"
        lines += ["", f"## {c['case']}", "",
                  f"{m['model']} | {m.get('gpu_name', m.get('device', '?'))}, torch {m.get('torch', '?')}, "
                  f"{m.get('dtype', '?')} | scheduler `{json.dumps(m['scheduler'])}` | {m['num_blocks']} KV blocks of "
                  f"{m['block_size_tokens']} tokens | trace `{json.dumps(m['trace_slice'])}` | "
                  f"{len(c['_rec'].requests)} requests ({c['slice']}) | attention {m.get('attention_path', '?')}, "
                  f"graphs {graphs.get('match', '-')} at {len(graphs.get('sizes', []))} sizes | "
                  f"idle {idle} ({m.get('idle_skipped_s', 0):.1f} s skipped)", "",
                  f"tiersim: `{c['execution']}` execution (the server spent {_apct(c['graph_share']['graph_time'])} of "
                  f"its busy time, {_apct(c['graph_share']['graph_steps'])} of its steps, in CUDA graphs; "
                  f"auto choice: `{c['execution_auto']}`), costs: "
                  f"{c['table'] or c['backend']} on {c['gpu']}."]
        if "case" in m:
            pc = m["case"]
            lines.append(f"Predicted before the run (h200 table): {100 * pc['predicted_utilization']:.0f} % busy, "
                         f"{pc['predicted_busy_s']:.1f} s busy, {pc['predicted_steps']:,} steps.")
        for n in c["notes"]:
            lines.append(f"Note: {n}.")
        lines += ["", "| metric | p50 meas. | p50 sim. | err | p90 meas. | p90 sim. | err | p99 meas. | p99 sim. "
                      "| err |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for metric, label in (("ttft", "TTFT (ms)"), ("itl", "ITL (ms)"), ("e2e", "E2E (ms)")):
            row = c["latency"][metric]
            lines.append(f"| {label} | " + " | ".join(f"{_ms(row[f'p{q}'][0])} | {_ms(row[f'p{q}'][1])} | "
                                                     f"{_pct(row[f'p{q}'][2])}" for q in QUANTILES) + " |")
        pr = c["per_request"]
        s = c["steps"]
        lines += ["", "| per request | requests | median abs. err | p90 abs. err | median signed |",
                  "|---|---:|---:|---:|---:|"]
        for metric in ("ttft", "e2e", "itl_mean"):
            p = pr[metric]
            lines.append(f"| {metric} | {p['n']} | {_apct(p['median_abs'])} | {_apct(p['p90_abs'])} | "
                         f"{_pct(p['median'])} |")
        lines += ["", f"Steps: {s['measured']:,} measured, {s['simulated']:,} simulated; mean step "
                      f"{_ms(s['mean_step_measured_s'])} / {_ms(s['mean_step_simulated_s'])} ms; busy "
                      f"{s['busy_measured_s']:.2f} / {s['busy_simulated_s']:.2f} s; utilization "
                      f"{_apct(s['utilization_measured'])} / {_apct(s['utilization_simulated'])}; preemptions "
                      f"{s['preemptions_measured']} / {s['preemptions_simulated']}; server host time per step "
                      f"(scheduling and inputs, inside the measured step, plus committing, after it) median "
                      f"{_ms(s['host_median_s'])} ms, mean {_ms(s['host_mean_s'])} ms.",
                  "", "| measured steps priced by shape | steps | measured s | priced s | median abs. err "
                      "| p90 abs. err | median signed | median signed vs forward only |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in c["step_pricing"].items():
            lines.append(f"| {k} | {v['steps']:,} | {v['measured_s']:.3f} | {v['priced_s']:.3f} | "
                         f"{_apct(v['median_abs'])} | {_apct(v['p90_abs'])} | {_pct(v['median'])} | "
                         f"{_pct(v['median_vs_forward'])} |")
        if c["with_host"]:
            h = c["with_host"]
            lines += ["", f"With the server's median host time per step added to tiersim's steps "
                          f"(`cpu_overhead_s = {1e3 * h['cpu_overhead_s']:.3f} ms`): " + ", ".join(
                              f"{metric.upper()} p50 {_pct(h['latency'][metric]['p50'][2])}, p99 "
                              f"{_pct(h['latency'][metric]['p99'][2])}" for metric in ("ttft", "itl", "e2e")) + "."]
        lines += ["", f"![{c['case']}]({c['case']}.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def summary_table(cases: list[dict], markdown: bool) -> list[str]:
    head = ["case", "requests", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99",
            "per-req E2E", "per-req TTFT", "steps meas/sim", "mean step ms meas/sim"]
    rows = []
    for c in cases:
        lat, pr, s = c["latency"], c["per_request"], c["steps"]
        rows.append([c["case"], str(len(c["_rec"].requests)),
                     _pct(lat["ttft"]["p50"][2]), _pct(lat["ttft"]["p99"][2]), _pct(lat["itl"]["p50"][2]),
                     _pct(lat["itl"]["p99"][2]), _pct(lat["e2e"]["p50"][2]), _pct(lat["e2e"]["p99"][2]),
                     f"{_apct(pr['e2e']['median_abs'])} ({_apct(pr['e2e']['p90_abs'])})",
                     f"{_apct(pr['ttft']['median_abs'])} ({_apct(pr['ttft']['p90_abs'])})",
                     f"{s['measured']:,}/{s['simulated']:,}",
                     f"{_ms(s['mean_step_measured_s'])}/{_ms(s['mean_step_simulated_s'])}"])
    if markdown:
        return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else [len(h) for h in head]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def _jsonable(c: dict) -> dict:
    out = {k: v for k, v in c.items() if not k.startswith("_") and k != "meta"}
    out["per_request"] = {k: {kk: vv for kk, vv in v.items() if kk != "errors"} for k, v in c["per_request"].items()}
    out["latency"] = {m: {q: dict(zip(("measured", "simulated", "error"), t)) for q, t in row.items()}
                      for m, row in c["latency"].items()}
    if c["with_host"]:
        out["with_host"] = {"cpu_overhead_s": c["with_host"]["cpu_overhead_s"],
                            "latency": {m: {q: dict(zip(("measured", "simulated", "error"), t)) for q, t in row.items()}
                                        for m, row in c["with_host"]["latency"].items()}}
    out["requests"] = len(c["_rec"].requests)
    return out


# ============================================================================ command
def add_arguments(p) -> None:
    """Options of ``validate --e2e`` (the step-level options are in ``calibration.validate``)."""
    p.add_argument("--e2e", metavar="RUN_DIR", help="compare a reference-server run (python -m "
                   "calibration.reference_server) with tiersim's replay; report in RUN_DIR/e2e/")
    p.add_argument("--gpu", default=None, help="--e2e: tiersim GPU preset (default: the run's)")
    p.add_argument("--execution", choices=["auto", "cuda-graph", "host-launched"], default="auto",
                   help="--e2e: tiersim execution policy (auto: the mode most of the measured busy time ran in)")
    p.add_argument("--costs", choices=["table", "roofline"], default=None,
                   help="--e2e: cost backend (default: the GPU's table, roofline if it lacks the model)")
    p.add_argument("--cases", default=None, help="--e2e: only these cases (comma-separated)")


def main(args) -> int:
    from calibration.reference_server import read_run

    run_dir = Path(args.e2e)
    out = Path(args.out) if getattr(args, "out", None) else run_dir / "e2e"
    records = read_run(run_dir)
    if args.cases:
        records = {k: v for k, v in records.items() if k in args.cases.split(",")}
    if not records:
        from sim.errors import TiersimError

        raise TiersimError(f"{run_dir}: no finished cases to compare")
    cases = []
    for name, rec in records.items():
        c = compare_case(name, rec, out=out, gpu=args.gpu, execution=args.execution, backend=args.costs)
        out.mkdir(parents=True, exist_ok=True)
        plot_case(c, out / f"{name}.png")
        cases.append(c)
    report = write_report(cases, out)
    (out / "summary.json").write_text(json.dumps({"run_dir": str(run_dir), "cases": [_jsonable(c) for c in cases]},
                                                 indent=2, default=_json_default) + "\n")
    if getattr(args, "json", False):
        print((out / "summary.json").read_text())
        return 0
    print(f"tiersim validate --e2e {run_dir}: {len(cases)} case(s); errors are simulated / measured - 1")
    print("\n".join(summary_table(cases, markdown=False)))
    for c in cases:
        for n in c["notes"]:
            print(f"note ({c['case']}): {n}")
    print(f"report: {report}, {out}/summary.json, {out}/<case>.png")
    return 0


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")
