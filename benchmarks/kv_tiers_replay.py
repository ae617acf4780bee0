"""What each layer of the KV hierarchy buys on the Mooncake FAST'25 conversation replay: HBM alone
(LRU, and Continuum-style TTL), then DRAM, then DRAM and NVMe below it.

    python benchmarks/kv_tiers_replay.py                                 # the whole trace, every case
    python benchmarks/kv_tiers_replay.py --requests 2000 --cases hbm dram+nvme

One Llama-3.1-8B replica on an H100 (shipped table, CUDA graphs, ``fcfs``: the default run, 28,019
blocks of 16 tokens in HBM), the bundled Mooncake conversation trace at its own rate times ``--rate``.
The lower tiers are the ``tiered`` residency policy (inclusive: a released request's prompt blocks are
written through to the tier below, a lower tier's evictions move one tier further down; prefetch for
the head of the queue; a lower-tier hit is loaded only when the copy is faster than recomputing it)
with 200 GB of DRAM and 2 TB of NVMe per GPU, the ``mooncake-tiers`` case of ``bench_replay.py``.

For each case: the token hit rate per tier, the share of requests with a hit per tier, TTFT and E2E,
prefill tokens saved, bytes and utilisation per link, stall time (requests waiting for their prefix to
land), prefetch on time / late / wasted, load-versus-recompute choices, write-back bytes and evictions
per tier. Writes ``benchmarks/results/kv-tiers-replay-<UTC time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIERED = {"policies.residency.name": "tiered"}
DRAM, NVME = 200 * 10**9, 2 * 10**12
CASES: dict[str, dict] = {
    "hbm": {},
    "hbm-ttl": {"policies.eviction.name": "ttl"},
    "dram": {**TIERED, "replica.dram_kv_bytes": DRAM},
    "dram+nvme": {**TIERED, "replica.dram_kv_bytes": DRAM, "replica.nvme_kv_bytes": NVME},
    "dram+nvme-exclusive": {**TIERED, "replica.dram_kv_bytes": DRAM, "replica.nvme_kv_bytes": NVME,
                            "replica.kv_tier_mode": "exclusive"},
}


def run_case(name: str, requests: int | None, rate: float, ttl_s: float) -> dict:
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    over = {"trace.bundled": "mooncake-conversation", "trace.rate_scale": rate, "metrics.step_log": False,
            **CASES[name]}
    if requests:
        over["trace.max_requests"] = requests
    if name == "hbm-ttl":
        over["policies.eviction.ttl_s"] = ttl_s
    t0 = time.process_time()
    res = Simulation(with_overrides(SimConfig(), over)).run()
    s = res.summary
    kt = s["kv_tiers"]
    return {"case": name, "overrides": over, "cpu_s": time.process_time() - t0,
            "requests": s["requests"]["total"], "finished": s["requests"]["finished"],
            "token_hit_rate": kt["token_hit_rate"], "token_hit_rate_all": kt["token_hit_rate_all"],
            "request_hit_fraction": kt["request_hit_fraction"],
            "prefill_tokens_saved": kt["prefill_tokens_saved"], "lookup_tokens": kt["lookup_tokens"],
            "ttft_s": s["ttft_s"], "e2e_s": s["e2e_s"], "queueing_s": s["queueing_s"],
            "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
            "utilization": s["engine"]["utilization"], "preemptions": s["engine"]["preemptions"],
            "links": s["links"],
            "link_stats": {k: {m: v[m] for m in ("bytes", "transfers", "busy_s", "utilization")}
                           for k, v in s["link_stats"].items()},
            "stall": kt["stall"], "prefetch": kt["prefetch"], "loads": kt["loads"],
            "load_blocks": kt["load_blocks"], "recompute_choices": kt["recompute_choices"],
            "recompute_choice_tokens": kt["recompute_choice_tokens"], "writeback_bytes": kt["writeback_bytes"],
            "write_blocks": kt["write_blocks"], "evicted_blocks": kt["evicted_blocks"],
            "blocks_per_replica": kt["blocks_per_replica"], "mode": kt["mode"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--requests", type=int, default=0, help="the first N requests (0: all 12,031)")
    p.add_argument("--rate", type=float, default=1.0, help="trace.rate_scale")
    p.add_argument("--ttl-s", type=float, default=120.0, help="the ttl case's policies.eviction.ttl_s")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    rows = []
    print(f"{'case':21}{'hit %':>7}{'hbm':>6}{'dram':>6}{'nvme':>6}{'TTFT mean s':>12}{'p99 s':>9}"
          f"{'H2D GB':>8}{'D2H GB':>8}{'NVMe r GB':>10}{'NVMe w GB':>10}{'stall s':>9}{'recomp':>7}{'cpu s':>7}")
    for name in args.cases:
        r = run_case(name, args.requests or None, args.rate, args.ttl_s)
        rows.append(r)
        h, ln = r["token_hit_rate"], r["links"]
        print(f"{name:21}{100 * r['token_hit_rate_all']:>7.2f}{100 * h['hbm']:>6.2f}{100 * h['dram']:>6.2f}"
              f"{100 * h['nvme']:>6.2f}{r['ttft_s']['mean']:>12.2f}{r['ttft_s']['p99']:>9.2f}"
              f"{ln['pcie_h2d_bytes'] / 1e9:>8.1f}{ln['pcie_d2h_bytes'] / 1e9:>8.1f}"
              f"{ln['nvme_read_bytes'] / 1e9:>10.1f}{ln['nvme_write_bytes'] / 1e9:>10.1f}"
              f"{r['stall']['total_s']:>9.1f}{r['recompute_choices']:>7}{r['cpu_s']:>7.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kv-tiers-replay-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"what": "the KV hierarchy on the Mooncake conversation replay",
                                "requests": args.requests or "all", "rate_scale": args.rate, "ttl_s": args.ttl_s,
                                "cases": rows, "machine": {"python": platform.python_version(),
                                                           "platform": platform.platform(),
                                                           "cpus": os.cpu_count()}}, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
