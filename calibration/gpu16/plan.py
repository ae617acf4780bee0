"""What issue 16's leases measure: every part's points, their ids, and the time each part is planned to take.

This module owns the plan, so that the predictions committed before a lease (``calibration.gpu16.predict``),
the device command (``calibration.gpu16.run``) and the ingest (``calibration.gpu16.ingest``) agree point for
point. It imports neither torch nor numba.

Parts, in the order the device command runs them (by value: what the issue must show first):

==============  ====================================================================================  =====
part            what                                                                                  est s
==============  ====================================================================================  =====
unseen_steps    fused reference-decoder steps (prefill, decode, mixed chunked prefill) of shapes the   60
                H200 table never measured: Qwen2.5-7B, Mistral-7B (v0.3), Llama-2-7B (full MHA)
unfused_steps   the torch-unfused engine's steps (eager and CUDA graph), Llama-3.1-8B and 3.2-1B, at   35
                points of the fused validation grid (so the table run's fused steps sit beside them)
sm_share        a large GEMM, a batch-1 GEMM, a copy and whole 8B steps with SMs held back by a        35
                persistent occupier kernel and, where the stack has them, by green contexts
fp8_gemm        ``torch._scaled_mm`` e4m3 GEMMs (per-tensor scales) at the table's ten GEMM shapes,    25
                bf16 anchors at a few M; whether fp8-KV decode attention runs
unfused_ops     the torch-unfused recipe's ops alone over tokens (fp32 RMSNorm, rotary on [B, H, L,   30
                d], index_copy KV write, SiLU and multiply, the per-step embedding work) and its
                separate q/k/v and gate/up GEMMs at the shapes the table lacks
unfused_counts  CUDA kernels per layer of the stock decoder (CUPTI, its own process)                  20
==============  ====================================================================================  =====

The multi-GPU parts (``allreduce``, ``tp_steps``) run from ``calibration.gpu16.tp`` on a machine with
several GPUs; their plan is here too (:data:`ALLREDUCE_BYTES`, :func:`step_points`).
"""
from __future__ import annotations

from dataclasses import dataclass

from calibration.raw import model_shape
from calibration.validate import point_id

# ------------------------------------------------------------------------------------------ steps
UNSEEN_MODELS = ("qwen2.5-7b", "mistral-7b", "llama-2-7b")   # by value: the last one runs if time is left
UNFUSED_MODELS = ("llama-3.1-8b", "llama-3.2-1b")
TP_MODELS = ("llama-3.1-8b",)
QUICK_MODEL = "tiny-llama"
# every one is a point of the fused validation grid (calibration.reference_model), so the table run's
# fused steps at the same points sit beside the torch-unfused ones
PREFILL = ((1, 128), (1, 512), (1, 2048), (4, 512), (2, 2048))                 # (prompts, tokens each)
DECODE = ((1, 512), (1, 4096), (8, 2048), (32, 1024), (64, 2048), (128, 512))  # (decodes, context)
# (chunk tokens, cached before the chunk, decodes, their context): chunked prefill next to decodes
MIXED = ((512, 0, 8, 1024), (512, 1536, 32, 2048), (2048, 0, 16, 2048), (256, 3840, 64, 1024),
         (1024, 1024, 128, 512))
QUICK_PREFILL = ((1, 8), (2, 16))
QUICK_DECODE = ((1, 16), (4, 32))
QUICK_MIXED = ((8, 0, 2, 16), (4, 4, 2, 16))
MODES = ("eager", "graph")


@dataclass(frozen=True, slots=True)
class StepPoint:
    """One engine step to time: ``batch`` prompts of ``tokens`` (prefill), ``batch`` decodes of ``tokens``
    cached (decode), or those decodes plus a ``chunk`` on top of ``cached`` tokens finishing its prompt
    (mixed), on ``model`` under the engine ``recipe`` at tensor parallelism ``tp``."""

    part: str
    model: str
    recipe: str
    phase: str
    batch: int
    tokens: int
    chunk: int = 0
    cached: int = 0
    tp: int = 1

    @property
    def id(self) -> str:
        return point_id(self.model, self.phase, self.batch, self.tokens, recipe=self.recipe, chunk=self.chunk,
                        cached=self.cached, tp=self.tp)

    @property
    def max_position(self) -> int:
        """The largest token position the step uses (0-based)."""
        if self.phase == "prefill":
            return self.tokens - 1
        if self.phase == "decode":
            return self.tokens
        return max(self.cached + self.chunk - 1, self.tokens)

    @property
    def cache_tokens(self) -> int:
        """Cache slots the step's views need (batch x capacity, plus a mixed step's chunk sequence)."""
        if self.phase == "mixed":
            return self.cached + self.chunk + self.batch * (self.tokens + 1)
        return self.batch * (self.tokens if self.phase == "prefill" else self.tokens + 1)


