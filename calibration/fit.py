"""Raw calibration measurements → the cost table that ``sim.costs.table`` reads.

Inputs: ``DIR/raw/*.parquet`` (schema ``calibration.raw.RAW_COLUMNS``) and ``DIR/metadata.json`` from
the suite. Outputs, in the same directory: ``ops.parquet`` (the grid points each op is interpolated
on) and ``table.json`` (GPU identity, provenance, tail fits, kernels per op, launch constants, link
fits, cross-checks). Every choice is recorded in ``table.json["fit_notes"]``.

Tail fits are roofline-shaped: ``time = overhead + x · per_x`` over the largest points of a grid,
i.e. a fixed cost plus bytes over bandwidth or FLOPs over rate — whichever bound those points. The
table backend continues each curve with that slope beyond its grid, and flags every such lookup.
"""
from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from sim.costs.table import TABLE_FORMAT

# Which variant prices an op when several measured it. GEMMs: the framework path (torch → cuBLAS),
# which is what engines and the reference model run; CuPy's cuBLAS rows are kept as a cross-check.
# Decode attention: PyTorch SDPA (FlashAttention) prices it; the Numba paged kernel is a bandwidth
# cross-check of the same access pattern. All-reduce: the collective replayed inside a CUDA graph (how
# a CUDA-graph engine runs it), else eager.
PREFERRED_VARIANTS = {"gemm": ("torch", "cupy-cublas"), "attn_decode": ("torch-sdpa", "paged_splitk"),
                      "attn_prefill": ("torch-sdpa",), "allreduce": ("nccl-graph", "nccl")}
COST_OPS = ("gemm", "attn_prefill", "attn_decode", "rms_norm", "rope", "kv_write", "act", "add",
            "embed", "sample", "allreduce")
GPU_PRESETS = (("H100", "h100-sxm-80gb"), ("H200", "h200"), ("A100", "a100-80gb"))


def load_raw(directory: Path) -> pd.DataFrame:
    files = sorted((directory / "raw").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory / 'raw'}: no raw measurement files")
    frames = [pd.read_parquet(f) for f in files]
    return pd.concat(frames, ignore_index=True)


def _extra(s: str) -> dict:
    try:
        return json.loads(s) if s else {}
    except json.JSONDecodeError:
        return {}


