"""Part ``unfused_counts``: the CUDA kernels one layer of the stock decoder launches, as CUPTI counts them.

``calibration.torch_unfused.record("cuda")`` at its count points (Llama-3.1-8B and 3.2-1B, decode and
prefill): kernels, memcpys and memsets of one layer, with their names. It runs in its own process, last
in the lease, because Kineto may leave CUPTI attached and slow every later launch in the process
(pytorch/pytorch#144455). The counts go into ``meta["kernel_counts"]``; the ingest records them next to
the CPU counts in ``tests/data/kernel_counts/torch_unfused.json`` (entries with ``device = "cuda"``), where
``tests/unit/test_recipes.py`` checks the recipe against them. Quick mode (no GPU): the CPU count of the
1B points.
"""
from __future__ import annotations


def run(part: str, ctx, sink) -> None:
    import torch

    from calibration.torch_unfused import COUNT_POINTS, record

    if torch.cuda.is_available():
        device, points = "cuda", COUNT_POINTS
    else:
        device, points = "cpu", tuple(p for p in COUNT_POINTS if p[0] == "llama-3.2-1b")
    ctx.progress(f"counting one stock-decoder layer's kernels on {device} at {len(points)} points")
    counts = record(device, points)
    sink.meta["kernel_counts"] = counts
    sink.meta["headline"] = ", ".join(f"{c['model']} {c['phase']}: {c['kernels_per_layer']}" for c in counts)
    ctx.progress(sink.meta["headline"])
