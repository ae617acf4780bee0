"""Measured cost tables and the table backend that prices steps from them.

A table is a directory written by ``tiersim calibrate`` (``calibration.fit``)::

    ops.parquet   one row per measured grid point: op, key, x, y, z, time_s, p10_s, p90_s, variant
    table.json    format, GPU fingerprint, provenance, per-(op, key) roofline-shaped tail fits,
                  kernels per op call, launch constants, link fits
    raw/          the raw measurements the table was fitted from

Inside a grid, times are interpolated; beyond it, the fitted ``overhead + x · per_x`` line (fixed
overhead plus bytes over bandwidth or FLOPs over rate, whichever bound the largest points) continues
the curve from the last grid point. Extrapolation is never silent: every lookup reports it, and the
backend counts extrapolated lookups per op, with how far they went, for the run summary.

A model whose shapes the table did not measure is priced from the same GPU's other grids
(``sim.costs.generalise``); an engine whose kernels differ from the reference decoder's through a
recipe (``sim.costs.recipe``). Both are resolved once, at construction, into per-op curves on the
measured grids' points, so the hot path is the same for every model and engine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.base import LaunchCosts
from sim.costs.backend import BackendBase, stretch
from sim.costs.model import OpDef, StepShape, TransformerOps, parse_key
from sim.costs.roofline import RooflineBackend
from sim.errors import CostTableError
from sim.jit import numba, searchsorted
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


class Column(np.ndarray):
    """One column of :class:`Points`: a NumPy array that also answers the two pandas calls table code
    and notebooks use on a group's columns (``to_numpy``, ``median``)."""

    def to_numpy(self, dtype=None) -> np.ndarray:
        return np.asarray(self.view(np.ndarray), dtype=dtype)

    def median(self) -> float:
        """The median of the finite values (pandas skips NaN), NaN when there are none."""
        a = self.view(np.ndarray)
        a = a[~np.isnan(a)] if a.dtype.kind == "f" else a
        return float(np.median(a)) if a.size else float("nan")


class Points:
    """The grid points of one (op, key), or of the whole table: named NumPy columns of equal length.

    What the backend needs from a group, without pandas (importing it costs a run more than reading
    every table): ``points["x"]`` (a :class:`Column`), ``points[mask]`` (the rows where ``mask``),
    ``"kernels" in points``, ``len``, ``empty`` and ``sort_values(column)`` (NumPy's default sort, as
    pandas' ``sort_values``). ``to_pandas()`` gives the DataFrame.
    """

    __slots__ = ("_cols",)

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self._cols = columns

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def __len__(self) -> int:
        return len(next(iter(self._cols.values()))) if self._cols else 0

    @property
    def empty(self) -> bool:
        return len(self) == 0

    def __contains__(self, name: str) -> bool:
        return name in self._cols

    def __getitem__(self, what):
        if isinstance(what, str):
            return self._cols[what].view(Column)
        sel = np.asarray(what)
        return Points({k: v[sel] for k, v in self._cols.items()})

    def sort_values(self, name: str) -> Points:
        return self[np.argsort(self._cols[name], kind="quicksort")]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({k: v.copy() for k, v in self._cols.items()})


def _read_points(path: Path) -> Points:
    """``ops.parquet`` as columns (pyarrow only); strings as object arrays and nulls as NaN, as pandas
    reads them."""
    import pyarrow.parquet as pq

    from sim.arrow import to_numpy

    t = pq.ParquetFile(path).read()      # read_table goes through pyarrow.dataset, which imports pandas
    return Points({name: to_numpy(t.column(name)) for name in t.column_names})


class CostTable:
    """A loaded table: grid points per (op, key), tail fits, constants and identity."""

    def __init__(self, directory: Path) -> None:
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
        points = _read_points(ops_path)
        missing = {"op", "key", "x", "y", "z", "time_s"} - set(points.columns)
        if missing:
            raise CostTableError(f"{ops_path}: missing column(s) {', '.join(sorted(missing))}")
        t = np.asarray(points["time_s"], float)
        bad = np.flatnonzero(~np.isfinite(t) | (t <= 0))
        if bad.size:
            raise CostTableError(f"{ops_path}: row {int(bad[0])}, field 'time_s': not a positive time "
                                 f"({float(t[bad[0]])!r})")
        self.points_all = points
        # groups in sorted (op, key) order, each group's rows in file order (pandas' groupby, sort=True)
        pairs = list(zip(points["op"].tolist(), points["key"].tolist()))
        rows: dict[tuple[str, str], list[int]] = {}
        for i, pair in enumerate(pairs):
            rows.setdefault(pair, []).append(i)
        self.groups = {k: points[np.asarray(rows[k], dtype=np.int64)] for k in sorted(rows)}
        digest = hashlib.sha256(meta_path.read_bytes() + ops_path.read_bytes()).hexdigest()
        gpu = self.meta.get("gpu", {})
        self.identity = {"backend": "table", "table": directory.name, "path": str(directory),
                         "sha256": digest, "gpu": gpu.get("name", ""), "gpu_fingerprint": gpu.get("fingerprint", ""),
                         "created_utc": self.meta.get("created_utc", ""), "source": self.meta.get("source", "")}

    @property
    def frame(self):
        """Every grid point as a pandas DataFrame (imports pandas; the backend reads :attr:`groups`)."""
        return self.points_all.to_pandas()

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


def in_model_graph_gap(table_dir: Path) -> tuple[float, str]:
    """(seconds, source) of the idle gap between consecutive kernels inside a real model's CUDA-graph
    replay: from the table's in-model attribution (``validation/in_model.json``, written by
    ``python -m calibration.attribute``: per traced step, its span minus the time inside kernels, over
    its kernels), the median over the traced steps. Without that file, ``graph_kernel_s`` (the per-node
    cost of a graph of empty kernels: an upper bound on the gap), said so in the source."""
    path = Path(table_dir) / "validation" / "in_model.json"
    if path.exists():
        try:
            cases = json.loads(path.read_text())
            gaps = [(c["span_us"] - c["kernel_us"]) / c["kernels_measured"] * 1e-6 for c in cases
                    if c.get("kernels_measured")]
        except (OSError, ValueError, KeyError, TypeError):
            gaps = []
        if gaps:
            return float(np.median(gaps)), (f"{Path(table_dir).name}/validation/in_model.json: median idle gap "
                                            f"per kernel over {len(gaps)} traced graph replays")
    meta = json.loads((Path(table_dir) / "table.json").read_text()).get("launch", {})
    if "graph_kernel_s" in meta:
        return float(meta["graph_kernel_s"]), (f"{Path(table_dir).name}: graph_kernel_s (no in-model "
                                               "attribution; an upper bound on the gap)")
    return 0.0, "none measured"


