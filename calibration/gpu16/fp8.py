"""Part ``fp8_gemm``: fp8 GEMMs at the table's model shapes, and whether fp8-KV decode attention runs.

GEMMs: ``torch._scaled_mm`` (cuBLASLt on Hopper) with e4m3 activations [M, K] and e4m3 weights [N, K]
passed as their column-major transpose, per-tensor float32 scales, bf16 output, default (exact)
accumulation: what an engine's fp8 linear runs, minus the activation quantization kernel (a separate
elementwise kernel, not part of the GEMM op). Rows: part ``fp8_gemm``, variant ``torch``, op ``gemm``,
key ``dtype=fp8,k=..,n=..`` (the key the table backend prefers for fp8 weights), x = M; bytes count one
byte per input and weight element and two per output element. Also, with op "" (not table entries):
``torch-fast-accum`` (``use_fast_accum=True``) and ``torch-bf16-anchor`` (bf16 ``F.linear`` at a few M in
the same lease, so that fp8 over bf16 is a same-lease ratio).

fp8-KV attention: SDPA with bf16 queries and e4m3 K/V, and with all three in e4m3, is tried on every
backend; what each says goes into ``meta["capabilities"]``. Only if a fused backend runs is decode
attention timed (op ``attn_decode``, key ``d=..,dtype=fp8,kvh=..,qh=..``); stock PyTorch usually refuses,
and then the H200 table keeps pricing fp8 KV by bytes (``sim.costs.table``: decode attention at the batch
that reads the same KV bytes).
"""
from __future__ import annotations

import warnings

from calibration.gpu16.plan import FP8_ANCHOR_M, FP8_KV_DECODE, LM_HEAD_MAX_M, fp8_points, fp8_shapes, gemm_point_id
from calibration.raw import make_row

PLAN_S = 20.0


