"""A stock-PyTorch Llama decoder: the ``torch-unfused`` recipe's engine (``sim/costs/recipes/torch-unfused.toml``).

Written the way a model built from ``torch`` and ``torch.nn.functional`` alone runs (as Hugging Face
``transformers``' Llama does), in contrast with ``calibration.reference_model`` (fused RMSNorm, fused
QKV and gate/up projections):

- RMSNorm in fp32 from separate elementwise kernels: cast to fp32, ``pow(2)``, ``mean``, ``+ eps``,
  ``rsqrt``, multiply, cast back, multiply by the weight (8 kernels);
- separate q, k, v and gate, up projections (one GEMM each);
- rotary embedding by slicing, concatenation, multiply and add (rotate-half: per tensor ``q·cos``, ``-x2``,
  ``cat``, ``·sin``, ``+``: 5 kernels, 10 for q and k);
- KV write by ``index_copy_`` into a contiguous per-sequence cache (one kernel each for K and V);
- SDPA attention on the contiguous cache (native GQA); its output reshaped for ``o_proj`` (a view:
  the flash backends, CPU and CUDA, lay the output out as [B, L, heads, d] and return it transposed);
- SiLU and the gate multiply as separate kernels; residual adds out of place.

Per layer that is 40 kernels in decode and in prefill steps (``tests/data/kernel_counts/
torch_unfused.json`` records the profiler's count and how it was made). :class:`StockDecoder` has the interface of
``ReferenceModel`` that the timing helpers use (``make_step``), so the GPU issue that measures this
decoder can time it eagerly and as a CUDA graph with :func:`time_step`.
"""
from __future__ import annotations

from sim.specs import ModelSpec

RMS_EPS = 1e-5
ROPE_THETA = 500_000.0


