"""The cost-backend protocol: what a step's pricing needs from a source of per-op GPU times.

:class:`sim.costs.step.StepCostModel` (and so the engine's step builder) talks to costs only through
:class:`CostBackend`. Two backends implement it: ``TableBackend`` (measured tables, ``sim.costs.table``)
and ``RooflineBackend`` (the GPU spec, ``sim.costs.roofline``); both derive from :class:`BackendBase`,
which supplies the parts they share: the SM-share derivation (:meth:`BackendBase.for_share`), the
top-k selection cost (:meth:`BackendBase.selection_time`) and the lookup report.

Units: seconds, bytes, FLOPs; token counts are integers. "One instance" of an op means one call of
it: one layer for a per-layer op (``OpDef.per_layer``), the whole step otherwise.

SM share. ``for_share(f)`` is the same backend with the model's kernels confined to a fraction ``f`` of
the GPU's SMs (a persistent megakernel keeping SMs for its scheduler, a prefill/decode SM partition).
Each kernel's time above its fixed per-kernel floor is stretched by
``max(c / s_c(f), m / s_m(f)) / max(c, m)``, where ``c`` and ``m`` are the kernel's roofline compute
and memory times and ``s_c``, ``s_m`` the achievable fractions of compute rate and HBM bandwidth with
``f`` of the SMs (:class:`ShareCurves`). FMA throughput grows linearly with the SMs used
(``raw/sm_fma.parquet``: the same per-block time on 1 and on all 132 SMs), so ``s_c(f) = f``; HBM
bandwidth saturates with well under all SMs (``raw/hbm_stream.parquet``, ``extra.sweep == "blocks"``:
one 1,024-thread block per SM reaches 98 % of the full-chip copy bandwidth with half of an H100's
SMs), so memory-bound kernels slow far less.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from policies.base import LaunchCosts
from sim.costs.model import StepShape, TransformerOps
from sim.specs import GPUSpec


@runtime_checkable
class CostBackend(Protocol):
    """Per-op GPU times of one model (``ops``) on one GPU (``gpu``), and the host constants around them.

    Attributes:
        ops: the model's operator list under its tensor-parallel shard (``TransformerOps``).
        gpu: the GPU spec the times are for.
        identity: where the times come from (backend, table name and sha256, ...): goes into every
            result's metadata.
        launch: host/launch constants (seconds) that execution policies combine with kernel times.
        extrapolations: lookups beyond a measured grid so far, per table op (count; the run summary
            reports it). Grows as steps are priced.
        host_call_s: host seconds an eager engine spends issuing one call of each op (array over
            ``ops.ops``), spread over the op's kernels by ``KernelSequence``.
        step_host_s: host seconds of per-step work before an eager step's first launch.
        switch_s: extra GPU seconds per kernel inside a model over back-to-back isolated timings.
    """

    ops: TransformerOps
    gpu: GPUSpec
    identity: dict
    launch: LaunchCosts
    extrapolations: dict[str, int]
    host_call_s: np.ndarray
    step_host_s: float
    switch_s: float

    def fixed_times(self, tokens: int, sampled: int) -> np.ndarray:
        """Seconds of one instance of each op (array over ``ops.ops``) for a step of ``tokens`` tokens
        of which ``sampled`` rows produce a token; attention ops are 0 here (they vary per step: see
        the two attention methods). The caller must not modify the array (backends cache it)."""
        ...

    def kernel_counts(self, tokens: int, sampled: int, has_prefill: bool, has_decode: bool) -> np.ndarray:
        """Kernels one instance of each op launches in such a step (int64 array over ``ops.ops``; 0
        for an op that does not run: attention of an absent phase, all-reduce at TP 1, the LM head
        and sampling when nothing samples)."""
        ...

    def prefill_attention_time(self, q: np.ndarray, c: np.ndarray) -> float:
        """Seconds of one layer's prefill attention over the step's chunks: chunk ``i`` has ``q[i]``
        new tokens on top of ``c[i]`` cached ones (int64 arrays of equal length >= 1)."""
        ...

    def decode_attention_times(self, batch: int, ctx_sums: np.ndarray, query_tokens: int = 1) -> np.ndarray:
        """Seconds of one layer's decode attention for each of several steps of ``batch`` sequences:
        ``ctx_sums[j]`` is the total KV tokens all queries of step ``j`` read (the new tokens
        included; fewer with sparse attention), ``query_tokens`` the query tokens per sequence (more
        than 1 for a speculative verify step). Vectorised over ``ctx_sums`` (float64 array)."""
        ...

    def decode_linear_run(self, batch: int, ctx0: int, step: int, k: int, weight: float, base: float
                          ) -> np.ndarray | None:
        """``decode_attention_times(batch, ctx_sums) * weight + base`` for the ``k`` steps whose context
        totals are ``ctx0 + step * j`` (integers), bit for bit and with the same extrapolation
        counts, in one compiled pass; None where the backend has no such pass (the cost model then
        takes the general way). A dense decode run's steps, priced at the cost of one call."""
        ...

    def selection_time(self, num_seqs: int, units_per_seq: float, k: int) -> float:
        """Seconds of one top-``k`` selection over ``units_per_seq`` scored units (KV blocks, pages)
        for each of ``num_seqs`` sequences (one call; 0 when nothing is selected)."""
        ...

    def for_share(self, sm_fraction: float) -> CostBackend:
        """This backend with the model's kernels confined to ``sm_fraction`` (0 < f <= 1) of the
        GPU's SMs. Cached per value; ``1.0`` returns the backend itself. Always a fraction of the
        whole GPU, also when called on a derived backend."""
        ...

    def flops_bytes(self, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """FLOPs and bytes of one instance of each op in ``shape`` as the backend's kernels move them
        (arrays over ``ops.ops``; for explanation, not pricing)."""
        ...

    def lookup_report(self, execution: str | None = None) -> dict:
        """Where each op's times came from, for the run summary (``summary["costs"]``): per op its
        source (``measured`` at the model's exact shape, ``generalised`` from other shapes of this
        GPU and how, ``modelled`` from a microkernel or the spec where this GPU measured nothing like
        it, ``roofline`` from the GPU spec), lookups beyond the measured grids (how many, and how far:
        the coordinate over the grid's largest, or under its smallest), warnings, and with
        ``execution`` (an execution policy's name) the validation error bars of that mode."""
        ...


# ------------------------------------------------------------------------------------ SM share
def _read_raw(table_dir: Path | None, name: str):
    """A raw measurement file of a table directory as a DataFrame, or None when it is not there."""
    if table_dir is None:
        return None
    path = Path(table_dir) / "raw" / f"{name}.parquet"
    if not path.exists():
        return None
    import pandas as pd

    return pd.read_parquet(path)


def _has_rows(table_dir: Path | None, name: str) -> bool:
    """Whether a table directory's raw measurement file exists and holds rows (its footer only)."""
    if table_dir is None:
        return False
    path = Path(table_dir) / "raw" / f"{name}.parquet"
    if not path.exists():
        return False
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows > 0


@dataclass(frozen=True, slots=True)
class ShareCurves:
    """Achievable fractions of the full GPU's compute rate and HBM bandwidth with a subset of its SMs.

    ``mem_sms``/``mem_frac``: bandwidth with that many SMs over the bandwidth with all of them (one
    block per SM; non-decreasing). ``compute_exponent``: compute rate ∝ (SMs used)^exponent (1 =
    linear). ``floor_s``: per-kernel time that does not depend on the SMs (launch, ramp, tail).
    ``source`` says where the curves were measured. ``peak_bytes_per_s``: the full-chip bandwidth that
    sweep measured (all SMs, one block each), the most any set of concurrent kernels can draw; 0 when
    not measured (then the GPU spec's, :meth:`BackendBase.hbm_peak_bytes_per_s`).
    """

    sm_count: int
    mem_sms: tuple[float, ...]
    mem_frac: tuple[float, ...]
    compute_exponent: float = 1.0
    floor_s: float = 2.0e-6
    source: str = "assumed"
    peak_bytes_per_s: float = 0.0

    def compute(self, f: float) -> float:
        """Fraction of the full compute rate with ``f`` of the SMs."""
        return float(f) ** self.compute_exponent

    def memory(self, f: float) -> float:
        """Fraction of the full HBM bandwidth with ``f`` of the SMs."""
        sms = max(float(f) * self.sm_count, 1.0)
        return float(np.interp(sms, self.mem_sms, self.mem_frac))

    @classmethod
    def assumed(cls, sm_count: int, source: str = "assumed") -> ShareCurves:
        """No measurement: bandwidth linear in SMs up to 40 % of them, saturated above (the shape the
        H100 and H200 sweeps show: 80-90 % at a quarter of the SMs, 97-100 % at half)."""
        knee = 0.4 * sm_count
        return cls(sm_count, (1.0, knee, float(sm_count)), (1.0 / knee, 1.0, 1.0), 1.0, 2.0e-6, source)

    @classmethod
    def measured(cls, table_dir: Path | None, sm_count: int) -> ShareCurves:
        """From a table's ``raw/hbm_stream.parquet`` (``*_vs_blocks`` rows, y = thread blocks of 1,024
        threads, one per SM up to the SM count), ``raw/sm_fma.parquet`` (``fma_per_sm`` rows: time of
        a fixed per-block FMA chain on 1..SM-count blocks) and ``raw/launch.parquet``
        (``gpu_per_kernel``: back-to-back empty-kernel time, the per-kernel floor)."""
        hbm = _read_raw(table_dir, "hbm_stream")
        if hbm is None:
            return cls.assumed(sm_count, "assumed (no raw/hbm_stream.parquet)")
        sweep = [json.loads(e).get("sweep") if e else None for e in hbm["extra"]]
        rows = hbm[np.array([s == "blocks" for s in sweep], dtype=bool) & (hbm["bytes"] > 0)]
        if rows.empty:
            return cls.assumed(sm_count, "assumed (no blocks sweep in raw/hbm_stream.parquet)")
        bw = (rows["bytes"] / rows["median_s"]).groupby(rows["y"]).median()
        blocks = bw.index.to_numpy(float)
        full = float(bw[blocks <= sm_count].iloc[-1]) if (blocks <= sm_count).any() else float(bw.iloc[-1])
        sel = blocks <= sm_count
        sms = blocks[sel]
        frac = np.maximum.accumulate(np.minimum(bw.to_numpy(float)[sel] / full, 1.0))
        if sms[-1] < sm_count:
            sms, frac = np.append(sms, sm_count), np.append(frac, 1.0)
        exponent = 1.0
        fma = _read_raw(table_dir, "sm_fma")
        if fma is not None:
            per = fma[(fma["variant"] == "fma_per_sm") & (fma["median_s"] > 0)]
            if len(per) >= 2:
                rate = per["flops"].to_numpy(float) / per["median_s"].to_numpy(float)
                exponent = float(np.polyfit(np.log(per["x"].to_numpy(float)), np.log(rate), 1)[0])
        floor = 2.0e-6
        launch = _read_raw(table_dir, "launch")
        if launch is not None:
            k = launch[launch["variant"] == "gpu_per_kernel"]
            if len(k):
                floor = float(k["median_s"].median())
        return cls(sm_count, tuple(sms.tolist()), tuple(frac.tolist()), exponent, floor,
                   f"{Path(table_dir).name}/raw: hbm_stream blocks sweep, sm_fma per-SM, launch gpu_per_kernel",
                   full)


def share_factor(flops: np.ndarray, nbytes: np.ndarray, gpu: GPUSpec, curves: ShareCurves,
                 f: float) -> np.ndarray:
    """Stretch of each kernel's time above its floor when confined to ``f`` of the SMs (>= 1)."""
    c = np.asarray(flops, float) / gpu.peak_bf16_flops
    m = np.asarray(nbytes, float) / gpu.hbm_bandwidth_bytes_per_s
    base = np.maximum(c, m)
    slow = np.maximum(c / curves.compute(f), m / curves.memory(f))
    return np.where(base > 0, slow / np.where(base > 0, base, 1.0), 1.0)


def stretch(t: np.ndarray, kernels: np.ndarray, factor: np.ndarray, floor_s: float) -> np.ndarray:
    """``t`` with its part above ``kernels × floor_s`` stretched by ``factor``."""
    t = np.asarray(t, float)
    fixed = np.minimum(np.asarray(kernels, float) * floor_s, t)
    return fixed + (t - fixed) * factor


# ------------------------------------------------------------------------------------ top-k selection
class SelectionModel:
    """Top-k selection time over per-sequence scored units, from the ``topk`` microkernel.

    ``raw/topk.parquet`` (``calibration/kernels/topk.py``): one 256-thread block per row runs a radix
    select; x = units per row, y = k, z = rows (sequences). Its time does not follow k (the spread over
    k at one (units, rows) point is noise of ±20 % around a flat mean), so the model is the median over
    k, bilinear in (log2 units, log2 rows) inside the grid. Beyond it, time grows linearly in units per
    row and in waves of rows over the SMs, from the last measured edge; every such lookup is counted.
    Without the measurement: a floor plus four passes over the scores at HBM speed (a lower bound).
    """

    def __init__(self, topk_rows, gpu: GPUSpec, floor_s: float = 2.5e-6) -> None:
        self.gpu = gpu
        self.floor_s = floor_s
        self.measured = topk_rows is not None and len(topk_rows) > 0
        if self.measured:
            med = topk_rows.groupby(["x", "z"])["median_s"].median()
            self.units = np.unique(med.index.get_level_values(0).to_numpy(float))
            self.rows = np.unique(med.index.get_level_values(1).to_numpy(float))
            grid = np.full((self.units.size, self.rows.size), np.nan)
            for (u, r), t in med.items():
                grid[np.searchsorted(self.units, u), np.searchsorted(self.rows, r)] = t
            # fill holes along rows (nearest measured batch), then along units
            for i in range(grid.shape[0]):
                ok = np.isfinite(grid[i])
                if ok.any():
                    grid[i] = np.interp(np.log2(self.rows), np.log2(self.rows[ok]), grid[i, ok])
            self.grid = grid
        self.source = self.source_of(self.measured)
        self.extrapolated = 0
        self.max_over = 1.0

    @staticmethod
    def source_of(measured: bool) -> str:
        return "topk microkernel (radix select)" if measured else "roofline (no topk measurement)"

    def time(self, num_seqs: int, units_per_seq: float, k: int) -> float:
        if num_seqs <= 0 or units_per_seq <= 0 or k <= 0:
            return 0.0
        if not self.measured:
            nbytes = 4.0 * num_seqs * units_per_seq * 4.0
            return self.floor_s + nbytes / (self.gpu.hbm_bandwidth_bytes_per_s * 0.85)
        lu, lr = np.log2(self.units), np.log2(self.rows)
        u = min(max(float(units_per_seq), self.units[0]), self.units[-1])
        r = min(max(float(num_seqs), self.rows[0]), self.rows[-1])
        col = np.array([np.interp(np.log2(r), lr, self.grid[i]) for i in range(self.units.size)])
        t = float(np.interp(np.log2(u), lu, col))
        over = max(units_per_seq / self.units[-1], num_seqs / self.rows[-1], 1.0)
        if over > 1.0:
            self.extrapolated += 1
            self.max_over = max(self.max_over, over)
            # beyond the grid: the work above the grid's edge at the edge's per-unit rate, per wave
            waves = max(np.ceil(num_seqs / self.gpu.sm_count) / np.ceil(r / self.gpu.sm_count), 1.0)
            per_unit = max((col[-1] - col[-2]) / (self.units[-1] - self.units[-2]), 0.0) if col.size > 1 else 0.0
            t = (t + per_unit * max(units_per_seq - u, 0.0)) * waves
        return t


# ------------------------------------------------------------------------------------ the shared base
class BackendBase:
    """What every backend shares: SM-share derivation, top-k selection, the lookup report's frame.

    Subclasses set ``ops``, ``gpu``, ``identity``, ``launch``, ``extrapolations``, ``host_call_s``,
    ``step_host_s``, ``switch_s``, and call :meth:`_init_shared` with the table directory whose raw
    microkernel measurements (``hbm_stream``, ``sm_fma``, ``launch``, ``topk``) calibrate the SM share
    and the selection cost (None: stated assumptions).
    """

    ops: TransformerOps
    gpu: GPUSpec
    switch_s: float = 0.0
    step_host_s: float = 0.0

    def _init_shared(self, table_dir: Path | None) -> None:
        # the SM-share curves and the selection model read raw measurements with pandas: built on first
        # use (SM sharing, fp8 GEMMs, sparse attention), not by every run
        self._table_dir = table_dir
        self._share_curves: ShareCurves | None = None
        self._selection: SelectionModel | None = None
        self._shares: dict[float, CostBackend] = {}

    @property
    def share_curves(self) -> ShareCurves:
        if self._share_curves is None:
            self._share_curves = (ShareCurves.measured(self._table_dir, self.gpu.sm_count)
                                  if self._table_dir is not None else ShareCurves.assumed(self.gpu.sm_count))
        return self._share_curves

    @property
    def selection(self) -> SelectionModel:
        if self._selection is None:
            self._selection = SelectionModel(_read_raw(self._table_dir, "topk"), self.gpu)
        return self._selection

    @property
    def hbm_peak_bytes_per_s(self) -> float:
        """The most HBM bandwidth the GPU's kernels can draw together: the blocks sweep's full-chip
        figure where measured, else the GPU spec's (decoupled lanes share it: ``sim.replica.lanes``)."""
        return self.share_curves.peak_bytes_per_s or self.gpu.hbm_bandwidth_bytes_per_s

    # -- SM share
    def for_share(self, sm_fraction: float) -> CostBackend:
        f = float(sm_fraction)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"sm_fraction must be in (0, 1] (got {sm_fraction!r})")
        if f == 1.0:
            return self
        got = self._shares.get(f)
        if got is None:
            got = self._shares[f] = SharedBackend(self, f)
        return got

    def decode_linear_run(self, batch: int, ctx0: int, step: int, k: int, weight: float, base: float
                          ) -> np.ndarray | None:
        return None

    # -- selection
    def selection_time(self, num_seqs: int, units_per_seq: float, k: int) -> float:
        t = self.selection.time(num_seqs, units_per_seq, k)
        if self.selection.extrapolated:
            self.extrapolations["topk"] = self.selection.extrapolated
        return t

    # -- report
    def flops_bytes(self, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        return self.ops.flops_bytes(shape)

    def _selection_report(self) -> dict:
        if self._selection is None:     # never used: what it would be built from, without reading it
            return {"source": SelectionModel.source_of(_has_rows(self._table_dir, "topk")),
                    "extrapolated_lookups": 0, "max_over_grid": 1.0}
        return {"source": self.selection.source, "extrapolated_lookups": self.selection.extrapolated,
                "max_over_grid": self.selection.max_over}


class SharedBackend:
    """A backend's ops confined to a fraction of the SMs (see the module docstring).

    Invariants: it never changes the base backend; its per-op arrays are functions of the base's and
    are cached per (tokens, sampled); counters (extrapolations) are the base's.
    """

    def __init__(self, base: BackendBase, fraction: float) -> None:
        self.base = base
        self.fraction = float(fraction)
        self.ops, self.gpu = base.ops, base.gpu
        self.identity = {**base.identity, "sm_fraction": self.fraction}
        self.launch = base.launch
        self.host_call_s = base.host_call_s
        self.step_host_s = base.step_host_s
        self.switch_s = base.switch_s
        self.curves: ShareCurves = base.share_curves
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        ops = base.ops
        self._ia, self._ip = ops.index["attn_decode"], ops.index["attn_prefill"]
        self._mem_f = self.curves.memory(self.fraction)
        self._cmp_f = self.curves.compute(self.fraction)
        m = ops.model
        self._kv_per_token = 2.0 * ops.kv_heads * m.head_dim * m.bytes_per_kv
        self._q_flops_per_token = 4.0 * ops.q_heads * m.head_dim

    @property
    def extrapolations(self) -> dict[str, int]:
        return self.base.extrapolations

    @property
    def hbm_peak_bytes_per_s(self) -> float:
        return self.base.hbm_peak_bytes_per_s

    def fixed_times(self, tokens: int, sampled: int) -> np.ndarray:
        key = (tokens, sampled)
        got = self._cache.get(key)
        if got is None:
            base = self.base.fixed_times(tokens, sampled)
            shape = StepShape(prefill_q=np.empty(0, np.int64), prefill_c=np.empty(0, np.int64),
                              num_decode=tokens, decode_ctx_sum=0, num_sampled=sampled)
            flops, nbytes = self.ops.flops_bytes(shape)
            kern = self.base.kernel_counts(tokens, sampled, False, False)
            got = stretch(base, kern, share_factor(flops, nbytes, self.gpu, self.curves, self.fraction),
                          self.curves.floor_s)
            self._cache[key] = got
        return got

    def kernel_counts(self, tokens: int, sampled: int, has_prefill: bool, has_decode: bool) -> np.ndarray:
        return self.base.kernel_counts(tokens, sampled, has_prefill, has_decode)

    def prefill_attention_time(self, q: np.ndarray, c: np.ndarray) -> float:
        t = self.base.prefill_attention_time(q, c)
        shape = StepShape(prefill_q=q, prefill_c=c, num_decode=0, decode_ctx_sum=0, num_sampled=0)
        flops, nbytes = self.ops.flops_bytes(shape)
        f = share_factor(flops[self._ip:self._ip + 1], nbytes[self._ip:self._ip + 1], self.gpu, self.curves,
                         self.fraction)
        return float(stretch(np.array([t]), np.ones(1), f, self.curves.floor_s)[0])

    def decode_attention_times(self, batch: int, ctx_sums: np.ndarray, query_tokens: int = 1) -> np.ndarray:
        t = self.base.decode_attention_times(batch, ctx_sums, query_tokens)
        m = self.ops.model
        ctx = np.asarray(ctx_sums, float)
        flops = self._q_flops_per_token * ctx * query_tokens
        nbytes = ctx * self._kv_per_token + 2.0 * batch * query_tokens * self.ops.q_heads * m.head_dim * \
            m.bytes_per_weight
        f = share_factor(flops, nbytes, self.gpu, self.curves, self.fraction)
        return stretch(t, np.ones_like(t), f, self.curves.floor_s)

    def decode_linear_run(self, batch: int, ctx0: int, step: int, k: int, weight: float, base: float
                          ) -> np.ndarray | None:
        return None     # (the share's stretch is a vector expression of its own)

    def selection_time(self, num_seqs: int, units_per_seq: float, k: int) -> float:
        # one block per row: rows beyond the SMs left run in more waves
        t = self.base.selection_time(num_seqs, units_per_seq, k)
        sms = max(int(self.fraction * self.gpu.sm_count), 1)
        waves = np.ceil(num_seqs / sms) / max(np.ceil(num_seqs / self.gpu.sm_count), 1.0)
        return float(t * max(waves, 1.0))

    def for_share(self, sm_fraction: float) -> CostBackend:
        return self.base.for_share(sm_fraction)

    def flops_bytes(self, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        return self.base.flops_bytes(shape)

    def lookup_report(self, execution: str | None = None) -> dict:
        rep = dict(self.base.lookup_report(execution))
        rep["sm_share"] = {"fraction": self.fraction, "compute_rate": self._cmp_f, "hbm_bandwidth": self._mem_f,
                           "curves": self.curves.source}
        return rep
