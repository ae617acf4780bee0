"""Step cost: per-op GPU times from a backend, laid out as the step's kernel sequence, turned into a
wall-clock step time by the execution policy (host launches, CUDA graphs, persistent kernels).

Hot path: the kernel sequence of a step depends only on (tokens, sampled rows, has prefill, has
decode, the decode batch it is shaped for) and is cached; only attention changes from one decode step
to the next, so a run of K decode steps is priced with one vectorised call.

Two things the execution policy adds around the kernels, on every path alike (single steps, decode
runs, chunk runs): a captured graph's padding (``ExecutionPolicy.padded_batch``: a decode-only step of
``B`` sequences runs its GEMMs, LM head and decode attention at the bucket's ``P >= B`` rows; the
padded rows read no KV), and the per-step work outside the kernels (``with_step_overhead``: host
scheduling and input preparation, a resident kernel's dispatch), for engine steps (``num_seqs`` given)
and not for a drafter's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import KernelSequence
from sim.costs.backend import CostBackend
from sim.costs.model import StepShape, TransformerOps

VAR_PREFILL, VAR_DECODE = 0, 1


@dataclass(frozen=True, slots=True)
class OpCost:
    name: str
    table_op: str
    key: str
    count: int          # instances per step (layers for per-layer ops)
    time_s: float       # all instances together
    flops: float
    bytes: float
    kernels: int        # all instances together
    bound: str          # "compute" | "memory" | "latency"


_EMPTY = np.empty(0, dtype=np.int64)


class StepCostModel:
    """Prices engine steps of one model on one replica, through a :class:`CostBackend` only."""

    def __init__(self, ops: TransformerOps, backend: CostBackend, execution, repeat: np.ndarray | None = None) -> None:
        self.ops = ops
        self.backend = backend
        self.execution = execution
        self.launch = backend.launch
        self.num_layers = ops.model.num_layers
        per_layer = [op.per_layer for op in ops.ops]
        first = per_layer.index(True)
        last = len(per_layer) - 1 - per_layer[::-1].index(True)
        self._head = list(range(0, first))
        self._layer = list(range(first, last + 1))
        self._tail = list(range(last + 1, len(ops.ops)))
        self._var = {ops.index["attn_prefill"]: VAR_PREFILL, ops.index["attn_decode"]: VAR_DECODE}
        self._var_idx = np.array([self._var.get(i, -1) for i in range(len(ops.ops))], dtype=np.int64)
        self._var_list = self._var_idx.tolist()
        self._subset = repeat
        if repeat is None:
            self._repeat = np.array([self.num_layers if op.per_layer else 1 for op in ops.ops], dtype=np.int64)
            self._runs = None
        else:
            self._repeat = np.asarray(repeat, dtype=np.int64)
            self._runs = (self._repeat > 0).astype(np.int64)
        self._seq_cache: dict[tuple, KernelSequence] = {}
        self._ctx1 = np.empty(1)             # scratch: one decode step's attended context
        self._one_step = execution.step_time_one   # declared on ExecutionPolicy (a scalar path)
        self._pad = execution.padded_batch
        self._overhead = execution.with_step_overhead
        self._shares: dict[float, StepCostModel] = {}
        self._linear: dict[int, tuple | None] = {}   # per padded decode batch: ExecutionPolicy.linear_step
        self.steps_priced = 0

    def subset(self, repeat: np.ndarray) -> "StepCostModel":
        """The same model's ops on the same backend, op ``i`` called ``repeat[i]`` times per step
        (0: not run) instead of once per layer or step: a part of the model priced as such, e.g. an
        EAGLE head (one decoder layer of the target's shape and its LM head) or Medusa's heads."""
        return StepCostModel(self.ops, self.backend, self.execution, repeat)

    def for_share(self, fraction: float) -> "StepCostModel":
        """This cost model with the model's kernels confined to ``fraction`` of the GPU's SMs (see
        ``CostBackend.for_share``); cached per value, ``1.0`` is this model itself."""
        f = float(fraction)
        if f == 1.0:
            return self
        got = self._shares.get(f)
        if got is None:
            got = self._shares[f] = StepCostModel(self.ops, self.backend.for_share(f), self.execution, self._subset)
        return got

    def padded_batch(self, num_decode: int, has_prefill: bool) -> int:
        """The decode batch a step of ``num_decode`` decodes runs at (the execution policy's)."""
        return self._pad(num_decode, has_prefill) if num_decode else 0

    # ---------------------------------------------------------------- kernel layout
    def sequence(self, tokens: int, sampled: int, has_prefill: bool, has_decode: bool,
                 batch: int = 0) -> KernelSequence:
        """The step's kernels: per-op GPU time, kernel counts, variable ops and host costs (see
        ``policies.base.KernelSequence``); cached per (tokens, sampled rows, has prefill, has decode,
        decode batch)."""
        key = ((tokens << 34) | (sampled << 2) | (has_prefill << 1) | has_decode, batch)
        seq = self._seq_cache.get(key)
        if seq is not None:
            return seq
        backend = self.backend
        fixed = np.asarray(backend.fixed_times(tokens, sampled), dtype=np.float64)
        # variable ops run only when their phase is in the step; fixed ops only when they take time
        # (Python numbers: a few dozen ops, where each NumPy call costs more than the arithmetic)
        kernels = np.array([k * has_prefill if v == VAR_PREFILL else k * has_decode if v == VAR_DECODE
                            else (k if t > 0 else 0)
                            for k, v, t in zip(np.asarray(backend.kernel_counts(tokens, sampled, has_prefill,
                                                                                  has_decode), dtype=np.int64
                                                          ).tolist(), self._var_list, fixed.tolist())],
                           dtype=np.int64)
        if self._runs is not None:
            kernels = kernels * self._runs
        seq = KernelSequence(op_gpu_s=fixed, op_kernels=kernels, op_var=self._var_idx,
                             op_host_s=np.asarray(backend.host_call_s, dtype=np.float64), op_repeat=self._repeat,
                             switch_s=float(backend.switch_s), lead_s=float(backend.step_host_s), batch=batch,
                             has_prefill=has_prefill)
        self._seq_cache[key] = seq
        return seq

    # ---------------------------------------------------------------- pricing
    def step(self, prefill_q: np.ndarray, prefill_c: np.ndarray, num_decode: int, decode_ctx_sum: int,
             num_sampled: int, decode_query_tokens: int = 1, decode_tokens: int = -1,
             num_seqs: int = -1) -> tuple[float, int, int]:
        """(duration_s, launches, syncs) of one step. ``decode_query_tokens``: query tokens per decode
        as attention sees them (the most any decode has: a speculative verify step); ``decode_tokens``:
        all decodes' query tokens together, the GEMM rows (default: ``num_decode x
        decode_query_tokens``). With ``num_seqs`` (an engine step's sequences) the execution policy's
        per-step overhead is included. A captured graph's padding rows (``padded_batch``) run
        ``decode_query_tokens`` query tokens each and are sampled like real rows."""
        has_p = prefill_q.shape[0] > 0
        own = num_decode * decode_query_tokens if decode_tokens < 0 else decode_tokens
        nd = self._pad(num_decode, has_p) if num_decode else 0
        pad = (nd - num_decode) * decode_query_tokens
        dtok = own + pad
        # (one chunk, the common case: an int, not a NumPy reduction, which costs more than the lookup)
        ptok = (int(prefill_q[0]) if prefill_q.shape[0] == 1 else int(prefill_q.sum())) if has_p else 0
        tokens = ptok + dtok if has_p else dtok
        seq = self.sequence(tokens, num_sampled + pad, has_p, num_decode > 0, nd)
        pre = float(self.backend.prefill_attention_time(prefill_q, prefill_c)) if has_p else 0.0
        dec = 0.0
        if num_decode:
            ctx = self._ctx1
            ctx[0] = decode_ctx_sum
            dec = float(self.backend.decode_attention_times(nd, ctx, decode_query_tokens)[0])
        self.steps_priced += 1
        d, launches, syncs = self._one_step(seq, (pre, dec), self.launch)
        if num_seqs >= 0:
            d = self._overhead(d, num_seqs, ptok + own, seq, self.launch)
        return d, launches, syncs

    def lanes_step(self, prefill_lane: "StepCostModel", decode_lane: "StepCostModel", prefill_q: np.ndarray,
                   prefill_c: np.ndarray, num_decode: int, decode_ctx_sum: int, num_sampled: int,
                   num_seqs: int = -1) -> tuple[float, int, int]:
        """(duration_s, launches, syncs) of a mixed step run as two lanes (Nexus-style intra-GPU
        disaggregation): the prefill chunks' kernels on ``prefill_lane``'s SMs and the decodes' on
        ``decode_lane``'s, concurrently, each lane its own stream of the whole layer stack (so the
        weights are read once per lane). The step ends when both lanes end; the host work of the step
        (``num_seqs``) is counted once, on the whole step's kernels."""
        nd = num_decode
        dp, lp, sp = prefill_lane.step(prefill_q, prefill_c, 0, 0, num_sampled - nd)
        dd, ld, sd = decode_lane.step(_EMPTY, _EMPTY, nd, decode_ctx_sum, nd)
        d = dp if dp > dd else dd
        if num_seqs >= 0:
            ptok = int(prefill_q.sum())
            padded = self._pad(nd, True) if nd else 0
            seq = self.sequence(ptok + padded, num_sampled + padded - nd, True, nd > 0, padded)
            d = self._overhead(d, num_seqs, ptok + nd, seq, self.launch)
        return d, lp + ld, sp if sp > sd else sd

    def step_bytes(self, prefill_q: np.ndarray, prefill_c: np.ndarray, num_decode: int, decode_ctx_sum: int,
                   num_sampled: int) -> float:
        """HBM bytes one step's kernels move (weights, activations, KV: the op list's byte counts, each
        op times its instances per step), the traffic two concurrent lanes contend for."""
        shape = StepShape(prefill_q=prefill_q, prefill_c=prefill_c, num_decode=num_decode,
                          decode_ctx_sum=decode_ctx_sum, num_sampled=num_sampled)
        return float(np.dot(self.backend.flops_bytes(shape)[1], self._repeat))

    def decode_run(self, batch: int, ctx_sums: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Durations of consecutive decode-only engine steps of ``batch`` sequences whose attended
        context totals are ``ctx_sums`` (one per step); plus launches and syncs per step."""
        nd = self._pad(batch, False)
        seq = self.sequence(nd, nd, False, True, nd)
        k = ctx_sums.shape[0]
        var = np.zeros((k, 2))
        var[:, VAR_DECODE] = self.backend.decode_attention_times(nd, ctx_sums)
        timing = self.execution.step_times(seq, var, self.launch)
        self.steps_priced += k
        return self._overhead(timing.duration_s, batch, batch, seq, self.launch), timing.launches, timing.syncs

    def dense_decode_run(self, batch: int, ctx0: int, k: int) -> tuple[np.ndarray, int, int]:
        """:meth:`decode_run` at the context totals ``ctx0 + batch * j`` (j < k: every sequence of a
        dense decode run attends one more token each step), in one compiled pass where the execution
        policy's step is linear in the attention time (``ExecutionPolicy.linear_step``) and the
        backend has the pass (``CostBackend.decode_linear_run``); the same floats either way."""
        nd = self._pad(batch, False)
        seq = self.sequence(nd, nd, False, True, nd)
        lin = self._linear.get(nd, False)
        if lin is False:
            got = self.execution.linear_step(seq, self.launch)
            lin = self._linear[nd] = got if got is not None and len(got[1]) == 1 and got[1][0][0] == VAR_DECODE \
                else None
        if lin is not None:
            base, terms, launches, syncs = lin
            d = self.backend.decode_linear_run(nd, ctx0, batch, k, terms[0][1], base)
            if d is not None:
                self.steps_priced += k
                return self._overhead(d, batch, batch, seq, self.launch), launches, syncs
        return self.decode_run(batch, np.arange(ctx0, ctx0 + batch * k, batch, dtype=np.float64))

    def chunk_run(self, num_decode: int, ctx_sums: np.ndarray, chunk: int, cached: np.ndarray
                  ) -> tuple[np.ndarray, int, int]:
        """Durations of consecutive steps that each run ``num_decode`` decodes (attended context totals
        ``ctx_sums``, one per step) and one prefill chunk of ``chunk`` new tokens on top of
        ``cached[j]`` cached ones that does not finish its prompt (samples nothing); plus launches and
        syncs per step. Every term is computed as :meth:`step` computes it for one such step."""
        nd = self._pad(num_decode, True) if num_decode else 0
        seq = self.sequence(chunk + nd, nd, True, num_decode > 0, nd)
        k = cached.shape[0]
        var = np.zeros((k, 2))
        q = np.array([chunk], dtype=np.int64)
        c = np.empty(1, dtype=np.int64)
        pre = self.backend.prefill_attention_time
        for j in range(k):
            c[0] = cached[j]
            var[j, VAR_PREFILL] = float(pre(q, c))
        if num_decode:
            var[:, VAR_DECODE] = self.backend.decode_attention_times(nd, ctx_sums)
        timing = self.execution.step_times(seq, var, self.launch)
        self.steps_priced += k
        d = self._overhead(timing.duration_s, num_decode + 1, chunk + num_decode, seq, self.launch)
        return d, timing.launches, timing.syncs

    # ---------------------------------------------------------------- explanation
    def breakdown(self, shape: StepShape) -> tuple[float, list[OpCost], float, int, int]:
        """(step duration, per-op costs, launch/sync/idle overhead, launches, syncs). The op times
        plus the overhead add up to the duration."""
        ops = self.ops
        has_p = shape.prefill_q.size > 0
        has_d = shape.num_decode > 0
        duration, launches, syncs = self.step(shape.prefill_q, shape.prefill_c, shape.num_decode,
                                              shape.decode_ctx_sum, shape.num_sampled,
                                              max(1, shape.num_decode_tokens // max(shape.num_decode, 1)),
                                              num_seqs=int(shape.prefill_q.size) + shape.num_decode)
        fixed = self.backend.fixed_times(shape.num_tokens, shape.num_sampled)
        kern = self.backend.kernel_counts(shape.num_tokens, shape.num_sampled, has_p, has_d)
        flops, nbytes = self.backend.flops_bytes(shape)
        gpu = self.backend.gpu
        rows: list[OpCost] = []
        for i, op in enumerate(ops.ops):
            count = self.num_layers if op.per_layer else 1
            v = self._var.get(i)
            if v == VAR_PREFILL:
                t = self.backend.prefill_attention_time(shape.prefill_q, shape.prefill_c) if has_p else 0.0
            elif v == VAR_DECODE:
                t = float(self.backend.decode_attention_times(
                    shape.num_decode, np.array([shape.decode_ctx_sum], float),
                    max(1, shape.num_decode_tokens // max(shape.num_decode, 1)))[0]) if has_d else 0.0
            else:
                t = float(fixed[i])
            if t <= 0:
                continue
            bound = "latency"
            if t > 0:
                compute = flops[i] / t / gpu.peak_bf16_flops
                memory = nbytes[i] / t / gpu.hbm_bandwidth_bytes_per_s
                if max(compute, memory) >= 0.10:
                    bound = "compute" if compute >= memory else "memory"
            rows.append(OpCost(op.name, op.table_op, op.key, count, t * count, flops[i] * count,
                               nbytes[i] * count, int(kern[i]) * count, bound))
        overhead = duration - sum(r.time_s for r in rows)
        return duration, rows, overhead, launches, syncs
