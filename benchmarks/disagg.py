"""Prefill/decode disaggregation across GPUs (DistServe, Splitwise) against mixed replicas with
time-multiplexed chunked prefill, on the prefill-heavy Azure code trace, at 2 and 4 GPUs.

    python benchmarks/disagg.py                       # 3,000 requests, 2 and 4 GPUs, a few CPU-minutes
    python benchmarks/disagg.py --gpus 2 --requests 0 # the whole trace at 2 GPUs

Llama-3.1-8B, one H100 per replica (shipped table, CUDA graphs), ``chunked-prefill`` on every replica,
the first ``--requests`` requests of the Azure LLM inference 2023 code trace at ``--rate-scale`` times
its own rate, round-robin routing over the replicas that take arrivals. Mixed cases: every replica
serves whole requests, prefill chunks and decodes time-multiplexed in one step, with a 512- or 2,048-token
step budget. ``kPmD`` cases: ``cluster.prefill_replicas`` = k replicas prefill (2,048-token chunks) and
sample the first token, the other m decode; each hand-off moves the prompt's KV over the GPU's NVLink
(450 GB/s per direction on the H100 preset; ``--handoff-bw`` for an RDMA link) to the decode replica
with the most free KV blocks. Writes ``benchmarks/results/disagg-<UTC>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def cases(gpus: int) -> list[tuple[str, dict]]:
    out = [(f"{gpus} mixed, budget 512", {"policies.scheduling.max_num_batched_tokens": 512}),
           (f"{gpus} mixed, budget 2048", {})]
    out += [(f"{p}P{gpus - p}D", {"cluster.prefill_replicas": p}) for p in range(1, gpus)]
    return [(label, {"cluster.num_replicas": gpus, **over}) for label, over in out]


TIGHT_ITL_S = 0.025     # a per-token bound of an interactive service (Sarathi-Serve's P99 TBT SLOs are tens of ms)


def tight_goodput(req, slo_ttft_s: float) -> float:
    """Fraction of requests that finished with TTFT <= ``slo_ttft_s`` and their own p99 inter-token gap
    <= ``TIGHT_ITL_S`` (one-token requests have no gap): a per-token SLO that the summary's mean-TPOT
    goodput does not bound."""
    ok = (req.status == "finished") & (req.ttft_s <= slo_ttft_s) & ((req.itl_p99_s <= TIGHT_ITL_S)
                                                                     | req.itl_p99_s.isna())
    return float(ok.sum()) / len(req) if len(req) else 0.0


def row_of(label: str, over: dict, s: dict, wall_s: float, req) -> dict:
    ho = s.get("handoff")
    return {
        "case": label, **over,
        "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
        "itl_p50_s": s["itl_s"]["p50"], "itl_p99_s": s["itl_s"]["p99"],
        "tpot_p50_s": s["tpot_s"]["p50"], "tpot_p99_s": s["tpot_s"]["p99"],
        "e2e_p50_s": s["e2e_s"]["p50"],
        "output_tok_per_s": s["throughput"]["output_tokens_per_s"],
        "requests_per_s": s["throughput"]["requests_per_s"],
        "goodput_requests_per_s": s["goodput"]["requests_per_s"], "goodput_fraction": s["goodput"]["fraction"],
        "goodput_rule": s["goodput"]["definition"],
        "goodput_itl25_fraction": tight_goodput(req, s["goodput"]["slo_ttft_s"]),
        "goodput_itl25_rule": f"TTFT <= {s['goodput']['slo_ttft_s']:g} s, per-request p99 ITL <= "
                              f"{TIGHT_ITL_S * 1e3:g} ms",
        "finished": s["requests"]["finished"], "rejected": s["requests"]["rejected"],
        "preemptions": s["engine"]["preemptions"], "engine_utilization": s["engine"]["utilization"],
        "network_bytes": s["link_stats"].get("network", {}).get("bytes", 0),
        "network_busy_s": s["link_stats"].get("network", {}).get("busy_s", 0.0),
        "handoff_wait_p50_s": ho["wait_s"]["p50"] if ho else None,
        "handoff_wait_p99_s": ho["wait_s"]["p99"] if ho else None,
        "handoff_backpressure_p99_s": ho["backpressure_s"]["p99"] if ho else None,
        "backpressured_requests": ho["backpressured_requests"] if ho else None,
        "prefill_pool_busy": ho["pool_busy_fraction"]["prefill"] if ho else None,
        "decode_pool_busy": ho["pool_busy_fraction"]["decode"] if ho else None,
        "decode_preemptions": ho["decode_preemptions"] if ho else None,
        "makespan_s": s["time"]["makespan_s"], "wall_s": wall_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="first N requests of the code trace (0: all)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rate-scale", type=float, default=1.0, help="trace.rate_scale")
    ap.add_argument("--handoff-bw", type=float, default=0.0,
                    help="cluster.handoff_bandwidth_bytes_per_s (0: the GPU's NVLink)")
    args = ap.parse_args()
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    base = {"trace.bundled": "azure-code", "trace.max_requests": args.requests, "trace.rate_scale": args.rate_scale,
            "model.name": "llama-3.1-8b", "hardware.gpu": "h100-sxm-80gb", "costs.table": "h100-sxm-80gb",
            "policies.scheduling.name": "chunked-prefill",
            "cluster.handoff_bandwidth_bytes_per_s": args.handoff_bw}
    rows = []
    for gpus in args.gpus:
        for label, over in cases(gpus):
            t0 = time.perf_counter()
            res = Simulation(with_overrides(SimConfig(), {**base, **over})).run()
            row = row_of(label, over, res.summary, time.perf_counter() - t0, res.requests)
            rows.append(row)
            hand = ""
            if row["handoff_wait_p50_s"] is not None:
                hand = (f" | hand-off p50/p99 {1e3 * row['handoff_wait_p50_s']:.3f}/"
                        f"{1e3 * row['handoff_wait_p99_s']:.3f} ms, {row['network_bytes'] / 1e9:.1f} GB")
            print(f"{label:22s} TTFT p50 {row['ttft_p50_s']:7.3f} s p99 {row['ttft_p99_s']:7.2f} s | ITL p50 "
                  f"{1e3 * row['itl_p50_s']:6.2f} ms p99 {1e3 * row['itl_p99_s']:7.2f} ms | TPOT p50 "
                  f"{1e3 * row['tpot_p50_s']:6.2f} ms p99 {1e3 * row['tpot_p99_s']:7.2f} ms | "
                  f"{row['output_tok_per_s']:,.0f} out tok/s | goodput {row['goodput_fraction']:.3f} "
                  f"(ITL<=25ms: {row['goodput_itl25_fraction']:.3f}){hand}",
                  flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"disagg-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"requests": args.requests, "rate_scale": args.rate_scale,
                               "handoff_bandwidth_bytes_per_s": args.handoff_bw, "base": base, "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
