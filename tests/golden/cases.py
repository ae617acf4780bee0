"""Canonical runs whose metrics are stored in ``tests/golden/*.json``.

Regenerate after an intended behaviour change (and say why in the commit):

    python -m tests.golden.cases
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
# Results are deterministic; the tolerance only absorbs floating-point differences between NumPy
# builds and platforms.
REL_TOL = 1e-6

CASES = {
    # the default configuration (shipped H100 table, fcfs, CUDA graphs) on the first 2,000 conv requests
    "conv2000_default": {"trace.max_requests": 2000},
    # Mooncake with prefix caching, chunked prefill and swap preemption in a deliberately small HBM
    "mooncake400_chunked_swap": {
        "trace.bundled": "mooncake-conversation", "trace.max_requests": 400, "trace.rate_scale": 4.0,
        "policies.scheduling.name": "chunked-prefill", "replica.preemption_mode": "swap",
        "replica.num_hbm_blocks": 6000, "replica.dram_kv_bytes": 8 * 1024**3},
    # eager execution, two replicas, the code trace compressed 4x
    "code1500_eager_2rep": {"trace.bundled": "azure-code", "trace.max_requests": 1500, "trace.rate_scale": 4.0,
                            "policies.execution.name": "host-launched", "cluster.num_replicas": 2},
}


def metrics(overrides: dict) -> dict:
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    s = Simulation(with_overrides(SimConfig(), overrides)).run().summary
    out = {"requests": s["requests"], "engine": {k: s["engine"][k] for k in (
        "steps", "preemptions", "swaps_out", "swaps_in", "launches", "syncs")}}
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s", "queueing_s", "throughput", "goodput"):
        out[key] = s[key]
    out["kv"] = {k: s["kv"][k] for k in ("prefix_hit_tokens", "hbm_peak_active_bytes", "dram_peak_used_bytes",
                                         "fragmentation_tokens_mean")}
    out["links"] = s["links"]
    return out


def regenerate() -> None:
    for name, overrides in CASES.items():
        (HERE / f"{name}.json").write_text(json.dumps(metrics(overrides), indent=2, sort_keys=True) + "\n")
        print(f"wrote tests/golden/{name}.json")


if __name__ == "__main__":
    regenerate()
