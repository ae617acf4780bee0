"""Execution modes side by side, from the shipped H100 table: what tiersim prices for each.

    python benchmarks/exec_modes.py [--out benchmarks/results/exec-modes.json] [--plot FILE]

1. Batch-1 decode of Llama-3.2-1B (Hazy Research's "No Bubbles" workload: a 32-token prompt, 128
   generated tokens, no speculation), simulated in each mode: mean time per output token after the
   first, launches and syncs per token, beside the HBM floor (weight bytes / HBM bandwidth, a closed
   form) and the published figures (the megakernel at 78 % of the H100's bandwidth; SGLang and vLLM
   1.5x and 2.5x slower than it).
2. SMs reserved by the persistent scheduler: a compute-bound prefill (one 4,096-token prompt) and a
   memory-bound batch-1 decode (1,024 cached tokens) of Llama-3.1-8B, persistent mode, 0..66 SMs held.
3. CUDA-graph capture buckets: decode step time of Llama-3.1-8B against the batch, every shape
   captured ("all") against vLLM's sizes (padding; eager above 512).
4. Host work per step (the reference-h200 profile, fitted to the reference server's steps): the
   same decode steps serial and overlapped, CUDA graphs.

Everything is simulated time (deterministic); the JSON holds no wall-clock figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from policies import registry  # noqa: E402
from sim.config import SimConfig, with_overrides  # noqa: E402
from sim.costs.model import StepShape, TransformerOps  # noqa: E402
from sim.costs.step import StepCostModel  # noqa: E402
from sim.costs.table import CostTable, TableBackend, resolve_table_dir  # noqa: E402
from sim.engine import Simulation  # noqa: E402
from sim.specs import load_gpu, load_model  # noqa: E402
from traces import Trace  # noqa: E402

TABLE = "h100-sxm-80gb"
MODES = {"host-launched": {}, "cuda-graph": {}, "persistent": {}}
HAZY = {
    "source": "Spector, Juravsky et al., 'Look Ma, No Bubbles! Designing a Low-Latency Megakernel for "
              "Llama-1B', Hazy Research blog, 2025-05-27, hazyresearch.stanford.edu/blog/2025-05-27-no-bubbles",
    "workload": "Llama-3.2-1B, bf16, batch 1, 32-token prompt, 128 generated tokens, no speculation, H100",
    "megakernel_bandwidth_fraction": 0.78,
    "sglang_over_megakernel": 1.5,
    "vllm_over_megakernel": 2.5,
    "note": "78 % of memory bandwidth and 'over 1.5x' faster than existing systems are the post's words; "
            "1.5x over SGLang and 2.5x over vLLM are its Figure 1 as summarised by secondary sources; the "
            "per-token times below are derived from those ratios and the HBM floor, not read off the figure",
}


def hazy_case() -> dict:
    """Part 1: one 32 + 128-token request in each mode."""
    tr = Trace(arrival_s=np.zeros(1), prompt_tokens=np.array([32]), output_tokens=np.array([128]),
               name="hazy-llama1b", source="benchmarks/exec_modes.py")
    rows = {}
    weights = bw = None
    for mode, params in MODES.items():
        cfg = with_overrides(SimConfig(), {"model.name": "llama-3.2-1b", "costs.table": TABLE,
                                           "policies.execution.name": mode,
                                           **{f"policies.execution.{k}": v for k, v in params.items()}})
        sim = Simulation(cfg, trace=tr)
        res = sim.run()
        st = res.steps
        dec = st[(st["decode_seqs"] > 0) & (st["prefill_seqs"] == 0)]
        s = res.summary
        rows[mode] = {"decode_ms_per_token": float(dec["duration_s"].mean()) * 1e3,
                      "prefill_ms": float(st.loc[st["prefill_seqs"] > 0, "duration_s"].sum()) * 1e3,
                      "launches_per_token": s["execution"]["launches_per_token"],
                      "syncs_per_token": s["execution"]["syncs_per_token"],
                      "model_sms": s["execution"]["model_sms"]}
        weights = s["kv"]["weight_bytes_per_gpu"]
        bw = sim.gpu.hbm_bandwidth_bytes_per_s
    floor = weights / bw
    mk = floor / HAZY["megakernel_bandwidth_fraction"]
    for r in rows.values():
        r["x_hbm_floor"] = r["decode_ms_per_token"] / (floor * 1e3)
        r["bandwidth_fraction"] = floor * 1e3 / r["decode_ms_per_token"]
    published = {"megakernel_ms": mk * 1e3, "sglang_ms": mk * HAZY["sglang_over_megakernel"] * 1e3,
                 "vllm_ms": mk * HAZY["vllm_over_megakernel"] * 1e3}
    return {"weight_bytes": int(weights), "hbm_bandwidth_bytes_per_s": bw, "hbm_floor_ms": floor * 1e3,
            "tiersim": rows, "published": {**HAZY, **published}}


def _cost(model: str, execution: str, params: dict | None = None):
    t = CostTable(resolve_table_dir(TABLE))
    gpu = load_gpu(t.meta["gpu"]["preset"])
    ops = TransformerOps(load_model(model))
    ex = registry.build("execution", execution, params or {})
    cost = StepCostModel(ops, TableBackend(ops, gpu, t), ex)
    reserved = ex.reserved_sms(gpu.sm_count)
    return (cost.for_share((gpu.sm_count - reserved) / gpu.sm_count) if reserved else cost), gpu


def _price(cost, shape: StepShape, num_seqs: int) -> float:
    return cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum, shape.num_sampled,
                     num_seqs=num_seqs)[0]


def sm_reserve_curve() -> list[dict]:
    """Part 2."""
    rows = []
    prefill, decode = StepShape.prefill(1, 4096), StepShape.decode(1, 1024)
    base = None
    for sms in (0, 4, 8, 16, 24, 33, 44, 66):
        cost, gpu = _cost("llama-3.1-8b", "persistent", {"scheduler_sms": sms})
        p, d = _price(cost, prefill, 1), _price(cost, decode, 1)
        base = base or (p, d)
        rows.append({"scheduler_sms": sms, "model_sms": gpu.sm_count - sms, "prefill_1x4096_ms": p * 1e3,
                     "prefill_x": p / base[0], "decode_b1_ctx1024_ms": d * 1e3, "decode_x": d / base[1]})
    return rows


def bucket_curve() -> list[dict]:
    """Part 3."""
    all_, _ = _cost("llama-3.1-8b", "cuda-graph")
    vllm, _ = _cost("llama-3.1-8b", "cuda-graph", {"capture_sizes": "vllm"})
    rows = []
    for b in (1, 3, 5, 9, 17, 33, 65, 100, 129, 200, 257, 300, 500, 513, 600):
        s = StepShape.decode(b, 1024)
        a, v = _price(all_, s, b), _price(vllm, s, b)
        rows.append({"batch": b, "padded_to": vllm.padded_batch(b, False), "all_ms": a * 1e3, "vllm_ms": v * 1e3,
                     "padding_cost": v / a - 1.0})
    return rows


def host_curve() -> list[dict]:
    """Part 4."""
    none, _ = _cost("llama-3.1-8b", "cuda-graph")
    serial, _ = _cost("llama-3.1-8b", "cuda-graph", {"host": "reference-h200"})
    over, _ = _cost("llama-3.1-8b", "cuda-graph", {"host": "reference-h200", "host_overlap": True})
    rows = []
    for b in (1, 8, 32, 64, 128, 256):
        s = StepShape.decode(b, 1024)
        g, ser, ov = (_price(c, s, b) for c in (none, serial, over))
        rows.append({"batch": b, "gpu_ms": g * 1e3, "serial_ms": ser * 1e3, "overlapped_ms": ov * 1e3,
                     "serial_overhead": ser / g - 1.0, "overlapped_overhead": ov / g - 1.0})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "exec-modes.json")
    p.add_argument("--plot", help="write a PNG of the SM-reserve curve here")
    args = p.parse_args(argv)
    out = {"table": TABLE, "hazy_llama1b_batch1": hazy_case(), "sm_reserve": sm_reserve_curve(),
           "capture_buckets": bucket_curve(), "host_overhead": host_curve()}
    h = out["hazy_llama1b_batch1"]
    print(f"Llama-3.2-1B batch-1 decode on {TABLE} (32-token prompt, 128 tokens): ms per output token")
    print(f"  HBM floor (weights {h['weight_bytes'] / 1e9:.2f} GB / {h['hbm_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)"
          f" {h['hbm_floor_ms']:.3f}")
    for mode, r in h["tiersim"].items():
        print(f"  tiersim {mode:14} {r['decode_ms_per_token']:7.3f}  ({r['x_hbm_floor']:.2f}x floor, "
              f"{100 * r['bandwidth_fraction']:.0f} % of bandwidth; launches {r['launches_per_token']:.1f}, "
              f"syncs {r['syncs_per_token']:.2f} per token)")
    pub = h["published"]
    print(f"  published (derived): megakernel {pub['megakernel_ms']:.3f}, SGLang ~{pub['sglang_ms']:.2f}, "
          f"vLLM ~{pub['vllm_ms']:.2f}")
    print("persistent scheduler SMs (Llama-3.1-8B): prefill 1x4096 ms (x), decode b1 ms (x)")
    for r in out["sm_reserve"]:
        print(f"  {r['scheduler_sms']:3} SMs held: {r['prefill_1x4096_ms']:8.2f} ({r['prefill_x']:.2f}x)  "
              f"{r['decode_b1_ctx1024_ms']:7.3f} ({r['decode_x']:.3f}x)")
    print("capture buckets (Llama-3.1-8B decode, 1,024 tokens of context each): batch -> bucket, all / vllm ms")
    for r in out["capture_buckets"]:
        print(f"  {r['batch']:4} -> {r['padded_to']:4}: {r['all_ms']:7.3f} / {r['vllm_ms']:7.3f} "
              f"(+{100 * r['padding_cost']:.1f} %)")
    print("host work per step (reference-h200 profile, CUDA graphs): batch, GPU / serial / overlapped ms")
    for r in out["host_overhead"]:
        print(f"  {r['batch']:4}: {r['gpu_ms']:7.3f} / {r['serial_ms']:7.3f} / {r['overlapped_ms']:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["scheduler_sms"] for r in out["sm_reserve"]]
        ax.plot(xs, [r["prefill_x"] for r in out["sm_reserve"]], "o-", label="prefill 1 x 4,096 (compute-bound)")
        ax.plot(xs, [r["decode_x"] for r in out["sm_reserve"]], "s-", label="decode batch 1 (memory-bound)")
        ax.set_xlabel("SMs held by the persistent scheduler")
        ax.set_ylabel("step time / with no SMs held")
        ax.set_title(f"Llama-3.1-8B, persistent, {TABLE}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
