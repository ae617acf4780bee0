"""Measured cost tables and the table backend that prices steps from them.

A table is a directory written by ``tiersim calibrate`` (``calibration.fit``)::

    ops.parquet   one row per measured grid point: op, key, x, y, z, time_s, p10_s, p90_s, variant
    table.json    format, GPU fingerprint, provenance, per-(op, key) roofline-shaped tail fits,
                  kernels per op call, launch constants, link fits
    raw/          the raw measurements the table was fitted from

Inside a grid, times are interpolated; beyond it, the fitted ``overhead + x · per_x`` line (fixed
overhead plus bytes over bandwidth or FLOPs over rate, whichever bound the largest points) continues
the curve from the last grid point. Extrapolation is never silent: every lookup reports it, and the
backend counts extrapolated lookups per op for the run summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from policies.base import LaunchCosts
from sim.costs.backend import BackendBase
from sim.costs.model import StepShape, TransformerOps
from sim.costs.roofline import RooflineBackend
from sim.errors import CostTableError
from sim.specs import GPUSpec

TABLE_FORMAT = "tiersim-cost-table/1"
ELEMENTWISE = ("rms_norm", "rope", "kv_write", "act", "add", "embed", "sample", "allreduce")


def shipped_tables_dir() -> Path:
    spec = importlib.util.find_spec("calibration")
    if spec is None or not spec.submodule_search_locations:
        raise CostTableError("the calibration package (which holds the shipped tables) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tables"


def shipped_tables() -> list[str]:
    root = shipped_tables_dir()
    return sorted(p.name for p in root.iterdir() if (p / "table.json").exists()) if root.exists() else []


def resolve_table_dir(name_or_dir: str) -> Path:
    path = Path(name_or_dir)
    if (path / "table.json").exists():
        return path
    candidate = shipped_tables_dir() / name_or_dir
    if (candidate / "table.json").exists():
        return candidate
    if path.exists():
        raise CostTableError(f"{path}: not a cost table (no table.json); make one with "
                             f"`tiersim calibrate --out {path}`")
    raise CostTableError(f"costs.table: unknown cost table {name_or_dir!r} (shipped: "
                         f"{', '.join(shipped_tables()) or 'none'}; or a directory made by tiersim calibrate)")


@dataclass(frozen=True, slots=True)
class TailFit:
    """``time = overhead_s + per_x_s * x`` (per_y_s * x * y for 2-D grids) beyond the grid."""

    overhead_s: float
    per_x_s: float
    per_xy_s: float = 0.0


class CostTable:
    """A loaded table: grid points per (op, key), tail fits, constants and identity."""

    def __init__(self, directory: Path) -> None:
        import pandas as pd

        self.dir = directory
        meta_path, ops_path = directory / "table.json", directory / "ops.parquet"
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CostTableError(f"{meta_path}: cannot read ({exc})") from None
        if self.meta.get("format") != TABLE_FORMAT:
            raise CostTableError(f"{meta_path}: format {self.meta.get('format')!r}, expected {TABLE_FORMAT!r}")
        if not ops_path.exists():
            raise CostTableError(f"{ops_path}: missing (the table's grid points)")
        frame = pd.read_parquet(ops_path)
        missing = {"op", "key", "x", "y", "z", "time_s"} - set(frame.columns)
        if missing:
            raise CostTableError(f"{ops_path}: missing column(s) {', '.join(sorted(missing))}")
        bad = frame[~np.isfinite(frame["time_s"]) | (frame["time_s"] <= 0)]
        if len(bad):
            row = bad.index[0]
            raise CostTableError(f"{ops_path}: row {row}, field 'time_s': not a positive time "
                                 f"({bad['time_s'].iloc[0]!r})")
        self.frame = frame
        self.groups = {k: g.reset_index(drop=True) for k, g in frame.groupby(["op", "key"], sort=True)}
        digest = hashlib.sha256(meta_path.read_bytes() + ops_path.read_bytes()).hexdigest()
        gpu = self.meta.get("gpu", {})
        self.identity = {"backend": "table", "table": directory.name, "path": str(directory),
                         "sha256": digest, "gpu": gpu.get("name", ""), "gpu_fingerprint": gpu.get("fingerprint", ""),
                         "created_utc": self.meta.get("created_utc", ""), "source": self.meta.get("source", "")}

    def has(self, op: str, key: str) -> bool:
        return (op, key) in self.groups

    def points(self, op: str, key: str):
        return self.groups[(op, key)]

    def tail(self, op: str, key: str) -> TailFit | None:
        f = self.meta.get("fits", {}).get(op, {}).get(key)
        return TailFit(f["overhead_s"], f["per_x_s"], f.get("per_xy_s", 0.0)) if f else None

    def kernels(self, op: str, default: int = 1) -> int:
        return int(self.meta.get("kernels", {}).get(op, default))

    def launch(self, fallback: LaunchCosts) -> LaunchCosts:
        got = self.meta.get("launch", {})
        values = {f.name: float(got.get(f.name, getattr(fallback, f.name)))
                  for f in dataclasses.fields(LaunchCosts) if f.type in ("float", float)}
        return dataclasses.replace(fallback, **values)

    def link(self, name: str) -> tuple[float, float] | None:
        """(latency_s, bandwidth_bytes_per_s) of a measured link, e.g. 'pcie_h2d', or None."""
        got = self.meta.get("links", {}).get(name)
        return (float(got["latency_s"]), float(got["bandwidth_bytes_per_s"])) if got else None


class Curve1D:
    """time(x): piecewise-linear on the grid, clamped below, fitted line beyond (flagged); and the
    kernels one call launches at the nearest grid point (it can change with size: split-K GEMMs)."""

    __slots__ = ("xs", "ts", "slope", "ks")

    def __init__(self, xs: np.ndarray, ts: np.ndarray, tail: TailFit | None,
                 kernels: np.ndarray | None = None) -> None:
        order = np.argsort(xs, kind="stable")
        xs, ts = np.asarray(xs, float)[order], np.asarray(ts, float)[order]
        ux, inv = np.unique(xs, return_inverse=True)
        self.xs = ux
        self.ts = np.array([np.median(ts[inv == i]) for i in range(ux.size)])
        self.ks = None
        if kernels is not None:
            k = np.asarray(kernels, float)[order]
            self.ks = np.array([np.nanmedian(k[inv == i]) if np.isfinite(k[inv == i]).any() else np.nan
                                for i in range(ux.size)])
        if tail is not None:
            self.slope = max(tail.per_x_s, 0.0)
        elif ux.size >= 2:
            self.slope = max((self.ts[-1] - self.ts[-2]) / (ux[-1] - ux[-2]), 0.0)
        else:
            self.slope = 0.0

    def __call__(self, x: float) -> tuple[float, bool]:
        xs = self.xs
        if x > xs[-1]:
            return float(self.ts[-1] + self.slope * (x - xs[-1])), True
        return float(np.interp(x, xs, self.ts)), bool(x < xs[0])

    def kernels_at(self, x: float, default: int) -> int:
        if self.ks is None:
            return default
        i = int(np.argmin(np.abs(np.log(np.maximum(self.xs, 1e-9)) - np.log(max(x, 1e-9)))))
        k = self.ks[i]
        return int(round(k)) if np.isfinite(k) and k > 0 else default

    def many(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        x = np.asarray(x, float)
        out = np.interp(x, self.xs, self.ts)
        above = x > self.xs[-1]
        if above.any():
            out[above] = self.ts[-1] + self.slope * (x[above] - self.xs[-1])
        return out, int(above.sum() + (x < self.xs[0]).sum())


@numba.njit(cache=True, nogil=True)
def _row_eval(xs, ts, slope, x, out):
    """Piecewise-linear time(x) on one grid row, clamped below, continued with ``slope`` above;
    returns how many x fell outside the row."""
    n_ext = 0
    last = xs.shape[0] - 1
    for i in range(x.shape[0]):
        v = x[i]
        if v > xs[last]:
            out[i] = ts[last] + slope * (v - xs[last])
            n_ext += 1
        else:
            out[i] = np.interp(v, xs, ts)
            if v < xs[0]:
                n_ext += 1
    return n_ext


@numba.njit(cache=True, nogil=True)
def _decode_eval(batches, row_ptr, xs, ts, slopes, per_xy, batch, ctx_sums):
    """Compiled :meth:`DecodeGrid.many`, taking each step's total attended context."""
    ctx_mean = ctx_sums / batch
    n = ctx_mean.shape[0]
    nb = batches.shape[0]
    out = np.empty(n)
    if batch >= batches[nb - 1]:
        a, b = row_ptr[nb - 1], row_ptr[nb]
        n_ext = _row_eval(xs[a:b], ts[a:b], slopes[nb - 1], ctx_mean, out)
        if batch > batches[nb - 1]:
            extra = batch - batches[nb - 1]
            for i in range(n):
                per = per_xy if per_xy >= 0 else out[i] / max(ctx_mean[i] * batches[nb - 1], 1.0)
                out[i] = out[i] + per * extra * ctx_mean[i]
            n_ext = n
        return out, n_ext
    hi = np.searchsorted(batches, batch)
    a, b = row_ptr[hi], row_ptr[hi + 1]
    if batches[hi] == batch:
        n_ext = _row_eval(xs[a:b], ts[a:b], slopes[hi], ctx_mean, out)
        return out, n_ext
    lo = hi - 1
    t_hi = np.empty(n)
    n_hi = _row_eval(xs[a:b], ts[a:b], slopes[hi], ctx_mean, t_hi)
    a, b = row_ptr[lo], row_ptr[lo + 1]
    n_lo = _row_eval(xs[a:b], ts[a:b], slopes[lo], ctx_mean, out)
    w = (batch - batches[lo]) / (batches[hi] - batches[lo])
    for i in range(n):
        out[i] = out[i] + w * (t_hi[i] - out[i])
    return out, max(n_lo, n_hi)


