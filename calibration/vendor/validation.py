"""Validation part: step times of the reference decoder (``calibration.reference_model``).

Rows: part ``validation``, variant ``eager`` (host-launched, synchronize per step, host clock) or
``graph`` (one captured step replayed, replay + synchronize on the host clock), op ``prefill`` or
``decode``, key = model name, x = batch, y = prompt length (prefill) or cached context (decode).
Extra: ``kernels`` per step (profiler count in a child process for a subset of points, else the
captured graph's node count), ``attention_backend``, ``gpu``, device-side medians.
"""
from __future__ import annotations

from calibration.raw import Part, PartContext


def run(ctx: PartContext) -> list[dict]:
    from calibration.reference_model import run_validation

    return run_validation(ctx)


PART = Part(
    name="validation",
    description="eager and CUDA-graph prefill/decode step times of the PyTorch reference decoder "
                "(llama-3.1-8b, llama-3.2-1b)",
    requires=("torch",),
    coords="x = batch, y = prompt length (prefill) or cached context (decode); key = model name",
    run=run,
)