class _NearestLog:
    """The grid point nearest ``x`` in log space, as ``np.argmin(np.abs(np.log(np.maximum(xs, 1e-9)) -
    np.log(max(x, 1e-9))))`` picks it (the first on a tie), found by bisecting the midpoints between
    neighbouring log grid points; within 1e-9 of a midpoint (a near tie, where rounding could decide)
    it asks ``argmin`` itself, so the answer is always argmin's."""

    __slots__ = ("logs", "mids", "last", "kint", "first")

    def __init__(self, xs: np.ndarray, ks: np.ndarray | None = None) -> None:
        self.logs = logs = np.log(np.maximum(np.asarray(xs, float), 1e-9))
        self.mids = ((logs[:-1] + logs[1:]) / 2.0).tolist()
        # grid points whose logs are equal (distinct x a few ulps apart, or several clamped to 1e-9) are
        # equally near any x, and argmin takes the first of them
        self.first = None
        if logs.size > 1 and bool((logs[1:] == logs[:-1]).any()):
            first = list(range(logs.size))
            for j in range(1, logs.size):
                if logs[j] == logs[j - 1]:
                    first[j] = first[j - 1]
            self.first = first
        self.last = float(xs[-1]) if len(xs) else math.inf
        # each grid point's kernel count as Curve1D.kernels_at rounds it, -1 where unknown
        self.kint = None if ks is None else [int(round(k)) if np.isfinite(k) and k > 0 else -1 for k in ks]

    def index(self, x: float) -> int:
        lx = math.log(max(x, 1e-9))
        mids = self.mids
        i = bisect_left(mids, lx)
        if (i and lx - mids[i - 1] < 1e-9) or (i < len(mids) and mids[i] - lx < 1e-9):
            return int(np.argmin(np.abs(self.logs - np.log(max(x, 1e-9)))))
        return i if self.first is None else self.first[i]


class Curve1D:
    """time(x): piecewise-linear on the grid, clamped below, fitted line beyond (flagged); and the
    kernels one call launches at the nearest grid point (it can change with size: split-K GEMMs)."""

    __slots__ = ("xs", "ts", "slope", "ks", "_near")

    def __init__(self, xs: np.ndarray, ts: np.ndarray, tail: TailFit | None,
                 kernels: np.ndarray | None = None) -> None:
        order = np.argsort(xs, kind="stable")
        xs, ts = np.asarray(xs, float)[order], np.asarray(ts, float)[order]
        # repeated x (sorted, so each value's points are one slice) merge by their median
        ux, first, counts = np.unique(xs, return_index=True, return_counts=True)
        self.xs = ux
        unique = ux.size == xs.size
        groups = [] if unique else [slice(a, a + c) for a, c in zip(first.tolist(), counts.tolist())]
        self.ts = ts.copy() if unique else np.array([np.median(ts[g]) for g in groups])
        self.ks = None
        if kernels is not None:
            k = np.asarray(kernels, float)[order]
            self.ks = (np.where(np.isfinite(k), k, np.nan) if unique else
                       np.array([np.nanmedian(k[g]) if np.isfinite(k[g]).any() else np.nan for g in groups]))
        self._near = _NearestLog(ux, self.ks)
        if tail is not None:
            self.slope = max(tail.per_x_s, 0.0)
        elif ux.size >= 2:
            self.slope = max((self.ts[-1] - self.ts[-2]) / (ux[-1] - ux[-2]), 0.0)
        else:
            self.slope = 0.0

    @classmethod
    def of(cls, xs: np.ndarray, ts: np.ndarray, slope: float, ks: np.ndarray | None = None) -> "Curve1D":
        """A curve from unique increasing ``xs`` with its own slope beyond them (no re-aggregation)."""
        c = cls.__new__(cls)
        c.xs, c.ts = np.asarray(xs, float), np.asarray(ts, float)
        c.slope = max(float(slope), 0.0)
        c.ks = None if ks is None else np.asarray(ks, float)
        c._near = _NearestLog(c.xs, c.ks)
        return c

    def at(self, x: np.ndarray) -> np.ndarray:
        """Times at many x (no extrapolation bookkeeping)."""
        return self.many(x)[0]

    def kernels_many(self, x: np.ndarray, default: int) -> np.ndarray:
        """Kernel counts at many x (nearest grid point in log x), ``default`` where unknown."""
        x = np.asarray(x, float)
        if self.ks is None:
            return np.full(x.shape, default, dtype=float)
        near = np.abs(np.log(np.maximum(self.xs, 1e-9))[None, :] - np.log(np.maximum(x, 1e-9))[:, None]).argmin(axis=1)
        k = self.ks[near]
        return np.where(np.isfinite(k) & (k > 0), np.round(k), default)

    def __call__(self, x: float) -> tuple[float, bool]:
        xs = self.xs
        if x > xs[-1]:
            return float(self.ts[-1] + self.slope * (x - xs[-1])), True
        return float(np.interp(x, xs, self.ts)), bool(x < xs[0])

    def kernels_at(self, x: float, default: int) -> int:
        near = self._near
        if near.kint is None:
            return default
        # nearest grid point in log x; at or beyond the last (``xs`` is increasing) that is the last
        k = near.kint[-1 if x >= near.last else near.index(x)]
        return k if k >= 0 else default

    def many(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        x = np.asarray(x, float)
        out = np.interp(x, self.xs, self.ts)
        above = x > self.xs[-1]
        if above.any():
            out[above] = self.ts[-1] + self.slope * (x[above] - self.xs[-1])
        return out, int(above.sum() + (x < self.xs[0]).sum())


@numba.njit(cache=True, nogil=True, inline="always")
def _interp1(x, xp, fp):
    """``np.interp(x, xp, fp)`` for one finite ``x``, with numpy's arithmetic (bit-identical; a test
    checks it), without the array the compiled ``np.interp`` allocates per call (4x faster: the
    decode grids evaluate it once per step of every run)."""
    n = xp.shape[0]
    if x <= xp[0]:
        return fp[0]
    if x >= xp[n - 1]:
        return fp[n - 1]
    j = searchsorted(xp, x, True) - 1
    if xp[j] == x:
        return fp[j]
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    r = slope * (x - xp[j]) + fp[j]
    if np.isnan(r):
        r = slope * (x - xp[j + 1]) + fp[j + 1]
        if np.isnan(r) and fp[j] == fp[j + 1]:
            r = fp[j]
    return r


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
            out[i] = _interp1(v, xs, ts)
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
    hi = searchsorted(batches, batch)
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


@numba.njit(cache=True, nogil=True)
def _decode_linear(batches, row_ptr, xs, ts, slopes, per_xy, batch, ctx0, step, k, weight, base):
    """``_decode_eval`` at the context totals ``ctx0 + step * j`` (j < k), each time then taken to
    ``t * weight + base``: a dense decode run's step durations (``TableBackend.decode_linear_run``)."""
    ctx = np.empty(k)
    for j in range(k):
        ctx[j] = float(ctx0 + step * j)
    out, n_ext = _decode_eval(batches, row_ptr, xs, ts, slopes, per_xy, batch, ctx)
    for j in range(k):
        out[j] = out[j] * weight + base
    return out, n_ext


@dataclass(frozen=True, slots=True)
class _AboveGrids:
    """The token-row ops' (``idx``) curve ends, for steps of more tokens than every such op's grid
    holds (long prompts, e.g. Mooncake's): their times there are one vector expression instead of a
    lookup per op. ``unit``: x per token; ``allreduce``: ops whose x is bytes (computed as ``op_x``
    does); ``groups``: the positions in ``idx`` of each table op, in first-occurrence order (for the
    extrapolation notes); beyond ``t_min`` tokens every such op extrapolates; ``sampled_x0``: the
    sampled-row count from which no sampled-row op's grid starts above it."""

    idx: np.ndarray
    unit: np.ndarray
    allreduce: np.ndarray
    xs_last: np.ndarray
    ts_last: np.ndarray
    slope: np.ndarray
    groups: list
    t_min: int
    sampled_x0: float


class DecodeGrid:
    """Decode attention time(batch, ctx) for uniform contexts; a batch with mixed contexts is priced
    at its mean context (attention over paged KV is memory-bound: time follows total KV read)."""

    def __init__(self, points, tail: TailFit | None) -> None:
        self.batches = np.unique(points["x"].to_numpy(float))
        self._near = _NearestLog(self.batches)
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
        # (the batches are >= 1, so their logs are what _NearestLog takes; max(batch, 1) likewise)
        return self.rows[self._near.index(max(batch, 1))].kernels_at(ctx, default)

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
        return np.exp(_interp1(x, lq, lt)), x < lq[0]
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
            hi = searchsorted(cs, ci)
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
    return total * _interp1(np.log(max(mean_q, 1.0)), eff_lq, eff_tab[row]), ext


def _medians_by(points: Points, keys: tuple[str, ...], value: str = "time_s") -> dict[tuple, float]:
    """Median of ``value`` per distinct tuple of ``keys`` (rows with a NaN key left out, as pandas'
    groupby does), keyed by the tuple of floats."""
    cols = [np.asarray(points[k], float) for k in keys]
    v = np.asarray(points[value], float)
    ok = np.ones(v.size, dtype=bool)
    for c in cols:
        ok &= ~np.isnan(c)
    groups: dict[tuple, list[float]] = {}
    for i in np.flatnonzero(ok):
        groups.setdefault(tuple(float(c[i]) for c in cols), []).append(v[i])
    return {k: Column.median(np.asarray(g).view(Column)) for k, g in groups.items()}


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
        t = _medians_by(base, ("x", "z"))
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


# token grid of the elementwise part (calibration/vendor/ops.py): generalised curves use the same points
TOKEN_GRID = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 384, 512, 768,
                       1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384], dtype=np.float64)
