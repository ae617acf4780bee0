"""Speculative decoding: speedup versus load, and why it stops paying.

    python benchmarks/spec_decode_curve.py                       # the whole curve (about 15 CPU-minutes)
    python benchmarks/spec_decode_curve.py --requests 500 --loads 1 8 --procs 1     # a quick look

Llama-3.1-8B on one H100 (shipped table, CUDA graphs, ``fcfs``), the first ``--requests`` requests of
the Azure LLM inference 2023 conversation trace with their arrival rate scaled by each ``--loads``
factor; without speculation, with a Llama-3.2-1B draft model at fixed depths k = 1..5, and with
``adaptive-k``. Acceptance is i.i.d. at ``--alpha`` per draft token (the trace has no text: an
assumption, 0.6 by default). For each run: mean TPOT (the decode speed a user sees) and mean E2E
(queueing included), the speedup of each over the run without speculation, and the step breakdown
(mean decode batch, verify and draft time per verify step, tokens per target step, and the GPU's
time per output token in prefill and decode steps, the target's and the drafter's). A second table
prices one decode step of the batch sizes the runs saw from the cost model alone (verify at 1 + k query
tokens, plus the drafter's k passes), the per-step throughput gain of each k: where it falls below 1,
that depth stops paying.

Writes ``benchmarks/results/spec-decode-curve-<UTC time>.json`` and ``spec_decode_curve.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
KS = (1, 2, 3, 4, 5)


def policies(alpha: float) -> dict[str, dict]:
    common = {"drafter": "model", "draft_model": "llama-3.2-1b", "acceptance": "iid", "alpha": alpha}
    out = {"none": {"name": "none"}}
    for k in KS:
        out[f"k={k}"] = {"name": "fixed-k", "k": k, **common}
    out["adaptive"] = {"name": "adaptive-k", "k_max": max(KS), **common}
    # the drafter prefills a prompt only when its request first drafts: adaptive-k's k = 0 then costs nothing
    out["adaptive-lazy"] = {"name": "adaptive-k", "k_max": max(KS), "draft_prefill": "lazy", **common}
    return out


def run_one(job: tuple) -> dict:
    label, load, params, requests = job
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    over = {"trace.max_requests": requests, "trace.rate_scale": load, "metrics.step_log": True,
            **{f"policies.speculation.{k}": v for k, v in params.items()}}
    sim = Simulation(with_overrides(SimConfig(), over))
    t0 = time.process_time()
    res = sim.run()
    cpu = time.process_time() - t0
    s = res.summary
    st = res.steps
    dec = st[st["decode_seqs"] > 0]
    row = {"policy": label, "load": load, "tpot_mean_s": s["tpot_s"]["mean"], "tpot_p99_s": s["tpot_s"]["p99"],
           "e2e_mean_s": s["e2e_s"]["mean"], "ttft_mean_s": s["ttft_s"]["mean"], "itl_p99_s": s["itl_s"]["p99"],
           "queueing_mean_s": s["queueing_s"]["mean"], "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
           "steps": s["engine"]["steps"], "preemptions": s["engine"]["preemptions"],
           "mean_decode_batch": float(dec["decode_seqs"].mean()) if len(dec) else 0.0,
           "decode_batch_p90": float(dec["decode_seqs"].quantile(0.9)) if len(dec) else 0.0,
           "busy_fraction": s["engine"]["utilization"], "hbm_kv_bytes": s["kv"]["hbm_kv_bytes_per_gpu"],
           "cpu_s": cpu}
    # where the GPU's time goes, per output token: prefill steps (the target's, and the drafter's prefill
    # inside them), decode / verify steps (the target's, and the drafter's passes and catch-ups)
    tokens = max(int(res.requests["generated_tokens"].sum()), 1)
    pre = st["prefill_seqs"] > 0
    row["per_token_s"] = {
        "prefill_target": float((st["duration_s"] - st["draft_s"])[pre].sum()) / tokens,
        "prefill_drafter": float(st["draft_s"][pre].sum()) / tokens,
        "decode_target": float((st["duration_s"] - st["draft_s"])[~pre].sum()) / tokens,
        "decode_drafter": float(st["draft_s"][~pre].sum()) / tokens}
    sp = s.get("speculation")
    if sp:
        row.update({k: sp[k] for k in ("acceptance_rate", "tokens_per_target_step", "tokens_per_decode_step",
                                        "draft_s_per_verify_step", "verify_s_per_verify_step", "draft_share_of_busy",
                                        "wasted_draft_tokens", "lookahead_kv_peak_bytes")})
        row["itl_per_step_mean_s"] = sp["itl_per_step_s"]["mean"]
        ver = st[st["draft_tokens"] > 0]
        row["mean_verify_batch"] = float(ver["decode_seqs"].mean()) if len(ver) else 0.0
        pol = sim.replicas[0].speculation
        if params["name"] == "adaptive-k":
            row["adaptive_chosen"] = {str(k): v for k, v in sorted(pol.chosen.items())}
    return row


def step_table(alpha: float, batches) -> list[dict]:
    """Per-step price and throughput gain of each depth at each batch size, from the cost model."""
    from policies.base import Drafter
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation
    from sim.replica.step import StepBuilder
    from traces import Trace

    tr = Trace(arrival_s=[0.0], prompt_tokens=[16], output_tokens=[4])
    sim = Simulation(with_overrides(SimConfig(), {"policies.speculation.name": "fixed-k"}), trace=tr)
    ex = sim.build_policy("execution", 0)
    b = StepBuilder(cost=sim.cost_model("llama-3.1-8b", ex), sparsity=sim.build_policy("sparsity", 0), sm_share=1.0,
                    drafter_cost=lambda n: sim.cost_model(n, ex), drafter=Drafter(kind="model", model="llama-3.2-1b"))

    class R:
        num_computed = 1024      # about the conv trace's mean context during decode; a multiple of 64 (see estimate)

    rows = []
    for n in batches:
        dec = [R()] * n
        t = {k: b.estimate(dec, k) for k in (0, *KS)}
        verify = {k: b.cost.step(*_empty(), n, n * (1024 + 1 + k), n * (1 + k), 1 + k, n * (1 + k))[0]
                  for k in (0, *KS)}
        gain = {k: ((1 - alpha ** (k + 1)) / (1 - alpha)) * t[0] / t[k] for k in KS}
        rows.append({"batch": n, "step_s": {str(k): v for k, v in t.items()},
                     "verify_s": {str(k): v for k, v in verify.items()},
                     "draft_s": {str(k): t[k] - verify[k] for k in KS}, "gain": {str(k): v for k, v in gain.items()}})
    return rows


def drafter_table() -> list[dict]:
    """What each drafter takes from Llama-3.1-8B's HBM on the H100 and adds to a k = 3 verify step."""
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation
    from sim.replica.step import StepBuilder
    from traces import Trace

    tr = Trace(arrival_s=[0.0], prompt_tokens=[16], output_tokens=[4])
    rows = []
    for label, params in (("none (no speculation)", {"name": "none"}), ("n-gram", {"drafter": "ngram"}),
                          ("Medusa, 4 heads", {"drafter": "medusa"}), ("EAGLE, 1 layer", {"drafter": "eagle"}),
                          ("Llama-3.2-1B", {"drafter": "model"}),
                          ("Llama-3.1-8B (self)", {"drafter": "model", "draft_model": "llama-3.1-8b"})):
        params = {"name": "fixed-k", **params} if "name" not in params else params
        sim = Simulation(with_overrides(SimConfig(), {f"policies.speculation.{k}": v for k, v in params.items()}),
                         trace=tr)
        ex = sim.build_policy("execution", 0)
        b = StepBuilder(cost=sim.cost_model("llama-3.1-8b", ex), sparsity=sim.build_policy("sparsity", 0),
                        sm_share=1.0, drafter_cost=lambda n, ex=ex, sim=sim: sim.cost_model(n, ex),
                        drafter=sim.drafter)

        class R:
            num_computed = 1024

        row = {"drafter": label, "params": sim.draft_footprint.params,
               "weight_bytes": sim.draft_footprint.weight_bytes,
               "kv_bytes_per_token": sim.draft_footprint.kv_bytes_per_token,
               "hbm_blocks": sim.hbm_blocks, "hbm_kv_tokens": sim.hbm_blocks * 16}
        for n in (1, 32):
            row[f"draft_s_k3_b{n}"] = b.drafting.estimate(n, 1024, 3, 1)[0]
            row[f"step_s_k3_b{n}"] = b.estimate([R()] * n, 3 if params["name"] != "none" else 0)
        rows.append(row)
    return rows