def _points(part: str, model: str, recipe: str, quick: bool, mixed: bool, tp: int = 1) -> list[StepPoint]:
    pre, dec, mix = (QUICK_PREFILL, QUICK_DECODE, QUICK_MIXED) if quick else (PREFILL, DECODE, MIXED)
    out = [StepPoint(part, model, recipe, "prefill", b, n, tp=tp) for b, n in pre]
    out += [StepPoint(part, model, recipe, "decode", b, c, tp=tp) for b, c in dec]
    if mixed:
        out += [StepPoint(part, model, recipe, "mixed", b, c, q, cached, tp=tp) for q, cached, b, c in mix]
    # no position past the model's context window (Llama-2-7B has 4,096: its rotary table ends there;
    # lease 1 hit a device-side index assert on the decode at context 4,096)
    from calibration.reference_model import resolve_spec

    window = resolve_spec(model).max_context_tokens
    return [p for p in out if p.max_position < window]


def step_points(part: str, quick: bool = False) -> list[StepPoint]:
    """The points of a step part (``unseen_steps``, ``unfused_steps``, ``tp_steps``), model by model."""
    if part == "unseen_steps":
        models = (QUICK_MODEL,) if quick else UNSEEN_MODELS
        return [p for m in models for p in _points(part, m, "fused", quick, mixed=True)]
    if part == "unfused_steps":
        models = (QUICK_MODEL,) if quick else UNFUSED_MODELS
        return [p for m in models for p in _points(part, m, "torch-unfused", quick, mixed=False)]
    if part == "tp_steps":
        models = (QUICK_MODEL,) if quick else TP_MODELS
        return [p for m in models for p in _points(part, m, "fused", quick, mixed=False, tp=2)]
    raise ValueError(f"{part!r} is not a step part (unseen_steps, unfused_steps, tp_steps)")


# ------------------------------------------------------------------------------------------ SM share
# SMs held back from the model, of the H200's 132: each leaves a multiple of 8 (112, 96, 64, 32), the
# granularity green contexts split SMs in on Hopper, so both mechanisms hold the same counts
SM_RESERVED = (0, 20, 36, 68, 100)
SM_MECHANISMS = ("occupier", "green")
SM_WORKLOADS = ("gemm_compute", "gemm_memory", "copy", "decode_step", "prefill_step")
SM_MODEL = "llama-3.1-8b"
SM_GEMM = (28672, 4096)                    # (n, k): the 8B gate_up projection
SM_GEMM_M = {"gemm_compute": 4096, "gemm_memory": 1}
SM_COPY_BYTES = 2**30                      # bytes copied (read + written: twice that)
SM_DECODE = (1, 1024)                      # (batch, context)
SM_PREFILL = (1, 2048)                     # (prompts, tokens)
QUICK_SM_RESERVED = (0, 1)


def sm_points(quick: bool = False) -> list[tuple[str, str, int]]:
    """(mechanism, workload, reserved SMs) in measuring order: each mechanism's whole sweep."""
    reserved = QUICK_SM_RESERVED if quick else SM_RESERVED
    return [(mech, w, r) for mech in SM_MECHANISMS for r in reserved for w in SM_WORKLOADS]


def sm_point_id(mechanism: str, workload: str, reserved: int) -> str:
    from sim.costs.model import make_key

    return make_key(mechanism=mechanism, reserved=int(reserved), workload=workload)


# ------------------------------------------------------------------------------------------ fp8
FP8_MODELS = ("llama-3.1-8b", "llama-3.2-1b")
FP8_M = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384)
FP8_ANCHOR_M = (1, 128, 2048, 8192)        # bf16 at the same shapes in the same lease
LM_HEAD_MAX_M = 4096                       # the LM head sees only the sampled rows
QUICK_FP8_M = (1, 16)
FP8_KV_DECODE = ((1, 1024), (8, 2048), (32, 4096))   # (batch, context) if fp8-KV attention runs


def fp8_shapes(quick: bool = False) -> list[tuple[int, int, bool]]:
    """(n, k, is the LM head) of every GEMM of the fp8 models (the tiny shape in quick mode)."""
    if quick:
        from calibration.vendor.keys import tiny_shape

        t = tiny_shape()
        return [(n, k, n == t.vocab_size) for n, k in t.gemms]
    seen: dict[tuple[int, int], bool] = {}
    vocab = {model_shape(m).vocab_size for m in FP8_MODELS}
    for m in FP8_MODELS:
        for n, k in model_shape(m).gemms:
            seen.setdefault((n, k), n in vocab)
    return [(n, k, lm) for (n, k), lm in seen.items()]


def fp8_points(quick: bool = False) -> list[tuple[str, int, int, int]]:
    """(dtype, n, k, M): every fp8 point, then the bf16 anchors."""
    grid = QUICK_FP8_M if quick else FP8_M
    anchors = QUICK_FP8_M[:1] if quick else FP8_ANCHOR_M
    shapes = fp8_shapes(quick)
    out = [("fp8", n, k, m) for n, k, lm in shapes for m in grid if not lm or m <= LM_HEAD_MAX_M]
    out += [("bf16", n, k, m) for n, k, lm in shapes for m in anchors if not lm or m <= LM_HEAD_MAX_M]
    return out


