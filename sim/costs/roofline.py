"""Roofline cost backend: each op takes max(FLOPs / achieved rate, bytes / achieved bandwidth), never
less than a minimum kernel time, from the GPU spec and named efficiency factors.

It needs no measurements, so it prices any model on any GPU preset — the right tool for "what if"
hardware, and the extrapolation shape the measured tables fall back on beyond their grids. The
efficiency factors are leads, not measurements; the calibrated table backend replaces them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import LaunchCosts
from sim.costs.backend import BackendBase
from sim.costs.model import StepShape, TransformerOps
from sim.specs import GPUSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class RooflineParams:
    """Achieved fractions of the datasheet peaks, and fixed per-kernel times (seconds).

    Defaults: dense GEMMs reach ~70 % of peak bf16 at large sizes and FlashAttention-2-class prefill
    attention ~40 % (Dao, "FlashAttention-2", 2023, reports 35–50 % of peak on A100/H100 for the
    forward pass); memory-bound kernels stream at ~85 % of HBM peak (an H100 device-to-device copy
    moved ~3.0 of 3.35 TB/s on the lent machine, device tool KINDS.md). Launch constants are typical
    PyTorch-eager / CUDA-graph figures until a calibrated table supplies measured ones.
    """

    gemm_efficiency: float = 0.70
    attention_efficiency: float = 0.40
    memory_efficiency: float = 0.85
    nvlink_efficiency: float = 0.70
    min_kernel_s: float = 2.5e-6
    allreduce_latency_s: float = 8e-6
    dispatch_s: float = 8e-6
    graph_launch_s: float = 8e-6
    graph_kernel_s: float = 1.0e-6
    sync_s: float = 10e-6


def roofline_launch(params: RooflineParams) -> LaunchCosts:
    return LaunchCosts(dispatch_s=params.dispatch_s, graph_launch_s=params.graph_launch_s,
                       graph_kernel_s=params.graph_kernel_s, sync_s=params.sync_s)


class RooflineBackend(BackendBase):
    """Prices the ops of one model on one GPU from first principles (a ``CostBackend``)."""

    def __init__(self, ops: TransformerOps, gpu: GPUSpec, params: RooflineParams | None = None) -> None:
        self.ops = ops
        self.gpu = gpu
        self.p = params or RooflineParams()
        self.launch = roofline_launch(self.p)
        self.kernels = np.ones(len(ops.ops), dtype=np.int64)
        self.host_call_s = self.launch.dispatch_s * self.kernels.astype(float)   # per op call
        self.step_host_s = 0.0
        self.switch_s = 0.0
        self.identity = {"backend": "roofline", "gpu": gpu.name, "params": self.p.__repr__()}
        self.extrapolations: dict[str, int] = {}
        self._init_shared(None)
        self._compute_rate = np.array([
            gpu.peak_bf16_flops * (self.p.attention_efficiency if op.table_op.startswith("attn")
                                   else self.p.gemm_efficiency if op.table_op == "gemm"
                                   else 1.0)
            for op in ops.ops])
        self._mem_rate = np.array([
            (gpu.nvlink_bandwidth_bytes_per_s * self.p.nvlink_efficiency
             if op.table_op == "allreduce" else gpu.hbm_bandwidth_bytes_per_s * self.p.memory_efficiency)
            for op in ops.ops])
        self._floor = np.array([self.p.allreduce_latency_s if op.table_op == "allreduce"
                                else self.p.min_kernel_s for op in ops.ops])
        self._attn = np.array([op.table_op.startswith("attn") for op in ops.ops])
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def times(self, shape: StepShape) -> np.ndarray:
        """Per-op seconds for one instance of each op (one layer for per-layer ops)."""
        flops, nbytes = self.ops.flops_bytes(shape)
        t = np.maximum(flops / self._compute_rate, nbytes / self._mem_rate)
        t = np.maximum(t, self._floor)
        for i, op in enumerate(self.ops.ops):
            if (op.rows == "prefill" and shape.prefill_q.size == 0) or (op.rows == "decode" and shape.num_decode == 0):
                t[i] = 0.0
            elif op.rows == "sampled" and shape.num_sampled == 0:
                t[i] = 0.0
        if self.ops.tp == 1:
            t[[i for i, op in enumerate(self.ops.ops) if op.table_op == "allreduce"]] = 0.0
        return t

    def times_at(self, op, xs: np.ndarray) -> np.ndarray:
        """Seconds of one instance of ``op`` (an ``OpDef`` of ``ops``) at each row count in ``xs``."""
        i = self.ops.index[op.name]
        out = np.empty(len(xs))
        for j, x in enumerate(xs):
            n = int(x)
            out[j] = self.fixed_times(n, n)[i]
        return out

    # --------------------------------------------------------------- hot-path interface
    def fixed_times(self, tokens: int, sampled: int) -> np.ndarray:
        key = (tokens, sampled)
        got = self._cache.get(key)
        if got is None:
            shape = StepShape(prefill_q=np.empty(0, np.int64), prefill_c=np.empty(0, np.int64),
                              num_decode=tokens, decode_ctx_sum=0, num_sampled=sampled)
            got = self.times(shape)
            got[self._attn] = 0.0
            self._cache[key] = got
        return got

    def kernel_counts(self, tokens: int, sampled: int, has_prefill: bool, has_decode: bool) -> np.ndarray:
        """Kernels each op launches in this step (0 for ops that do not run)."""
        k = self.kernels.copy()
        for i, op in enumerate(self.ops.ops):
            if ((op.rows == "prefill" and not has_prefill) or (op.rows == "decode" and not has_decode)
                    or (op.rows == "sampled" and sampled == 0) or (op.table_op == "allreduce" and self.ops.tp == 1)):
                k[i] = 0
        return k

    def prefill_attention_time(self, q: np.ndarray, c: np.ndarray) -> float:
        i = self.ops.index["attn_prefill"]
        shape = StepShape(prefill_q=q, prefill_c=c, num_decode=0, decode_ctx_sum=0, num_sampled=0)
        flops, nbytes = self.ops.flops_bytes(shape)
        return max(flops[i] / self._compute_rate[i], nbytes[i] / self._mem_rate[i], self._floor[i])

    def decode_attention_times(self, batch: int, ctx_sums: np.ndarray, query_tokens: int = 1) -> np.ndarray:
        ops, m = self.ops, self.ops.model
        i = ops.index["attn_decode"]
        ctx = np.asarray(ctx_sums, dtype=np.float64)
        flops = 4.0 * ops.q_heads * m.head_dim * ctx * query_tokens
        nbytes = ctx * 2 * ops.kv_heads * m.head_dim * m.bytes_per_kv + \
            2 * batch * query_tokens * ops.q_heads * m.head_dim * m.bytes_per_weight
        return np.maximum(np.maximum(flops / self._compute_rate[i], nbytes / self._mem_rate[i]), self._floor[i])

    def lookup_report(self, execution: str | None = None) -> dict:
        return {"backend": "roofline",
                "ops": {op.name: {"table_op": op.table_op, "key": op.key, "source": "roofline"}
                        for op in self.ops.ops},
                "extrapolated_lookups": dict(sorted(self.extrapolations.items())),
                "selection": self._selection_report(), "warnings": []}
