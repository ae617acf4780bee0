"""Vidur's GPU profiling tables → a tiersim cost table (``ops.parquet`` + ``table.json``).

    python -m calibration.vidur_import --data /work/shared/peers/vidur/data \\
        --out calibration/tables/a100-80gb-vidur
    python -m calibration.vidur_import --data DIR --out DIR2 --vidur-conventions   # summed as Vidur sums
    python -m calibration.vidur_import --from-predictions $VIDUR_CACHE --out DIR3  # Vidur's own predictions

Vidur (Microsoft, MLSys'24; PyPI ``vidur==0.0.26``, MIT license) prices an engine iteration from
profiles measured with Sarathi-Serve's model layers: ``compute/mlp.csv.xz`` (per-layer ops against
``num_tokens``), ``compute/attention.csv.xz`` (FlashAttention prefill against ``prefill_chunk_size`` and
``kv_cache_size``, decode against ``batch_size`` and ``kv_cache_size``) and ``network/all_reduce.csv.xz``
(NCCL all-reduce against ``size`` in bytes). Every time column is in milliseconds. This module reads
the rows of one model and tensor-parallel size (by default the only complete set shipped:
Llama-2-70B, TP 2, A100 DGX) and writes them as tiersim grid points, one ``(op, key)`` per profiled op,
keys taken from :class:`sim.costs.model.TransformerOps` so that they match what the simulator asks for:

=========================================  ====================================  ==========================
Vidur column (``time_stats.<op>.median``)  tiersim op (``TransformerOps`` name)  x, y, z
=========================================  ====================================  ==========================
emb                                        embed                                 num_tokens
input_layernorm, post_attention_layernorm  attn_norm / ffn_norm (one rms_norm    num_tokens (mean of the
                                           key: their mean per point)            two profiles per point)
attn_pre_proj                              qkv_proj (gemm)                       num_tokens
attn_rope                                  rope                                  num_tokens
attn_post_proj                             o_proj (gemm)                         num_tokens
mlp_up_proj                                gate_up_proj (gemm, gate+up fused)    num_tokens
mlp_act                                    act (SiLU(gate) * up)                 num_tokens
mlp_down_proj                              down_proj (gemm)                      num_tokens
add                                        attn_residual / ffn_residual (add)    num_tokens
attn_prefill (is_prefill)                  attn_prefill                          x=prefill_chunk_size,
                                                                                 y=kv_cache_size, z=1
attn_decode (not is_prefill)               attn_decode                           x=batch_size,
                                                                                 y=kv_cache_size + 1
all_reduce (num_workers = devices = tp)    attn_allreduce / ffn_allreduce        x=size (bytes)
=========================================  ====================================  ==========================

``kv_cache_size`` is the tokens already cached before the profiled tokens (the profiler builds each
sequence with ``processed_len = kv_cache_size``); tiersim's decode ``y`` counts the new token's key too,
hence the +1. Duplicate profile points are merged by their median.

Not profiled by Vidur, so left out of the table (``costs.fallback = "roofline"`` prices them): the KV
write (the attention profile has no ``attn_kv_cache_save`` column; Vidur fills it with 0 and also
leaves it out of its sum), ``lm_head`` and ``sample``. Vidur does not count them either: its model
time is the per-layer sum times the layers (no embedding, final norm, LM head or sampling). tiersim's
final norm shares the per-layer norms' key and is priced from their curve.

``--vidur-conventions`` (:func:`apply_vidur_conventions`) writes a table that prices a step the way
Vidur 0.0.26's predictor does, for like-for-like comparisons: ops Vidur does not count cost ~0
(1 ps), one residual add per layer (Vidur times and charges one; tiersim's op list has two, so each
is priced at half), every all-reduce pays ``nccl_cpu_launch_overhead_ms`` (0.02 ms), decode attention
of more than one sequence pays ``attention_decode_batching_overhead_fraction`` (+10 %, GQA models), and
no launch or synchronisation overhead (Vidur adds none). What a table cannot express is listed in
``table.json["fit_notes"]`` (Vidur's random-forest smoothing, its rounding of token counts, and its
prefill-attention lookup at ``kv_cache_size = cached + chunk``).

``--from-predictions`` (:func:`predictions_rows`) builds the table from what a Vidur run cached in its
predictor cache (the random forests' outputs on Vidur's own grid) with those lookup rules folded in as
well, so that tiersim prices every step as Vidur does; comparisons use it to separate step costs from
simulation semantics.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.fit import tail_fit
from sim.costs.model import TransformerOps, parse_key
from sim.costs.table import TABLE_FORMAT
from sim.specs import ModelSpec, load_model

VIDUR_VERSION = "0.0.26"
MS = 1e-3                      # Vidur's profile times are milliseconds
SOURCE_FILES = {"mlp": "compute/mlp.csv.xz", "attention": "compute/attention.csv.xz",
                "all_reduce": "network/all_reduce.csv.xz"}
# Vidur per-layer op → the tiersim op (a TransformerOps name) it prices
MLP_OPS = {
    "emb": "embed",
    "attn_pre_proj": "qkv_proj",
    "attn_rope": "rope",
    "attn_post_proj": "o_proj",
    "mlp_up_proj": "gate_up_proj",
    "mlp_act": "act",
    "mlp_down_proj": "down_proj",
    "add": "attn_residual",
}
NORM_OPS = ("input_layernorm", "post_attention_layernorm")   # both → attn_norm/ffn_norm (one key)
# Vidur 0.0.26 predictor constants (vidur/config/config.py, BaseExecutionTimePredictorConfig defaults)
NCCL_CPU_LAUNCH_OVERHEAD_MS = 0.02
NCCL_CPU_SKEW_OVERHEAD_PER_DEVICE_MS = 0.0
ATTENTION_DECODE_BATCHING_OVERHEAD_FRACTION = 0.1
NEGLIGIBLE_S = 1e-12           # "costs nothing" in a table that only holds positive times
COLUMNS = ["op", "key", "x", "y", "z", "time_s", "p10_s", "p90_s", "reps", "variant", "kernels",
           "min_s", "max_s", "std_s"]


@dataclass(frozen=True, slots=True)
class Profiles:
    """The raw Vidur CSVs (unfiltered) and their sha256 digests."""

    mlp: pd.DataFrame
    attention: pd.DataFrame
    all_reduce: pd.DataFrame
    digests: dict


def read_profiles(data_dir: str | Path) -> Profiles:
    """Read ``compute/{mlp,attention}.csv.xz`` and ``network/all_reduce.csv.xz`` under ``data_dir``."""
    data_dir = Path(data_dir)
    frames, digests = {}, {}
    for name, rel in SOURCE_FILES.items():
        path = data_dir / rel
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (expected Vidur's profiling layout: "
                                    f"{', '.join(SOURCE_FILES.values())})")
        frames[name] = pd.read_csv(path)
        digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return Profiles(frames["mlp"], frames["attention"], frames["all_reduce"], digests)


def _need(frame: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)}")


def _rows(frame: pd.DataFrame, op: str, key: str, x, y, z, stats: str, variant: str, reps: int) -> pd.DataFrame:
    """Grid rows from one Vidur timer (``time_stats.<stats>.*`` in ms), duplicates merged by median."""
    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float), "z": np.asarray(z, float),
                       "time_s": frame[f"time_stats.{stats}.median"].to_numpy(float) * MS,
                       "min_s": frame[f"time_stats.{stats}.min"].to_numpy(float) * MS,
                       "max_s": frame[f"time_stats.{stats}.max"].to_numpy(float) * MS,
                       "std_s": frame[f"time_stats.{stats}.std"].to_numpy(float) * MS})
    df = df.dropna(subset=["time_s"])
    df = df.groupby(["x", "y", "z"], as_index=False).median()
    df.insert(0, "key", key)
    df.insert(0, "op", op)
    df["p10_s"] = np.nan     # Vidur keeps min/max/mean/median/std per point, no percentiles
    df["p90_s"] = np.nan
    df["reps"] = reps
    df["variant"] = variant
    df["kernels"] = np.nan
    return df


def select_rows(profiles: Profiles, model: ModelSpec, tp: int, block_size: int = 16,
                notes: list[str] | None = None) -> pd.DataFrame:
    """The table's grid points for ``model`` at tensor-parallel ``tp`` (see the module table)."""
    notes = notes if notes is not None else []
    ops = TransformerOps(model, tp=tp)
    key = {op.name: (op.table_op, op.key) for op in ops.ops}
    out: list[pd.DataFrame] = []

    mlp = profiles.mlp
    _need(mlp, ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens", "num_tensor_parallel_workers"],
          "mlp.csv")
    sel = mlp[(mlp["n_head"] == model.num_heads) & (mlp["n_kv_head"] == model.num_kv_heads)
              & (mlp["n_embd"] == model.hidden_size) & (mlp["n_expanded_embd"] == model.ffn_size)
              & (mlp["num_tensor_parallel_workers"] == tp)]
    if "use_gated_mlp" in sel.columns:
        sel = sel[sel["use_gated_mlp"].astype(str).str.lower() == "true"]
    if sel.empty:
        raise ValueError(f"mlp.csv: no rows for {model.name} (heads {model.num_heads}/{model.num_kv_heads}, "
                         f"hidden {model.hidden_size}, ffn {model.ffn_size}) at tensor-parallel {tp}")
    vocab = sorted(int(v) for v in sel["vocab_size"].unique()) if "vocab_size" in sel.columns else []
    if vocab and vocab != [model.vocab_size]:
        notes.append(f"embed: Vidur profiled a vocabulary of {', '.join(map(str, vocab))} rows "
                     f"(its Llama-2 config), the model preset has {model.vocab_size}; the gather's time "
                     "does not depend on it")
    tokens = sel["num_tokens"].to_numpy(float)
    zeros = np.zeros(len(sel))
    for vop, tname in MLP_OPS.items():
        if f"time_stats.{vop}.median" not in sel.columns:
            notes.append(f"{vop}: not in mlp.csv; {tname} left to the fallback")
            continue
        op, k = key[tname]
        out.append(_rows(sel, op, k, tokens, zeros, zeros, vop, f"vidur-{VIDUR_VERSION}:mlp.csv:{vop}", 20))
    norms = [n for n in NORM_OPS if f"time_stats.{n}.median" in sel.columns]
    if norms:
        # one rms_norm key prices both per-layer norms: their mean keeps Vidur's per-layer sum
        both = pd.concat([_rows(sel, *key["attn_norm"], tokens, zeros, zeros, n, "", 20) for n in norms])
        norm = both.groupby(["op", "key", "x", "y", "z"], as_index=False)[
            ["time_s", "min_s", "max_s", "std_s"]].mean()
        norm["p10_s"], norm["p90_s"], norm["reps"] = np.nan, np.nan, 20 * len(norms)
        norm["variant"] = f"vidur-{VIDUR_VERSION}:mlp.csv:mean({','.join(norms)})"
        norm["kernels"] = np.nan
        out.append(norm)

    att = profiles.attention
    _need(att, ["n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "batch_size",
                "prefill_chunk_size", "kv_cache_size", "is_prefill"], "attention.csv")
    sel = att[(att["n_embd"] == model.hidden_size) & (att["n_q_head"] == model.num_heads)
              & (att["n_kv_head"] == model.num_kv_heads) & (att["block_size"] == block_size)
              & (att["num_tensor_parallel_workers"] == tp)]
    if sel.empty:
        raise ValueError(f"attention.csv: no rows for {model.name} at tensor-parallel {tp}, block size {block_size}")
    prefill = sel[sel["is_prefill"].astype(str).str.lower() == "true"]
    decode = sel[sel["is_prefill"].astype(str).str.lower() != "true"]
    backend = str(sel["attention_backend"].iloc[0]) if "attention_backend" in sel.columns else "?"
    op, k = key["attn_prefill"]
    out.append(_rows(prefill, op, k, prefill["prefill_chunk_size"], prefill["kv_cache_size"], prefill["batch_size"],
                     "attn_prefill", f"vidur-{VIDUR_VERSION}:attention.csv:{backend}", 5))
    op, k = key["attn_decode"]
    out.append(_rows(decode, op, k, decode["batch_size"], decode["kv_cache_size"] + 1, np.zeros(len(decode)),
                     "attn_decode", f"vidur-{VIDUR_VERSION}:attention.csv:{backend}", 5))
    if "time_stats.attn_kv_cache_save.median" not in att.columns:
        notes.append("kv_write: attention.csv has no attn_kv_cache_save timer (Vidur fills it with 0 and "
                     "leaves it out of its step sum); left to the fallback")

    if tp > 1:
        ar = profiles.all_reduce
        _need(ar, ["num_workers", "devices_per_node", "collective", "size"], "all_reduce.csv")
        sel = ar[(ar["num_workers"] == tp) & (ar["devices_per_node"] == tp) & (ar["collective"] == "all_reduce")]
        if sel.empty:
            raise ValueError(f"all_reduce.csv: no rows for {tp} workers on one node")
        op, k = key["attn_allreduce"]
        zeros = np.zeros(len(sel))
        out.append(_rows(sel, op, k, sel["size"], zeros, zeros, "all_reduce",
                         f"vidur-{VIDUR_VERSION}:all_reduce.csv:{tp}gpu-1node", 0))
    table = pd.concat(out, ignore_index=True)[COLUMNS]
    return table.sort_values(["op", "key", "z", "y", "x"], kind="stable").reset_index(drop=True)


