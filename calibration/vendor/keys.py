"""Canonical cost-table keys of a model's shapes, exactly as ``sim.costs.model.TransformerOps`` makes them.

The fit joins raw rows to the simulator's op list by ``(op, key)``; these helpers rebuild each key
from a ``calibration.raw.ModelShape`` with ``sim.costs.model.make_key`` (a unit test checks them
against ``TransformerOps.required_table_entries`` of the presets).
"""
from __future__ import annotations

from calibration.raw import ModelShape, model_shape
from sim.costs.model import make_key

DTYPE = "bf16"  # the simulator's dtype; CPU (float32) and CuPy (fp16) rows say what ran in extra


def gemm_key(n: int, k: int) -> str:
    return make_key(dtype=DTYPE, k=k, n=n)


def attention_key(shape: ModelShape) -> str:
    return make_key(d=shape.head_dim, dtype=DTYPE, kvh=shape.num_kv_heads, qh=shape.num_heads)


def elementwise_keys(shape: ModelShape) -> dict[str, str]:
    """Key of each elementwise table op of ``shape``."""
    h, d = shape.hidden_size, shape.head_dim
    qh, kvh = shape.num_heads, shape.num_kv_heads
    return {
        "rms_norm": make_key(h=h),
        "rope": make_key(d=d, kvh=kvh, qh=qh),
        "kv_write": make_key(d=d, kvh=kvh),
        "act": make_key(f=shape.ffn_size),
        "add": make_key(h=h),
        "embed": make_key(h=h, v=shape.vocab_size),
        "sample": make_key(v=shape.vocab_size),
    }


def shape_dict(shape: ModelShape) -> dict:
    """A JSON-able description of ``shape`` (for kernel-count specs run in a child process)."""
    return {"name": shape.name, "hidden_size": shape.hidden_size, "num_heads": shape.num_heads,
            "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "ffn_size": shape.ffn_size, "vocab_size": shape.vocab_size,
            "gemms": [list(g) for g in shape.gemms]}


def shape_from_dict(data: dict) -> ModelShape:
    return ModelShape(name=data["name"], hidden_size=data["hidden_size"], num_heads=data["num_heads"],
                      num_kv_heads=data["num_kv_heads"], head_dim=data["head_dim"],
                      ffn_size=data["ffn_size"], vocab_size=data["vocab_size"],
                      gemms=tuple(tuple(g) for g in data["gemms"]))


def tiny_shape() -> ModelShape:
    """A tiny Llama-like shape for quick runs on the CPU (tests, smoke runs)."""
    h, qh, kvh, d, f, v = 64, 4, 2, 16, 128, 512
    gemms = (((qh + 2 * kvh) * d, h), (h, qh * d), (2 * f, h), (h, f), (v, h))
    return ModelShape(name="tiny", hidden_size=h, num_heads=qh, num_kv_heads=kvh, head_dim=d,
                      ffn_size=f, vocab_size=v, gemms=gemms)


DEFAULT_MODELS = ("llama-3.1-8b", "llama-3.2-1b")


def part_models(models: tuple[ModelShape, ...], quick: bool, cuda: bool) -> tuple[ModelShape, ...]:
    """The shapes a part measures: the tiny shape on a quick CPU run (tests and smoke runs: timing
    an 8B model's GEMMs on a CPU takes minutes and says nothing), else the suite's ``ctx.models``,
    else the two Llama presets the validation model uses."""
    if quick and not cuda:
        return (tiny_shape(),)
    if models:
        return tuple(models)
    return tuple(model_shape(name) for name in DEFAULT_MODELS)