def rms_norm_fp32(x, weight, eps: float = RMS_EPS):
    """Stock RMSNorm: ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``."""
    import torch

    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(var + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class StockDecoder:
    """A Llama decoder from stock PyTorch ops with a contiguous KV cache per layer.

    Invariants: weights never change after construction; each layer's K and V caches are one flat
    buffer of ``batch × capacity_tokens`` positions, and a step of ``b`` sequences with ``n`` positions
    each sees its prefix as ``[b, kvh, n, d]`` (so a step may trade sequences for length within the
    buffer; positions written under one (b, n) are read back only under the same (b, n)).
    """

    def __init__(self, spec: str | ModelSpec, *, device="cpu", dtype=None, batch: int = 1,
                 capacity_tokens: int = 4096, num_layers: int | None = None, seed: int = 0,
                 weight_std: float = 0.02, max_positions: int | None = None) -> None:
        import torch

        from calibration.reference_model import resolve_spec

        self.torch = torch
        self.spec = spec = resolve_spec(spec)
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda"
                                                      else torch.float32)
        h, d, f, v = spec.hidden_size, spec.head_dim, spec.ffn_size, spec.vocab_size
        qh, kvh = spec.num_heads, spec.num_kv_heads
        self.h, self.d, self.qh, self.kvh = h, d, qh, kvh
        self.num_layers = num_layers or spec.num_layers
        self.batch, self.capacity = batch, capacity_tokens
        self.slots = batch * capacity_tokens
        torch.manual_seed(seed)

        def mat(*size):
            return torch.empty(*size, device=self.device, dtype=self.dtype).normal_(0.0, weight_std)

        def norm():
            return torch.empty(h, device=self.device, dtype=self.dtype).normal_(1.0, 0.05)

        self.embed_table = mat(v, h)
        self.layers = [dict(attn_norm=norm(), q=mat(qh * d, h), k=mat(kvh * d, h), v=mat(kvh * d, h),
                            o=mat(h, qh * d), ffn_norm=norm(), gate=mat(f, h), up=mat(f, h), down=mat(h, f))
                       for _ in range(self.num_layers)]
        self.final_norm = norm()
        self.lm_head = self.embed_table if spec.tied_embeddings else mat(v, h)
        positions = max_positions or capacity_tokens + 1
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self.sin = emb.sin().to(device=self.device, dtype=self.dtype)
        # random, never zeros (METHOD.md): attention over a cache of zeros is not what runs
        self.k_flat = [torch.empty(self.slots * kvh * d, device=self.device, dtype=self.dtype).normal_()
                       for _ in range(self.num_layers)]
        self.v_flat = [torch.empty_like(c).normal_() for c in self.k_flat]

    def cache_views(self, i: int, batch: int, positions: int):
        """Layer ``i``'s K and V caches for a step of ``batch`` sequences of ``positions`` each."""
        n = batch * self.kvh * positions * self.d
        shape = (batch, self.kvh, positions, self.d)
        return self.k_flat[i][:n].view(shape), self.v_flat[i][:n].view(shape)

    # ------------------------------------------------------------------ forward
    def layer(self, i: int, x, cos, sin, pos, batch: int, new: int, keys: int, cap: int | None = None):
        """One decoder layer on ``x`` [batch·new, h]; its K/V go to positions ``pos`` of the cache
        (viewed with ``cap`` positions per sequence, default ``keys``), attention reads ``keys``."""
        F = self.torch.nn.functional
        w = self.layers[i]
        qh, kvh, d = self.qh, self.kvh, self.d
        hn = rms_norm_fp32(x, w["attn_norm"])
        q = F.linear(hn, w["q"]).view(batch, new, qh, d).transpose(1, 2)
        k = F.linear(hn, w["k"]).view(batch, new, kvh, d).transpose(1, 2)
        v = F.linear(hn, w["v"]).view(batch, new, kvh, d).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        kc, vc = self.cache_views(i, batch, cap or keys)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        if cap and cap > keys:
            kc, vc = kc[:, :, :keys], vc[:, :, :keys]
        causal = new > 1 and keys == new
        attn = F.scaled_dot_product_attention(q, kc, vc, is_causal=causal, enable_gqa=qh != kvh)
        attn = attn.transpose(1, 2).reshape(batch * new, qh * d)
        x = x + F.linear(attn, w["o"])
        hn = rms_norm_fp32(x, w["ffn_norm"])
        x = x + F.linear(F.silu(F.linear(hn, w["gate"])) * F.linear(hn, w["up"]), w["down"])
        return x

    def logits(self, ids, start: int, cap: int | None = None):
        """One step: ``ids`` [B, L] new tokens at positions [start, start + L) (caches viewed with ``cap``
        positions per sequence, default start + L); logits [B, vocab] of each sequence's last token."""
        torch, F = self.torch, self.torch.nn.functional
        batch, new = ids.shape
        pos = torch.arange(start, start + new, device=self.device)
        x = F.embedding(ids.reshape(-1), self.embed_table)
        cos = self.cos[pos].view(1, 1, new, self.d)
        sin = self.sin[pos].view(1, 1, new, self.d)
        for i in range(self.num_layers):
            x = self.layer(i, x, cos, sin, pos, batch, new, start + new, cap)
        last = x.view(batch, new, self.h)[:, -1]
        return F.linear(rms_norm_fp32(last, self.final_norm), self.lm_head)

    def forward(self, ids, start: int):
        """One step (see :meth:`logits`); returns the greedy next ids [B]."""
        return self.torch.argmax(self.logits(ids, start), dim=-1)

    def make_step(self, phase: str, batch: int, length: int):
        """A zero-arg step with static inputs (capturable in a CUDA graph): ``prefill`` of ``batch``
        prompts of ``length`` tokens, or a ``decode`` of ``batch`` sequences with ``length`` cached."""
        new, start = (length, 0) if phase == "prefill" else (1, length)
        if batch * (start + new) > self.slots:
            raise ValueError(f"{batch} x {start + new} positions exceed the cache's {self.slots}")
        if start + new > self.cos.shape[0]:
            raise ValueError(f"{start + new} positions exceed the rotary tables' {self.cos.shape[0]}")
        ids = self.torch.randint(0, self.spec.vocab_size, (batch, new), device=self.device)
        return lambda: self.forward(ids, start)

    def make_layer_step(self, phase: str, batch: int, length: int):
        """One decoder layer of such a step, alone (what the kernel-count test profiles)."""
        torch = self.torch
        new, start = (length, 0) if phase == "prefill" else (1, length)
        pos = torch.arange(start, start + new, device=self.device)
        x = torch.randn(batch * new, self.h, device=self.device, dtype=self.dtype)
        cos = self.cos[pos].view(1, 1, new, self.d)
        sin = self.sin[pos].view(1, 1, new, self.d)
        return lambda: self.layer(0, x, cos, sin, pos, batch, new, start + new)