def fit_tails(table: pd.DataFrame) -> dict:
    """Roofline-shaped tail fits per (op, key), as ``calibration.fit`` makes them."""
    fits: dict = {}
    for (op, key), g in table.groupby(["op", "key"], sort=True):
        x, t = g["x"].to_numpy(float), g["time_s"].to_numpy(float)
        if op == "attn_decode":
            a, b = tail_fit(x * g["y"].to_numpy(float), t)
            entry = {"overhead_s": a, "per_x_s": 0.0, "per_xy_s": b}
            if b > 0:
                k = parse_key(key)
                entry["kv_bytes_per_s"] = 2.0 * int(k.get("kvh", 1)) * int(k.get("d", 128)) * 2.0 / b
        elif op == "attn_prefill":
            one = g[g["z"] <= 1]
            q, c = one["x"].to_numpy(float), one["y"].to_numpy(float)
            a, b = tail_fit(q * (c + q / 2), one["time_s"].to_numpy(float))
            entry = {"overhead_s": a, "per_x_s": 0.0, "per_work_s": b}
        else:
            a, b = tail_fit(x, t)
            entry = {"overhead_s": a, "per_x_s": b}
        fits.setdefault(op, {})[key] = entry
    return fits


def apply_vidur_conventions(table: pd.DataFrame, ops: TransformerOps, notes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Fold Vidur 0.0.26's predictor conventions into the grid (see the module docstring); returns the
    new grid and the ``launch`` section (all zero)."""
    t = table.copy()
    times = ["time_s", "min_s", "max_s"]
    key = {op.name: (op.table_op, op.key) for op in ops.ops}
    add = (t["op"] == key["attn_residual"][0]) & (t["key"] == key["attn_residual"][1])
    t.loc[add, times] *= 0.5
    notes.append("vidur-conventions: add halved (Vidur times one residual add per layer and charges one; "
                 "tiersim runs attn_residual and ffn_residual)")
    if ops.tp > 1:
        extra = (NCCL_CPU_LAUNCH_OVERHEAD_MS + NCCL_CPU_SKEW_OVERHEAD_PER_DEVICE_MS * ops.tp ** 1.25) * MS
        ar = t["op"] == "allreduce"
        t.loc[ar, times] += extra
        notes.append(f"vidur-conventions: every all-reduce + {extra * 1e3:g} ms (nccl_cpu_launch_overhead_ms "
                     f"+ nccl_cpu_skew_overhead_per_device_ms * tp^1.25)")
    if ops.model.num_heads > ops.model.num_kv_heads:
        dec = (t["op"] == "attn_decode") & (t["x"] > 1)
        t.loc[dec, times] *= 1.0 + ATTENTION_DECODE_BATCHING_OVERHEAD_FRACTION
        notes.append(f"vidur-conventions: decode attention of more than one sequence x "
                     f"{1 + ATTENTION_DECODE_BATCHING_OVERHEAD_FRACTION:g} "
                     "(attention_decode_batching_overhead_fraction, GQA models)")
    # ops Vidur does not count: the embedding (profiled but not summed), KV write, LM head, sampling
    zero = ["embed", "kv_write", "lm_head", "sample"]
    t = t[~t.set_index(["op", "key"]).index.isin([key[n] for n in zero])]
    rows = []
    for name in zero:
        op, k = key[name]
        for x in (1.0, 65536.0):
            rows.append({"op": op, "key": k, "x": x, "y": 0.0, "z": 0.0, "time_s": NEGLIGIBLE_S, "p10_s": np.nan,
                         "p90_s": np.nan, "reps": 0, "variant": "vidur-conventions:not-counted",
                         "kernels": np.nan, "min_s": NEGLIGIBLE_S, "max_s": NEGLIGIBLE_S, "std_s": 0.0})
    notes.append(f"vidur-conventions: {', '.join(zero)} cost {NEGLIGIBLE_S:g} s per call (Vidur's step time is "
                 "its per-layer sum times the layers; the KV-cache save is left out of that sum)")
    notes.append("vidur-conventions: final_norm shares the rms_norm key of the per-layer norms, so it is still "
                 "priced (one norm over the sampled rows per step, a few microseconds; Vidur counts none)")
    notes.append("vidur-conventions, not expressible in a table: Vidur prices each op from a random forest "
                 "trained on these points (tiersim interpolates them); it rounds the step's token count up "
                 "to a multiple of 8, the decode batch's mean context up to a multiple of 64 (and counts the "
                 "new token in it), and looks prefill attention up at kv_cache_size = ceil64(cached + chunk) "
                 "and prefill_chunk_size = ceil32(chunk) instead of kv_cache_size = cached")
    t = pd.concat([t, pd.DataFrame(rows)], ignore_index=True)[COLUMNS]
    launch = {"dispatch_s": 0.0, "graph_launch_s": 0.0, "graph_kernel_s": 0.0, "sync_s": 0.0, "switch_s": 0.0}
    notes.append("vidur-conventions: launch constants all 0 (Vidur adds no launch, host or synchronisation "
                 "time to an iteration)")
    return t.sort_values(["op", "key", "z", "y", "x"], kind="stable").reset_index(drop=True), launch


PREDICTED_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "attn_rope",
                 "input_layernorm", "post_attention_layernorm", "add", "all_reduce", "attn_prefill", "attn_decode")


def find_predictions(cache_dir: str | Path) -> dict[str, Path]:
    """The newest ``predictions/<hash>/<op>.csv.xz`` per op in a Vidur predictor cache."""
    found: dict[str, Path] = {}
    for p in sorted(Path(cache_dir).glob("predictions/*/*.csv.xz"), key=lambda p: p.stat().st_mtime):
        found[p.name.split(".")[0]] = p
    missing = [op for op in PREDICTED_OPS if op not in found]
    if missing:
        raise FileNotFoundError(f"{cache_dir}: no cached Vidur predictions for {', '.join(missing)} (run Vidur "
                                "once with this cache to train and store them)")
    return {op: found[op] for op in PREDICTED_OPS}


def predictions_rows(files: dict[str, Path], ops: TransformerOps, notes: list[str], *, max_tokens: int = 4096,
                     granularity: int = 64, max_batch: int = 128) -> pd.DataFrame:
    """Grid points that reproduce Vidur's predictor (its random-forest outputs, cached by Vidur, and its
    lookup rules) at integer coordinates: per-token ops at every token count t = 1..max_tokens with the
    value at ceil8(t); decode attention piecewise constant in the batch's mean context over Vidur's
    64-token buckets; prefill attention at kv = ceil64(cached + chunk), chunk = ceil32(chunk), exact on
    cached-token rows that are multiples of 64 and interpolated between them. Conventions as
    :func:`apply_vidur_conventions` (the overheads are folded in; ops Vidur does not count cost ~0)."""
    pred = {}
    for op, path in files.items():
        f = pd.read_csv(path)
        y = f.pop("prediction").to_numpy(float)
        pred[op] = {tuple(int(v) for v in row): t for row, t in zip(f.to_numpy(), y)}
    key = {op.name: (op.table_op, op.key) for op in ops.ops}
    t = np.arange(1, max_tokens + 1)
    r8 = (t + 7) // 8 * 8

    def per_token(name: str, ms: np.ndarray, x=t) -> pd.DataFrame:
        op, k = key[name]
        return pd.DataFrame({"op": op, "key": k, "x": np.asarray(x, float), "y": 0.0, "z": 0.0, "time_s": ms * MS})

    def look(op: str, keys) -> np.ndarray:
        return np.array([pred[op][(int(k),)] for k in keys])

    out = [per_token(MLP_OPS[v], look(v, r8)) for v in MLP_OPS if v not in ("emb", "add")]
    out.append(per_token("attn_residual", 0.5 * look("add", r8)))
    out.append(per_token("attn_norm", 0.5 * (look("input_layernorm", r8) + look("post_attention_layernorm", r8))))
    if ops.tp > 1:
        extra = NCCL_CPU_LAUNCH_OVERHEAD_MS + NCCL_CPU_SKEW_OVERHEAD_PER_DEVICE_MS * ops.tp ** 1.25
        out.append(per_token("attn_allreduce", look("all_reduce", r8) + extra,
                             x=t * ops.model.hidden_size * ops.model.bytes_per_weight))
    # decode: Vidur keys on int(mean(cached + 2)) rounded up to 64 (its kv counts the token being decoded
    # and the one it will emit); in tiersim's terms (mean attended keys m) bucket K covers m in [K-64, K)
    rows = []
    over = 1.0 + (ATTENTION_DECODE_BATCHING_OVERHEAD_FRACTION if ops.model.num_heads > ops.model.num_kv_heads else 0)
    for b in range(1, max_batch + 1):
        f = over if b > 1 else 1.0
        for kk in range(granularity, max_tokens + 1, granularity):
            v = pred["attn_decode"][(b, kk)] * f * MS
            rows += [(b, max(kk - granularity, 1), v), (b, kk - 1e-3, v)]
    d = pd.DataFrame(rows, columns=["x", "y", "time_s"])
    out.append(d.assign(op=key["attn_decode"][0], key=key["attn_decode"][1], z=0.0))
    rows = []
    for c in range(0, max_tokens, granularity):
        for k in range(1, max_tokens // 32 + 1):
            q_hi = 32 * k
            kv = -(-(c + q_hi) // granularity) * granularity
            if kv > max_tokens:
                break
            v = pred["attn_prefill"][(kv, q_hi)] * MS
            rows += [(q_hi - 31, c, v), (q_hi, c, v)]
    p = pd.DataFrame(rows, columns=["x", "y", "time_s"])
    out.append(p.assign(op=key["attn_prefill"][0], key=key["attn_prefill"][1], z=1.0))
    for name in ("embed", "kv_write", "lm_head", "sample"):
        op, k = key[name]
        out.append(pd.DataFrame({"op": op, "key": k, "x": [1.0, 65536.0], "y": 0.0, "z": 0.0,
                                 "time_s": NEGLIGIBLE_S}))
    table = pd.concat(out, ignore_index=True)
    # no "kernels" column: unknown anyway, and without it the backend skips a per-token-count kernel lookup
    # over these dense grids
    table = table.assign(p10_s=np.nan, p90_s=np.nan, reps=0, variant=f"vidur-{VIDUR_VERSION}:predictions",
                         min_s=np.nan, max_s=np.nan, std_s=np.nan)[[c for c in COLUMNS if c != "kernels"]]
    notes += [
        "source: Vidur's cached random-forest predictions (predictions/<hash>/*.csv.xz in its predictor cache), "
        "not the profiles; Vidur's lookup rules folded into the grid",
        "per-token ops and all-reduce: a point at every token count t (all-reduce: t x hidden x 2 bytes) holding "
        "Vidur's value at ceil8(t); add halved (Vidur charges one per layer), rms_norm the mean of its two norms, "
        f"all-reduce + {NCCL_CPU_LAUNCH_OVERHEAD_MS} ms",
        f"attn_decode: piecewise constant over Vidur's {granularity}-token context buckets (x {over:g} for batches "
        "above 1); exact for integer batch sizes",
        "attn_prefill: Vidur's value at kv = ceil64(cached + chunk), chunk = ceil32(chunk); exact on rows of "
        "cached tokens that are multiples of 64, linear between them (Vidur jumps where cached + chunk crosses "
        "a multiple of 64)",
        "embed, kv_write, lm_head, sample cost 1 ps (not counted by Vidur); final_norm shares the rms_norm key "
        "and is still priced (a few microseconds per step)",
    ]
    return table.sort_values(["op", "key", "z", "y", "x"], kind="stable").reset_index(drop=True)


def _created_utc() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return when.replace(microsecond=0).isoformat()


def build_table(data_dir: str | Path | None, out_dir: str | Path, *, model: str = "llama-2-70b", tp: int = 2,
                block_size: int = 16, gpu_preset: str = "a100-80gb", vidur_conventions: bool = False,
                predictions_cache: str | Path | None = None, command_line: str | None = None) -> Path:
    """Write ``out_dir/ops.parquet`` + ``table.json`` from Vidur's profiles under ``data_dir`` or, with
    ``predictions_cache``, from the predictions Vidur cached there (see :func:`predictions_rows`)."""
    spec = load_model(model)
    ops = TransformerOps(spec, tp=tp)
    notes: list[str] = []
    launch: dict = {}
    if predictions_cache is not None:
        files = find_predictions(predictions_cache)
        table = predictions_rows(files, ops, notes)
        digests = {f"predictions/{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in files.values()}
        launch = {"dispatch_s": 0.0, "graph_launch_s": 0.0, "graph_kernel_s": 0.0, "sync_s": 0.0, "switch_s": 0.0}
        notes.append("launch constants all 0 (Vidur adds no launch, host or synchronisation time)")
        source = f"--from-predictions {predictions_cache}"
    else:
        notes.append("times: Vidur's time_stats.<op>.median (milliseconds) x 1e-3; min_s/max_s/std_s carry its "
                     "min/max/std; p10_s/p90_s are empty (Vidur records no percentiles)")
        profiles = read_profiles(data_dir)
        digests = profiles.digests
        table = select_rows(profiles, spec, tp, block_size, notes)
        notes.append("attn_decode: y = kv_cache_size + 1 (the profile's cached tokens plus the new token's key)")
        notes.append("attn_prefill: x = prefill_chunk_size, y = kv_cache_size (tokens cached before the chunk), "
                     "z = batch_size (always 1: several chunks in one step are priced as the sum of single "
                     "ones, as Vidur does)")
        notes.append("allreduce: x = size in bytes (fp16 elements x 2; Vidur turns it into tokens as size / "
                     "hidden / 2); rows with num_workers = devices_per_node = tensor_parallel_size")
        notes.append("rms_norm: mean of input_layernorm and post_attention_layernorm at each num_tokens")
        notes.append("kernels per call are not known from the profiles (1 assumed); dtype: Vidur profiled "
                     "fp16, the keys say bf16 (same tensor-core rate on A100)")
        if vidur_conventions:
            table, launch = apply_vidur_conventions(table, ops, notes)
        else:
            notes.append("launch constants not profiled by Vidur: the roofline defaults apply")
        source = f"--data {data_dir}" + (" --vidur-conventions" if vidur_conventions else "")
    have = set(map(tuple, table[["op", "key"]].drop_duplicates().to_numpy()))
    missing = [f"{op.name} ({op.table_op} {op.key})" for op in ops.ops
               if (op.table_op, op.key) not in have and not (op.table_op == "allreduce" and tp == 1)]
    if missing:
        notes.append("not profiled by Vidur, left out (set costs.fallback = \"roofline\" to price them): "
                     + "; ".join(dict.fromkeys(missing)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": TABLE_FORMAT,
        "gpu": {"name": "NVIDIA A100-SXM4-80GB (Vidur profile, DGX A100)", "preset": gpu_preset,
                "fingerprint": "", "sm_count": 108, "compute_capability": "8.0", "simulated": False},
        "host": {},
        "libraries": {"vidur": VIDUR_VERSION},
        "created_utc": _created_utc(),
        "source": command_line or f"python -m calibration.vidur_import {source} --out {out_dir}",
        "code_version": "",
        "quick": False,
        "fits": fit_tails(table),
        "kernels": {},
        "launch": launch,
        "links": {},
        "memory": {},
        "cross_checks": {},
        "raw_files": dict(sorted(digests.items())),
        "fit_notes": notes,
        "vidur": {"version": VIDUR_VERSION, "license": "MIT (LICENSES/MIT-microsoft-vidur.txt)",
                  "model": model, "tensor_parallel_size": tp, "block_size": block_size,
                  "source": "predictions" if predictions_cache is not None else "profiles",
                  "conventions": bool(vidur_conventions or predictions_cache is not None),
                  "mapping": {**MLP_OPS, "add": "attn_residual, ffn_residual",
                              **{n: "attn_norm, ffn_norm (their mean)" for n in NORM_OPS},
                              "attn_prefill": "attn_prefill", "attn_decode": "attn_decode",
                              "all_reduce": "attn_allreduce, ffn_allreduce"}},
    }
    tmp = out / ".ops.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(out / "ops.parquet")
    (out / "table.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.vidur_import",
                                description="Convert Vidur's profiling CSVs into a tiersim cost table.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="Vidur data directory (compute/, network/)")
    src.add_argument("--from-predictions", metavar="CACHE_DIR",
                     help="build from the predictions a Vidur run cached in its predictor cache instead")
    p.add_argument("--out", required=True, help="table directory to write")
    p.add_argument("--model", default="llama-2-70b", help="tiersim model preset (default llama-2-70b)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--block-size", type=int, default=16, help="the attention profile's KV block size")
    p.add_argument("--gpu-preset", default="a100-80gb", help="hardware.gpu the table is for")
    p.add_argument("--vidur-conventions", action="store_true",
                   help="price steps the way Vidur 0.0.26's predictor does (see the module docstring)")
    args = p.parse_args(argv)
    try:
        out = build_table(args.data, args.out, model=args.model, tp=args.tp, block_size=args.block_size,
                          gpu_preset=args.gpu_preset, vidur_conventions=args.vidur_conventions,
                          predictions_cache=args.from_predictions,
                          command_line="python -m calibration.vidur_import " + " ".join(
                              argv if argv is not None else sys.argv[1:]))
    except (FileNotFoundError, ValueError) as exc:
        print(f"vidur_import: error: {exc}", file=sys.stderr)
        return 2
    frame = pd.read_parquet(out / "ops.parquet")
    print(f"wrote {out}: {len(frame):,} grid points, "
          + ", ".join(f"{op} {n}" for op, n in frame.groupby("op").size().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