def fp8_gemm_available(torch, device) -> tuple[bool, str]:
    """Whether ``torch._scaled_mm`` runs an e4m3 GEMM here, and what it said."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no float8_e4m3fn or _scaled_mm"
    try:
        a = torch.randn(16, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(16, 32, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device, dtype=torch.float32)
        out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        ref = a.float() @ b.float().t()
        err = float((out.float() - ref).norm() / ref.norm())
        return err < 2e-2, f"ok (relative error {err:.1e} against fp32 on the same e4m3 values)"
    except Exception as exc:  # noqa: BLE001 - the answer is the capability
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def fp8_kv_attention(torch, device) -> dict:
    """What SDPA says to e4m3 K/V (bf16 queries) and to all-e4m3 inputs, per backend."""
    from calibration import torch_ops

    out: dict = {}
    if not hasattr(torch, "float8_e4m3fn"):
        return {"all": "no float8_e4m3fn"}
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 8, 1, 64, device=device, dtype=dt)
    k = torch.randn(2, 8, 128, 64, device=device, dtype=dt)
    for label, args in (("bf16 q, e4m3 kv", (q, k.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn))),
                        ("e4m3 q, kv", (q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn),
                                        k.to(torch.float8_e4m3fn)))):
        for backend in ("flash", "efficient", "cudnn", "math"):
            try:
                with warnings.catch_warnings():   # torch warns why a backend declined; the error says it too
                    warnings.simplefilter("ignore")
                    torch_ops._call_sdpa(backend, "native", *args, None, False)
                out[f"{label} / {backend}"] = "runs"
            except Exception as exc:  # noqa: BLE001
                text = str(exc).splitlines()[0][:160] if str(exc) else ""
                out[f"{label} / {backend}"] = f"{type(exc).__name__}: {text}"
    return out


def _time(env, call, n_sets, point_s):
    from calibration.vendor.timing import time_calls

    return time_calls(call, n_sets, env, point_s=point_s)


def run(part: str, ctx, sink) -> None:
    from calibration.vendor.keys import gemm_key
    from calibration.vendor.timing import (
        Budget,
        describe_error,
        failure_row,
        finish_rows,
        recover,
        rotation_sets,
        torch_env,
    )
    from sim.costs.model import make_key

    env = torch_env(ctx.quick)
    torch = env.torch
    budget = Budget(ctx.budget_s, PLAN_S)
    ok, why = fp8_gemm_available(torch, env.device)
    caps = sink.meta.setdefault("capabilities", {})
    caps["fp8_gemm"] = why
    caps["fp8_kv_attention"] = fp8_kv_attention(torch, env.device)
    ctx.progress(f"fp8 GEMM: {why}")
    points = [p for p in fp8_points(ctx.quick) if ok or p[0] == "bf16"]
    extra_points = [("fast", n, k, m) for n, k, lm in fp8_shapes(ctx.quick) for m in FP8_ANCHOR_M
                    if ok and not ctx.quick and (not lm or m <= LM_HEAD_MAX_M)]
    todo = points + extra_points
    by_shape: dict[tuple[int, int], list] = {}
    for p in todo:
        by_shape.setdefault((p[1], p[2]), []).append(p)
    left = len(todo)
    for (n, k), pts in by_shape.items():
        group = budget.group(len(pts), left)
        ctx.progress(f"n={n} k={k}: {len(pts)} points, {group.total_s:.0f} s")
        w8 = ws = None
        for j, (dtype, _, _, m) in enumerate(pts):
            left -= 1
            if group.expired():
                continue
            fp8 = dtype in ("fp8", "fast")
            nbytes = (m * k + k * n + 2 * m * n) if fp8 else 2.0 * (m * k + k * n + m * n)
            variant = {"fp8": "torch", "fast": "torch-fast-accum", "bf16": "torch-bf16-anchor"}[dtype]
            key = make_key(dtype="fp8", k=k, n=n) if fp8 else gemm_key(n, k)
            extra = {**env.base_extra(), "n": n, "k": k, "point": gemm_point_id("fp8" if fp8 else "bf16", n, k, m),
                     "lib": "torch._scaled_mm (cuBLASLt), e4m3 x e4m3 -> bf16, per-tensor scales" if fp8
                     else "cuBLAS via torch.nn.functional.linear", "use_fast_accum": dtype == "fast"}
            try:
                n_sets = rotation_sets(nbytes, env)
                if fp8:
                    if w8 is None or len(w8) < n_sets:
                        w8 = [(torch.randn(n, k, device=env.device) * 0.02).to(torch.float8_e4m3fn)
                              for _ in range(n_sets)]
                    xs = [torch.randn(m, k, device=env.device).to(torch.float8_e4m3fn) for _ in range(n_sets)]
                    sa = torch.full((), 0.5, device=env.device, dtype=torch.float32)
                    sb = torch.full((), 0.02, device=env.device, dtype=torch.float32)
                    fast = dtype == "fast"

                    def call(i, xs=xs, w8=w8, sa=sa, sb=sb, fast=fast):
                        return torch._scaled_mm(xs[i], w8[i].t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                use_fast_accum=fast)
                else:
                    if ws is None or len(ws) < n_sets:
                        ws = [torch.randn(n, k, device=env.device, dtype=env.dtype) * 0.02 for _ in range(n_sets)]
                    xs = [torch.randn(m, k, device=env.device, dtype=env.dtype) for _ in range(n_sets)]

                    def call(i, xs=xs, ws=ws):
                        return torch.nn.functional.linear(xs[i], ws[i])
                meas = _time(env, call, n_sets, group.share(len(pts) - j))
                sink.add(make_row("fp8_gemm", variant, meas.samples_s, op="gemm" if dtype == "fp8" else "", key=key,
                                  x=m, nbytes=nbytes, flops=2.0 * m * n * k, extra={**extra, **meas.extra()}))
                del xs, call
            except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
                recover(env, exc)
                sink.add(failure_row("fp8_gemm", variant, describe_error(exc), op="gemm" if dtype == "fp8" else "",
                                     key=key, x=m, extra=extra))
        del w8, ws
        recover(env)
        sink.flush()
    _fp8_kv_decode(ctx, sink, env, budget, caps["fp8_kv_attention"])
    finish_rows(sink.rows)


def _fp8_kv_decode(ctx, sink, env, budget, verdicts: dict) -> None:
    """Decode attention with e4m3 K/V, timed only where a fused backend accepted it."""
    from calibration import torch_ops
    from calibration.raw import model_shape
    from calibration.vendor.timing import describe_error, failure_row, recover, rotation_sets

    runs = [name for name, v in verdicts.items() if v == "runs" and not name.endswith("/ math")]
    if not runs or not env.cuda:
        sink.meta["fp8_kv_decode"] = ("not timed: no fused SDPA backend accepts e4m3 K/V here"
                                      if env.cuda else "not timed: no GPU")
        return
    label, backend = runs[0].split(" / ")
    torch = env.torch
    shape = model_shape("llama-3.1-8b")
    qh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    from sim.costs.model import make_key

    key = make_key(d=d, dtype="fp8", kvh=kvh, qh=qh)
    sink.meta["fp8_kv_decode"] = f"timed with {backend} ({label})"
    for batch, ctx_len in FP8_KV_DECODE:
        if budget.expired():
            break
        nbytes = batch * ctx_len * 2.0 * kvh * d + 2.0 * batch * qh * d * 2
        extra = {**env.base_extra(), "attention_backend": backend, "inputs": label}
        try:
            n_sets = rotation_sets(nbytes, env, max_sets=64)
            qdt = torch.float8_e4m3fn if label.startswith("e4m3") else env.dtype
            sets = [(torch.randn(batch, qh, 1, d, device=env.device).to(qdt),
                     torch.randn(batch, kvh, ctx_len, d, device=env.device).to(torch.float8_e4m3fn),
                     torch.randn(batch, kvh, ctx_len, d, device=env.device).to(torch.float8_e4m3fn))
                    for _ in range(n_sets)]
            meas = _time(env, lambda i, sets=sets: torch_ops._call_sdpa(backend, "native", *sets[i], None, False),
                         n_sets, 0.2)
            sink.add(make_row("fp8_gemm", "torch-sdpa", meas.samples_s, op="attn_decode", key=key, x=batch,
                              y=ctx_len, nbytes=nbytes, flops=4.0 * qh * d * batch * ctx_len,
                              extra={**extra, **meas.extra()}))
            del sets
        except Exception as exc:  # noqa: BLE001
            recover(env, exc)
            sink.add(failure_row("fp8_gemm", "torch-sdpa", describe_error(exc), op="attn_decode", key=key,
                                 x=batch, y=ctx_len, extra=extra))
    sink.flush()