# ---------------------------------------------------------------------------- kernel counting
# CUDA kernels each top-level aten op of the layer launches. The CPU profiler records aten ops and
# their CPU kernels, not GPU kernels, and the CPU decomposes some ops differently, so the count is made
# per top-level op with what its CUDA implementation launches:
#   - elementwise ops (mul, add, neg, pow, rsqrt, silu): one TensorIterator kernel each, on CPU and CUDA;
#   - aten::to with a real cast (a child aten::_to_copy): one copy kernel; without one it is a no-op;
#   - aten::mean: one reduce kernel on CUDA; the CPU runs it as aten::sum + aten::div_ (two ops);
#   - aten::linear: one cuBLAS GEMM (aten::t is a view; cuBLAS picks a split-K kernel pair at some
#     shapes, which the table's measured GEMM counts already carry);
#   - aten::cat, aten::index_copy_, aten::embedding, aten::argmax, aten::index, aten::arange: one each;
#   - aten::scaled_dot_product_attention: one FlashAttention kernel (the CPU runs
#     _scaled_dot_product_flash_attention_for_cpu; a CUDA split-KV decode may add a combine kernel);
#   - aten::reshape: a copy kernel when it has to copy (a child aten::clone), else a view.
ONE_KERNEL = frozenset({"aten::mul", "aten::add", "aten::neg", "aten::pow", "aten::rsqrt", "aten::silu",
                        "aten::mean", "aten::linear", "aten::cat", "aten::index_copy_", "aten::embedding",
                        "aten::argmax", "aten::index", "aten::arange", "aten::scaled_dot_product_attention"})
VIEW_OPS = frozenset({"aten::view", "aten::transpose", "aten::t", "aten::slice", "aten::select",
                      "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::as_strided", "aten::permute",
                      "aten::alias", "aten::detach", "aten::narrow", "aten::split", "aten::chunk",
                      "aten::empty", "aten::empty_like", "aten::lift_fresh", "aten::result_type"})


def cuda_kernels(name: str, children: list[str]) -> int:
    """CUDA kernels one top-level aten op launches (see the table above); ValueError if unknown."""
    if name in ONE_KERNEL:
        return 1
    if name in VIEW_OPS:
        return 0
    if name == "aten::to":
        return int("aten::_to_copy" in children)
    if name == "aten::reshape":
        return int("aten::clone" in children)
    raise ValueError(f"no CUDA kernel count known for {name} (children {children}): add it to "
                     f"calibration.torch_unfused")


