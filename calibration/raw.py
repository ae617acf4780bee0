"""Raw calibration measurements: one schema for every part of the suite, and the Part protocol.

Every measurement is one row: which part and variant produced it, which cost-table op and shape key it
prices (when it prices one), up to three size coordinates, and robust statistics of the repeated timings.
``calibration.fit`` turns these rows into the per-op table that ``sim.costs.table`` reads.

Coordinates per part are documented by the part itself (``Part.coords``); for the parts that price a
cost-table op they follow ``sim.costs.model`` (gemm: x=M; attn_prefill: x=q, y=c, z=seqs;
attn_decode: x=batch, y=ctx; elementwise ops: x=tokens; allreduce and links: x=bytes).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RAW_COLUMNS: dict[str, str] = {
    "part": "string",      # suite part, e.g. "hbm_stream", "gemm"
    "variant": "string",   # e.g. "triad", "pinned_h2d", "cupy-cublas"
    "op": "string",        # cost-table op this row prices ("" if none)
    "key": "string",       # canonical shape key (sim.costs.model.make_key) ("" if none)
    "x": "float64",
    "y": "float64",
    "z": "float64",
    "median_s": "float64",
    "p10_s": "float64",
    "p90_s": "float64",
    "min_s": "float64",
    "max_s": "float64",
    "reps": "int64",
    "bytes": "float64",    # bytes moved per call (for bandwidth fits), 0 if not meaningful
    "flops": "float64",    # floating-point operations per call, 0 if not meaningful
    "extra": "string",     # JSON object with anything else (kernel counts, backend names, ...)
}


def make_row(part: str, variant: str, samples_s: Sequence[float], *, op: str = "", key: str = "",
             x: float = 0.0, y: float = 0.0, z: float = 0.0, nbytes: float = 0.0, flops: float = 0.0,
             extra: dict | None = None) -> dict:
    """One raw row from repeated timings (seconds). Empty or non-finite samples are an error."""
    s = np.asarray([v for v in samples_s], dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"{part}/{variant}: no valid timing samples")
    return {
        "part": part, "variant": variant, "op": op, "key": key,
        "x": float(x), "y": float(y), "z": float(z),
        "median_s": float(np.median(s)), "p10_s": float(np.percentile(s, 10)),
        "p90_s": float(np.percentile(s, 90)), "min_s": float(s.min()), "max_s": float(s.max()),
        "reps": int(s.size), "bytes": float(nbytes), "flops": float(flops),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }


def rows_to_frame(rows: list[dict]):
    """Rows → a pandas DataFrame with exactly RAW_COLUMNS, in order and with their dtypes."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(RAW_COLUMNS))
    for col, dtype in RAW_COLUMNS.items():
        frame[col] = frame[col].astype(dtype)
    return frame


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The shapes of one model that the GEMM, attention and elementwise parts must measure."""

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    gemms: tuple[tuple[int, int], ...]  # (n, k) pairs, weights [k, n]


@dataclass
class PartContext:
    """What a part gets to run: sizes, the models whose shapes matter, where to report progress."""

    quick: bool                       # tiny grids (CI, the CUDA simulator, smoke tests)
    simulate: bool                    # running under NUMBA_ENABLE_CUDASIM=1
    models: tuple[ModelShape, ...] = ()
    scratch_dir: Path = field(default_factory=lambda: Path("/tmp"))
    progress: Callable[[str], None] = lambda msg: None
    budget_s: float = math.inf        # soft wall-clock budget for this part


@dataclass(frozen=True, slots=True)
class Part:
    """One calibration part: measures a primitive over a grid and returns raw rows.

    ``requires`` lists importable modules (e.g. ``("numba.cuda",)`` or ``("torch",)``); the suite skips
    a part, saying why, when one is missing. ``coords`` documents x, y, z for this part.
    """

    name: str
    description: str
    requires: tuple[str, ...]
    coords: str
    run: Callable[[PartContext], list[dict]]


def model_shape(name: str, tp: int = 1) -> ModelShape:
    """The per-GPU shapes of preset model ``name`` under tensor parallelism ``tp``."""
    from sim.costs.model import TransformerOps
    from sim.specs import load_model

    ops = TransformerOps(load_model(name), tp=tp)
    m = ops.model
    gemms = tuple(dict.fromkeys((op.n, op.k) for op in ops.ops if op.table_op == "gemm"))
    return ModelShape(name=m.name, hidden_size=m.hidden_size, num_heads=ops.q_heads,
                      num_kv_heads=ops.kv_heads, head_dim=m.head_dim, ffn_size=ops.ffn,
                      vocab_size=m.vocab_size, gemms=gemms)
