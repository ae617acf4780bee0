"""Nexus-style prefill/decode lanes against time-multiplexed chunked prefill, on the prefill-heavy Azure
code trace, one GPU each.

    python benchmarks/nexus_lanes.py                      # 3,000 requests, about 2 CPU-minutes
    python benchmarks/nexus_lanes.py --requests 0         # the whole trace

Llama-3.1-8B on one H100 (shipped table, CUDA graphs), ``chunked-prefill`` with a 2,048-token budget
(and 512 for comparison), the first ``--requests`` requests of the Azure LLM inference 2023 code trace at
its own rate. The lanes runs set ``replica.prefill_sm_fraction`` = p: each mixed step's prefill chunks
run on p of the SMs while its decodes run on the rest, concurrently, and the step ends when both lanes
end (tiersim's lanes are synchronised at every step; Nexus runs the phases as independent streams, so a
decode does not wait for a chunk: see the README). Writes ``benchmarks/results/nexus-lanes-<UTC>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="first N requests of the code trace (0: all)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    args = ap.parse_args()
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    base = {"trace.bundled": "azure-code", "trace.max_requests": args.requests,
            "policies.scheduling.name": "chunked-prefill"}
    cases = [("time-multiplexed, budget 2048", {}),
             ("time-multiplexed, budget 512", {"policies.scheduling.max_num_batched_tokens": 512})]
    cases += [(f"lanes p = {p}, budget 2048", {"replica.prefill_sm_fraction": p}) for p in args.fractions]
    rows = []
    for label, over in cases:
        s = Simulation(with_overrides(SimConfig(), {**base, **over})).run().summary
        row = {"case": label, **over, "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
               "itl_p50_s": s["itl_s"]["p50"], "itl_p99_s": s["itl_s"]["p99"], "tpot_mean_s": s["tpot_s"]["mean"],
               "output_tok_per_s": s["throughput"]["output_tokens_per_s"], "steps": s["engine"]["steps"]}
        rows.append(row)
        print(f"{label:32s} TTFT p50 {row['ttft_p50_s']:7.3f} s  p99 {row['ttft_p99_s']:7.2f} s | ITL p50 "
              f"{1e3 * row['itl_p50_s']:6.2f} ms  p99 {1e3 * row['itl_p99_s']:6.2f} ms | TPOT "
              f"{1e3 * row['tpot_mean_s']:6.2f} ms | {row['output_tok_per_s']:,.0f} out tok/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"nexus-lanes-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"requests": args.requests, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
