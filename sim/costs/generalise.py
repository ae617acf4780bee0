"""Prices shapes a table has not measured from the shapes it has, on the same GPU.

A measured table holds grids at the calibrated models' exact shapes. Any other Llama-, Qwen- or
Mistral-style decoder (GQA, any hidden / FFN size, heads, head dim, vocabulary, TP shard) is priced
from those grids by the rules here; an entry measured at the model's exact shape is always the first
source. Each rule states its assumption:

- **GEMM** (:class:`GemmModel`): ``t = o + ((F_q / (P e_c))^k + (B / (W e_m) + o_m)^k)^(1/k)``, a smooth
  maximum of a compute time and a memory time. ``F_q`` are the FLOPs the GPU actually spends after
  tile and wave quantization: the best of 64/128/256-wide output tiles with split-K 1-8, in whole
  waves over the SMs; ``B`` the bytes moved (inputs, weights, output); ``P``, ``W`` the GPU's peak
  bf16 rate and HBM bandwidth. ``o, e_c, e_m, o_m, k`` are fitted on every measured bf16 GEMM of the
  table (log-space least squares), then a residual per M (the median over the measured shapes of
  measured / model at that M, interpolated in log M) corrects what the form misses at that M: cuBLAS'
  kernel choice changes with M the same way for all shapes.
- **Elementwise ops** (norms, rotary, KV write, activation, residual add, embedding gather, argmax):
  memory-bound, so time follows bytes moved. An op measured at another shape is read at the token
  count that moves the same bytes (``x' = x · bytes_per_row / bytes_per_row_measured``; the measured
  curve's floor and kernel count carry over). An op never measured on this GPU is priced per kernel
  from its bytes on the GPU's measured one-kernel elementwise curve (the residual ``add``), else on
  the HBM-stream microkernel's curve with its per-kernel floor (:class:`BytesModel`).
- **Decode attention**: memory-bound in KV bytes. Read from the measured grid with the nearest head
  dim at the batch that reads the same KV bytes with the same parallelism (FlashAttention's grid is
  batch × KV heads): ``batch' = batch · r``, ``r = (kvh' d' b_kv') / (kvh d b_kv)``; below one
  sequence, one sequence at ``r`` times the context. The query heads per KV head do not enter
  (decode attention is memory-bound).
- **Prefill attention**: compute-bound in ``qh · d`` per token pair. The measured time above the grid's
  smallest time is scaled by ``(qh' d') / (qh d)``; KV heads and KV precision do not enter.
- **All-reduce** measured at another TP size on this GPU (``allreduce`` entries, key ``tp=N``, x = bytes:
  ``calibration.gpu16.tp``): read at the bytes that put the same traffic on each link (a ring moves
  ``2 (n-1)/n`` of the bytes per GPU), the measured latency carried over. Never measured: a ring over
  NVLink at the spec bandwidth (×0.7) plus a fixed latency; always reported as unmeasured.
- **fp8 weights** without measured fp8 GEMMs (:func:`fp8_factor`): memory-bound GEMMs scale with the
  bytes moved (weights and input rows at 1 byte, output at 2), compute-bound ones with the GPU's fp8
  over bf16 peak (1 where the GPU has no fp8 tensor cores: weight-only quantization).
"""
from __future__ import annotations

import json

import numpy as np

from sim.costs.model import dtype_name, parse_key
from sim.specs import GPUSpec

# the M grid of the GEMM part (calibration/vendor/gemm.py): generalised GEMM curves use the same points
M_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
          640, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
TILES = ((128, 128), (128, 256), (256, 128), (64, 128), (64, 256))
SPLIT_K = (1, 2, 3, 4, 8)
BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
__all__ = ["GemmModel", "BytesModel", "dtype_name", "fp8_factor", "gemm_model_from_table", "ring_allreduce_time"]


# ------------------------------------------------------------------------------------------ GEMM
def quantized_flops(m: np.ndarray, n: float, k: float, sm_count: int) -> np.ndarray:
    """FLOPs a GEMM of ``m × n × k`` spends in whole tiles and waves: the best of the candidate
    output tiles and split-K factors (cuBLAS' heuristics pick among such kernels)."""
    m = np.asarray(m, float)
    best = None
    for tm, tn in TILES:
        for sk in SPLIT_K:
            tiles = np.ceil(m / tm) * np.ceil(n / tn) * sk
            waves = np.ceil(tiles / sm_count)
            f = 2.0 * waves * sm_count * tm * tn * np.ceil(k / sk / 64.0) * 64.0
            best = f if best is None else np.minimum(best, f)
    return best


def _lm(residual, p0: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int = 200) -> np.ndarray:
    """Levenberg-Marquardt on a box (clipped steps), numerical Jacobian; returns the parameters."""
    p = np.clip(p0.astype(float), lo, hi)
    r = residual(p)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(iters):
        jac = np.empty((r.size, p.size))
        for j in range(p.size):
            h = 1e-6 * max(abs(p[j]), 1e-3)
            q = p.copy()
            q[j] += h
            jac[:, j] = (residual(q) - r) / h
        a = jac.T @ jac
        g = jac.T @ r
        improved = False
        for _ in range(10):
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            q = np.clip(p + step, lo, hi)
            rq = residual(q)
            cq = float(rq @ rq)
            if cq < cost:
                p, r, cost = q, rq, cq
                lam = max(lam / 3.0, 1e-9)
                improved = True
                break
            lam *= 4.0
        if not improved or np.max(np.abs(step)) < 1e-10:
            break
    return p


