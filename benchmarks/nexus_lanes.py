"""Nexus-style prefill/decode lanes against time-multiplexed chunked prefill, on the prefill-heavy Azure
code trace, at the same GPU count.

    python benchmarks/nexus_lanes.py                      # 3,000 requests, one GPU, under 2 CPU-minutes
    python benchmarks/nexus_lanes.py --requests 0         # the whole trace
    python benchmarks/nexus_lanes.py --replicas 2         # two GPUs: 2 replicas of each mode
    python benchmarks/nexus_lanes.py --replicas 2 --disagg cluster.some_key=value ...   # plus a P/D row

Llama-3.1-8B on one H100 (shipped table, CUDA graphs), ``chunked-prefill``, the first ``--requests``
requests of the Azure LLM inference 2023 code trace at its own rate. Rows:

* time-multiplexed chunked prefill, budgets 2,048 and 512 (one stream; Sarathi-Serve/vLLM);
* lock-step lanes, ``replica.prefill_sm_fraction = p``: each mixed step's chunks on p of the SMs and its
  decodes on the rest, the step ending when both end (``StepCostModel.lanes_step``);
* decoupled lanes, ``replica.lanes = "decoupled"``: a prefill lane and a decode lane as independent step
  streams over one KV pool, static p, and adaptive (``replica.lanes_partition = "adaptive"``, the decode
  lane's share sized to ``replica.lanes_itl_slo_s``), their HBM traffic sharing the measured peak
  (``sim.replica.lanes``).

The disaggregation row is a hook: ``--disagg KEY=VALUE ...`` adds a run with those overrides (the P/D
pool keys of ``cluster``, when that branch has landed) beside the ``--replicas`` runs of the other modes;
without it there is no such row. Writes ``benchmarks/results/nexus-lanes-<UTC>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cases(args) -> list[tuple[str, dict]]:
    out = [("time-multiplexed, budget 2048", {}),
           ("time-multiplexed, budget 512", {"policies.scheduling.max_num_batched_tokens": 512})]
    out += [(f"lock-step lanes p = {p}", {"replica.prefill_sm_fraction": p}) for p in args.lockstep]
    dec = {"replica.lanes": "decoupled"}
    out += [(f"decoupled p = {p}", {**dec, "replica.prefill_sm_fraction": p}) for p in args.fractions]
    out += [(f"decoupled p = {p}, budget 512", {**dec, "replica.prefill_sm_fraction": p,
                                                  "policies.scheduling.max_num_batched_tokens": 512})
            for p in args.fractions_512]
    out += [(f"decoupled adaptive, ITL SLO {1e3 * s:g} ms",
             {**dec, "replica.lanes_partition": "adaptive", "replica.lanes_itl_slo_s": s}) for s in args.slos]
    if args.disagg:
        over = {}
        for item in args.disagg:
            k, _, v = item.partition("=")
            over[k] = _value(v)
        out.append(("disaggregated P/D (--disagg)", over))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="first N requests of the code trace (0: all)")
    ap.add_argument("--replicas", type=int, default=1, help="GPUs (replicas) of every mode")
    ap.add_argument("--lockstep", type=float, nargs="*", default=[0.5, 0.7, 0.9])
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--fractions-512", type=float, nargs="*", default=[0.7])
    ap.add_argument("--slos", type=float, nargs="*", default=[0.015, 0.025, 0.05])
    ap.add_argument("--disagg", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of a disaggregated-P/D run (the cluster's pool keys), run beside the others")
    args = ap.parse_args()
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    base = {"trace.bundled": "azure-code", "trace.max_requests": args.requests,
            "policies.scheduling.name": "chunked-prefill", "cluster.num_replicas": args.replicas}
    rows = []
    for label, over in cases(args):
        s = Simulation(with_overrides(SimConfig(), {**base, **over})).run().summary
        row = {"case": label, **over, "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
               "itl_p50_s": s["itl_s"]["p50"], "itl_p99_s": s["itl_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"],
               "tpot_p99_s": s["tpot_s"]["p99"], "tpot_mean_s": s["tpot_s"]["mean"],
               "output_tok_per_s": s["throughput"]["output_tokens_per_s"], "steps": s["engine"]["steps"]}
        if "lanes" in s:
            reps = s["lanes"]["replicas"]
            row["prefill_share_mean"] = sum(r["prefill_share_mean"] for r in reps) / len(reps)
            row["hbm_stretch_s"] = sum(r["prefill_hbm_stretch_s"] + r["decode_hbm_stretch_s"] for r in reps)
        rows.append(row)
        print(f"{label:36s} TTFT p50 {row['ttft_p50_s']:6.3f} s  p99 {row['ttft_p99_s']:6.2f} s | ITL p50 "
              f"{1e3 * row['itl_p50_s']:6.2f} ms  p99 {1e3 * row['itl_p99_s']:6.2f} ms | TPOT p50 "
              f"{1e3 * row['tpot_p50_s']:6.2f} ms  p99 {1e3 * row['tpot_p99_s']:6.2f} ms | "
              f"{row['output_tok_per_s']:,.1f} out tok/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"nexus-lanes-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"requests": args.requests, "replicas": args.replicas, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