class DecodeGrid:
    """Decode attention time(batch, ctx) for uniform contexts; a batch with mixed contexts is priced
    at its mean context (attention over paged KV is memory-bound: time follows total KV read)."""

    def __init__(self, points, tail: TailFit | None) -> None:
        self.batches = np.unique(points["x"].to_numpy(float))
        self.rows = []
        for b in self.batches:
            sel = points[points["x"] == b]
            self.rows.append(Curve1D(sel["y"].to_numpy(), sel["time_s"].to_numpy(),
                                     TailFit(0.0, tail.per_xy_s * b, 0.0) if tail else None,
                                     sel["kernels"].to_numpy() if "kernels" in sel else None))
        self.tail = tail

        self._flat = (self.batches.astype(np.float64),
                      np.concatenate(([0], np.cumsum([r.xs.size for r in self.rows]))).astype(np.int64),
                      np.concatenate([r.xs for r in self.rows]), np.concatenate([r.ts for r in self.rows]),
                      np.array([r.slope for r in self.rows], dtype=np.float64),
                      float(tail.per_xy_s) if tail else -1.0)

    def kernels_at(self, batch: int, ctx: float, default: int) -> int:
        i = int(np.argmin(np.abs(np.log(self.batches) - np.log(max(batch, 1)))))
        return self.rows[i].kernels_at(ctx, default)

    def fast(self, batch: int, ctx_sums: np.ndarray) -> tuple[np.ndarray, int]:
        """Compiled equivalent of :meth:`many` (the hot path), from total (not mean) contexts."""
        return _decode_eval(*self._flat, float(batch), ctx_sums)

    def many(self, batch: int, ctx_mean: np.ndarray) -> tuple[np.ndarray, int]:
        bs = self.batches
        if batch >= bs[-1]:
            t, n = self.rows[-1].many(ctx_mean)
            if batch > bs[-1]:
                # more sequences than measured: the extra ones add their KV read at the fitted rate
                per_seq_token = self.tail.per_xy_s if self.tail else (t / np.maximum(ctx_mean * bs[-1], 1))
                t = t + per_seq_token * (batch - bs[-1]) * ctx_mean
                n = int(np.size(ctx_mean))
            return t, n
        hi = int(np.searchsorted(bs, batch))
        if bs[hi] == batch:
            return self.rows[hi].many(ctx_mean)
        lo = hi - 1
        t_lo, n_lo = self.rows[lo].many(ctx_mean)
        t_hi, n_hi = self.rows[hi].many(ctx_mean)
        w = (batch - bs[lo]) / (bs[hi] - bs[lo])
        return t_lo + w * (t_hi - t_lo), max(n_lo, n_hi)


