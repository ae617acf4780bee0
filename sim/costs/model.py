"""The transformer's operator list for one engine step, with FLOPs, bytes and kernel counts per op.

An engine step runs one forward pass over a mixed batch: prefill chunks (``q`` new tokens on top of ``c``
cached tokens each) and decodes (one new token attending to ``ctx`` cached tokens each). Every op is
described by the *table op* that prices it (``gemm``, ``attn_prefill``, ...) and a canonical shape
``key``; cost backends (roofline, measured tables) price ops by ``(table_op, key, x, y, z)``:

==============  ===============================================  =====================  ==========
table op        what it is                                        x                      y, z
==============  ===============================================  =====================  ==========
gemm            GEMM, weights [k, n] (dtype: the weights')       M (rows = tokens)      -
attn_prefill    causal attention of q new tokens over c+q keys    q (new tokens/seq)     y=c, z=seqs
attn_decode     one query token per sequence over ctx keys        batch (sequences)      y=ctx
rms_norm        RMSNorm over hidden h                             tokens                 -
rope            rotary embedding on q and k heads                 tokens                 -
kv_write        write new K and V into the paged cache            tokens                 -
act             SiLU(gate) * up                                   tokens                 -
add             residual add                                      tokens                 -
embed           token-embedding gather                            tokens                 -
sample          greedy sampling (argmax) over the vocabulary      rows                   -
allreduce       tensor-parallel all-reduce of activations         bytes                  -
==============  ===============================================  =====================  ==========

Keys are ``name=value`` pairs sorted by name and joined by commas, e.g. ``dtype=bf16,k=4096,n=6144``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.errors import ConfigError
from sim.specs import ModelSpec

# Table ops, in a fixed order; integer codes index per-op arrays in the hot path.
TABLE_OPS = ("gemm", "attn_prefill", "attn_decode", "rms_norm", "rope", "kv_write", "act", "add",
             "embed", "sample", "allreduce")


def make_key(**parts: object) -> str:
    """Canonical shape key: ``name=value`` pairs sorted by name."""
    return ",".join(f"{k}={parts[k]}" for k in sorted(parts))


def parse_key(key: str) -> dict[str, str]:
    if not key:
        return {}
    return dict(item.split("=", 1) for item in key.split(","))


@dataclass(frozen=True, slots=True)
class OpDef:
    """One operator of the forward pass.

    ``per_layer`` ops run once per transformer layer; the others once per step. ``rows`` says which
    count of the step drives the op: ``tokens`` (all tokens in the step), ``sampled`` (rows that produce
    a token), or the attention-specific drivers ``prefill`` / ``decode`` (the op is skipped when the
    step has no such sequences).
    """

    name: str
    table_op: str
    key: str
    per_layer: bool
    rows: str
    n: int = 0  # gemm output columns
    k: int = 0  # gemm reduction dim


@dataclass(frozen=True, slots=True)
class StepShape:
    """Aggregates of one engine step that every op's cost depends on.

    ``prefill_q``/``prefill_c``: new and already-cached tokens of each prefill chunk.
    ``decode_ctx_sum``: keys attended by all decode queries together (each decode attends to its whole
    KV, the new token included). ``num_sampled``: rows that produce a token this step (decodes plus
    chunks that finish their prompt). ``decode_tokens`` is the number of query tokens of decodes: one per
    decode, more when a speculative verify step checks several draft tokens at once.
    """

    prefill_q: np.ndarray
    prefill_c: np.ndarray
    num_decode: int
    decode_ctx_sum: int
    num_sampled: int
    decode_tokens: int = -1

    @classmethod
    def prefill(cls, batch: int, prompt_tokens: int) -> "StepShape":
        """``batch`` whole prompts of ``prompt_tokens`` each, nothing cached, each sampling a token."""
        return cls(prefill_q=np.full(batch, prompt_tokens, np.int64), prefill_c=np.zeros(batch, np.int64),
                   num_decode=0, decode_ctx_sum=0, num_sampled=batch)

    @classmethod
    def decode(cls, batch: int, context_tokens: int) -> "StepShape":
        """``batch`` decodes, each with ``context_tokens`` of KV before the step (plus its new token)."""
        empty = np.empty(0, np.int64)
        return cls(prefill_q=empty, prefill_c=empty, num_decode=batch,
                   decode_ctx_sum=batch * (context_tokens + 1), num_sampled=batch)

    @classmethod
    def mixed(cls, chunk_tokens: int, cached_tokens: int, batch: int, context_tokens: int) -> "StepShape":
        """A chunked-prefill step: one chunk of ``chunk_tokens`` on top of ``cached_tokens`` that finishes
        its prompt (so it samples), batched with ``batch`` decodes of ``context_tokens`` each."""
        return cls(prefill_q=np.array([chunk_tokens], np.int64), prefill_c=np.array([cached_tokens], np.int64),
                   num_decode=batch, decode_ctx_sum=batch * (context_tokens + 1), num_sampled=batch + 1)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decode if self.decode_tokens < 0 else self.decode_tokens

    @property
    def num_tokens(self) -> int:
        return int(self.prefill_q.sum()) + self.num_decode_tokens


def dtype_name(nbytes: float) -> str:
    """Key name of an element size: 1 → fp8, 2 → bf16, 4 → fp32; under a byte (4 bits plus scales) → int4."""
    if nbytes < 1:
        return "int4"
    return {1: "fp8", 2: "bf16", 4: "fp32"}.get(int(nbytes), f"b{int(nbytes)}")


class TransformerOps:
    """Operator list of a Llama-style decoder under tensor parallelism ``tp`` (per-GPU shapes).

    GEMM keys carry the weights' element type (``dtype=fp8`` for ``bytes_per_weight = 1``), attention
    keys the KV cache's (``bytes_per_kv``); ``dtype`` overrides both.
    """

    def __init__(self, model: ModelSpec, tp: int = 1, dtype: str | None = None) -> None:
        if tp < 1:
            raise ConfigError(f"replica.tensor_parallel_size must be >= 1 (got {tp})")
        for what, value in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads),
                            ("ffn_size", model.ffn_size)):
            if value % tp and not (what == "num_kv_heads" and tp % value == 0):
                raise ConfigError(f"replica.tensor_parallel_size={tp} does not divide "
                                  f"model {model.name}.{what}={value}")
        w_dtype = dtype or dtype_name(model.bytes_per_weight)
        kv_dtype = dtype or dtype_name(model.bytes_per_kv)
        self.model, self.tp, self.dtype = model, tp, w_dtype
        h, d = model.hidden_size, model.head_dim
        self.q_heads = model.num_heads // tp
        self.kv_heads = max(1, model.num_kv_heads // tp)
        self.ffn = model.ffn_size // tp
        attn_key = make_key(d=d, dtype=kv_dtype, kvh=self.kv_heads, qh=self.q_heads)
        qkv_n = (self.q_heads + 2 * self.kv_heads) * d

        def gemm(name: str, n: int, k: int, per_layer: bool = True, rows: str = "tokens") -> OpDef:
            return OpDef(name, "gemm", make_key(dtype=w_dtype, k=k, n=n), per_layer, rows, n, k)

        ops = [
            OpDef("embed", "embed", make_key(h=h, v=model.vocab_size), False, "tokens"),
            OpDef("attn_norm", "rms_norm", make_key(h=h), True, "tokens"),
            gemm("qkv_proj", qkv_n, h),
            OpDef("rope", "rope", make_key(d=d, kvh=self.kv_heads, qh=self.q_heads), True, "tokens"),
            OpDef("kv_write", "kv_write", make_key(d=d, kvh=self.kv_heads), True, "tokens"),
            OpDef("attn_prefill", "attn_prefill", attn_key, True, "prefill"),
            OpDef("attn_decode", "attn_decode", attn_key, True, "decode"),
            gemm("o_proj", h, self.q_heads * d),
        ]
        if tp > 1:
            ops.append(OpDef("attn_allreduce", "allreduce", make_key(tp=tp), True, "tokens"))
        ops += [
            OpDef("attn_residual", "add", make_key(h=h), True, "tokens"),
            OpDef("ffn_norm", "rms_norm", make_key(h=h), True, "tokens"),
            gemm("gate_up_proj", 2 * self.ffn, h),
            OpDef("act", "act", make_key(f=self.ffn), True, "tokens"),
            gemm("down_proj", h, self.ffn),
        ]
        if tp > 1:
            ops.append(OpDef("ffn_allreduce", "allreduce", make_key(tp=tp), True, "tokens"))
        ops += [
            OpDef("ffn_residual", "add", make_key(h=h), True, "tokens"),
            OpDef("final_norm", "rms_norm", make_key(h=h), False, "sampled"),
            gemm("lm_head", model.vocab_size // tp if model.vocab_size % tp == 0 else model.vocab_size,
                 h, per_layer=False, rows="sampled"),
            OpDef("sample", "sample", make_key(v=model.vocab_size), False, "sampled"),
        ]
        self.ops: tuple[OpDef, ...] = tuple(ops)
        self.index = {op.name: i for i, op in enumerate(self.ops)}

    # ------------------------------------------------------------------ accounting
    def required_table_entries(self) -> list[tuple[str, str]]:
        """(table_op, key) pairs a measured table must cover to price this model."""
        seen: dict[tuple[str, str], None] = {}
        for op in self.ops:
            seen[(op.table_op, op.key)] = None
        return list(seen)

    def flops_bytes(self, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """Per-op FLOPs and bytes moved for ONE instance (one layer for per-layer ops), as arrays."""
        m = self.model
        h, d, v = m.hidden_size, m.head_dim, m.vocab_size
        w, kvb = m.bytes_per_weight, m.bytes_per_kv
        qh, kvh = self.q_heads, self.kv_heads
        tokens = float(shape.num_tokens)
        sampled = float(shape.num_sampled)
        q = shape.prefill_q.astype(np.float64)
        c = shape.prefill_c.astype(np.float64)
        flops = np.zeros(len(self.ops))
        nbytes = np.zeros(len(self.ops))
        for i, op in enumerate(self.ops):
            rows = sampled if op.rows == "sampled" else tokens
            t = op.table_op
            if t == "gemm":
                flops[i] = 2.0 * rows * op.n * op.k
                nbytes[i] = (rows * op.k + op.k * op.n + rows * op.n) * w
            elif t == "attn_prefill":
                flops[i] = 4.0 * qh * d * float(np.sum(q * (c + (q + 1) / 2)))
                nbytes[i] = (2 * q.sum() * qh * d * w) + float(np.sum(c + q)) * 2 * kvh * d * kvb
            elif t == "attn_decode":
                dt = float(shape.num_decode_tokens)
                flops[i] = 4.0 * qh * d * shape.decode_ctx_sum * (dt / max(shape.num_decode, 1))
                nbytes[i] = shape.decode_ctx_sum * 2 * kvh * d * kvb + 2 * dt * qh * d * w
            elif t == "rms_norm":
                flops[i] = 4.0 * rows * h
                nbytes[i] = (2 * rows * h + h) * w
            elif t == "rope":
                flops[i] = 3.0 * rows * (qh + kvh) * d
                nbytes[i] = 2 * rows * (qh + kvh) * d * w
            elif t == "kv_write":
                nbytes[i] = 2 * rows * 2 * kvh * d * kvb
            elif t == "act":
                flops[i] = 5.0 * rows * self.ffn
                nbytes[i] = 3 * rows * self.ffn * w
            elif t == "add":
                flops[i] = rows * h
                nbytes[i] = 3 * rows * h * w
            elif t == "embed":
                nbytes[i] = 2 * rows * h * w
            elif t == "sample":
                flops[i] = rows * v
                nbytes[i] = rows * v * w
            elif t == "allreduce":
                nbytes[i] = rows * h * w
        return flops, nbytes

    def op_x(self, op: OpDef, shape: StepShape) -> float:
        """The table's ``x`` coordinate of ``op`` for this step (see the module table)."""
        if op.table_op == "allreduce":
            return float(shape.num_tokens * self.model.hidden_size * self.model.bytes_per_weight)
        if op.rows == "sampled":
            return float(shape.num_sampled)
        return float(shape.num_tokens)
