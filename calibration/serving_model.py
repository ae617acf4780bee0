"""The reference decoder as a serving engine runs it: ragged batches over a token arena.

``calibration.reference_model.ReferenceModel`` times steps whose sequences all have the same length
(its cache is one ``[batch, kv_heads, capacity, head_dim]`` view). A server's step mixes prefill
chunks and decodes of different lengths, so :class:`ServingModel` keeps the reference decoder's
weights and ops (``calibration.torch_ops``, op for op as ``sim.costs.model`` lists them) and changes
only what raggedness forces:

- **KV cache**: one token arena per layer, ``[tokens, kv_heads, head_dim]`` for K and for V; each
  admitted request owns a contiguous region (:class:`TokenArena`, first fit) of ``prompt + output -
  1`` tokens, the most KV it can ever hold. A contiguous per-sequence cache is what the reference
  decoder's attention reads (and what the cost tables were calibrated on); paging it would change the
  kernels. The arena is larger than the scheduler's block capacity (``ARENA_FACTOR``) so that region
  fragmentation never binds before tiersim's block count does.
- **One mixed forward pass per step**, as tiersim prices a step: the step's tokens are packed
  ``[T, hidden]`` (decodes first, then prefill chunks), every GEMM and elementwise op runs once over
  them, ``kv_write`` is one ``index_copy_`` per K and V into each token's arena slot, and final norm,
  LM head and sampling run on the sampling rows only.
- **Attention** (``attention_path``): ``"varlen"`` — FlashAttention's variable-length kernel
  (``torch.ops.aten._flash_attention_forward`` with per-sequence key offsets and ``seqused_k``), one
  launch per layer for all sequences, causal masks aligned bottom-right (a chunk after ``c`` cached
  tokens sees them all), reading exactly each sequence's own keys, so its cost follows the batch's
  total context as tiersim's ``attn_decode`` assumes. It is a private ATen op, so :func:`probe_varlen`
  checks it against the reference attention on the device before use. ``"loop"`` — one
  ``torch_ops.attention_prefill``/``attention_decode`` call per sequence (the reference ops
  themselves): used on the CPU and wherever the varlen kernel is missing or fails its probe; on a GPU
  it is launch-bound at large batches and CUDA graphs are then off. ``"emulated"`` — the loop path
  fed from the varlen kernel's device inputs (query offsets, key offsets, key counts), with decode
  "graphs" that re-run the captured step on their static buffers: the GPU path's data flow (packing,
  padding rows, dummy region, staging copies) run on the CPU, so tests can check it against ``loop``.
- **CUDA graphs** for decode-only steps (``varlen`` path only), captured at vLLM's batch sizes
  (``CAPTURE_SIZES``). With ``graph_match="pad"`` (vLLM's behaviour) a batch replays the smallest
  captured graph that holds it, the padding rows writing and reading a one-token dummy region; with
  ``"exact"`` only batches of a captured size replay one. Prefill and mixed steps run eagerly.

:class:`TorchExecutor` drives it for ``calibration.reference_server``: one model build, warm-up and
graph capture per model, shared by that model's cases.
"""
from __future__ import annotations

import time

import numpy as np

from calibration.serving_engine import StepTiming

# vLLM v0's CUDA-graph batch sizes: ``_BATCH_SIZES_TO_CAPTURE = [1, 2, 4] + [8 * i for i in range(1, 33)]``
# (vllm/worker/model_runner.py, v0.4-v0.6), i.e. 1, 2, 4, 8, 16, ..., 256; a decode batch is padded to
# the next one (``_get_graph_batch_size``).
CAPTURE_SIZES = (1, 2, 4) + tuple(8 * i for i in range(1, 33))
ARENA_FACTOR = 2.0               # arena tokens per token of scheduler KV capacity
MEMORY_MARGIN_BYTES = 8 * 2**30  # activations of the largest step, graph pools, allocator slack
ID_POOL = 1 << 16                # random prompt token ids, reused cyclically (values do not change speed)
PROBE_TOL = 2e-2                 # varlen vs reference attention, relative (bf16)


