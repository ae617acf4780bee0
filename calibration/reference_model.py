"""The validation reference: a Llama-architecture decoder in eager PyTorch, and its step timings.

:class:`ReferenceModel` is built from a ``sim.specs.ModelSpec`` with random weights (normal, small
std: speed does not depend on values, but zeros would be unrepresentative) and uses only
``calibration.torch_ops``, op for op as ``sim.costs.model.TransformerOps`` lists them: embed; per
layer attn_norm, qkv_proj, rope, kv_write, attention, o_proj, residual add, ffn_norm, gate_up_proj,
act, down_proj, residual add; then final_norm and lm_head on the sampled rows only, and greedy
sampling. Its measured step times are what the simulator's predictions are validated against.

A *mixed* step (:meth:`ReferenceModel.make_mixed_step`) is what a chunked-prefill scheduler runs: one
prompt chunk of ``q`` new tokens on top of ``c`` cached ones, finishing its prompt, batched with ``B``
decodes. Every op runs once over all ``q + B`` tokens, except attention (the chunk's prefill attention
and the decodes' decode attention, as the op list prices them); the KV write goes through one slot
index per token and head (one scatter each for K and V, as the op list's two kernels), and the two
attention outputs are joined by one concatenation (a kernel per layer the op list does not have: an
engine's variable-length attention writes one output).

:func:`run_validation` times prefill and decode steps over a grid, eager (host-launched, one
synchronize per step, as an engine does) and as a replayed CUDA graph of the same step, and reports
the kernels per step. ``calibration.vendor.validation`` exposes it as the ``validation`` part.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass

from sim.specs import ModelSpec, load_model

TINY_SPEC = ModelSpec(name="tiny-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                      head_dim=16, ffn_size=128, vocab_size=256, max_context_tokens=4096)

FULL_MODELS = ("llama-3.1-8b", "llama-3.2-1b")
PREFILL_BATCH = (1, 2, 4, 8)
PREFILL_LEN = (128, 256, 512, 1024, 2048, 4096)
MAX_PREFILL_TOKENS = 16384
DECODE_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_CTX = (128, 512, 1024, 2048, 4096, 8192)
MAX_DECODE_TOKENS = 262144
QUICK_MODELS = ("tiny-llama",)
QUICK_PREFILL = ((1, 2), (8, 32))   # (batches, prompt lengths)
QUICK_DECODE = ((1, 4), (16, 64))   # (batches, contexts)
PLAN_S = 170.0                      # planned duration of the whole part without a budget
MODE_CAP_S = 0.3                    # at most this much timing per point and mode (eager / graph)
MIN_REPS, MAX_REPS = 3, 15
MEMORY_MARGIN_BYTES = 6 * 2**30     # activations, graph pools, allocator slack
MODEL_WEIGHT = {"llama-3.1-8b": 0.65, "llama-3.2-1b": 0.35}  # shares of the timing budget
COUNT_CAP_S = 40.0                  # at most this long for one model's kernel-count child


def resolve_spec(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model == TINY_SPEC.name:
        return TINY_SPEC
    return load_model(model)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: object
    qkv: object       # [(qh + 2 kvh) d, h]
    o: object         # [h, qh d]
    ffn_norm: object
    gate_up: object   # [2 f, h], rows [gate | up]
    down: object      # [h, f]


class ReferenceModel:
    """A Llama decoder with a contiguous per-sequence KV cache carved out of one flat buffer.

    Invariants: weights never change after construction; the cache is one tensor
    ``[layers, 2, kv_capacity_tokens * kvh * d]`` filled with random values; the view for a step of
    ``batch`` sequences with per-sequence capacity ``cap`` is its prefix reshaped
    ``[batch, kvh, cap, d]``, so positions written under one (batch, cap) are read back only under the
    same (batch, cap). ``batch * cap`` must not exceed ``kv_capacity_tokens``.
    """

    def __init__(self, spec: str | ModelSpec, *, device="cpu", dtype=None, kv_capacity_tokens: int = 4096,
                 seed: int = 0, weight_std: float = 0.02, reduce=None, lm_head_rows: int | None = None) -> None:
        """``reduce`` (tensor parallelism): applied to the o_proj and down_proj outputs before their
        residual adds (an in-place all-reduce over the ranks; default none). ``lm_head_rows``: the LM
        head's rows (this rank's vocabulary shard; default the whole vocabulary)."""
        import torch

        from calibration import torch_ops

        self.torch, self.ops = torch, torch_ops
        self.spec = spec = resolve_spec(spec)
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda"
                                                      else torch.float32)
        self.capacity = int(kv_capacity_tokens)
        h, d, f, v = spec.hidden_size, spec.head_dim, spec.ffn_size, spec.vocab_size
        qh, kvh = spec.num_heads, spec.num_kv_heads
        self.qh, self.kvh, self.d, self.h = qh, kvh, d, h
        torch.manual_seed(seed)

        def mat(*size):
            return torch.empty(*size, device=self.device, dtype=self.dtype).normal_(0.0, weight_std)

        def norm_weight():
            return torch.empty(h, device=self.device, dtype=self.dtype).normal_(1.0, 0.05)

        self.embed_table = mat(v, h)
        self.layers = [LayerWeights(norm_weight(), mat((qh + 2 * kvh) * d, h), mat(h, qh * d),
                                    norm_weight(), mat(2 * f, h), mat(h, f))
                       for _ in range(spec.num_layers)]
        self.final_norm = norm_weight()
        self.lm_head = mat(lm_head_rows, h) if lm_head_rows else (self.embed_table if spec.tied_embeddings
                                                                  else mat(v, h))
        self.reduce = reduce
        positions = min(self.capacity + 1, spec.max_context_tokens)
        self.cos, self.sin = torch_ops.rope_tables(positions, d, device=self.device, dtype=self.dtype)
        self.kv = torch.empty(spec.num_layers, 2, self.capacity * kvh * d, device=self.device,
                              dtype=self.dtype).normal_()

    # ------------------------------------------------------------------ cache
    def cache_view(self, layer: int, batch: int, cap: int, offset: int = 0):
        """K and V caches [batch, kvh, cap, d] of ``layer``: views into the flat buffer, starting
        ``offset`` token slots in (a mixed step keeps its chunk and its decodes in disjoint views)."""
        if offset + batch * cap > self.capacity:
            raise ValueError(f"cache view {batch} x {cap} at {offset} exceeds the capacity of {self.capacity} "
                             f"tokens")
        lo = offset * self.kvh * self.d
        n = batch * self.kvh * cap * self.d
        shape = (batch, self.kvh, cap, self.d)
        return self.kv[layer, 0, lo:lo + n].view(shape), self.kv[layer, 1, lo:lo + n].view(shape)

    def flat_cache(self, layer: int):
        """K and V of ``layer`` as rows of one head's vector: [capacity * kvh, d] (what slot indices
        of :meth:`mixed_slots` address)."""
        rows = self.capacity * self.kvh
        return self.kv[layer, 0].view(rows, self.d), self.kv[layer, 1].view(rows, self.d)

    def mixed_slots(self, batch: int, ctx: int, chunk: int, cached: int):
        """Row of each (new token, KV head) of a mixed step in :meth:`flat_cache`: [chunk + batch, kvh].

        The chunk's sequence is the view [1, kvh, cached + chunk, d] at offset 0, its new tokens at
        positions ``cached ..``; the decodes are the view [batch, kvh, ctx + 1, d] right after it, each
        new token at position ``ctx``."""
        torch = self.torch
        kvh = self.kvh
        c_cap, d_cap = cached + chunk, ctx + 1
        heads = torch.arange(kvh, device=self.device)
        pos = torch.arange(cached, c_cap, device=self.device)
        chunk_rows = heads[None, :] * c_cap + pos[:, None]
        seq = torch.arange(batch, device=self.device)
        dec_rows = c_cap * kvh + (seq[:, None] * kvh + heads[None, :]) * d_cap + ctx
        return torch.cat((chunk_rows, dec_rows))

    def positions(self, batch: int, new: int, start: int):
        """Position ids [batch * new] of the step's tokens (sequence-major, as the tokens are)."""
        return self.torch.arange(start, start + new, device=self.device).repeat(batch)

    # ------------------------------------------------------------------ forward
    def forward(self, ids, positions, start: int, cap: int | None = None, offset: int = 0):
        """One engine step: ``ids`` [B, L] new tokens at positions ``[start, start + L)`` of every
        sequence (their K/V go into the cache, ``offset`` slots in). Returns (logits [B, vocab] of each
        sequence's last token, greedy next ids [B])."""
        o = self.ops
        batch, new = ids.shape
        cap = start + new if cap is None else cap
        tokens = batch * new
        qh, kvh, d, h = self.qh, self.kvh, self.d, self.h
        x = o.embed(ids.reshape(tokens), self.embed_table)                      # embed
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        for layer, w in enumerate(self.layers):
            k_cache, v_cache = self.cache_view(layer, batch, cap, offset)
            hn = o.rms_norm(x, w.attn_norm)                                     # attn_norm
            qkv = o.linear(hn, w.qkv)                                           # qkv_proj
            q = qkv[:, :qh * d].view(tokens, qh, d)
            k = qkv[:, qh * d:(qh + kvh) * d].view(tokens, kvh, d)
            v = qkv[:, (qh + kvh) * d:].view(tokens, kvh, d)
            q, k = o.rope(q, k, cos, sin)                                       # rope
            o.kv_write(k_cache, v_cache, k, v, start)                           # kv_write
            qs = q.view(batch, new, qh, d).transpose(1, 2)
            if new == 1:                                                        # attn_decode
                attn = o.attention_decode(qs, k_cache, v_cache, start + 1)
            else:                                                               # attn_prefill
                keys = start + new
                attn = o.attention_prefill(qs, k_cache[:, :, :keys], v_cache[:, :, :keys])
            attn = attn.transpose(1, 2).reshape(tokens, qh * d)
            x = o.add(x, self._reduced(o.linear(attn, w.o)))                    # o_proj, (allreduce,) residual
            hn = o.rms_norm(x, w.ffn_norm)                                      # ffn_norm
            gu = o.linear(hn, w.gate_up)                                        # gate_up_proj
            x = o.add(x, self._reduced(o.linear(o.act(gu), w.down)))            # act, down_proj, (allreduce,) residual
        last = x.view(batch, new, h)[:, -1]
        logits = o.linear(o.rms_norm(last, self.final_norm), self.lm_head)     # final_norm, lm_head
        return logits, o.sample(logits)                                         # sample

    def _reduced(self, y):
        if self.reduce is not None:
            self.reduce(y)
        return y

    def forward_mixed(self, ids, positions, slots, sample_rows, batch: int, ctx: int, chunk: int, cached: int):
        """One mixed step (module docstring): ``ids`` [chunk + batch] (the chunk's tokens, then one per
        decode) at ``positions``; ``slots`` from :meth:`mixed_slots`; ``sample_rows`` the rows that
        sample (the chunk's last token, every decode). Returns (logits [1 + batch, vocab], next ids)."""
        o = self.ops
        qh, kvh, d = self.qh, self.kvh, self.d
        tokens = chunk + batch
        c_cap, d_cap = cached + chunk, ctx + 1
        x = o.embed(ids, self.embed_table)                                      # embed
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        for layer, w in enumerate(self.layers):
            hn = o.rms_norm(x, w.attn_norm)                                     # attn_norm
            qkv = o.linear(hn, w.qkv)                                           # qkv_proj
            q = qkv[:, :qh * d].view(tokens, qh, d)
            k = qkv[:, qh * d:(qh + kvh) * d].view(tokens, kvh, d)
            v = qkv[:, (qh + kvh) * d:].view(tokens, kvh, d)
            q, k = o.rope(q, k, cos, sin)                                       # rope
            flat_k, flat_v = self.flat_cache(layer)
            flat_k.index_put_((slots,), k)                                      # kv_write (K)
            flat_v.index_put_((slots,), v)                                      # kv_write (V)
            kc, vc = self.cache_view(layer, 1, c_cap, 0)
            pre = o.attention_prefill(q[:chunk].view(1, chunk, qh, d).transpose(1, 2), kc, vc)  # attn_prefill
            kd, vd = self.cache_view(layer, batch, d_cap, c_cap)
            dec = o.attention_decode(q[chunk:].view(batch, 1, qh, d).transpose(1, 2), kd, vd, d_cap)  # attn_decode
            attn = self.torch.cat((pre.transpose(1, 2).reshape(chunk, qh * d),
                                   dec.transpose(1, 2).reshape(batch, qh * d)))
            x = o.add(x, self._reduced(o.linear(attn, w.o)))                    # o_proj, (allreduce,) residual
            hn = o.rms_norm(x, w.ffn_norm)                                      # ffn_norm
            gu = o.linear(hn, w.gate_up)                                        # gate_up_proj
            x = o.add(x, self._reduced(o.linear(o.act(gu), w.down)))            # act, down_proj, (allreduce,) residual
        last = x.index_select(0, sample_rows)
        logits = o.linear(o.rms_norm(last, self.final_norm), self.lm_head)     # final_norm, lm_head
        return logits, o.sample(logits)                                         # sample

    def logits(self, ids, start: int, cap: int | None = None, offset: int = 0):
        """Logits of each sequence's last new token (tests): ``forward`` with computed positions."""
        batch, new = ids.shape
        return self.forward(ids, self.positions(batch, new, start), start, cap, offset)[0]

    # ------------------------------------------------------------------ steps
    def make_step(self, phase: str, batch: int, length: int):
        """A zero-arg step with static inputs (so it can be captured in a CUDA graph).

        ``prefill``: ``batch`` empty sequences each get ``length`` prompt tokens. ``decode``: each of
        ``batch`` sequences has ``length`` cached tokens and adds one (attending to length + 1 keys).
        """
        torch = self.torch
        if phase == "prefill":
            new, start, cap = length, 0, length
        elif phase == "decode":
            new, start, cap = 1, length, length + 1
        else:
            raise ValueError(f"phase must be 'prefill' or 'decode' (got {phase!r})")
        ids = torch.randint(0, self.spec.vocab_size, (batch, new), device=self.device)
        pos = self.positions(batch, new, start)

        def step():
            return self.forward(ids, pos, start, cap)[1]

        return step

    def mixed_inputs(self, batch: int, ctx: int, chunk: int, cached: int, ids=None):
        """Static inputs of a mixed step: (ids, positions, slots, sample rows)."""
        torch = self.torch
        if cached + chunk + batch * (ctx + 1) > self.capacity:
            raise ValueError(f"a mixed step of a {chunk}-token chunk over {cached} cached and {batch} decodes "
                             f"at {ctx} needs {cached + chunk + batch * (ctx + 1)} cache slots; the cache has "
                             f"{self.capacity}")
        if ids is None:
            ids = torch.randint(0, self.spec.vocab_size, (chunk + batch,), device=self.device)
        pos = torch.cat((torch.arange(cached, cached + chunk, device=self.device),
                         torch.full((batch,), ctx, device=self.device, dtype=torch.long)))
        rows = torch.cat((torch.tensor([chunk - 1], device=self.device),
                          torch.arange(chunk, chunk + batch, device=self.device)))
        return ids, pos, self.mixed_slots(batch, ctx, chunk, cached), rows

    def make_mixed_step(self, batch: int, ctx: int, chunk: int, cached: int):
        """A zero-arg mixed step with static inputs: a ``chunk``-token chunk finishing a prompt whose
        first ``cached`` tokens are in the cache, batched with ``batch`` decodes of ``ctx`` cached
        tokens each (tokens needed: :func:`tokens_needed` of ``("mixed", ...)``)."""
        ids, pos, slots, rows = self.mixed_inputs(batch, ctx, chunk, cached)

        def step():
            return self.forward_mixed(ids, pos, slots, rows, batch, ctx, chunk, cached)[1]

        return step

    def prefill_step(self, batch: int, prompt_len: int):
        """Prefill ``batch`` prompts of ``prompt_len`` random tokens; returns the sampled ids."""
        return self.make_step("prefill", batch, prompt_len)()

    def decode_step(self, batch: int, context: int):
        """One decode step of ``batch`` sequences with ``context`` cached tokens each."""
        return self.make_step("decode", batch, context)()


