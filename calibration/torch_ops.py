"""The reference implementation of every cost-table op, as a straightforward eager PyTorch engine runs it.

One function per table op of ``sim.costs.model`` (``linear`` prices ``gemm``). The vendor parts
(``calibration.vendor``) time these very functions in isolation and ``calibration.reference_model``
builds its decoder from them, so what is timed is exactly what runs in the validation model.

Layouts (T = tokens of the step, B = sequences, L = new tokens per sequence, S = cache capacity):

- activations ``[T, features]``; per-head tensors ``[T, heads, head_dim]`` (views of the fused qkv
  GEMM output, so they are strided);
- attention inputs are in SDPA layout ``[B, heads, L, head_dim]`` (usually transposed views);
- KV cache ``[B, kv_heads, S, head_dim]`` per layer, per K and V.

Attention goes through ``scaled_dot_product_attention``, preferring the FlashAttention backend and
falling back to efficient / cuDNN / math; the backend actually used is remembered per call signature
and reported by :func:`sdpa_backend`. :func:`count_kernels` counts the GPU work one call launches.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - old torch
    SDPBackend = None
    sdpa_kernel = None

try:  # torch >= 2.3 (prototype API)
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover - old torch
    causal_lower_right = None

HAS_F_RMS_NORM = hasattr(F, "rms_norm")
ROPE_THETA = 500_000.0  # Llama 3 base; the llama3 frequency scaling changes values, not speed
RMS_EPS = 1e-5


# ----------------------------------------------------------------------------- elementwise ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``."""
    if HAS_F_RMS_NORM:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` without bias; ``w`` is ``[n, k]`` (out, in), i.e. the cost table's weights [k, n]."""
    return F.linear(x, w)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half formulation (dims i and i + d/2 form one pair).

    ``q`` [T, qh, d], ``k`` [T, kvh, d]; ``cos``/``sin`` [T, 1, d] (the per-token rows of
    :func:`rope_tables`). Returns new contiguous tensors.
    """
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_tables(max_positions: int, head_dim: int, *, theta: float = ROPE_THETA,
                device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim] for :func:`rope` (HF Llama layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             start: int) -> None:
    """Write the new tokens' K and V into the cache at positions ``[start, start + L)``.

    ``k_cache``/``v_cache`` [B, kvh, S, d]; ``k``/``v`` [B*L, kvh, d] ordered by sequence then
    position (the step's token order). One strided copy kernel each for K and V.
    """
    batch = k_cache.shape[0]
    new = k.shape[0] // batch
    if new * batch != k.shape[0] or start + new > k_cache.shape[2]:
        raise ValueError(f"kv_write: {k.shape[0]} tokens do not fit batch {batch} x positions "
                         f"[{start}, {start + new}) of a cache of {k_cache.shape[2]}")
    k_cache[:, :, start:start + new].copy_(k.view(batch, new, *k.shape[1:]).transpose(1, 2))
    v_cache[:, :, start:start + new].copy_(v.view(batch, new, *v.shape[1:]).transpose(1, 2))


def act(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``SiLU(gate) * up`` on the two halves [gate | up] of one GEMM output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add (out of place, as the eager engine writes ``h = h + out``)."""
    return a + b


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token-embedding gather: ``table[ids]``."""
    return F.embedding(ids, table)


def sample(logits: torch.Tensor) -> torch.Tensor:
    """Greedy sampling: argmax over the vocabulary of each row."""
    return torch.argmax(logits, dim=-1)


# ----------------------------------------------------------------------------- attention
# (backend name, how grouped-query heads are handled): "native" passes enable_gqa=True (or nothing
# when the head counts are equal), "expand" repeats the KV heads first (extra copy kernels).
_CANDIDATES = (("flash", "native"), ("efficient", "native"), ("efficient", "expand"),
               ("cudnn", "native"), ("cudnn", "expand"), ("math", "native"), ("math", "expand"))
_BACKEND_ENUM = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
_chosen: dict[tuple, tuple[str, str]] = {}
_last_used: dict[str, str] = {}
_gqa_kwarg: bool | None = None


def sdpa_supports_enable_gqa() -> bool:
    """Whether this torch's ``scaled_dot_product_attention`` accepts ``enable_gqa`` (torch >= 2.5)."""
    global _gqa_kwarg
    if _gqa_kwarg is None:
        q = torch.ones(1, 2, 1, 8)
        k = torch.ones(1, 1, 3, 8)
        try:
            F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
            _gqa_kwarg = True
        except (TypeError, RuntimeError):
            _gqa_kwarg = False
    return _gqa_kwarg


def sdpa_backend(kind: str) -> str | None:
    """The SDPA backend the last ``kind`` ("prefill" or "decode") call used, e.g. "flash"."""
    return _last_used.get(kind)


def _describe(backend: str, gqa: str, grouped: bool) -> str:
    if not grouped:
        return backend
    return f"{backend}+gqa" if gqa == "native" else f"{backend}+expand-kv"


def _call_sdpa(backend: str, gqa: str, q, k, v, mask, is_causal: bool):
    grouped = q.shape[1] != k.shape[1]
    kwargs = {}
    if grouped:
        if gqa == "native":
            if not sdpa_supports_enable_gqa():
                raise TypeError("enable_gqa is not supported by this torch")
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if sdpa_kernel is None:
        if backend != "math":
            raise RuntimeError("torch.nn.attention.sdpa_kernel is not available")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)
    enum = getattr(SDPBackend, _BACKEND_ENUM[backend], None)
    if enum is None:
        raise RuntimeError(f"SDPBackend has no {_BACKEND_ENUM[backend]}")
    with sdpa_kernel([enum]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)


def _is_fatal(exc: BaseException) -> bool:
    """Errors that another backend cannot fix: out of memory, sticky CUDA faults."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text


def _sdpa(kind: str, q, k, v, mask, is_causal: bool) -> torch.Tensor:
    """SDPA through the first backend that runs, in preference order; the choice is remembered.

    The first call for a signature tries backends in order (do it before CUDA-graph capture: a
    failed attempt may launch work); later calls go straight to the remembered backend.
    """
    grouped = q.shape[1] != k.shape[1]
    sig = (kind, q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[-1], mask is not None)
    choice = _chosen.get(sig)
    if choice is not None:
        try:
            out = _call_sdpa(*choice, q, k, v, mask, is_causal)
            _last_used[kind] = _describe(*choice, grouped)
            return out
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            if _is_fatal(exc):
                raise
            _chosen.pop(sig, None)
    errors = []
    for backend, gqa in _CANDIDATES:
        if gqa == "expand" and not grouped:
            continue
        try:
            out = _call_sdpa(backend, gqa, q, k, v, mask, is_causal)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            if _is_fatal(exc):
                raise
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            errors.append(f"{backend}/{gqa}: {first}")
            continue
        _chosen[sig] = (backend, gqa)
        _last_used[kind] = _describe(backend, gqa, grouped)
        return out
    raise RuntimeError("no SDPA backend ran: " + " | ".join(errors))


def causal_mask_lower_right(lq: int, lk: int, device=None) -> torch.Tensor:
    """Boolean mask [lq, lk], True = attend: query i sits at key position lk - lq + i."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cached_k: torch.Tensor | None = None,
                      cached_v: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk of new tokens over their cached prefix and themselves.

    ``q`` [B, qh, Lq, d]; ``k``/``v`` [B, kvh, Lk, d]: either the chunk's own keys (then
    ``cached_k``/``cached_v`` [B, kvh, c, d] hold the prefix and are concatenated in front) or, as the
    reference model passes them, the cache slice covering prefix and chunk (Lk = c + Lq). With
    Lk > Lq the mask is lower-right aligned: query i sees keys ``0 .. Lk - Lq + i``. Returns
    [B, qh, Lq, d].
    """
    if cached_k is not None:
        k = torch.cat((cached_k, k), dim=2)
        v = torch.cat((cached_v, v), dim=2)
    lq, lk = q.shape[2], k.shape[2]
    if lk < lq:
        raise ValueError(f"attention_prefill: {lk} keys for {lq} queries")
    if lk == lq:
        return _sdpa("prefill", q, k, v, None, True)
    mask = (causal_lower_right(lq, lk) if causal_lower_right is not None
            else causal_mask_lower_right(lq, lk, q.device))
    return _sdpa("prefill", q, k, v, mask, False)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     ctx_len: int) -> torch.Tensor:
    """One query token per sequence over the first ``ctx_len`` cached keys (new token included).

    ``q`` [B, qh, 1, d]; caches [B, kvh, S, d] with S >= ctx_len (every sequence of the batch has
    the same length, as in the calibration grid). No mask: the query is the newest position.
    """
    return _sdpa("decode", q, k_cache[:, :, :ctx_len], v_cache[:, :, :ctx_len], None, False)


# ----------------------------------------------------------------------------- kernel counting
def count_kernels(fn: Callable[[], object]) -> dict | None:
    """GPU activities one call of ``fn`` launches, read with ``torch.profiler`` (CUPTI).

    Returns ``{"kernels": n, "kernel": a, "memcpy": b, "memset": c, "names": [...]}`` where
    ``kernels`` = a + b + c counts every launch (a memcpy or memset launch costs the host about what a
    kernel does), or None without CUDA. Warm ``fn`` up first: first calls may launch one-off work.
    Note: Kineto may leave CUPTI attached after profiling, slowing later launches in this process
    (pytorch/pytorch#144455); the parts therefore count in a child process
    (``calibration.vendor.kernel_count``).
    """
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not names:  # older layouts attach device kernels to their CPU ops only
        names = [k.name for e in prof.events() for k in getattr(e, "kernels", ())]
    memcpy = sum(1 for n in names if n.startswith("Memcpy"))
    memset = sum(1 for n in names if n.startswith("Memset"))
    return {"kernels": len(names), "kernel": len(names) - memcpy - memset, "memcpy": memcpy,
            "memset": memset, "names": [n[:80] for n in names]}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["rms_norm", "linear", "rope", "rope_tables", "rotate_half", "kv_write", "act", "add",
           "embed", "sample", "attention_prefill", "attention_decode", "sdpa_backend",
           "sdpa_supports_enable_gqa", "causal_mask_lower_right", "count_kernels", "itemsize",
           "HAS_F_RMS_NORM", "RMS_EPS", "ROPE_THETA"]