# ============================================================================ token arena
class TokenArena:
    """First-fit allocator of contiguous token ranges in ``[0, capacity)``.

    Invariants: ``free`` is sorted by start, its ranges are disjoint and never adjacent (freed ranges
    are coalesced), and free plus allocated lengths add up to ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.free: list[list[int]] = [[0, self.capacity]] if capacity > 0 else []
        self.used = 0

    def allocate(self, n: int) -> int | None:
        """Start of a free range of ``n`` tokens, or None when no free range is that long."""
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = [start + n, length - n]
                self.used += n
                return start
        return None

    def release(self, start: int, n: int) -> None:
        free = self.free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        if i < len(free) and start + n > free[i][0] or i > 0 and free[i - 1][0] + free[i - 1][1] > start:
            raise RuntimeError(f"token arena: range [{start}, {start + n}) is already free")
        free.insert(i, [start, n])
        if i + 1 < len(free) and start + n == free[i + 1][0]:
            free[i][1] += free.pop(i + 1)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == start:
            free[i - 1][1] += free.pop(i)[1]
        self.used -= n

    def check(self) -> None:
        total = 0
        for j, (s, n) in enumerate(self.free):
            assert n > 0 and s >= 0 and s + n <= self.capacity
            if j:
                assert self.free[j - 1][0] + self.free[j - 1][1] < s, "free ranges overlap or touch"
            total += n
        assert total + self.used == self.capacity


# ============================================================================ the model
class AttnMeta:
    """Where each sequence of a packed step sits: device tensors for the varlen kernel and, for the
    loop path, host tuples ``(q0, q1, k0, k_len)``."""

    __slots__ = ("cu_q", "k_start", "k_used", "max_q", "max_k", "seqs")

    def __init__(self, cu_q, k_start, k_used, max_q: int, max_k: int, seqs=None) -> None:
        self.cu_q, self.k_start, self.k_used = cu_q, k_start, k_used
        self.max_q, self.max_k, self.seqs = max_q, max_k, seqs


class ServingModel:
    """The reference decoder's weights (``ReferenceModel``, same seed and init) over a token arena of
    ``arena_tokens`` tokens (plus one dummy slot at the end), for positions below ``max_positions``."""

    def __init__(self, spec, *, device="cpu", dtype=None, arena_tokens: int, max_positions: int,
                 seed: int = 0, weight_std: float = 0.02, attention: str | None = None) -> None:
        import torch

        from calibration import torch_ops
        from calibration.reference_model import ReferenceModel, resolve_spec

        self.torch, self.ops = torch, torch_ops
        self.spec = spec = resolve_spec(spec)
        ref = ReferenceModel(spec, device=device, dtype=dtype, kv_capacity_tokens=1, seed=seed,
                             weight_std=weight_std)
        self.device, self.dtype = ref.device, ref.dtype
        self.embed_table, self.layers = ref.embed_table, ref.layers
        self.final_norm, self.lm_head = ref.final_norm, ref.lm_head
        del ref
        self.qh, self.kvh, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.arena_tokens = int(arena_tokens)
        self.dummy = self.arena_tokens                  # the padding rows' one-token region
        self.cos, self.sin = torch_ops.rope_tables(max(int(max_positions), 2), self.d, device=self.device,
                                                   dtype=self.dtype)
        self.kv = torch.empty(spec.num_layers, 2, self.arena_tokens + 1, self.kvh, self.d, device=self.device,
                              dtype=self.dtype)
        self.kv.normal_()
        self.attention_path = attention or ("loop" if self.device.type != "cuda" else "varlen")
        self._varlen_kwargs = _varlen_kwargs(torch)

    @property
    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ attention
    def attend(self, q, kc, vc, meta: AttnMeta):
        """Attention of packed queries ``q`` [T, qh, d] over each sequence's arena keys; [T, qh, d]."""
        if self.attention_path == "varlen":
            return self.torch.ops.aten._flash_attention_forward(
                q, kc, vc, meta.cu_q, meta.k_start, meta.max_q, meta.max_k, 0.0, True, False,
                seqused_k=meta.k_used, **self._varlen_kwargs)[0]
        seqs = meta.seqs
        if self.attention_path == "emulated":     # what the varlen kernel reads, read on the host
            cu, ks, ku = meta.cu_q.tolist(), meta.k_start.tolist(), meta.k_used.tolist()
            seqs = [(cu[j], cu[j + 1], ks[j], ku[j]) for j in range(len(ku))]
        o = self.ops
        outs = []
        for q0, q1, k0, kl in seqs:
            qs = q[q0:q1].transpose(0, 1).unsqueeze(0)
            ks = kc[k0:k0 + kl].transpose(0, 1).unsqueeze(0)
            vs = vc[k0:k0 + kl].transpose(0, 1).unsqueeze(0)
            a = o.attention_decode(qs, ks, vs, kl) if q1 - q0 == 1 else o.attention_prefill(qs, ks, vs)
            outs.append(a[0].transpose(0, 1))
        return self.torch.cat(outs) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------ forward
    def forward(self, ids, pos, dest, meta: AttnMeta, rows=None, logits: bool = False):
        """One step over packed tokens: ``ids``, ``pos`` (positions) and ``dest`` (arena slots) [T];
        ``rows``: indices of the sampling rows (None: every row samples). Returns the greedy next ids
        of the sampling rows (their logits too with ``logits``)."""
        o = self.ops
        tokens = ids.shape[0]
        qh, kvh, d = self.qh, self.kvh, self.d
        x = o.embed(ids, self.embed_table)                                      # embed
        cos = self.cos[pos].unsqueeze(1)
        sin = self.sin[pos].unsqueeze(1)
        for layer, w in enumerate(self.layers):
            kc, vc = self.kv[layer, 0], self.kv[layer, 1]
            hn = o.rms_norm(x, w.attn_norm)                                     # attn_norm
            qkv = o.linear(hn, w.qkv)                                           # qkv_proj
            q = qkv[:, :qh * d].view(tokens, qh, d)
            k = qkv[:, qh * d:(qh + kvh) * d].view(tokens, kvh, d)
            v = qkv[:, (qh + kvh) * d:].view(tokens, kvh, d)
            q, k = o.rope(q, k, cos, sin)                                       # rope
            kc.index_copy_(0, dest, k)                                          # kv_write
            vc.index_copy_(0, dest, v)
            attn = self.attend(q, kc, vc, meta).reshape(tokens, qh * d)        # attn_prefill / attn_decode
            x = o.add(x, o.linear(attn, w.o))                                   # o_proj, attn_residual
            hn = o.rms_norm(x, w.ffn_norm)                                      # ffn_norm
            gu = o.linear(hn, w.gate_up)                                        # gate_up_proj
            x = o.add(x, o.linear(o.act(gu), w.down))                           # act, down_proj, ffn_residual
        last = x if rows is None else x.index_select(0, rows)
        out = o.linear(o.rms_norm(last, self.final_norm), self.lm_head)        # final_norm, lm_head
        ids_out = o.sample(out)                                                 # sample
        return (ids_out, out) if logits else ids_out