# ---------------------------------------------------------------------------- grid
def validation_points(quick: bool) -> list[tuple[str, int, int]]:
    """(phase, batch, prompt length or context) of the validation grid."""
    if quick:
        (pb, pl), (db, dc) = QUICK_PREFILL, QUICK_DECODE
        max_p = max_d = math.inf
    else:
        pb, pl, db, dc = PREFILL_BATCH, PREFILL_LEN, DECODE_BATCH, DECODE_CTX
        max_p, max_d = MAX_PREFILL_TOKENS, MAX_DECODE_TOKENS
    pts = [("prefill", b, n) for b in pb for n in pl if b * n <= max_p]
    pts += [("decode", b, c) for b in db for c in dc if b * c <= max_d]
    return pts


def run_order(points: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The points in measuring order: each phase coarse-first, the two phases interleaved, so a
    budget that runs out still leaves both prefill and decode covered across their ranges."""
    from calibration.vendor.timing import coarse_first

    pre = coarse_first([p for p in points if p[0] == "prefill"])
    dec = coarse_first([p for p in points if p[0] == "decode"])
    out = []
    for i in range(max(len(pre), len(dec))):
        out += [lst[i] for lst in (pre, dec) if i < len(lst)]
    return out


def tokens_needed(phase: str, batch: int, length: int, chunk: int = 0, cached: int = 0) -> int:
    """Cache tokens (batch x capacity, plus a mixed step's chunk sequence) a point's views need."""
    if phase == "mixed":
        return cached + chunk + batch * (length + 1)
    return batch * (length if phase == "prefill" else length + 1)


def count_subset(points: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Points whose eager kernels the profiler child counts: a few batches, shortest and longest."""
    chosen = []
    for phase in ("prefill", "decode"):
        mine = [p for p in points if p[0] == phase]
        batches = sorted({b for _, b, _ in mine})
        if not batches:
            continue
        pick = {batches[0], batches[len(batches) // 2], batches[-1]}
        for b in sorted(pick):
            lens = sorted(n for _, bb, n in mine if bb == b)
            for n in sorted({lens[0], lens[-1]}):
                chosen.append((phase, b, n))
    return chosen


def step_shape(phase: str, batch: int, length: int, chunk: int = 0, cached: int = 0):
    """The ``sim.costs.model.StepShape`` of a measured point: ``batch`` prompts of ``length`` (prefill),
    ``batch`` decodes of ``length`` cached tokens (decode), or a ``chunk`` over ``cached`` plus those
    decodes (mixed)."""
    from sim.costs.model import StepShape

    if phase == "prefill":
        return StepShape.prefill(batch, length)
    if phase == "decode":
        return StepShape.decode(batch, length)
    if phase == "mixed":
        return StepShape.mixed(chunk, cached, batch, length)
    raise ValueError(f"phase must be 'prefill', 'decode' or 'mixed' (got {phase!r})")


def step_flops_bytes(spec: ModelSpec, phase: str, batch: int, length: int, chunk: int = 0,
                     cached: int = 0) -> tuple[float, float]:
    """Whole-step FLOPs and bytes as the simulator's op list prices them (0, 0 if that fails)."""
    try:
        import numpy as np

        from sim.costs.model import TransformerOps

        ops = TransformerOps(spec)
        flops, nbytes = ops.flops_bytes(step_shape(phase, batch, length, chunk, cached))
        mult = np.array([spec.num_layers if op.per_layer else 1 for op in ops.ops], dtype=float)
        return float((flops * mult).sum()), float((nbytes * mult).sum())
    except Exception:  # noqa: BLE001 - informational only
        return 0.0, 0.0


# ---------------------------------------------------------------------------- kernel counts
_COUNT_MODELS: dict[tuple[str, int], ReferenceModel] = {}


def count_call(model: str, phase: str, batch: int, length: int, capacity: int):
    """Kernel-count builder (child process): one eager step; the model is built once per child."""
    import torch

    key = (model, capacity)
    if key not in _COUNT_MODELS:
        _COUNT_MODELS.clear()
        torch.cuda.empty_cache()
        _COUNT_MODELS[key] = ReferenceModel(model, device="cuda", kv_capacity_tokens=capacity)
    return _COUNT_MODELS[key].make_step(phase, batch, length)


# ---------------------------------------------------------------------------- measurement
def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


class _QuietGC:
    """Garbage collection off while a timing loop runs (collected and frozen first), as benchmark
    harnesses do: a collection landing inside an eager step would be charged to that step. (Pinning
    the timing thread to one CPU was tried on the lent H100 and made eager steps noisier.)"""

    def __enter__(self):
        import gc

        gc.collect()
        gc.freeze()
        self.was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc):
        import gc

        if self.was:
            gc.enable()
        gc.unfreeze()
        return False


def _time_eager(torch, step, cuda: bool, mode_s: float) -> tuple[list[float], list[float], float]:
    """Host-clock seconds per eager step (synchronize each step); device span per step; warm time."""
    with _QuietGC():
        return _time_eager_loop(torch, step, cuda, mode_s)


def _time_eager_loop(torch, step, cuda: bool, mode_s: float) -> tuple[list[float], list[float], float]:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    warm = time.perf_counter() - t0
    reps = int(min(MAX_REPS, max(MIN_REPS, mode_s // max(warm, 1e-6))))
    host, gpu = [], []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if cuda:
            start.record()
        step()
        if cuda:
            end.record()
        sync()
        host.append(time.perf_counter() - t0)
        if cuda:
            gpu.append(start.elapsed_time(end) / 1e3)
    return host, gpu, warm


def _time_graph(torch, step, mode_s: float) -> tuple[list[float], list[float], dict | None]:
    """Host seconds per replay (replay + synchronize), device seconds per replay, graph node counts."""
    from calibration.vendor.kernel_count import finish_graph, new_graph, per_call

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph, keep = new_graph(torch)
    with torch.cuda.graph(graph):
        step()
    counts = per_call(finish_graph(graph, keep), 1)
    try:
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        reps = int(min(MAX_REPS, max(MIN_REPS, mode_s // max(warm, 1e-6))))
        host, gpu = [], []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            host.append(time.perf_counter() - t0)
            gpu.append(start.elapsed_time(end) / 1e3)
    finally:
        del graph
    return host, gpu, counts


def _fit_points(torch, spec: ModelSpec, points: list, cuda: bool) -> tuple[list, int, str | None]:
    """Points whose cache fits in free GPU memory next to the weights; the capacity to allocate."""
    need = max(tokens_needed(*p) for p in points)
    if not cuda:
        return points, need, None
    free, _ = torch.cuda.mem_get_info()
    per_token = spec.kv_bytes_per_token
    room = (free - spec.weight_bytes - MEMORY_MARGIN_BYTES) // per_token
    if need <= room:
        return points, need, None
    kept = [p for p in points if tokens_needed(*p) <= room]
    note = (f"{len(points) - len(kept)} points dropped: {free / 2**30:.1f} GiB free holds "
            f"{max(room, 0)} cache tokens next to the weights")
    return kept, max([tokens_needed(*p) for p in kept], default=0), note


def _attach_profiler_counts(rows: list[dict], eager_rows: dict, subset: list, results: list,
                            note: str | None) -> None:
    for p, res in zip(subset, results):
        i = eager_rows[p]
        extra = json.loads(rows[i]["extra"])
        if res is not None and "error" not in res:
            extra.update(kernels=res["kernels"], kernels_source="profiler",
                         kernel_breakdown={k: res[k] for k in ("kernel", "memcpy", "memset")})
        elif res is not None:
            extra["kernels_error"] = res["error"]
        elif note:
            extra["kernels_note"] = note
        rows[i]["extra"] = json.dumps(extra, sort_keys=True)
    for i in eager_rows.values():  # eager rows without a profiler count take the graph's
        extra = json.loads(rows[i]["extra"])
        if "kernels" not in extra and "graph_kernels" in extra:
            extra.update(kernels=extra["graph_kernels"], kernels_source="graph")
            rows[i]["extra"] = json.dumps(extra, sort_keys=True)


def _measure_model(ctx, env, spec: ModelSpec, points: list, deadline: float, budget, rows: list) -> dict:
    """Time every point of one model (eager, then graph); returns {point: index of its eager row}."""
    from calibration.raw import make_row
    from calibration.vendor.timing import describe_error, failure_row, recover

    torch, cuda = env.torch, env.cuda
    base = {**env.base_extra(), "model": spec.name, "layers": spec.num_layers}
    eager_rows: dict[tuple[str, int, int], int] = {}
    points, capacity, note = _fit_points(torch, spec, points, cuda)
    if note:
        ctx.progress(f"validation {spec.name}: {note}")
        base["memory_note"] = note
    if not points:
        rows.append(failure_row("validation", "eager", note or "no point fits", key=spec.name,
                                extra=base, progress=ctx.progress))
        return eager_rows
    ctx.progress(f"validation {spec.name}: building the model, cache of {capacity} tokens")
    try:
        model = ReferenceModel(spec, device=env.device, dtype=env.dtype, kv_capacity_tokens=capacity)
    except Exception as exc:  # noqa: BLE001 - this model is lost, the next one may still run
        recover(env, exc)
        rows.append(failure_row("validation", "eager", describe_error(exc), key=spec.name, extra=base,
                                progress=ctx.progress))
        return eager_rows
    skipped = 0
    step = None
    points = run_order(points)
    try:
        for n_done, (phase, batch, length) in enumerate(points):
            step = None
            left = deadline - time.monotonic()
            if budget.enforced and left <= 0:
                skipped += 1
                continue
            mode_s = min(MODE_CAP_S, max(0.02, left / (len(points) - n_done) / 2.2))
            flops, nbytes = step_flops_bytes(spec, phase, batch, length)
            where = dict(op=phase, key=spec.name, x=batch, y=length)
            extra = dict(base)
            try:
                step = model.make_step(phase, batch, length)
                host, gpu, _ = _time_eager(torch, step, cuda, mode_s)
                extra["attention_backend"] = model.ops.sdpa_backend(
                    "prefill" if phase == "prefill" and length > 1 else "decode")
                rows.append(make_row("validation", "eager", host, nbytes=nbytes, flops=flops,
                                     extra={**extra, "gpu_span_median_s": _median(gpu)}, **where))
                eager_rows[(phase, batch, length)] = len(rows) - 1
            except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
                step = None
                recover(env, exc)
                rows.append(failure_row("validation", "eager", describe_error(exc), extra=extra,
                                        progress=ctx.progress, **where))
                continue
            if not cuda:
                continue
            try:
                host, gpu, counts = _time_graph(torch, step, mode_s)
                graph_extra = {**extra, "gpu_median_s": _median(gpu)}
                if counts is not None:
                    graph_extra.update(kernels=counts["kernels"], kernels_source="graph",
                                       graph_kernels=counts["kernels"], graph_kernel_breakdown=counts)
                    i = eager_rows[(phase, batch, length)]
                    eager = json.loads(rows[i]["extra"])
                    eager["graph_kernels"] = counts["kernels"]
                    rows[i]["extra"] = json.dumps(eager, sort_keys=True)
                rows.append(make_row("validation", "graph", host, nbytes=nbytes, flops=flops,
                                     extra=graph_extra, **where))
            except Exception as exc:  # noqa: BLE001
                recover(env, exc)
                rows.append(failure_row("validation", "graph", describe_error(exc), extra=extra,
                                        progress=ctx.progress, **where))
    finally:
        step = None
        del model
        recover(env)  # the weights and cache go back before the next model or the counting child
    if skipped:
        ctx.progress(f"validation {spec.name}: budget spent, {skipped} points skipped")
    return eager_rows


def run_validation(ctx) -> list[dict]:
    """The ``validation`` part: eager and CUDA-graph step times of the reference model.

    Each model gets a share of the timing budget by weight (the 8B steps cost more); after a model's
    timings, its weights are freed and a child process profiles the eager kernels of a few points.
    """
    from calibration.vendor.kernel_count import count_in_child
    from calibration.vendor.timing import Budget, torch_env

    env = torch_env(ctx.quick)
    budget = Budget(ctx.budget_s, PLAN_S, reserve=0.25)
    models = QUICK_MODELS if ctx.quick else FULL_MODELS
    weights = [MODEL_WEIGHT.get(m, 1.0) for m in models]
    points = validation_points(ctx.quick)
    rows: list[dict] = []
    for i, name in enumerate(models):
        spec = resolve_spec(name)
        share = max(budget.left(), 0.0) * weights[i] / sum(weights[i:])
        eager_rows = _measure_model(ctx, env, spec, points, time.monotonic() + share, budget, rows)
        if env.cuda and eager_rows:
            subset = [p for p in count_subset(list(eager_rows)) if p in eager_rows]
            cap = max(tokens_needed(*p) for p in subset)
            specs = [{"builder": "calibration.reference_model:count_call",
                      "kwargs": {"model": spec.name, "phase": ph, "batch": b, "length": n,
                                 "capacity": cap}}
                     for ph, b, n in subset]
            timeout = budget.count_timeout(COUNT_CAP_S)
            if budget.enforced:
                timeout = min(timeout, budget.reserve_s * weights[i] / sum(weights))
            ctx.progress(f"validation {spec.name}: counting kernels of {len(specs)} steps")
            results, note = count_in_child(specs, timeout)
            _attach_profiler_counts(rows, eager_rows, subset, results, note)
        else:
            _attach_profiler_counts(rows, eager_rows, [], [], None)
    return rows