@numba.njit(cache=True, nogil=True)
def _prefill_row(lq, lt, q):
    """Power-law (log-log linear) interpolation of one c-row at q; beyond the row the last segment's
    exponent continues (capped at 2, attention's own growth in q). Returns (time, extrapolated)."""
    x = np.log(max(q, 1.0))
    n = lq.shape[0]
    if x <= lq[n - 1]:
        return np.exp(np.interp(x, lq, lt)), x < lq[0]
    k = min((lt[n - 1] - lt[n - 2]) / (lq[n - 1] - lq[n - 2]), 2.0) if n >= 2 else 1.0
    return np.exp(lt[n - 1] + k * (x - lq[n - 1])), True


@numba.njit(cache=True, nogil=True)
def _prefill_eval(cs, ptr, lq, lt, eff_lq, eff_tab, q, c):
    """Sum over chunks of the single-sequence time at (q_i, c_i), times the batching efficiency of
    len(q) sequences at their mean q. Returns (time, any lookup extrapolated)."""
    nc = cs.shape[0]
    total = 0.0
    ext = False
    for i in range(q.shape[0]):
        qi, ci = float(q[i]), float(c[i])
        if ci <= cs[0] or nc == 1:
            t, e = _prefill_row(lq[ptr[0]:ptr[1]], lt[ptr[0]:ptr[1]], qi)
            e = e or (nc == 1 and ci > cs[0])
        else:
            hi = np.searchsorted(cs, ci)
            if hi >= nc:
                t1, e1 = _prefill_row(lq[ptr[nc - 2]:ptr[nc - 1]], lt[ptr[nc - 2]:ptr[nc - 1]], qi)
                t2, e2 = _prefill_row(lq[ptr[nc - 1]:ptr[nc]], lt[ptr[nc - 1]:ptr[nc]], qi)
                slope = max((t2 - t1) / (cs[nc - 1] - cs[nc - 2]), 0.0)
                t, e = t2 + slope * (ci - cs[nc - 1]), True
            else:
                lo = hi - 1
                t1, e1 = _prefill_row(lq[ptr[lo]:ptr[lo + 1]], lt[ptr[lo]:ptr[lo + 1]], qi)
                t2, e2 = _prefill_row(lq[ptr[hi]:ptr[hi + 1]], lt[ptr[hi]:ptr[hi + 1]], qi)
                w = (ci - cs[lo]) / (cs[hi] - cs[lo])
                t, e = t1 + w * (t2 - t1), e1 or e2
        total += t
        ext = ext or e
    n = q.shape[0]
    if n <= 1 or eff_tab.shape[0] == 0 or eff_lq.shape[0] == 0:
        return total, ext
    row = min(n, eff_tab.shape[0]) - 1
    mean_q = 0.0
    for i in range(n):
        mean_q += q[i]
    mean_q /= n
    return total * np.interp(np.log(max(mean_q, 1.0)), eff_lq, eff_tab[row]), ext