def _empty():
    import numpy as np

    e = np.empty(0, np.int64)
    return e, e


def plot(rows: list[dict], table: list[dict], alpha: float, requests: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for r in rows:
        by.setdefault(r["policy"], {})[r["load"]] = r
    loads = sorted(by["none"])
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.cm.viridis([i / (len(KS) - 1) for i in range(len(KS))])
    panels = (("tpot_mean_s", ax[0], "TPOT speedup (mean)"), ("e2e_mean_s", ax[1], "E2E speedup (mean)"))
    for metric, a, title in panels:
        for i, k in enumerate(KS):
            a.plot(loads, [by["none"][x][metric] / by[f"k={k}"][x][metric] for x in loads], "o-", color=colors[i],
                   label=f"fixed k={k}", lw=1.2, ms=4)
        a.plot(loads, [by["none"][x][metric] / by["adaptive"][x][metric] for x in loads], "s-", color="crimson",
               label="adaptive-k", lw=2.2, ms=5)
        a.plot(loads, [by["none"][x][metric] / by["adaptive-lazy"][x][metric] for x in loads], "^--",
               color="darkorange", label="adaptive-k, lazy draft prefill", lw=1.6, ms=5)
        a.axhline(1.0, color="black", lw=0.8, ls="--")
        a.set_xscale("log", base=2)
        a.set_xticks(loads, [f"{x:g}x" for x in loads])
        a.set_xlabel("load (trace rate scale)")
        a.set_ylabel("speedup over no speculation")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    a = ax[2]
    batches = [t["batch"] for t in table]
    for i, k in enumerate(KS):
        a.plot(batches, [t["gain"][str(k)] for t in table], "o-", color=colors[i], label=f"k={k}", lw=1.2, ms=4)
    a.axhline(1.0, color="black", lw=0.8, ls="--")
    a.set_xscale("log", base=2)
    a.set_xlabel("decode batch (requests, 1,024 tokens of context each)")
    a.set_ylabel("tokens per second, over k = 0")
    a.set_title("per-step gain from the cost model")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(f"Llama-3.1-8B + Llama-3.2-1B draft, H100 table, Azure conv (first {requests:,} requests), "
                 f"i.i.d. acceptance {alpha}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8])
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    pols = policies(args.alpha)
    jobs = [(label, load, params, args.requests) for load in args.loads for label, params in pols.items()]
    t0 = time.perf_counter()
    if args.procs > 1:
        with Pool(args.procs) as pool:
            rows = pool.map(run_one, jobs, chunksize=1)
    else:
        rows = [run_one(j) for j in jobs]
    seen = sorted({round(r["mean_decode_batch"]) for r in rows} | {1, 2, 4, 8, 16, 32, 64, 128, 256})
    table = step_table(args.alpha, [b for b in seen if b >= 1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    drafters = drafter_table()
    doc = {"what": "speedup of speculative decoding versus load", "requests": args.requests, "alpha": args.alpha,
           "loads": args.loads, "runs": rows, "step_table": table, "drafters": drafters,
           "wall_s": time.perf_counter() - t0,
           "machine": {"python": platform.python_version(), "platform": platform.platform(),
                       "cpus": os.cpu_count()}}
    (out / f"spec-decode-curve-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, table, args.alpha, args.requests, out / "spec_decode_curve.png")
    by = {(r["policy"], r["load"]): r for r in rows}
    print(f"{'load':>6} " + "".join(f"{lab:>10}" for lab in pols if lab != "none") + "   (TPOT speedup; E2E below)")
    for metric in ("tpot_mean_s", "e2e_mean_s"):
        for load in args.loads:
            base = by[("none", load)][metric]
            print(f"{load:>5g}x " + "".join(f"{base / by[(lab, load)][metric]:>10.3f}" for lab in pols if lab != "none")
                  + f"   batch {by[('none', load)]['mean_decode_batch']:.1f}")
        print()
    print(f"{'drafter':24}{'params':>8}{'weights GB':>11}{'KV B/token':>11}{'KV tokens':>11}"
          f"{'draft ms b1':>12}{'step ms b1':>11}{'draft ms b32':>13}{'step ms b32':>12}   (k = 3)")
    for d in drafters:
        print(f"{d['drafter']:24}{d['params'] / 1e9:>7.2f}B{d['weight_bytes'] / 1e9:>11.2f}"
              f"{d['kv_bytes_per_token']:>11,}{d['hbm_kv_tokens']:>11,}"
              f"{d['draft_s_k3_b1'] * 1e3:>12.2f}{d['step_s_k3_b1'] * 1e3:>11.2f}"
              f"{d['draft_s_k3_b32'] * 1e3:>13.2f}{d['step_s_k3_b32'] * 1e3:>12.2f}")
    print(f"results: {out}/spec-decode-curve-{stamp}.json, {out}/spec_decode_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