def _varlen_kwargs(torch) -> dict:
    """Keyword arguments this torch's ``_flash_attention_forward`` takes beyond ``seqused_k`` (none so
    far; kept in one place because the private schema has grown between releases)."""
    return {}


# ============================================================================ inputs
class StepInputs:
    """Host arrays of one packed step (decodes first, then prefill chunks)."""

    __slots__ = ("ids", "pos", "dest", "cu_q", "k_start", "k_used", "rows", "max_q", "max_k", "seqs",
                 "sample_reqs")

    def __init__(self, ids, pos, dest, cu_q, k_start, k_used, rows, max_q, max_k, seqs, sample_reqs) -> None:
        self.ids, self.pos, self.dest = ids, pos, dest
        self.cu_q, self.k_start, self.k_used = cu_q, k_start, k_used
        self.rows, self.max_q, self.max_k, self.seqs, self.sample_reqs = rows, max_q, max_k, seqs, sample_reqs


def pack_step(step, regions: dict, last_token: dict, id_pool: np.ndarray, arena_total: int,
              with_seqs: bool = True) -> StepInputs:
    """The packed inputs of an engine step (``calibration.serving_engine.Step``): token ids (decodes
    feed back their last sampled id; prompt and recomputed tokens come from ``id_pool``), positions,
    arena slots (``regions``: request idx -> region start), per-sequence query offsets, key offsets
    and key counts, the sampling rows and, ``with_seqs``, the loop path's host tuples."""
    dec, pre = step.decode, step.prefill
    nd = len(dec)
    if nd:
        c_d = np.fromiter((c for _, c in dec), dtype=np.int64, count=nd)
        base_d = np.fromiter((regions[r.idx] for r, _ in dec), dtype=np.int64, count=nd)
        ids_d = np.fromiter((last_token.get(r.idx, 0) for r, _ in dec), dtype=np.int64, count=nd)
    else:
        c_d = base_d = ids_d = np.empty(0, dtype=np.int64)
    parts_ids, parts_pos, parts_dest = [ids_d], [c_d], [base_d + c_d]
    q_lens = [1] * nd
    k_start = base_d.tolist()
    k_used = (c_d + 1).tolist()
    rows = list(range(nd))
    sample_reqs = [r for r, _ in dec]
    t = nd
    for req, n, c in pre:
        base = regions[req.idx]
        p = np.arange(c, c + n, dtype=np.int64)
        parts_pos.append(p)
        parts_dest.append(p + base)
        parts_ids.append(np.take(id_pool, p + req.idx * 7919, mode="wrap"))
        q_lens.append(n)
        k_start.append(base)
        k_used.append(c + n)
        t += n
        if c + n == req.num_tokens:
            rows.append(t - 1)
            sample_reqs.append(req)
    s = len(q_lens)
    cu_q = np.zeros(s + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu_q[1:])
    ks = np.empty(s + 1, dtype=np.int32)
    ks[:s] = k_start
    ks[s] = arena_total
    ku = np.asarray(k_used, dtype=np.int32)
    seqs = [(int(cu_q[j]), int(cu_q[j + 1]), int(ks[j]), int(ku[j])) for j in range(s)] if with_seqs else None
    return StepInputs(np.concatenate(parts_ids), np.concatenate(parts_pos), np.concatenate(parts_dest), cu_q, ks,
                      ku, None if not pre else np.asarray(rows, dtype=np.int64), max(q_lens), int(ku.max()), seqs,
                      sample_reqs)