class PrefillGrid:
    """Prefill attention time(q, c, seqs). Per sequence: power-law interpolation in q within each
    measured c, linear in c between them; several sequences in one launch run at the batching
    efficiency measured for equal-length sequences (``t(q, 0, n) / (n t(q, 0, 1))``, interpolated in n
    between measured sequence counts and in log q; beyond the largest measured n it stays there)."""

    def __init__(self, points, tail: TailFit | None) -> None:
        one = points[points["z"] <= 1]
        if one.empty:
            raise CostTableError("attn_prefill grid has no single-sequence (z=1) points")
        self.cs = np.unique(one["y"].to_numpy(float))
        lq, lt, ptr = [], [], [0]
        for c in self.cs:
            sel = one[one["y"] == c].sort_values("x")
            lq.append(np.log(sel["x"].to_numpy(float)))
            lt.append(np.log(sel["time_s"].to_numpy(float)))
            ptr.append(ptr[-1] + len(sel))
        self._lq, self._lt = np.concatenate(lq), np.concatenate(lt)
        self._ptr = np.asarray(ptr, dtype=np.int64)
        # batching efficiency at the smallest c, precomputed for 1..max measured sequences
        base = points[points["y"] == self.cs[0]]
        t = {(float(q), float(n)): float(g["time_s"].median()) for (q, n), g in base.groupby(["x", "z"])}
        ns = np.unique([n for _, n in t])
        qs = [q for q in np.unique([q for q, _ in t]) if (q, 1.0) in t]
        n_max = int(ns[-1]) if ns.size >= 2 else 0
        tab = np.ones((n_max, len(qs)))
        for j, q in enumerate(qs):
            have = [m for m in ns if (q, m) in t]
            ratio = [t[(q, m)] / (m * t[(q, 1.0)]) for m in have]
            for row in range(n_max):
                tab[row, j] = np.interp(float(row + 1), have, ratio)
        self._eff_lq = np.log(np.asarray(qs, dtype=np.float64)) if qs else np.empty(0)
        self._eff_tab = tab if qs else np.ones((0, 0))

    def time(self, q: np.ndarray, c: np.ndarray) -> tuple[float, bool]:
        """``q``, ``c``: int64 (or float64) arrays of new and cached tokens per chunk."""
        return _prefill_eval(self.cs, self._ptr, self._lq, self._lt, self._eff_lq, self._eff_tab, q, c)