def tail_fit(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least-squares ``t = a + b x`` (a, b >= 0) over the upper half of the points by x."""
    order = np.argsort(x)
    x, t = x[order].astype(float), t[order].astype(float)
    if x.size == 1:
        return float(t[0]), 0.0
    sel = x >= np.median(x)
    xs, ts = x[sel], t[sel]
    if xs.size < 2 or np.ptp(xs) == 0:
        xs, ts = x[-2:], t[-2:]
    if np.ptp(xs) == 0:
        return float(ts.mean()), 0.0
    b, a = np.polyfit(xs, ts, 1)
    if b < 0:
        b = 0.0
        a = float(ts.mean())
    if a < 0:
        b = float(np.sum(xs * ts) / np.sum(xs * xs))
        a = 0.0
    return float(a), float(b)


def _choose_variant(rows: pd.DataFrame, op: str, notes: list[str]) -> pd.DataFrame:
    variants = list(dict.fromkeys(rows["variant"]))
    if len(variants) <= 1:
        return rows
    for v in PREFERRED_VARIANTS.get(op, ()):
        if v in variants:
            notes.append(f"{op}: priced from variant {v!r} (also measured: "
                         f"{', '.join(x for x in variants if x != v)})")
            return rows[rows["variant"] == v]
    v = variants[0]
    notes.append(f"{op}: priced from variant {v!r} of {variants}")
    return rows[rows["variant"] == v]


def fit_ops(raw: pd.DataFrame, notes: list[str]) -> tuple[pd.DataFrame, dict, dict]:
    """Grid points and tail fits per (op, key), and kernels per op call."""
    priced = raw[raw["op"].isin(COST_OPS) & (raw["part"] != "validation")]
    grids, fits, kernels = [], {}, {}
    for op, rows in priced.groupby("op", sort=True):
        if op == "allreduce":   # per TP size: a size whose graph capture failed keeps its eager rows
            rows = pd.concat([_choose_variant(g, op, notes) for _, g in rows.groupby("key", sort=True)])
        else:
            rows = _choose_variant(rows, op, notes)
        ks = [int(_extra(e).get("kernels", 0) or 0) for e in rows["extra"]]
        ks = [k for k in ks if k > 0]
        if ks:
            kernels[op] = int(np.median(ks))
        for key, g in rows.groupby("key", sort=True):
            g = g.assign(kernels=[float(_extra(e).get("kernels") or np.nan) for e in g["extra"]])
            agg = (g.groupby(["x", "y", "z"], as_index=False)
                   .agg(time_s=("median_s", "median"), p10_s=("p10_s", "median"), p90_s=("p90_s", "median"),
                        reps=("reps", "sum"), variant=("variant", "first"), kernels=("kernels", "median")))
            agg.insert(0, "key", key)
            agg.insert(0, "op", op)
            grids.append(agg)
            x = agg["x"].to_numpy(float)
            t = agg["time_s"].to_numpy(float)
            entry: dict = {}
            if op == "attn_decode":
                xy = x * agg["y"].to_numpy(float)
                a, b = tail_fit(xy, t)
                entry = {"overhead_s": a, "per_x_s": 0.0, "per_xy_s": b}
                if b > 0:
                    entry["kv_bytes_per_s"] = _kv_bytes_per_token(key) / b
            elif op == "attn_prefill":
                one = agg[agg["z"] <= 1]
                a, b = tail_fit((one["x"] * (one["y"] + one["x"] / 2)).to_numpy(float), one["time_s"].to_numpy(float))
                entry = {"overhead_s": a, "per_x_s": 0.0, "per_work_s": b}
            else:
                a, b = tail_fit(x, t)
                entry = {"overhead_s": a, "per_x_s": b}
                flops = g["flops"].to_numpy(float) / np.maximum(g["x"].to_numpy(float), 1)
                nbytes = g["bytes"].to_numpy(float) / np.maximum(g["x"].to_numpy(float), 1)
                if b > 0 and flops.size:
                    f, by = float(np.median(flops)), float(np.median(nbytes))
                    entry["flops_per_s"] = f / b if f else None
                    entry["bytes_per_s"] = by / b if by else None
                    entry["bound"] = "compute" if f and (by == 0 or (f / b) / 1e12 > (by / b) / 1e9 * 0.1) else "memory"
            fits.setdefault(op, {})[key] = entry
    table = pd.concat(grids, ignore_index=True) if grids else pd.DataFrame(
        columns=["op", "key", "x", "y", "z", "time_s", "p10_s", "p90_s", "reps", "variant"])
    kernels.setdefault("gemm", 1)
    return table, fits, kernels


def _kv_bytes_per_token(key: str) -> float:
    from sim.costs.model import parse_key

    k = parse_key(key)
    return 2.0 * int(k.get("kvh", 1)) * int(k.get("d", 128)) * 2.0


def fit_launch(raw: pd.DataFrame, notes: list[str]) -> dict:
    """Launch constants (seconds) from the torch and Numba launch parts."""
    out: dict = {}
    tl = raw[raw["part"] == "torch_launch"]
    eager = tl[tl["variant"] == "eager_dispatch"]
    if len(eager):
        out["dispatch_s"] = float(eager["median_s"].median())
        notes.append("dispatch_s: host time per eager torch op launch (median of the tiny-op loop)")
    graph = tl[tl["variant"] == "graph_replay"]
    if len(graph) >= 2:
        a, b = np.polyfit(graph["x"].to_numpy(float), graph["median_s"].to_numpy(float), 1)[::-1]
        out["graph_kernel_s"] = max(float(b), 0.0)
        out["graph_launch_s"] = max(float(a), 0.0)
        notes.append("graph_kernel_s / graph_launch_s: slope / intercept of graph replay time vs kernels")
    sync = tl[tl["variant"] == "sync"]
    if len(sync):
        out["sync_s"] = float(sync["median_s"].median())
    mixed = tl[tl["variant"] == "graph_chain_mixed"]
    if len(mixed):
        out["switch_s"] = max(float(np.median([_extra(e).get("switch_s", 0.0) for e in mixed["extra"]])), 0.0)
        notes.append("switch_s: per-kernel time of small layer ops in a graph after a different kernel "
                     "minus after themselves (what isolated op timings miss inside a model)")
    calls = tl[tl["variant"] == "eager_call_host"]
    if len(calls):
        per_op: dict[str, list[float]] = {}
        for e, t, y in zip(calls["extra"], calls["median_s"], calls["y"]):
            op = _extra(e).get("table_op")
            if op and not (op == "attn_prefill" and y > 0):    # the prefill call without a cached prefix
                per_op.setdefault(op, []).append(float(t))
        out["op_host_s"] = {op: float(np.median(v)) for op, v in sorted(per_op.items())}
        notes.append("op_host_s: host seconds per eager call of each op at tiny sizes")
    eng = tl[tl["variant"] == "engine_host_step"]
    eng = eng[np.array([_extra(e).get("phase") == "decode" for e in eng["extra"]], dtype=bool)]
    if eng["x"].nunique() >= 2:
        b, a = np.polyfit(eng["x"].to_numpy(float), eng["median_s"].to_numpy(float), 1)
        out["engine_layer_host_s"] = max(float(b), 0.0)
        out["engine_step_host_s"] = max(float(a), 0.0)
        bm, am = np.polyfit(eng["x"].to_numpy(float), eng["min_s"].to_numpy(float), 1)
        notes.append(f"engine_layer_host_s / engine_step_host_s: slope / intercept of the reference engine's "
                     f"median eager decode step time vs layers at tiny shapes (from the fastest steps: "
                     f"{bm * 1e6:.1f} / {am * 1e6:.1f} us)")
    pk = raw[raw["part"] == "persistent"]
    door = pk[pk["variant"] == "doorbell_rtt"]
    if len(door):
        out["doorbell_s"] = float(door["median_s"].median())
        notes.append("doorbell_s: host write → persistent kernel sees it → completion seen by host")
    item = pk[pk["variant"] == "queued_dispatch"]
    if len(item):
        # x = items per sample and median_s is per item: take the per-item cost of the longest queues
        out["persistent_item_s"] = float(item.loc[item["x"] == item["x"].max(), "median_s"].median())
        notes.append("persistent_item_s: per-item dispatch time with the longest queue measured")
    nl = raw[(raw["part"] == "launch") & (raw["variant"] == "roundtrip")]
    if len(nl) and "sync_s" not in out:
        out["sync_s"] = float(nl["median_s"].median())
        notes.append("sync_s: Numba empty-kernel launch+sync round trip (no torch measurement)")
    return out


def fit_links(raw: pd.DataFrame, notes: list[str]) -> dict:
    """(latency, bandwidth) per link from transfers of many sizes: t = latency + bytes / bandwidth."""
    links = {}
    pc = raw[raw["part"] == "pcie"]
    for variant, name in (("pinned_h2d", "pcie_h2d"), ("pinned_d2h", "pcie_d2h")):
        g = pc[pc["variant"] == variant]
        if len(g) >= 3:
            a, b = tail_fit(g["x"].to_numpy(float), g["median_s"].to_numpy(float))
            small = float(g.loc[g["x"].idxmin(), "median_s"])
            if b > 0:
                links[name] = {"latency_s": min(a, small) if a > 0 else small, "bandwidth_bytes_per_s": 1.0 / b}
    st = raw[raw["part"] == "storage"]
    for variant, name in (("direct_seq", "nvme_read"), ("buffered_seq", "nvme_read")):
        g = st[st["variant"] == variant]
        if len(g) >= 3 and name not in links:
            a, b = tail_fit(g["x"].to_numpy(float), g["median_s"].to_numpy(float))
            if b > 0:
                links[name] = {"latency_s": a, "bandwidth_bytes_per_s": 1.0 / b, "variant": variant}
    if links:
        notes.append("links: t = latency + bytes / bandwidth fitted over the larger transfers")
    return links


def fit_memory(raw: pd.DataFrame) -> dict:
    hb = raw[raw["part"] == "hbm_stream"]
    out = {}
    for variant in ("copy", "triad", "scale"):
        g = hb[(hb["variant"] == variant) & (hb["bytes"] > 0)]
        if len(g):
            bw = (g["bytes"] / g["median_s"]).max()
            out[f"hbm_{variant}_bytes_per_s"] = float(bw)
    return out


def _cross_checks(raw: pd.DataFrame) -> dict:
    """Agreement between independent measurements of the same quantity."""
    out = {}
    g = raw[raw["op"] == "gemm"]
    if set(g["variant"]) >= {"torch", "cupy-cublas"}:
        piv = g.pivot_table(index=["key", "x"], columns="variant", values="median_s", aggfunc="median").dropna()
        if len(piv):
            r = piv["cupy-cublas"] / piv["torch"]
            out["gemm_cupy_over_torch"] = {"median": float(r.median()), "p10": float(r.quantile(0.1)),
                                           "p90": float(r.quantile(0.9)), "points": int(len(r))}
    na = raw[raw["part"] == "decode_attention"]
    ta = raw[(raw["op"] == "attn_decode") & (raw["part"] != "decode_attention")]
    if len(na) and len(ta):
        nbw = (na["bytes"] / na["median_s"]).max()
        tbw = (ta["bytes"] / ta["median_s"]).max() if (ta["bytes"] > 0).any() else None
        out["decode_attention_peak_bytes_per_s"] = {"numba": float(nbw), "sdpa": float(tbw) if tbw else None}
    return out


def gpu_preset(name: str) -> str:
    for token, preset in GPU_PRESETS:
        if token in name.upper():
            return preset
    return ""


def fit_table(out_dir: str | Path) -> Path:
    """Fit ``out_dir/raw`` into ``out_dir/ops.parquet`` + ``out_dir/table.json``; returns out_dir."""
    directory = Path(out_dir)
    raw = load_raw(directory)
    meta_path = directory / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    notes: list[str] = []
    ops, fits, kernels = fit_ops(raw, notes)
    device = meta.get("device", {})
    gpu = device.get("gpu", {})
    name = str(gpu.get("name", ""))
    table = {
        "format": TABLE_FORMAT,
        "gpu": {"name": name, "preset": gpu_preset(name), "fingerprint": meta.get("fingerprint", ""),
                "sm_count": gpu.get("sm_count"), "compute_capability": gpu.get("compute_capability"),
                "simulated": bool(meta.get("simulated", gpu.get("simulated", False)))},
        "host": device.get("host", {}),
        "libraries": device.get("libraries", {}),
        "created_utc": meta.get("created_utc") or datetime.now(UTC).isoformat(),
        "source": " ".join(meta["command_line"]) if isinstance(meta.get("command_line"), list)
        else meta.get("command_line", "tiersim calibrate"),
        "code_version": meta.get("code_version", ""),
        "quick": bool(meta.get("quick", False)),
        "fits": fits,
        "kernels": kernels,
        "launch": fit_launch(raw, notes),
        "links": fit_links(raw, notes),
        "memory": fit_memory(raw),
        "cross_checks": _cross_checks(raw),
        "raw_files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((directory / "raw").glob("*.parquet"))},
        "fit_notes": notes,
    }
    tmp = directory / ".ops.parquet.tmp"
    ops.to_parquet(tmp, index=False)
    tmp.replace(directory / "ops.parquet")
    (directory / "table.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return directory