# what one row of each elementwise table op moves, per unit of its key's size: the ratio between two
# keys' values is the ratio of bytes per row (the element size cancels); see TransformerOps.flops_bytes
_ROW_SIZE = {
    "rms_norm": lambda p: float(p["h"]), "add": lambda p: float(p["h"]), "embed": lambda p: float(p["h"]),
    "act": lambda p: float(p["f"]), "sample": lambda p: float(p["v"]),
    "rope": lambda p: float(p["qh"]) * float(p["d"]) + float(p["kvh"]) * float(p["d"]),
    "kv_write": lambda p: float(p["kvh"]) * float(p["d"]),
}


class TableBackend(BackendBase):
    """Prices a model's ops from a measured table (a ``CostBackend``).

    Each op's source, in order: the table's entry at the model's exact shape; else, with ``fallback``
    (a ``RooflineBackend``), the roofline; else, with ``generalise`` (the default), the GPU's other
    measurements by the rules of ``sim.costs.generalise``; else construction fails naming the missing
    entries. ``recipe`` (``sim.costs.recipe``; default ``fused``) says which kernels the engine runs
    for each op and which primitive prices each. Every op's source is in :meth:`lookup_report`.

    Invariants: per-op curves never change after construction; only the extrapolation counters grow.
    """

    def __init__(self, ops: TransformerOps, gpu: GPUSpec, table: CostTable,
                 fallback: RooflineBackend | None = None, *, generalise: bool = True, recipe=None) -> None:
        from sim.costs.recipe import load_recipe

        self.ops, self.gpu, self.table = ops, gpu, table
        self.roofline = fallback
        self.recipe = recipe if recipe is not None else load_recipe("fused")
        self.identity = dict(table.identity)
        if self.recipe.name != "fused":
            self.identity["recipe"] = self.recipe.name
        tgpu = table.meta.get("gpu", {}).get("preset", "")
        if tgpu and tgpu != gpu.name:
            raise CostTableError(f"costs.table {table.dir.name!r} was measured on {tgpu}, but hardware.gpu "
                                 f"is {gpu.name}; use a table for {gpu.name} or costs.backend = \"roofline\"")
        missing = [(op, key) for op, key in ops.required_table_entries()
                   if not table.has(op, key) and not (op == "allreduce" and ops.tp == 1)]
        if missing and fallback is None and not generalise:
            raise CostTableError(self._missing_message(missing, "set costs.fallback = \"roofline\" or "
                                                                "\"generalise\""))
        # with a fallback the roofline prices what the table lacks (the behaviour before generalisation)
        self.missing = set(missing) if fallback is not None else set()
        if self.missing:
            self.identity["roofline_fallback_for"] = sorted(f"{op} {key}" for op, key in missing)
        roof_launch = fallback.launch if fallback else RooflineBackend(ops, gpu).launch
        gap_s, gap_source = in_model_graph_gap(table.dir)
        self.launch = dataclasses.replace(table.launch(roof_launch), times_include_gap=True, graph_gap_s=gap_s,
                                          graph_gap_source=gap_source)
        self.kernels = np.array([table.kernels(op.table_op) for op in ops.ops], dtype=np.int64)
        self.switch_s = float(table.meta.get("launch", {}).get("switch_s", 0.0))
        self._init_shared(table.dir)
        self.sources: dict[str, dict] = {}
        self.warnings: list[str] = []
        self.ext_over: dict[str, float] = {}
        self.ext_under: dict[str, float] = {}
        self._gemm_model = None
        self._bytes_model = None
        self._gemm_curves: dict[tuple[int, int], Curve1D] = {}
        self.curves: dict[int, Curve1D] = {}
        self.extrapolations: dict[str, int] = {}
        cannot: list[tuple[str, str, str]] = []
        host_kernels = np.zeros(len(ops.ops))     # recipe ops: host seconds of their kernels
        for i, op in enumerate(ops.ops):
            if op.table_op.startswith("attn") or (op.table_op == "allreduce" and ops.tp == 1):
                continue
            try:
                base, src = self._base_curve(op)
            except _CannotGeneralise as exc:
                cannot.append((op.table_op, op.key, str(exc)))
                continue
            rec = self.recipe.for_op(op)
            if not rec.is_table:
                base, nominal, host_kernels[i] = self._apply_recipe(op, rec, base)
                self.kernels[i] = nominal
                src = {**src, "recipe": [k.name for k in rec.kernels]}
                if rec.scale != 1.0:
                    src["scale"] = rec.scale if not isinstance(rec.scale, tuple) else [list(p) for p in rec.scale]
            self.sources[op.name] = {"table_op": op.table_op, "key": op.key, **src}
            if base is not None:
                self.curves[i] = base
        ia, ip = ops.index["attn_decode"], ops.index["attn_prefill"]
        self._ia, self._ip = ia, ip
        try:
            self._init_attention(ops.ops[ia], ops.ops[ip])
        except _CannotGeneralise as exc:
            cannot.append(("attn_decode/attn_prefill", ops.ops[ia].key, str(exc)))
        if cannot:
            listing = "; ".join(f"{op} {key} ({why})" for op, key, why in cannot[:4])
            more = f" and {len(cannot) - 4} more" if len(cannot) > 4 else ""
            raise CostTableError(f"cost table {table.dir} has no entry for {listing}{more} (model "
                                 f"{ops.model.name}, tensor_parallel_size={ops.tp}), and nothing measured on "
                                 f"this GPU to generalise from; measure them with `tiersim calibrate --models "
                                 f"{ops.model.name}` or set costs.fallback = \"roofline\"")
        self.host_call_s, self.step_host_s = self._host_model(table, host_kernels)
        self._dense = self._build_dense()
        self._above = self._build_above() if self._dense is not None else None
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ sources
    def _missing_message(self, missing, hint: str) -> str:
        listing = "; ".join(f"{op} {key}" for op, key in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        return (f"cost table {self.table.dir} has no entry for {listing}{more} (model {self.ops.model.name}, "
                f"tensor_parallel_size={self.ops.tp}); measure them with `tiersim calibrate --models "
                f"{self.ops.model.name}` or {hint}")

    def _measured_curve(self, op: str, key: str) -> Curve1D:
        pts = self.table.points(op, key)
        return Curve1D(pts["x"].to_numpy(), pts["time_s"].to_numpy(), self.table.tail(op, key),
                       pts["kernels"].to_numpy() if "kernels" in pts else None)

    def _base_curve(self, op: OpDef) -> tuple[Curve1D | None, dict]:
        """The table op's curve at the model's shape, and where it came from."""
        t, key = op.table_op, op.key
        m = self.ops.model
        if self.table.has(t, key):
            curve = self._measured_curve(t, key)
            if t == "kv_write" and m.bytes_per_kv != 2:      # the key has no dtype: measured at bf16
                ratio = m.bytes_per_kv / 2.0
                return self._scaled(curve, ratio), {"source": "generalised", "from": f"{t} {key} (bf16 KV)",
                                                    "how": f"bytes per row x {ratio:g}"}
            return curve, {"source": "measured"}
        if (t, key) in self.missing:
            return None, {"source": "roofline"}
        if t == "gemm":
            return self._gemm_curve(op.n, op.k, key)
        if t == "allreduce":
            return self._allreduce_curve(key)
        return self._elementwise_curve(op)

    def _scaled(self, curve: Curve1D, ratio: float) -> Curve1D:
        """A curve read at ``x · ratio`` (an op that moves ``ratio`` times the bytes per row)."""
        xs = curve.xs / ratio
        ts, ks = curve.ts, curve.ks
        if xs[0] > 1.0:       # below the measured grid an elementwise op stays at its floor
            xs, ts = np.concatenate(([1.0], xs)), np.concatenate(([ts[0]], ts))
            ks = None if ks is None else np.concatenate(([ks[0]], ks))
        return Curve1D.of(xs, ts, curve.slope * ratio, ks)

    def _elementwise_curve(self, op: OpDef) -> tuple[Curve1D, dict]:
        t = op.table_op
        want = parse_key(op.key)
        size = _ROW_SIZE.get(t)
        keys = [k for (o, k) in self.table.groups if o == t]
        if size is not None and keys:
            target = size(want)
            src = min(sorted(keys), key=lambda k: abs(np.log(size(parse_key(k)) / target)))
            ratio = target / size(parse_key(src))
            if t == "kv_write":
                ratio *= self.ops.model.bytes_per_kv / 2.0
            return self._scaled(self._measured_curve(t, src), ratio), {
                "source": "generalised", "from": f"{t} {src}", "how": f"bytes per row x {ratio:.4g}"}
        # never measured on this GPU: its kernels priced by their bytes
        bm = self._bytes()
        k = int(self.table.kernels(t, _NOMINAL_KERNELS.get(t, 1)))
        shape_rows = TOKEN_GRID
        nbytes = self._op_bytes_per_row(op) * shape_rows
        ts = k * bm.time(nbytes / k)
        slope = (ts[-1] - ts[-2]) / (shape_rows[-1] - shape_rows[-2])
        return Curve1D.of(shape_rows, ts, slope, np.full(shape_rows.shape, float(k))), {
            "source": "modelled", "from": bm.source, "how": f"{k} kernel(s) of its bytes (not measured on this GPU)"}

    def _op_bytes_per_row(self, op: OpDef) -> float:
        shape = StepShape(prefill_q=np.empty(0, np.int64), prefill_c=np.empty(0, np.int64), num_decode=1,
                          decode_ctx_sum=0, num_sampled=1)
        return float(self.ops.flops_bytes(shape)[1][self.ops.index[op.name]])

    def _bytes(self):
        if self._bytes_model is None:
            from sim.costs.generalise import BytesModel

            self._bytes_model = BytesModel.for_table(self.table, self.gpu)
        return self._bytes_model

    def _gemm_curve(self, n: int, k: int, key: str | None = None) -> tuple[Curve1D, dict]:
        """GEMM time over M at (n, k) in the model's weight dtype: measured, else generalised."""
        from sim.costs.generalise import M_GRID, dtype_name, fp8_factor, gemm_model_from_table
        from sim.costs.model import make_key

        dtype = dtype_name(self.ops.model.bytes_per_weight)
        key = key or make_key(dtype=dtype, k=k, n=n)
        if self.table.has("gemm", key):
            return self._measured_curve("gemm", key), {"source": "measured"}
        bf16 = make_key(dtype="bf16", k=k, n=n)
        if self.table.has("gemm", bf16):
            curve, src = self._measured_curve("gemm", bf16), {"source": "measured", "from": f"gemm {bf16}"}
        else:
            got = self._gemm_curves.get((n, k))
            if got is None:
                if self._gemm_model is None:
                    self._gemm_model = gemm_model_from_table(self.table, self.gpu)
                if self._gemm_model is None:
                    raise _CannotGeneralise("fewer than two measured bf16 GEMM shapes")
                xs = np.asarray(M_GRID, float)
                ts = self._gemm_model.time(xs, n, k)
                got = Curve1D.of(xs, ts, (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]), self._nearest_gemm_kernels(n, k, xs))
                self._gemm_curves[(n, k)] = got
            curve = got
            src = {"source": "generalised", "from": "GEMM model fitted on this GPU's measured GEMMs",
                   "how": f"n={n}, k={k} over M"}
        if dtype == "bf16":
            return curve, src
        if dtype != "fp8":
            raise _CannotGeneralise(f"no {dtype} GEMM model (bytes_per_weight={self.ops.model.bytes_per_weight})")
        factor = fp8_factor(curve.xs, n, k, self.gpu)
        kern = curve.kernels_many(curve.xs, 1)
        ts = stretch(curve.ts, kern, factor, self.share_curves.floor_s)
        note = ("gemm fp8: no measured fp8 GEMM on this table; priced from bf16 by the stated model "
                "(memory-bound: bytes moved; compute-bound: the GPU's fp8 peak"
                + (f" {self.gpu.peak_fp8_flops / 1e12:,.0f} TFLOP/s)" if self.gpu.peak_fp8_flops > 0 else
                   "; this GPU has no fp8 tensor cores: bf16 rate, weight-only quantization)"))
        if note not in self.warnings:
            self.warnings.append(note)
        slope = curve.slope * float(factor[-1])
        return Curve1D.of(curve.xs, ts, slope, curve.ks), {
            "source": "generalised", "from": src.get("from", "gemm " + bf16) if src["source"] == "measured"
            else src["from"], "how": "fp8 from bf16 (stated model)"}

    def _nearest_gemm_kernels(self, n: int, k: int, xs: np.ndarray) -> np.ndarray:
        keys = [key for (o, key) in self.table.groups if o == "gemm"]
        best = min(sorted(keys), key=lambda key: abs(np.log(float(parse_key(key)["n"]) / n))
                   + abs(np.log(float(parse_key(key)["k"]) / k)))
        return self._measured_curve("gemm", best).kernels_many(xs, 1)

    def _allreduce_curve(self, key: str) -> tuple[Curve1D, dict]:
        """All-reduce time over bytes at this TP size: measured at another TP size on this GPU, read at the
        bytes that put the same traffic on each link (a ring moves 2 (n-1)/n of the bytes per GPU; the
        latency part is carried over as measured), else a ring over the spec's NVLink bandwidth."""
        from sim.costs.generalise import ring_allreduce_time
        from sim.costs.model import make_key

        tp = self.ops.tp
        measured = sorted(int(parse_key(k).get("tp", 0)) for (o, k) in self.table.groups if o == "allreduce")
        measured = [m for m in measured if m > 1]
        if measured:
            m = min(measured, key=lambda v: (abs(np.log(v / tp)), v))
            src = make_key(tp=m)
            ratio = ((tp - 1) / tp) / ((m - 1) / m)
            return self._scaled(self._measured_curve("allreduce", src), ratio), {
                "source": "generalised", "from": f"allreduce {src}",
                "how": f"bytes x {ratio:.4g} (a ring's per-link traffic at tp={tp} over tp={m}; latency as measured)"}
        xs = np.geomspace(1024.0, 2.0 ** 31, 64)
        ts = ring_allreduce_time(xs, tp, self.gpu)
        note = (f"allreduce tp={tp}: not measured on this table; a ring all-reduce over NVLink at "
                f"{self.gpu.nvlink_bandwidth_bytes_per_s / 1e9:,.0f} GB/s x 0.7 plus 8 us prices it")
        if note not in self.warnings:
            self.warnings.append(note)
        return Curve1D.of(xs, ts, (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]), np.ones_like(xs)), {
            "source": "modelled", "from": "GPU spec (NVLink)", "how": "ring all-reduce"}

    # ------------------------------------------------------------------ recipes
    def _apply_recipe(self, op: OpDef, rec, base: Curve1D | None) -> tuple[Curve1D, int, float]:
        """The op's curve under a recipe (sum of its kernels at each x), its nominal kernels per call,
        and the host seconds an eager engine spends issuing them."""
        from sim.costs.recipe import extent

        xs = base.xs if base is not None else TOKEN_GRID
        ts = np.zeros_like(xs)
        ks = np.zeros_like(xs)
        nominal, host = 0, 0.0
        per_op_host = self.table.meta.get("launch", {}).get("op_host_s", {})
        for spec in rec.kernels:
            if spec.price == "table":
                if base is not None:
                    t = base.at(xs)
                    kk = base.kernels_many(xs, int(self._table_kernels(op)))
                else:
                    t = self._roof_ref().times_at(op, xs)
                    kk = np.full(xs.shape, float(self._table_kernels(op)))
                n_table = int(self._table_kernels(op))
                n_call = n_table if spec.count == -1 else spec.count
                if spec.count != -1:
                    kk = np.full(xs.shape, float(spec.count))
                ts += t
                ks += kk
                nominal += n_call
                # the call's measured host cost, plus a dispatch for each kernel beyond the table's
                host += float(per_op_host.get(op.table_op, self.launch.dispatch_s * n_table))
                host += self.launch.dispatch_s * max(n_call - n_table, 0)
            elif spec.price == "bytes":
                t = self._bytes().time(xs * spec.bytes_per_row(self.ops)) * spec.count
                ts += t
                ks += spec.count
                nominal += spec.count
                host += self.launch.dispatch_s * spec.count
            else:   # gemm
                n, k = extent(self.ops, spec.n), extent(self.ops, spec.k)
                curve, _ = self._gemm_curve(n, k)
                ts += curve.at(xs) * spec.count
                ks += curve.kernels_many(xs, 1) * spec.count
                nominal += spec.count
                host += float(per_op_host.get("gemm", self.launch.dispatch_s)) * spec.count
        ts *= rec.scale_at(xs)
        slope = (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]) if xs.size > 1 else 0.0
        return Curve1D.of(xs, ts, slope, ks), nominal, host

    def _table_kernels(self, op: OpDef) -> int:
        return int(self.table.kernels(op.table_op, _NOMINAL_KERNELS.get(op.table_op, 1)))

    def recipe_kernels_per_layer(self) -> int:
        """Nominal kernels of one layer under the recipe (table kernels at the table's per-op count;
        one attention op): what a profiler counts for a layer, split-K GEMM pairs aside."""
        total = 0
        for i, op in enumerate(self.ops.ops):
            if not op.per_layer or op.table_op == "attn_prefill" or (op.table_op == "allreduce" and self.ops.tp == 1):
                continue
            total += int(self.kernels[i]) + (self._attn_extra_k.get(i, 0) if op.table_op == "attn_decode" else 0)
        return total

    # ------------------------------------------------------------------ attention
    def _init_attention(self, dec: OpDef, pre: OpDef) -> None:
        m = self.ops.model
        self._dec_r = 1.0
        self._pre_rho, self._pre_floor = 1.0, 0.0
        self._attn_extra: dict[int, list] = {}
        self._attn_extra_k: dict[int, int] = {}
        self._attn_scale: dict[int, object] = {}
        # decode
        if (dec.table_op, dec.key) in self.missing:
            self.decode = None
            self.sources[dec.name] = {"table_op": dec.table_op, "key": dec.key, "source": "roofline"}
        else:
            src = self._attention_source("attn_decode", dec.key, by="kv")
            self.decode = DecodeGrid(self.table.points("attn_decode", src), self.table.tail("attn_decode", src))
            sp = parse_key(src)
            self._dec_r = (self.ops.kv_heads * m.head_dim * m.bytes_per_kv) / (
                float(sp["kvh"]) * float(sp["d"]) * _dtype_bytes(sp.get("dtype", "bf16")))
            entry = {"source": "measured"} if src == dec.key else {
                "source": "generalised", "from": f"attn_decode {src}",
                "how": f"same KV bytes: batch x {self._dec_r:.4g} (memory-bound in KV bytes)"}
            self.sources[dec.name] = {"table_op": dec.table_op, "key": dec.key, **entry}
            pts = self.table.points("attn_decode", src)
            self._dec_ctx_max, self._dec_batch_max = float(pts["y"].max()), float(pts["x"].max())
            self._dec_ctx_min = float(pts["y"].min())
        # prefill
        if (pre.table_op, pre.key) in self.missing:
            self.prefill = None
            self.sources[pre.name] = {"table_op": pre.table_op, "key": pre.key, "source": "roofline"}
        else:
            src = self._attention_source("attn_prefill", pre.key, by="q")
            pts = self.table.points("attn_prefill", src)
            self.prefill = PrefillGrid(pts, self.table.tail("attn_prefill", src))
            sp = parse_key(src)
            self._pre_rho = (self.ops.q_heads * m.head_dim) / (float(sp["qh"]) * float(sp["d"]))
            self._pre_floor = float(pts["time_s"].min())
            entry = {"source": "measured"} if src == pre.key else {
                "source": "generalised", "from": f"attn_prefill {src}",
                "how": f"time above the grid's floor x {self._pre_rho:.4g} (compute-bound in qh x d)"}
            self.sources[pre.name] = {"table_op": pre.table_op, "key": pre.key, **entry}
            self._pre_q_max, self._pre_c_max = float(pts["x"].max()), float(pts["y"].max())
            self._pre_q_min = float(pts["x"].min())
        # recipe: extra kernels priced with the attention call, and corrections
        for i, op in ((self._ia, dec), (self._ip, pre)):
            rec = self.recipe.for_op(op)
            if rec.is_table:
                continue
            extra = [k for k in rec.kernels if k.price == "bytes"]
            self._attn_extra[i] = extra
            self._attn_extra_k[i] = sum(k.count for k in extra)
            self._attn_scale[i] = rec
            self.kernels[i] += self._attn_extra_k[i]
            self.sources[op.name]["recipe"] = [k.name for k in rec.kernels]
            if rec.scale != 1.0:
                self.sources[op.name]["scale"] = rec.scale if not isinstance(rec.scale, tuple) else \
                    [list(p) for p in rec.scale]

    def _attention_source(self, op: str, key: str, by: str) -> str:
        """The measured key that prices attention at ``key``: itself, else the nearest measured one
        (same head dim first; then KV heads for decode, query heads for prefill; bf16 first)."""
        if self.table.has(op, key):
            return key
        keys = [k for (o, k) in self.table.groups if o == op]
        if not keys:
            raise _CannotGeneralise(f"no measured {op}")
        want = parse_key(key)

        def dist(k: str) -> float:
            p = parse_key(k)
            return (10.0 * abs(np.log(float(p["d"]) / float(want["d"])))
                    + abs(np.log(float(p["kvh" if by == "kv" else "qh"]) / float(want["kvh" if by == "kv" else "qh"])))
                    + (0.0 if p.get("dtype", "bf16") == "bf16" else 1.0))

        return min(sorted(keys), key=dist)

    def _attn_extra_time(self, i: int, tokens: float) -> float:
        extra = self._attn_extra.get(i)
        if not extra:
            return 0.0
        bm = self._bytes()
        return float(sum(float(bm.time(tokens * k.bytes_per_row(self.ops))) * k.count for k in extra))

    # ------------------------------------------------------------------ host
    def _host_model(self, table: CostTable, recipe_host: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Host seconds per op call of an eager engine, and its per-step host work before the first
        launch. Per-op call costs come from the tiny-shape call timings; when the table also measured
        the engine's whole host cost per layer and per step, the per-layer ops are scaled to add up
        to that (the engine's Python, views and glue count too) and the step's fixed part leads.
        Ops a recipe changes cost their kernels' calls, scaled alike."""
        launch = table.meta.get("launch", {})
        per_op = launch.get("op_host_s", {})
        ops = self.ops.ops
        base = np.array([float(per_op.get(op.table_op, self.launch.dispatch_s * self.kernels[i]))
                         for i, op in enumerate(ops)])
        fused_base = base.copy()
        if recipe_host is not None:
            base = np.where(recipe_host > 0, recipe_host, base)
        layer_s = launch.get("engine_layer_host_s")
        step_s = launch.get("engine_step_host_s")
        if layer_s:
            # one layer runs one attention op (decode or prefill): price the layer with decode's; the
            # scale is the fused engine's (the reference engine's measured host cost per layer)
            in_layer = np.array([op.per_layer and op.table_op != "attn_prefill" for op in ops])
            scale = float(layer_s) / float(fused_base[in_layer].sum())
            base = np.where([op.per_layer for op in ops], base * scale, base)
        lead = 0.0
        if step_s:
            outside = float(fused_base[[not op.per_layer for op in ops]].sum())
            lead = max(float(step_s) - outside - self.launch.sync_s, 0.0)
        return base, lead

    # ------------------------------------------------------------------ hot path
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
                          else self.kernels[i]) + (self._attn_extra_k.get(i, 0) if self.decode else 0)
            elif not dense:
                curve = self.curves.get(i)
                if curve is not None:
                    out[i] = curve.kernels_at(sampled if op.rows == "sampled" else tokens, int(out[i]))
        return out

    DENSE_MAX = 16384

    def _fixed_ops(self) -> tuple[list[int], list[int], dict[int, float]]:
        """The ops priced from their own curves (not attention, not an all-reduce at TP 1): those whose
        x is the step's tokens, those whose x is its sampled rows, and each one's x per token or row
        (an all-reduce's bytes per token, else 1)."""
        ops = self.ops
        needed = [i for i, op in enumerate(ops.ops)
                  if not op.table_op.startswith("attn") and not (op.table_op == "allreduce" and ops.tp == 1)]
        unit = {i: (ops.model.hidden_size * ops.model.bytes_per_weight if ops.ops[i].table_op == "allreduce" else 1)
                for i in needed}
        return ([i for i in needed if ops.ops[i].rows != "sampled"],
                [i for i in needed if ops.ops[i].rows == "sampled"], unit)

    def _build_dense(self):
        """Per-op times and kernel counts for every token count (and sampled-row count) inside the
        measured grids, so that pricing a step's fixed ops is one row lookup. None when an op is priced
        by the roofline fallback (then the per-shape path, cached, is used)."""
        ops = self.ops
        n = len(ops.ops)
        tok, smp, unit = self._fixed_ops()
        if any(i not in self.curves for i in tok + smp):
            return None

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

    def _build_above(self) -> "_AboveGrids":
        """The token-row ops' curve ends (see :class:`_AboveGrids`): the vector path of steps longer
        than every token-row grid. Built only with the dense tables (every such op has a curve)."""
        ops = self.ops
        tok, smp, unit = self._fixed_ops()
        groups: dict[str, list[int]] = {}
        for j, i in enumerate(tok):
            groups.setdefault(ops.ops[i].table_op, []).append(j)
        u = np.array([unit[i] for i in tok], dtype=np.float64)
        xs_last = np.array([self.curves[i].xs[-1] for i in tok], dtype=np.float64)
        return _AboveGrids(
            idx=np.array(tok, dtype=np.int64), unit=u,
            allreduce=np.array([ops.ops[i].table_op == "allreduce" for i in tok], dtype=bool), xs_last=xs_last,
            ts_last=np.array([self.curves[i].ts[-1] for i in tok], dtype=np.float64),
            slope=np.array([self.curves[i].slope for i in tok], dtype=np.float64),
            groups=[(name, np.array(js, dtype=np.int64)) for name, js in groups.items()],
            t_min=int(np.floor(np.max(xs_last / u))) if tok else 0,
            sampled_x0=max([float(self.curves[i].xs[0]) for i in smp], default=0.0))

    def _fixed_above(self, tokens: int, sampled: int) -> np.ndarray | None:
        """:meth:`fixed_times` of a step beyond every token-row grid (None where that does not hold):
        the same values and the same extrapolation notes as the per-op lookups."""
        a = self._above
        if tokens <= a.t_min or (0 < sampled < a.sampled_x0):
            return None
        x = tokens * a.unit
        if a.allreduce.any():      # (as ``op_x`` computes it)
            x = np.where(a.allreduce, float(tokens * self.ops.model.hidden_size * self.ops.model.bytes_per_weight), x)
        if not (x > a.xs_last).all():
            return None
        out = self._dense[3][sampled].copy()
        out[a.idx] = a.ts_last + a.slope * (x - a.xs_last)
        over = x / a.xs_last
        for name, js in a.groups:
            self._note(name, int(js.shape[0]), float(over[js].max()))
        return out

    def _note(self, name: str, n: int, over: float, under: float = 1.0) -> None:
        """Count ``n`` lookups of ``name`` outside its grid: the largest coordinate was ``over`` times
        the grid's largest, the smallest ``under`` times the grid's smallest."""
        self.extrapolations[name] = self.extrapolations.get(name, 0) + n
        if over > self.ext_over.get(name, 1.0):
            self.ext_over[name] = float(over)
        if under < self.ext_under.get(name, 1.0):
            self.ext_under[name] = float(under)

    def fixed_times(self, tokens: int, sampled: int) -> np.ndarray:
        d = self._dense
        if d is not None and tokens <= d[0] and sampled <= d[1]:
            return d[2][tokens] + d[3][sampled]
        key = (tokens, sampled)
        got = self._cache.get(key)
        if got is not None:
            return got
        if self._above is not None and sampled <= d[1]:
            got = self._fixed_above(tokens, sampled)
            if got is not None:
                self._cache[key] = got
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
                self._note(op.table_op, 1, x / curve.xs[-1], x / curve.xs[0])
            out[i] = t
        self._cache[key] = out
        return out

    def prefill_attention_time(self, q: np.ndarray, c: np.ndarray) -> float:
        if self.prefill is None:
            return self.roofline.prefill_attention_time(q, c)
        t, ext = self.prefill.time(q, c)
        if ext:
            self._note("attn_prefill", 1, max(float(np.max(q)) / self._pre_q_max, float(np.max(c)) / self._pre_c_max),
                       float(np.min(q)) / self._pre_q_min)
        if self._pre_rho != 1.0:
            floor = min(self._pre_floor, t)
            t = floor + (t - floor) * self._pre_rho
        rec = self._attn_scale.get(self._ip)
        if rec is not None:
            rows = float(np.sum(q))
            t = (t + self._attn_extra_time(self._ip, rows)) * float(rec.scale_at(rows))
        return t

    def decode_linear_run(self, batch: int, ctx0: int, step: int, k: int, weight: float, base: float
                          ) -> np.ndarray | None:
        # what decode_attention_times computes for one query per sequence, when it is the grid alone
        if self.decode is None or self._dec_r != 1.0 or self._attn_scale.get(self._ia) is not None:
            return None
        out, n_ext = _decode_linear(*self.decode._flat, float(batch), ctx0, step, k, weight, base)
        if n_ext:
            ends = (ctx0, ctx0 + step * (k - 1))
            self._note_decode(n_ext, batch, 1.0, float(max(ends)), float(min(ends)))
        return out

    def _note_decode(self, n_ext: int, batch: int, r: float, ctx_max: float, ctx_min: float) -> None:
        """Decode attention looked up outside its grid ``n_ext`` times, at ``batch`` sequences (times
        ``r``: see ``_dec_r``) whose context totals spanned ``ctx_min .. ctx_max``."""
        self._note("attn_decode", n_ext, max(ctx_max / batch / self._dec_ctx_max, batch * r / self._dec_batch_max),
                   min(ctx_min / batch / self._dec_ctx_min, batch * r))

    def decode_attention_times(self, batch: int, ctx_sums: np.ndarray, query_tokens: int = 1) -> np.ndarray:
        if self.decode is None:
            return self.roofline.decode_attention_times(batch, ctx_sums, query_tokens)
        r = self._dec_r
        if r == 1.0:
            t, n_ext = self.decode.fast(batch, ctx_sums)
        else:
            # the batch that reads the same KV bytes with the same parallelism (batch x KV heads);
            # under one sequence, one sequence over r times the context
            t, n_ext = self.decode.fast(max(batch * r, 1.0), np.asarray(ctx_sums, np.float64) * r)
        if n_ext:
            self._note_decode(n_ext, batch, r, float(np.max(ctx_sums)), float(np.min(ctx_sums)))
        if query_tokens > 1:
            # The table holds one query per sequence; several (speculative verify) cost what the
            # roofline says they add on top of one, since the KV is read once either way.
            ref = self._roof_ref().decode_attention_times(batch, ctx_sums, 1)
            t = t * (self._roof_ref().decode_attention_times(batch, ctx_sums, query_tokens) / ref)
        rec = self._attn_scale.get(self._ia)
        if rec is not None:
            rows = float(batch * query_tokens)
            t = (t + self._attn_extra_time(self._ia, rows)) * float(rec.scale_at(rows))
        return t

    def _roof_ref(self) -> RooflineBackend:
        if self.roofline is None:
            self.roofline = RooflineBackend(self.ops, self.gpu)
        return self.roofline

    # ------------------------------------------------------------------ report
    def flops_bytes(self, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """Per-op FLOPs and bytes of one instance; bytes follow the recipe's kernels."""
        flops, nbytes = self.ops.flops_bytes(shape)
        if self.recipe.name == "fused":
            return flops, nbytes
        from sim.costs.recipe import extent

        for i, op in enumerate(self.ops.ops):
            rec = self.recipe.for_op(op)
            if rec.is_table:
                continue
            rows = self.ops.op_x(op, shape) if op.table_op != "allreduce" else 0.0
            if op.table_op.startswith("attn"):
                rows = float(shape.num_tokens)
            total = 0.0
            for k in rec.kernels:
                if k.price == "table":
                    total += nbytes[i]
                elif k.price == "bytes":
                    total += rows * k.bytes_per_row(self.ops) * k.count
                else:
                    n, kk = extent(self.ops, k.n), extent(self.ops, k.k)
                    total += (rows * kk + kk * n + rows * n) * self.ops.model.bytes_per_weight * k.count
            nbytes[i] = total
        return flops, nbytes

    def lookup_report(self, execution: str | None = None) -> dict:
        ops = {}
        for op in self.ops.ops:
            if op.table_op == "allreduce" and self.ops.tp == 1:
                continue
            ops[op.name] = dict(self.sources.get(op.name, {"table_op": op.table_op, "key": op.key,
                                                            "source": "roofline"}))
        classes: dict[str, int] = {}
        for entry in ops.values():
            classes[entry["source"]] = classes.get(entry["source"], 0) + 1
        ext = {name: {"lookups": n, "max_over_grid": round(self.ext_over.get(name, 1.0), 3),
                      "min_under_grid": round(self.ext_under.get(name, 1.0), 3)}
               for name, n in sorted(self.extrapolations.items())}
        out = {"backend": "table", "table": self.table.dir.name, "recipe": self.recipe.name,
               "classes": dict(sorted(classes.items())), "ops": ops,
               "extrapolated_lookups": dict(sorted(self.extrapolations.items())), "extrapolated": ext,
               "roofline_priced": sorted(n for n, e in ops.items() if e["source"] == "roofline"),
               "selection": self._selection_report(), "warnings": list(self.warnings)}
        if execution is not None:
            bars = self.error_bars()
            out["error_bars"] = bars.for_run(execution, self.generalised) if bars is not None else {
                "line": "error bars: this table has no validation measurements", "classes": []}
        return out

    @property
    def generalised(self) -> bool:
        """Whether any op is priced from something other than its exact-shape measurement."""
        return any(e.get("source") != "measured" for e in self.sources.values()) or self.recipe.name != "fused"

    def error_bars(self):
        """The table's validation error bars (``sim.costs.accuracy.ErrorBars``), or None."""
        if not hasattr(self, "_error_bars"):
            from sim.costs.accuracy import ErrorBars

            self._error_bars = ErrorBars.for_table(self.table.dir)
        return self._error_bars


# kernels per call of each table op when a table does not say (the reference decoder's, fused recipe)
_NOMINAL_KERNELS = {"rope": 10, "kv_write": 2, "act": 2}


def _dtype_bytes(name: str) -> float:
    from sim.costs.generalise import BYTES

    return float(BYTES.get(name, 2))


class _CannotGeneralise(Exception):
    """Nothing measured on this GPU prices the op."""