class GemmModel:
    """bf16 GEMM time over (M, N, K) on one GPU, fitted on its measured GEMMs (module docstring).

    ``fit`` takes arrays of M, N, K and seconds; ``time(m, n, k)`` prices an array of M at one (N, K).
    ``params`` holds ``overhead_s, compute_efficiency, memory_efficiency, smoothness, memory_latency_s``;
    ``residual`` the log correction per measured M.
    """

    def __init__(self, gpu: GPUSpec, params: np.ndarray, res_m: np.ndarray, res_log: np.ndarray,
                 shapes: list[tuple[int, int]], points: int) -> None:
        self.gpu, self.params = gpu, params
        self.res_m, self.res_log = res_m, res_log
        self.shapes, self.points = shapes, points

    @staticmethod
    def _features(gpu: GPUSpec, m, n, k, item: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
        """(quantized FLOPs, bytes moved) of each M at (n, k): what the fitted form needs."""
        m = np.asarray(m, float)
        return quantized_flops(m, n, k, gpu.sm_count), item * (m * k + k * n + m * n)

    @staticmethod
    def _form(p: np.ndarray, gpu: GPUSpec, fq: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        o, ec, em, sm, om = p
        tc = fq / (gpu.peak_bf16_flops * ec)
        tm = nbytes / (gpu.hbm_bandwidth_bytes_per_s * em) + om
        return o + (tc ** sm + tm ** sm) ** (1.0 / sm)

    @classmethod
    def fit(cls, gpu: GPUSpec, m: np.ndarray, n: np.ndarray, k: np.ndarray, t: np.ndarray) -> GemmModel:
        m, n, k, t = (np.asarray(a, float) for a in (m, n, k, t))
        shapes = sorted({(int(a), int(b)) for a, b in zip(n, k)})
        fq, nbytes = np.empty_like(t), np.empty_like(t)
        for sn, sk in shapes:
            sel = (n == sn) & (k == sk)
            fq[sel], nbytes[sel] = cls._features(gpu, m[sel], sn, sk)
        lo = np.array([0.0, 0.05, 0.05, 1.0, 0.0])
        hi = np.array([1e-4, 1.2, 1.5, 20.0, 1e-4])
        logt = np.log(t)
        p = _lm(lambda p: np.log(cls._form(p, gpu, fq, nbytes)) - logt, np.array([3e-6, 0.7, 0.8, 4.0, 1e-6]),
                lo, hi)
        resid = logt - np.log(cls._form(p, gpu, fq, nbytes))
        res_m = np.unique(m)
        res_log = np.array([np.median(resid[m == v]) for v in res_m])
        return cls(gpu, p, res_m, res_log, shapes, int(t.size))

    def time(self, m, n: int, k: int) -> np.ndarray:
        m = np.asarray(m, float)
        base = self._form(self.params, self.gpu, *self._features(self.gpu, m, n, k))
        corr = np.interp(np.log(np.maximum(m, 1.0)), np.log(self.res_m), self.res_log)
        return base * np.exp(corr)

    def describe(self) -> dict:
        o, ec, em, sm, om = (float(v) for v in self.params)
        return {"form": "o + ((F_q/(P e_c))^k + (B/(W e_m) + o_m)^k)^(1/k), times a residual per M",
                "overhead_s": o, "compute_efficiency": ec, "memory_efficiency": em, "smoothness": sm,
                "memory_latency_s": om, "fitted_on": [f"n={a},k={b}" for a, b in self.shapes],
                "points": self.points}


_FITTED: dict[tuple, GemmModel | None] = {}


def gemm_model_from_table(table, gpu: GPUSpec, dtype: str = "bf16") -> GemmModel | None:
    """The GEMM model of a table's measured ``dtype`` GEMMs (None with fewer than two shapes); fitted
    once per table content and GPU in a process."""
    key = (table.identity["sha256"], gpu.name, gpu.peak_bf16_flops, gpu.hbm_bandwidth_bytes_per_s, dtype)
    if key not in _FITTED:
        _FITTED[key] = _fit_table(table, gpu, dtype)
    return _FITTED[key]


def _fit_table(table, gpu: GPUSpec, dtype: str) -> GemmModel | None:
    rows = [(parse_key(key), g) for (op, key), g in table.groups.items() if op == "gemm"]
    ms, ns, ks, ts = [], [], [], []
    for parts, g in rows:
        if parts.get("dtype", "bf16") != dtype:
            continue
        ms.append(g["x"].to_numpy(float))
        ns.append(np.full(len(g), float(parts["n"])))
        ks.append(np.full(len(g), float(parts["k"])))
        ts.append(g["time_s"].to_numpy(float))
    if len(ms) < 2:
        return None
    return GemmModel.fit(gpu, np.concatenate(ms), np.concatenate(ns), np.concatenate(ks), np.concatenate(ts))


def fp8_factor(m: np.ndarray, n: int, k: int, gpu: GPUSpec) -> np.ndarray:
    """Time of an fp8 GEMM over the bf16 one at the same shape (>0), by the roofline split of the bf16
    time: the compute part at fp8 over bf16 peak (1 without fp8 tensor cores), the memory part by
    bytes (inputs and weights 1 byte, output 2)."""
    m = np.asarray(m, float)
    c = 2.0 * m * n * k / gpu.peak_bf16_flops
    mem16 = 2.0 * (m * k + k * n + m * n) / gpu.hbm_bandwidth_bytes_per_s
    mem8 = (1.0 * m * k + 1.0 * k * n + 2.0 * m * n) / gpu.hbm_bandwidth_bytes_per_s
    rate = gpu.peak_fp8_flops / gpu.peak_bf16_flops if gpu.peak_fp8_flops > 0 else 1.0
    return np.maximum(c / rate, mem8) / np.maximum(c, mem16)


# ------------------------------------------------------------------------------------------ bytes
class BytesModel:
    """Seconds of one memory-bound kernel moving ``nbytes``, from the GPU's own measurements.

    First choice: the table's measured residual ``add`` (one framework elementwise kernel, timed back
    to back like every table op, so its floor includes the gap between kernels), read at the token
    count that moves the same bytes; beyond its grid it continues at its fitted bandwidth. Else the
    HBM-stream microkernel (``raw/hbm_stream.parquet``, copy, bytes sweep) with the launch
    microkernel's per-kernel floor. Else the GPU spec at 85 % of HBM bandwidth and a 2.5 µs floor.
    """

    def __init__(self, xs: np.ndarray, ts: np.ndarray, bytes_per_x: float, slope_s_per_byte: float,
                 source: str) -> None:
        self.xs, self.ts = xs, ts
        self.bytes_per_x = bytes_per_x
        self.slope = slope_s_per_byte
        self.source = source

    @classmethod
    def for_table(cls, table, gpu: GPUSpec) -> BytesModel:
        adds = [(int(parse_key(key)["h"]), g) for (op, key), g in table.groups.items() if op == "add"]
        if adds:
            h, g = max(adds, key=lambda a: a[0])
            from sim.costs.table import _medians_by

            med = _medians_by(g, ("x",))
            xs = np.array(sorted(k[0] for k in med), dtype=float)
            ts = np.array([med[(x,)] for x in xs.tolist()], dtype=float)
            per_x = 3.0 * h * 2.0
            slope = max((ts[-1] - ts[-2]) / ((xs[-1] - xs[-2]) * per_x), 0.0) if xs.size > 1 else 0.0
            return cls(xs, ts, per_x, slope, f"measured add h={h} ({table.dir.name})")
        from sim.costs.backend import _read_raw

        hbm = _read_raw(table.dir, "hbm_stream")
        if hbm is not None:
            sweep = [json.loads(e).get("sweep") if e else None for e in hbm["extra"]]
            rows = hbm[(hbm["variant"] == "copy") & np.array([s == "bytes" for s in sweep], dtype=bool)]
            if len(rows) >= 2:
                rows = rows.sort_values("bytes")
                xs, ts = rows["bytes"].to_numpy(float), rows["median_s"].to_numpy(float)
                slope = max((ts[-1] - ts[-2]) / (xs[-1] - xs[-2]), 0.0)
                return cls(xs, ts, 1.0, slope, f"HBM-stream microkernel, copy ({table.dir.name}/raw)")
        bw = gpu.hbm_bandwidth_bytes_per_s * 0.85
        return cls(np.array([1.0, 1e9]), np.array([2.5e-6, 2.5e-6 + 1e9 / bw]), 1.0, 1.0 / bw,
                   "GPU spec (85 % of HBM bandwidth, 2.5 us floor)")

    def time(self, nbytes) -> np.ndarray:
        """Seconds per kernel (array) for ``nbytes`` moved by each."""
        x = np.asarray(nbytes, float) / self.bytes_per_x
        out = np.interp(x, self.xs, self.ts)
        above = x > self.xs[-1]
        if np.any(above):
            out = np.where(above, self.ts[-1] + self.slope * (x - self.xs[-1]) * self.bytes_per_x, out)
        return out


# ------------------------------------------------------------------------------------------ links
def ring_allreduce_time(nbytes, tp: int, gpu: GPUSpec, latency_s: float = 8e-6, efficiency: float = 0.7):
    """Seconds of a ring all-reduce of ``nbytes`` over ``tp`` GPUs on NVLink (spec bandwidth)."""
    bw = max(gpu.nvlink_bandwidth_bytes_per_s, 1.0) * efficiency
    return latency_s * (tp - 1) / max(tp - 1, 1) + 2.0 * (tp - 1) / tp * np.asarray(nbytes, float) / bw
