"""Step time against SMs reserved from the model (``StepCostModel.for_share``), from a measured table.

    python benchmarks/sm_share.py [--table h100-sxm-80gb] [--model llama-3.1-8b] [--plot FILE]

A compute-bound prefill (one 4,096-token prompt) and a memory-bound batch-1 decode (1,024 cached
tokens), CUDA graphs, with 0..116 of the GPU's SMs held back (a persistent scheduler's SMs, or the
other side of a prefill/decode partition). The share model is calibrated from the table's SM-subset
microkernels (``sim/costs/backend.py``): compute slows in proportion to the SMs lost, HBM bandwidth
only as the measured bandwidth-vs-SMs sweep says.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies import registry  # noqa: E402
from sim.costs.model import StepShape, TransformerOps  # noqa: E402
from sim.costs.step import StepCostModel  # noqa: E402
from sim.costs.table import CostTable, TableBackend, resolve_table_dir  # noqa: E402
from sim.specs import load_gpu, load_model  # noqa: E402

RESERVED = (0, 4, 8, 16, 24, 33, 44, 66, 88, 99, 116)


def curve(table: str, model: str) -> tuple[list[dict], str]:
    t = CostTable(resolve_table_dir(table))
    gpu = load_gpu(t.meta["gpu"]["preset"])
    ops = TransformerOps(load_model(model))
    backend = TableBackend(ops, gpu, t)
    cost = StepCostModel(ops, backend, registry.build("execution", "cuda-graph", {}))
    shapes = {"prefill_1x4096": StepShape.prefill(1, 4096), "decode_b1_ctx1024": StepShape.decode(1, 1024)}
    rows = []
    base = {}
    for r in RESERVED:
        f = (gpu.sm_count - r) / gpu.sm_count
        c = cost.for_share(f)
        row = {"reserved_sms": r, "sm_fraction": f}
        for name, s in shapes.items():
            d = c.step(s.prefill_q, s.prefill_c, s.num_decode, s.decode_ctx_sum, s.num_sampled)[0]
            base.setdefault(name, d)
            row[f"{name}_ms"] = d * 1e3
            row[f"{name}_x"] = d / base[name]
        rows.append(row)
    return rows, backend.share_curves.source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="h100-sxm-80gb")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--plot", help="write a PNG of the curve here")
    args = p.parse_args(argv)
    rows, source = curve(args.table, args.model)
    print(f"{args.model} on {args.table}, CUDA graphs; share curves from {source}")
    print(f"{'reserved SMs':>13}{'share':>7}{'prefill 1x4096 ms':>19}{'x':>7}{'decode b1 ms':>14}{'x':>7}")
    for r in rows:
        print(f"{r['reserved_sms']:>13}{r['sm_fraction']:>7.2f}{r['prefill_1x4096_ms']:>19.2f}"
              f"{r['prefill_1x4096_x']:>7.2f}{r['decode_b1_ctx1024_ms']:>14.3f}{r['decode_b1_ctx1024_x']:>7.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["reserved_sms"] for r in rows]
        ax.plot(xs, [r["prefill_1x4096_x"] for r in rows], "o-", label="prefill, 1 x 4,096 tokens (compute-bound)")
        ax.plot(xs, [r["decode_b1_ctx1024_x"] for r in rows], "s-",
                label="decode, batch 1, 1,024 cached (memory-bound)")
        ax.set_xlabel("SMs reserved from the model's kernels")
        ax.set_ylabel("step time / step time on all SMs")
        ax.set_title(f"{args.model} on {args.table}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