def count_layer_ops(step) -> dict:
    """Profile one call of ``step`` with the CPU profiler and count the CUDA kernels its aten ops launch.

    Returns ``{"count": CUDA kernels, "ops": {top-level aten op: calls}, "kernels_by_op": {op: kernels},
    "cpu_leaf_ops": leaf aten ops the CPU ran}`` — the last one for the record: it differs from the
    CUDA count where the CPU decomposes an op (mean) or a matmul's internals show.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()                       # warm: first calls may allocate or pick kernels
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    calls: dict[str, int] = {}
    kernels: dict[str, int] = {}
    leaves = 0
    for e in events:
        kids = [c.name for c in e.cpu_children if c.name.startswith("aten::")]
        if not kids:
            leaves += 1
        parent = e.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue
        calls[e.name] = calls.get(e.name, 0) + 1
        n = cuda_kernels(e.name, kids)
        if n:
            kernels[e.name] = kernels.get(e.name, 0) + n
    return {"count": sum(kernels.values()), "ops": dict(sorted(calls.items())),
            "kernels_by_op": dict(sorted(kernels.items())), "cpu_leaf_ops": leaves}


def time_step(step, cuda: bool, mode_s: float = 0.3) -> dict:
    """Eager (host clock, one synchronize per step) and CUDA-graph seconds of one step, with
    ``calibration.reference_model``'s timing loops (for the GPU issue that validates this decoder)."""
    import torch

    from calibration.reference_model import _median, _time_eager, _time_graph

    host, gpu, _ = _time_eager(torch, step, cuda, mode_s)
    out = {"eager_s": _median(host), "eager_gpu_s": _median(gpu)}
    if cuda:
        ghost, ggpu, counts = _time_graph(torch, step, mode_s)
        out.update(graph_s=_median(ghost), graph_gpu_s=_median(ggpu), graph_kernels=(counts or {}).get("kernels"))
    return out


# ---------------------------------------------------------------------------- recording counts
FIXTURE = "tests/data/kernel_counts/torch_unfused.json"
COUNT_POINTS = (("llama-3.1-8b", "decode", 2, 16), ("llama-3.1-8b", "prefill", 1, 16),
                ("llama-3.2-1b", "decode", 2, 16), ("llama-3.2-1b", "prefill", 1, 16))


def count_cuda_layer(step) -> dict:
    """Kernels one call of ``step`` launches on the GPU (CUPTI, ``calibration.torch_ops.count_kernels``)."""
    import torch

    from calibration.torch_ops import count_kernels

    with torch.no_grad():
        step()
        got = count_kernels(step)
    return {"count": got["kernels"], "kernel_names": got["names"]}


def record(device: str = "cpu", points=COUNT_POINTS) -> list[dict]:
    """Kernels per layer of the stock decoder at ``points`` (default :data:`COUNT_POINTS`) on ``device``
    (one layer, real shapes, a 1,024-token vocabulary: the layer does not touch it)."""
    import dataclasses

    import torch

    from sim.specs import load_model

    out = []
    for name, phase, batch, length in points:
        spec = dataclasses.replace(load_model(name), num_layers=1, vocab_size=1024)
        dec = StockDecoder(spec, device=device, dtype=torch.bfloat16, batch=batch, capacity_tokens=64, num_layers=1)
        step = dec.make_layer_step(phase, batch, length)
        if device == "cpu":
            got = count_layer_ops(step)
            how = ("torch.profiler, CPU activity: top-level aten ops of one layer, each mapped to the CUDA "
                   "kernels it launches (calibration.torch_unfused.cuda_kernels); cpu_leaf_ops is the raw "
                   "CPU count (aten::mean runs as sum + div_ there, matmul internals show)")
        else:
            got = count_cuda_layer(step)
            how = "torch.profiler, CUDA activity (CUPTI): kernels, memcpys and memsets of one layer"
        out.append({"model": name, "phase": phase, "batch": batch, "length": length, "device": device,
                    "torch": torch.__version__, "kernels_per_layer": got["count"], "counted": how,
                    **{k: v for k, v in got.items() if k != "count"}})
        del dec
    return out


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m calibration.torch_unfused",
                                description="count the stock decoder layer's kernels and record them")
    p.add_argument("--device", default="cpu", help="cpu (profiler aten ops) or cuda (CUPTI kernels)")
    p.add_argument("--fixture", default=FIXTURE, help="the recorded-count file to update")
    args = p.parse_args(argv)
    path = Path(args.fixture)
    data = json.loads(path.read_text()) if path.exists() else {"counts": []}
    fresh = record(args.device)
    keep = [c for c in data["counts"] if c.get("device") != args.device]
    data["counts"] = keep + fresh
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for c in fresh:
        print(f"{c['model']} {c['phase']} on {c['device']}: {c['kernels_per_layer']} kernels per layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