# ============================================================================ probe
def probe_varlen(model: ServingModel) -> tuple[bool, str]:
    """Does the varlen kernel give the reference attention on this device, eagerly and replayed in a
    CUDA graph whose key offsets and counts change between replays? (ok, note)."""
    torch = model.torch
    if model.device.type != "cuda":
        return False, "no CUDA device"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False, "torch has no aten::_flash_attention_forward"
    dev, dt = model.device, model.dtype
    qh, kvh, d = model.qh, model.kvh, model.d
    gen = torch.Generator(device=dev).manual_seed(1)
    cap = 256
    kc = torch.randn(cap, kvh, d, device=dev, dtype=dt, generator=gen)
    vc = torch.randn(cap, kvh, d, device=dev, dtype=dt, generator=gen)

    def case(q_lens, k_lens, k_starts):
        s = len(q_lens)
        cu = np.zeros(s + 1, np.int32)
        np.cumsum(q_lens, out=cu[1:])
        ks = np.array(list(k_starts) + [cap], np.int32)
        q = torch.randn(int(cu[-1]), qh, d, device=dev, dtype=dt, generator=gen)
        seqs = [(int(cu[j]), int(cu[j + 1]), int(ks[j]), int(k_lens[j])) for j in range(s)]
        meta = AttnMeta(torch.from_numpy(cu).to(dev), torch.from_numpy(ks).to(dev),
                        torch.tensor(k_lens, dtype=torch.int32, device=dev), max(q_lens), cap, seqs)
        return q, meta

    def err(a, b) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    saved = model.attention_path
    try:
        q, meta = case([5, 1, 1, 3], [12, 7, 30, 3], [100, 3, 40, 200])
        model.attention_path = "loop"
        want = model.attend(q, kc, vc, meta)
        model.attention_path = "varlen"
        got = model.attend(q, kc, vc, meta)
        e = err(got, want)
        if not e < PROBE_TOL:
            return False, f"varlen attention differs from the reference by {e:.3g} (relative)"
        # graph replay with new offsets and counts in the same buffers
        q2, meta2 = case([1, 1], [9, 25], [10, 60])
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model.attend(q2, kc, vc, meta2)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model.attend(q2, kc, vc, meta2)
        meta2.k_start.copy_(torch.tensor([150, 5, cap], dtype=torch.int32, device=dev))
        meta2.k_used.copy_(torch.tensor([31, 4], dtype=torch.int32, device=dev))
        g.replay()
        torch.cuda.synchronize()
        ref_meta = AttnMeta(None, None, None, 1, cap, [(0, 1, 150, 31), (1, 2, 5, 4)])
        model.attention_path = "loop"
        want2 = model.attend(q2, kc, vc, ref_meta)
        e2 = err(out, want2)
        del g
        if not e2 < PROBE_TOL:
            return False, f"varlen attention in a CUDA graph differs from the reference by {e2:.3g}"
        return True, f"varlen matches the reference attention (relative error {e:.1e} eager, {e2:.1e} graph)"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return False, f"varlen attention failed: {type(exc).__name__}: {first}"
    finally:
        model.attention_path = saved