def gemm_point_id(dtype: str, n: int, k: int, m: int) -> str:
    from sim.costs.model import make_key

    return make_key(dtype=dtype, k=int(k), m=int(m), n=int(n))


# ------------------------------------------------------------------------------------------ unfused ops
# the torch-unfused recipe's ops that differ from the reference decoder's, each timed whole; the recipe
# op they check (sim/costs/recipes/torch-unfused.toml) and the table op whose key they carry
UNFUSED_OPS = {"rms_norm_fp32": ("attn_norm", "rms_norm"), "rotary_bhld": ("rope", "rope"),
               "kv_index_copy": ("kv_write", "kv_write"), "silu_then_mul": ("act", "act"),
               "embed_step": ("embed", "embed")}
UNFUSED_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
UNFUSED_GEMM_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_UNFUSED_TOKENS = (1, 8)
QUICK_UNFUSED_GEMM_M = (1, 8)


def unfused_gemm_shapes(quick: bool = False) -> list[tuple[str, int, int]]:
    """(model, n, k) of the torch-unfused recipe's GEMMs that the table has not measured: the separate
    k/v (n = KV heads x head dim) and gate/up (n = FFN) projections."""
    from calibration.vendor.keys import gemm_key
    from sim.costs.table import CostTable, resolve_table_dir

    if quick:
        from calibration.vendor.keys import tiny_shape

        t = tiny_shape()
        return [(QUICK_MODEL, t.num_kv_heads * t.head_dim, t.hidden_size), (QUICK_MODEL, t.ffn_size, t.hidden_size)]
    table = CostTable(resolve_table_dir("h200"))
    out = []
    for name in UNFUSED_MODELS:
        s = model_shape(name)
        for n in (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.ffn_size):
            if not table.has("gemm", gemm_key(n, s.hidden_size)):
                out.append((name, n, s.hidden_size))
    return out


def unfused_op_points(quick: bool = False) -> list[tuple[str, str, int]]:
    """(model, unfused op, tokens)."""
    models = (QUICK_MODEL,) if quick else UNFUSED_MODELS
    grid = QUICK_UNFUSED_TOKENS if quick else UNFUSED_TOKENS
    return [(m, op, t) for m in models for op in UNFUSED_OPS for t in grid]


def unfused_op_id(model: str, op: str, tokens: int) -> str:
    from sim.costs.model import make_key

    return make_key(model=model, op=op, tokens=int(tokens))


# ------------------------------------------------------------------------------------------ all-reduce
ALLREDUCE_BYTES = tuple(2**k for k in range(12, 30))   # 4 KiB .. 512 MiB of bf16
QUICK_ALLREDUCE_BYTES = (4096, 65536)
TP_SIZES = (2, 4, 8)


def allreduce_point_id(tp: int, nbytes: int, variant: str) -> str:
    from sim.costs.model import make_key

    return make_key(bytes=int(nbytes), tp=int(tp), variant=variant)


# ------------------------------------------------------------------------------------------ the lease
@dataclass(frozen=True, slots=True)
class PartPlan:
    name: str
    module: str            # calibration.gpu16.<module> exposes run(ctx, sink)
    estimate_s: float      # planned wall seconds on one H200, process start included
    quick_estimate_s: float
    what: str


LEASE_PARTS = (
    PartPlan("unseen_steps", "steps", 60.0, 20.0,
             "fused decoder steps of unseen shapes: qwen2.5-7b, mistral-7b, llama-2-7b (prefill, decode, mixed)"),
    PartPlan("unfused_steps", "steps", 35.0, 15.0, "torch-unfused decoder steps: llama-3.1-8b, llama-3.2-1b"),
    PartPlan("sm_share", "sm_share", 35.0, 20.0, "ops and 8B steps with 0-100 SMs held (occupier, green contexts)"),
    PartPlan("fp8_gemm", "fp8", 25.0, 10.0, "fp8 e4m3 GEMMs (torch._scaled_mm) at the table's shapes; fp8-KV SDPA"),
    PartPlan("unfused_ops", "unfused_ops", 30.0, 10.0, "torch-unfused ops over tokens; its k/v, gate/up GEMMs"),
    PartPlan("unfused_counts", "unfused_counts", 20.0, 15.0, "CUDA kernels per stock-decoder layer (CUPTI)"),
)
TP_PARTS = (
    PartPlan("allreduce", "tp", 60.0, 20.0, "NCCL all-reduce, eager and in a CUDA graph, 4 KiB - 512 MiB"),
    PartPlan("tp_steps", "tp", 60.0, 20.0, "TP fused decoder steps: llama-3.1-8b"),
)


def part_plan(name: str) -> PartPlan:
    for p in LEASE_PARTS + TP_PARTS:
        if p.name == name:
            return p
    known = ", ".join(p.name for p in LEASE_PARTS + TP_PARTS)
    raise ValueError(f"unknown part {name!r}; known parts: {known}")