class TableBackend(BackendBase):
    """Prices a model's ops from a measured table (a ``CostBackend``); ops the table lacks use the
    roofline backend when ``fallback`` is given, else construction fails naming the missing entries."""

    def __init__(self, ops: TransformerOps, gpu: GPUSpec, table: CostTable,
                 fallback: RooflineBackend | None = None) -> None:
        self.ops, self.gpu, self.table = ops, gpu, table
        self.roofline = fallback
        self.identity = dict(table.identity)
        tgpu = table.meta.get("gpu", {}).get("preset", "")
        if tgpu and tgpu != gpu.name:
            raise CostTableError(f"costs.table {table.dir.name!r} was measured on {tgpu}, but hardware.gpu "
                                 f"is {gpu.name}; use a table for {gpu.name} or costs.backend = \"roofline\"")
        missing = [(op, key) for op, key in ops.required_table_entries()
                   if not table.has(op, key) and not (op == "allreduce" and ops.tp == 1)]
        if missing and fallback is None:
            listing = "; ".join(f"{op} {key}" for op, key in missing[:4])
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            raise CostTableError(
                f"cost table {table.dir} has no entry for {listing}{more} (model {ops.model.name}, "
                f"tensor_parallel_size={ops.tp}); measure them with `tiersim calibrate --models "
                f"{ops.model.name}` or set costs.fallback = \"roofline\"")
        self.missing = set(missing)
        if self.missing:
            self.identity["roofline_fallback_for"] = sorted(f"{op} {key}" for op, key in missing)
        roof_launch = fallback.launch if fallback else RooflineBackend(ops, gpu).launch
        self.launch = dataclasses.replace(table.launch(roof_launch), times_include_gap=True)
        self.kernels = np.array([table.kernels(op.table_op) for op in ops.ops], dtype=np.int64)
        self.switch_s = float(table.meta.get("launch", {}).get("switch_s", 0.0))
        self.host_call_s, self.step_host_s = self._host_model(table)
        self.curves: dict[int, Curve1D] = {}
        self.extrapolations: dict[str, int] = {}
        for i, op in enumerate(ops.ops):
            if (op.table_op, op.key) in self.missing or op.table_op.startswith("attn"):
                continue
            if op.table_op == "allreduce" and ops.tp == 1:
                continue
            pts = table.points(op.table_op, op.key)
            self.curves[i] = Curve1D(pts["x"].to_numpy(), pts["time_s"].to_numpy(),
                                     table.tail(op.table_op, op.key),
                                     pts["kernels"].to_numpy() if "kernels" in pts else None)
        self._dense = self._build_dense()
        ia, ip = ops.index["attn_decode"], ops.index["attn_prefill"]
        akey = ops.ops[ia].key
        self.decode = (DecodeGrid(table.points("attn_decode", akey), table.tail("attn_decode", akey))
                       if ("attn_decode", akey) not in self.missing else None)
        self.prefill = (PrefillGrid(table.points("attn_prefill", akey), table.tail("attn_prefill", akey))
                        if ("attn_prefill", akey) not in self.missing else None)
        self._ia, self._ip = ia, ip
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._init_shared(table.dir)

    def _host_model(self, table: CostTable) -> tuple[np.ndarray, float]:
        """Host seconds per op call of an eager engine, and its per-step host work before the first
        launch. Per-op call costs come from the tiny-shape call timings; when the table also measured
        the engine's whole host cost per layer and per step, the per-layer ops are scaled to add up
        to that (the engine's Python, views and glue count too) and the step's fixed part leads."""
        launch = table.meta.get("launch", {})
        per_op = launch.get("op_host_s", {})
        ops = self.ops.ops
        base = np.array([float(per_op.get(op.table_op, self.launch.dispatch_s * self.kernels[i]))
                         for i, op in enumerate(ops)])
        layer_s = launch.get("engine_layer_host_s")
        step_s = launch.get("engine_step_host_s")
        if layer_s:
            # one layer runs one attention op (decode or prefill): price the layer with decode's
            in_layer = np.array([op.per_layer and op.table_op != "attn_prefill" for op in ops])
            scale = float(layer_s) / float(base[in_layer].sum())
            base = np.where([op.per_layer for op in ops], base * scale, base)
        lead = 0.0
        if step_s:
            outside = float(base[[not op.per_layer for op in ops]].sum())
            lead = max(float(step_s) - outside - self.launch.sync_s, 0.0)
        return base, lead

    def kernel_counts(self, tokens: int, sampled: int, has_prefill: bool, has_decode: bool) -> np.ndarray:
        """Kernels each op launches in this step, from the counts measured at the nearest grid point
        (0 for ops that do not run)."""
        ops = self.ops
        d = self._dense
        dense = d is not None and tokens <= d[0] and sampled <= d[1]
        out = d[4][tokens] + d[5][sampled] if dense else self.kernels.copy()
        for i, op in enumerate(ops.ops):
            if ((op.rows == "prefill" and not has_prefill) or (op.rows == "decode" and not has_decode)
                    or (op.rows == "sampled" and sampled == 0) or (op.table_op == "allreduce" and ops.tp == 1)):
                out[i] = 0
                continue
            if op.rows == "prefill":
                out[i] = self.kernels[i]
            elif op.rows == "decode":
                out[i] = (self.decode.kernels_at(tokens, 1024.0, int(self.kernels[i])) if self.decode
                          else self.kernels[i])
            elif not dense:
                curve = self.curves.get(i)
                if curve is not None:
                    out[i] = curve.kernels_at(sampled if op.rows == "sampled" else tokens, int(out[i]))
        return out

    DENSE_MAX = 16384

    def _build_dense(self):
        """Per-op times and kernel counts for every token count (and sampled-row count) inside the
        measured grids, so that pricing a step's fixed ops is one row lookup. None when an op is priced
        by the roofline fallback (then the per-shape path, cached, is used)."""
        ops = self.ops
        n = len(ops.ops)
        needed = [i for i, op in enumerate(ops.ops)
                  if not op.table_op.startswith("attn") and not (op.table_op == "allreduce" and ops.tp == 1)]
        if any(i not in self.curves for i in needed):
            return None
        unit = {i: (ops.model.hidden_size * ops.model.bytes_per_weight if ops.ops[i].table_op == "allreduce" else 1)
                for i in needed}
        tok = [i for i in needed if ops.ops[i].rows != "sampled"]
        smp = [i for i in needed if ops.ops[i].rows == "sampled"]

        def limit(idx):
            return min([self.DENSE_MAX] + [int(self.curves[i].xs[-1] // unit[i]) for i in idx])

        nt, ns = limit(tok), limit(smp)
        tok_t, smp_t = np.zeros((nt + 1, n)), np.zeros((ns + 1, n))
        tok_k, smp_k = np.zeros((nt + 1, n), np.int64), np.zeros((ns + 1, n), np.int64)
        for idx, size, t_arr, k_arr in ((tok, nt, tok_t, tok_k), (smp, ns, smp_t, smp_k)):
            x = np.arange(1, size + 1, dtype=np.float64)
            for i in idx:
                curve = self.curves[i]
                t_arr[1:, i] = curve.many(x * unit[i])[0]
                if curve.ks is not None:
                    near = np.abs(np.log(curve.xs)[None, :] - np.log(x * unit[i])[:, None]).argmin(axis=1)
                    k = curve.ks[near]
                    k_arr[1:, i] = np.where(np.isfinite(k) & (k > 0), np.round(k), self.kernels[i]).astype(np.int64)
                else:
                    k_arr[1:, i] = self.kernels[i]
        return nt, ns, tok_t, smp_t, tok_k, smp_k

    def _note(self, name: str, n: int = 1) -> None:
        self.extrapolations[name] = self.extrapolations.get(name, 0) + n

    def fixed_times(self, tokens: int, sampled: int) -> np.ndarray:
        d = self._dense
        if d is not None and tokens <= d[0] and sampled <= d[1]:
            return d[2][tokens] + d[3][sampled]
        key = (tokens, sampled)
        got = self._cache.get(key)
        if got is not None:
            return got
        ops = self.ops
        out = np.zeros(len(ops.ops))
        roof = None
        shape = StepShape(prefill_q=np.empty(0, np.int64), prefill_c=np.empty(0, np.int64),
                          num_decode=tokens, decode_ctx_sum=0, num_sampled=sampled)
        for i, op in enumerate(ops.ops):
            if op.table_op.startswith("attn") or (op.table_op == "allreduce" and ops.tp == 1):
                continue
            x = ops.op_x(op, shape)
            if x <= 0:
                continue
            curve = self.curves.get(i)
            if curve is None:
                if roof is None:
                    roof = self.roofline.times(shape)
                out[i] = roof[i]
                continue
            t, ext = curve(x)
            if ext:
                self._note(op.table_op)
            out[i] = t
        self._cache[key] = out
        return out

    def prefill_attention_time(self, q: np.ndarray, c: np.ndarray) -> float:
        if self.prefill is None:
            return self.roofline.prefill_attention_time(q, c)
        t, ext = self.prefill.time(q, c)
        if ext:
            self._note("attn_prefill")
        return t

    def decode_attention_times(self, batch: int, ctx_sums: np.ndarray, query_tokens: int = 1) -> np.ndarray:
        if self.decode is None:
            return self.roofline.decode_attention_times(batch, ctx_sums, query_tokens)
        t, n_ext = self.decode.fast(batch, ctx_sums)
        if n_ext:
            self._note("attn_decode", n_ext)
        if query_tokens > 1:
            # The table holds one query per sequence; several (speculative verify) cost what the
            # roofline says they add on top of one, since the KV is read once either way.
            ref = self._roof_ref().decode_attention_times(batch, ctx_sums, 1)
            t = t * (self._roof_ref().decode_attention_times(batch, ctx_sums, query_tokens) / ref)
        return t

    def _roof_ref(self) -> RooflineBackend:
        if self.roofline is None:
            self.roofline = RooflineBackend(self.ops, self.gpu)
        return self.roofline

    def lookup_report(self) -> dict:
        ops = {}
        for op in self.ops.ops:
            if op.table_op == "allreduce" and self.ops.tp == 1:
                continue
            src = "roofline" if (op.table_op, op.key) in self.missing else "measured"
            ops[op.name] = {"table_op": op.table_op, "key": op.key, "source": src}
        return {"backend": "table", "table": self.table.dir.name, "ops": ops,
                "extrapolated_lookups": dict(sorted(self.extrapolations.items())),
                "selection": self._selection_report(), "warnings": []}