# ============================================================================ executor
class _Graph:
    """One captured decode step of ``batch`` rows: static inputs, the graph, its sampled ids."""

    __slots__ = ("batch", "i64", "i32", "graph", "out")

    def __init__(self, batch, i64, i32, graph, out) -> None:
        self.batch, self.i64, self.i32, self.graph, self.out = batch, i64, i32, graph, out


class _Rerun:
    """The CPU stand-in for a CUDA graph (``emulated`` attention): replaying re-runs the step."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class TorchExecutor:
    """Runs the reference server's steps on :class:`ServingModel` (see the module docstring).

    Reports, per step, the host clock when its first input copy was issued and when its sampled ids
    were on the host (after a synchronisation, as an engine must before scheduling the next step).
    """

    name = "torch"

    def __init__(self, spec, *, device: str, arena_tokens: int, max_positions: int, graphs: bool,
                 graph_match: str = "pad", max_graph_batch: int = 256, progress=None, seed: int = 0,
                 attention: str | None = None) -> None:
        import torch

        self.torch = torch
        self.progress = progress or (lambda m: None)
        if not str(device).startswith("cuda"):
            # tiny CPU runs (tests): several intra-op threads only contend on a shared machine
            torch.set_num_threads(1)
        t0 = time.perf_counter()
        self.model = ServingModel(spec, device=device, arena_tokens=arena_tokens, max_positions=max_positions,
                                  seed=seed, attention=attention)
        self.cuda = self.model.device.type == "cuda"
        self.build_s = time.perf_counter() - t0
        self.max_positions = int(max_positions)
        self.graph_match = graph_match
        self.probe_note = "CPU: reference attention per sequence"
        if self.cuda and attention is None:
            ok, self.probe_note = probe_varlen(self.model)
            self.model.attention_path = "varlen" if ok else "loop"
            self.progress(f"  attention: {self.model.attention_path} ({self.probe_note})")
        elif attention is not None:
            self.probe_note = f"attention path {attention!r} chosen by the caller"
        path = self.model.attention_path
        self.use_graphs = bool(graphs and (self.cuda and path == "varlen" or path == "emulated"))
        self.graph_sizes = tuple(b for b in CAPTURE_SIZES if b <= max_graph_batch) if self.use_graphs else ()
        self.graphs: dict[int, _Graph] = {}
        self.graph_note = ""
        self.id_pool = np.random.default_rng(seed).integers(0, self.model.spec.vocab_size, ID_POOL, dtype=np.int64)
        self._host64 = self._host32 = self._out_host = None
        self.region_start: dict[int, int] = {}     # request idx -> first arena token of its region
        self.region_len: dict[int, int] = {}
        self.last_token: dict[int, int] = {}
        self.arena = TokenArena(arena_tokens)
        t1 = time.perf_counter()
        try:
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 - the probe passed on small shapes but a real step failed
            if self.model.attention_path != "varlen" or attention is not None:
                raise
            self._fall_back(f"varlen attention failed in the warm-up ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
            self._warm_up()
        self.warmup_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        if self.use_graphs:
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - the run goes on eagerly, and says so
                self.graphs.clear()
                self.graph_sizes, self.use_graphs = (), False
                self.graph_note = f"graph capture failed ({type(exc).__name__}: {str(exc)[:160]}); all steps eager"
                self.progress(f"  {self.graph_note}")
                if self.cuda:
                    torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t2

    def _fall_back(self, why: str) -> None:
        """Give up the varlen kernel: reference attention per sequence, no graphs."""
        self.probe_note = why
        self.model.attention_path = "loop"
        self.use_graphs, self.graph_sizes = False, ()
        self.progress(f"  attention: loop ({why})")
        self.reset()
        if self.cuda:
            self.torch.cuda.synchronize()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_configs(cls, model_name: str, configs: list, *, device: str = "cpu", graphs: bool = True,
                    graph_match: str = "pad", progress=None) -> TorchExecutor:
        """One executor for every case of a model: the arena holds ``ARENA_FACTOR`` times the largest
        KV capacity among ``configs`` (less if the GPU's free memory says so, never less than it),
        rope tables cover their longest request, graphs go up to their largest ``max_num_seqs``."""
        import torch

        from calibration.reference_server import load_model_spec, load_slice

        spec = load_model_spec(model_name)
        cap = max(c.replica.num_hbm_blocks * c.replica.block_size_tokens for c in configs)
        longest = max(int((t.prompt_tokens + t.output_tokens).max()) for t in map(load_slice, configs))
        seqs = max(int(c.policies.scheduling.params.get("max_num_seqs", 256)) for c in configs)
        arena = int(cap * ARENA_FACTOR) + longest
        if str(device).startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            room = (free - spec.weight_bytes - MEMORY_MARGIN_BYTES) // spec.kv_bytes_per_token
            if room < cap + longest:
                raise RuntimeError(f"{free / 2**30:.0f} GiB free holds {max(room, 0):,} KV tokens of {spec.name} next "
                                   f"to its weights; the cases need {cap + longest:,}")
            arena = min(arena, int(room))
        (progress or (lambda m: None))(f"{spec.name}: building on {device}, token arena {arena:,} tokens "
                                       f"(scheduler capacity {cap:,}), positions up to {longest:,}")
        return cls(spec, device=device, arena_tokens=arena, max_positions=longest + 1, graphs=graphs,
                   graph_match=graph_match, max_graph_batch=seqs, progress=progress)

    def _stage(self, n64: int, n32: int):
        """Pinned host staging buffers (grown on demand)."""
        torch = self.torch
        if self._host64 is None or self._host64.numel() < n64:
            self._host64 = torch.empty(max(n64, 4096), dtype=torch.int64, pin_memory=self.cuda)
        if self._host32 is None or self._host32.numel() < n32:
            self._host32 = torch.empty(max(n32, 4096), dtype=torch.int32, pin_memory=self.cuda)
        return self._host64, self._host32

    def _warm_up(self) -> None:
        """A few eager steps of each kind (library handles, workspaces, SDPA backend choices)."""
        from calibration.serving_engine import Step
        from sim.request import Request

        n = min(512, self.max_positions - 1, self.arena.capacity // 4)
        if n < 2:
            return
        reqs = [Request(idx=-1 - j, req_id=-1, arrival_s=0.0, prompt_tokens=n, output_tokens=2) for j in range(3)]
        for r in reqs:
            self.region_start[r.idx], self.region_len[r.idx] = self.arena.allocate(n), n
        for _ in range(2):
            self.run(Step(prefill=[(reqs[0], n, 0)], decode=[], preempted=[]))
            self.run(Step(prefill=[(reqs[1], n // 2, 0)], decode=[(reqs[2], n - 1)], preempted=[]))
            self.run(Step(prefill=[], decode=[(r, n - 1) for r in reqs], preempted=[]))
        for r in reqs:
            self.release(r)
        self.last_token.clear()

    def _capture(self) -> None:
        """Capture the decode graphs, largest first, in one shared memory pool (as vLLM does). On the
        CPU (``emulated`` attention) a "graph" re-runs the step on its static buffers."""
        torch = self.torch
        m = self.model
        pool = torch.cuda.graph_pool_handle() if self.cuda else None
        dev = m.device
        for b in sorted(self.graph_sizes, reverse=True):
            i64 = torch.zeros(3 * b, dtype=torch.int64, device=dev)
            i32 = torch.zeros(2 * b + 1, dtype=torch.int32, device=dev)
            i64[2 * b:] = m.dummy
            i32[:b] = m.dummy
            i32[b] = m.arena_tokens + 1
            i32[b + 1:] = 1
            cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
            meta = AttnMeta(cu_q, i32[:b + 1], i32[b + 1:], 1, self.max_positions)
            ids, pos, dest = i64[:b], i64[b:2 * b], i64[2 * b:]
            if not self.cuda:
                out = m.forward(ids, pos, dest, meta)
                self.graphs[b] = _Graph(b, i64, i32, _Rerun(lambda o=out, a=(ids, pos, dest, meta): o.copy_(
                    m.forward(*a))), out)
                continue
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    m.forward(ids, pos, dest, meta)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = m.forward(ids, pos, dest, meta)
            self.graphs[b] = _Graph(b, i64, i32, g, out)
        if self.cuda:
            torch.cuda.synchronize()
        self.progress(f"  captured {len(self.graphs)} decode graphs (batch {min(self.graph_sizes)}-"
                      f"{max(self.graph_sizes)})")

    # ------------------------------------------------------------------ cases
    def start_case(self, trace) -> None:
        longest = int((trace.prompt_tokens + trace.output_tokens).max()) if len(trace) else 0
        if longest + 1 > self.max_positions:
            raise RuntimeError(f"a request of {longest} tokens exceeds the {self.max_positions} positions built")
        self.reset()

    def reset(self) -> None:
        self.region_start.clear()
        self.region_len.clear()
        self.last_token.clear()
        self.arena = TokenArena(self.model.arena_tokens)

    def recover(self) -> None:
        """After a failed case: drop its state and cached memory so the next case starts clean."""
        self.reset()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        self.graphs.clear()
        self.model = None
        if self.cuda:
            self.torch.cuda.empty_cache()

    def release(self, req) -> None:
        start = self.region_start.pop(req.idx, None)
        if start is not None:
            self.arena.release(start, self.region_len.pop(req.idx))
        self.last_token.pop(req.idx, None)

    def describe(self) -> dict:
        torch = self.torch
        m = self.model
        out = {"device": str(m.device), "torch": torch.__version__, "dtype": str(m.dtype).replace("torch.", ""),
               "attention_path": m.attention_path, "attention_probe": self.probe_note,
               "arena_tokens": m.arena_tokens, "kv_arena_bytes": m.kv_bytes,
               "graphs": {"sizes": list(self.graph_sizes), "match": self.graph_match, "note": self.graph_note},
               "build_s": self.build_s, "warmup_s": self.warmup_s, "capture_s": self.capture_s}
        if self.cuda:
            out["gpu_name"] = torch.cuda.get_device_name(m.device)
        return out

    # ------------------------------------------------------------------ steps
    def _regions_for(self, step) -> None:
        for req, _, c in step.prefill:
            if c == 0 and req.idx not in self.region_start:
                need = max(req.prompt_tokens + req.output_tokens - 1, 1)
                start = self.arena.allocate(need)
                if start is None:
                    raise RuntimeError(f"token arena full: no {need} contiguous tokens free of "
                                       f"{self.arena.capacity:,} ({self.arena.used:,} held)")
                self.region_start[req.idx], self.region_len[req.idx] = start, need

    def _graph_for(self, batch: int) -> _Graph | None:
        if not self.graphs or batch > self.graph_sizes[-1]:
            return None
        if self.graph_match == "exact":
            return self.graphs.get(batch)
        for b in self.graph_sizes:
            if b >= batch:
                return self.graphs[b]
        return None

    def run(self, step) -> StepTiming:
        self._regions_for(step)
        inp = pack_step(step, self.region_start, self.last_token, self.id_pool, self.model.arena_tokens + 1,
                        with_seqs=self.model.attention_path != "varlen")
        g = None if step.prefill else self._graph_for(len(step.decode))
        if g is not None:
            launch, done, sampled = self._replay(g, inp)
            timing = StepTiming(launch_perf=launch, done_perf=done, graph=True, graph_batch=g.batch)
        else:
            launch, done, sampled = self._eager(inp)
            timing = StepTiming(launch_perf=launch, done_perf=done)
        last = self.last_token
        for req, tok in zip(inp.sample_reqs, sampled):
            last[req.idx] = tok
        return timing

    def _eager(self, inp: StepInputs):
        t, s = inp.ids.shape[0], inp.cu_q.shape[0] - 1
        nr = 0 if inp.rows is None else inp.rows.shape[0]
        h64, h32 = self._stage(3 * t + nr, 3 * s + 2)
        a64, a32 = h64.numpy(), h32.numpy()
        a64[:t], a64[t:2 * t], a64[2 * t:3 * t] = inp.ids, inp.pos, inp.dest
        if nr:
            a64[3 * t:3 * t + nr] = inp.rows
        a32[:s + 1], a32[s + 1:2 * s + 2], a32[2 * s + 2:3 * s + 2] = inp.cu_q, inp.k_start, inp.k_used
        dev = self.model.device
        launch = time.perf_counter()
        d64 = h64[:3 * t + nr].to(dev, non_blocking=True)
        d32 = h32[:3 * s + 2].to(dev, non_blocking=True)
        meta = AttnMeta(d32[:s + 1], d32[s + 1:2 * s + 2], d32[2 * s + 2:], inp.max_q, inp.max_k, inp.seqs)
        rows = d64[3 * t:] if nr else None
        out = self.model.forward(d64[:t], d64[t:2 * t], d64[2 * t:3 * t], meta, rows)
        sampled = self._to_host(out)
        return launch, time.perf_counter(), sampled

    def _replay(self, g: _Graph, inp: StepInputs):
        b = g.batch
        n = inp.ids.shape[0]
        h64, h32 = self._stage(3 * b, 2 * b + 1)
        a64, a32 = h64.numpy(), h32.numpy()
        m = self.model
        a64[:3 * b] = 0
        a64[:n], a64[b:b + n], a64[2 * b:2 * b + n] = inp.ids, inp.pos, inp.dest
        a64[2 * b + n:3 * b] = m.dummy
        a32[:n] = inp.k_start[:n]
        a32[n:b] = m.dummy
        a32[b] = m.arena_tokens + 1
        a32[b + 1:b + 1 + n] = inp.k_used
        a32[b + 1 + n:2 * b + 1] = 1
        launch = time.perf_counter()
        g.i64.copy_(h64[:3 * b], non_blocking=True)
        g.i32.copy_(h32[:2 * b + 1], non_blocking=True)
        g.graph.replay()
        sampled = self._to_host(g.out)[:n]
        return launch, time.perf_counter(), sampled

    def _to_host(self, out) -> list[int]:
        if not self.cuda:
            return out.tolist()
        torch = self.torch
        host = self._out_host
        if host is None or host.numel() < out.numel():
            host = self._out_host = torch.empty(max(out.numel(), 512), dtype=out.dtype, pin_memory=True)
        host[:out.numel()].copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host[:out.numel()].tolist()

