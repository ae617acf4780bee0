"""The drafter of speculative decoding: what it occupies in HBM and what it adds to a step's time.

Footprint (:func:`drafter_footprint`, read by the engine when it sizes the KV pool): a draft model's
weights, or an EAGLE head's (``layers`` decoder layers of the target's shape plus the 2h x h fusion
layer; the embedding and LM head are the target's), or Medusa's heads (each an h x h residual block
and an h x vocab LM head, Cai et al. 2024), come out of the target's KV budget; a drafter that keeps
KV (draft model, EAGLE) stores it in the target's blocks, so each block holds ``block_size`` tokens of
both and the pool has fewer blocks. Everything is per GPU under the replica's tensor parallelism.

Time (:class:`Drafting`, priced with the target's cost backend on the same GPU, on the same share of
its SMs):

- a draft model (a model preset's full cost model) or an EAGLE head (the target's ops as a
  ``StepCostModel.subset``: ``layers`` per-layer ops, two more o_proj-sized GEMM calls for the 2h -> h
  fusion layer, the embedding, final norm, LM head and sampling) prefills every prompt chunk the
  target prefills, in the same step (or, with ``lazy_prefill``, only when the request first drafts).
  Before drafting, a request whose drafter KV lags catches up in the first draft pass: the last
  accepted tokens (EAGLE re-reads them with the target's features; a draft model never saw a last
  accepted draft) as a multi-token decode row, a longer lag (it sat out steps, or prefills lazily) as
  a prefill chunk. Then one pass per draft token: the first over the drafting requests, each later
  one over ``width`` rows per request still drafting (tree chains);
- Medusa: one pass of its heads over the drafting requests, whatever the depth;
- prompt lookup (n-gram): ``host_s`` per drafting request, on the step's critical path;
- ``none``: free.

Which tokens the drafter's KV covers afterwards (``Request.num_draft_computed``, kept by the
replica): a draft model's own passes fed the last token and drafts 1..k-1, so its KV stays valid up to
the accepted ones (``min(computed, computed_before + k)``); EAGLE re-feeds every accepted token with
the target's features (its KV is valid up to the token before the step: ``computed_before + 1``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.base import Drafter
from sim.costs.step import StepCostModel
from sim.errors import ConfigError
from sim.specs import ModelSpec, load_model

_EMPTY = np.empty(0, dtype=np.int64)
CATCH_UP_AS_DECODE = 8      # catch-ups of up to this many tokens run as decode rows, longer ones as chunks


@dataclass(frozen=True, slots=True)
class DrafterFootprint:
    """HBM a drafter takes per GPU, and its parameters (for FLOP counts)."""

    weight_bytes: int = 0           # per GPU
    kv_bytes_per_token: int = 0     # per GPU, stored in the target's blocks
    params: int = 0                 # the drafter's own parameters (whole model)
    model: ModelSpec | None = None  # a draft model's spec


def _layer_params(m: ModelSpec) -> int:
    h, d = m.hidden_size, m.head_dim
    return h * (m.num_heads + 2 * m.num_kv_heads) * d + m.num_heads * d * h + 3 * h * m.ffn_size + 2 * h


def drafter_footprint(drafter: Drafter, target: ModelSpec, tp: int) -> DrafterFootprint:
    """What ``drafter`` occupies in HBM next to ``target`` under tensor parallelism ``tp``."""
    kind = drafter.kind
    if kind == "model":
        m = load_model(drafter.model)
        if m.vocab_size != target.vocab_size:
            raise ConfigError(f"policies.speculation.draft_model: {m.name} has a vocabulary of {m.vocab_size} "
                              f"tokens, {target.name} of {target.vocab_size}; a draft model must share the "
                              f"target's tokenizer")
        kvh = max(1, m.num_kv_heads // tp)
        return DrafterFootprint(-(-m.weight_bytes // tp), 2 * m.num_layers * kvh * m.head_dim * m.bytes_per_kv,
                                m.param_count, m)
    if kind == "eagle":
        h = target.hidden_size
        params = drafter.layers * _layer_params(target) + 2 * h * h
        kvh = max(1, target.num_kv_heads // tp)
        return DrafterFootprint(-(-params * target.bytes_per_weight // tp),
                                2 * drafter.layers * kvh * target.head_dim * target.bytes_per_kv, params)
    if kind == "medusa":
        h = target.hidden_size
        params = drafter.heads * (h * h + h + h * target.vocab_size)
        return DrafterFootprint(-(-params * target.bytes_per_weight // tp), 0, params)
    return DrafterFootprint()


def eagle_repeat(cost: StepCostModel, layers: int) -> np.ndarray:
    """Calls per step of each target op in an EAGLE head's pass (see the module docstring)."""
    ops = cost.ops
    rep = np.array([layers if op.per_layer else 0 for op in ops.ops], dtype=np.int64)
    for name in ("embed", "final_norm", "lm_head", "sample"):
        rep[ops.index[name]] = 1
    rep[ops.index["o_proj"]] += 2      # the fusion layer: a 2h x h GEMM, two h x h GEMMs' weights and FLOPs
    return rep


def medusa_repeat(cost: StepCostModel, heads: int) -> np.ndarray:
    """Calls per step of each target op in a pass of Medusa's heads: per head an h x h GEMM (priced
    as the target's o_proj, h x h for Llama-style models), a residual add, an LM head and sampling."""
    ops = cost.ops
    rep = np.zeros(len(ops.ops), dtype=np.int64)
    for name in ("o_proj", "attn_residual", "lm_head", "sample"):
        rep[ops.index[name]] = heads
    return rep


class Drafting:
    """The drafter's work in each step of one replica (see the module docstring)."""

    def __init__(self, drafter: Drafter, target_cost: StepCostModel,
                 model_cost: Callable[[str], StepCostModel]) -> None:
        self.drafter = drafter
        self.kind = drafter.kind
        self.keeps_kv = drafter.keeps_kv
        self.host_s = drafter.host_s
        self.cost: StepCostModel | None = None
        if self.kind == "model":
            self.cost = model_cost(drafter.model)
        elif self.kind == "eagle":
            self.cost = target_cost.subset(eagle_repeat(target_cost, drafter.layers))
        elif self.kind == "medusa":
            self.cost = target_cost.subset(medusa_repeat(target_cost, drafter.heads))
        self.refeeds_accepted = self.kind == "eagle"
        self.eager_prefill = self.keeps_kv and not drafter.lazy_prefill

    @property
    def free(self) -> bool:
        return self.kind == "none"

    def time(self, prefill: list, decode: list, drafts: list | None, width: int) -> tuple[float, int, int]:
        """(seconds, launches, syncs) the drafter adds to a step: its prefill of the step's prompt
        chunks, its catch-up, and its draft passes."""
        kind = self.kind
        if kind == "none":
            return 0.0, 0, 0
        drafting = [(r, d) for r, d in zip(decode, drafts) if d] if drafts else []
        if kind == "ngram":
            return self.host_s * len(drafting), 0, 0
        cost = self.cost
        if kind == "medusa":
            if not drafting:
                return 0.0, 0, 0
            n = len(drafting)
            return cost.step(_EMPTY, _EMPTY, n, sum(r.num_computed + 1 for r, _ in drafting), n, 1)
        # draft model / EAGLE: pass 0 = the step's prompt chunks (unless the drafter prefills lazily),
        # catch-up chunks, first drafts. A short catch-up (the last accepted drafts) is a multi-token
        # decode row, as engines run it; a long one (a drafter that sat out steps) a prefill chunk.
        qs, cs = [], []
        if self.eager_prefill:
            for r, n in prefill:
                qs.append(r.num_computed + n - r.num_draft_computed)
                cs.append(r.num_draft_computed)
        nd0 = ctx0 = rows0 = 0
        query0 = 1
        for r, _ in drafting:
            q = r.num_computed + 1 - r.num_draft_computed     # tokens the drafter has not seen, the new one too
            if q > CATCH_UP_AS_DECODE:
                qs.append(q)
                cs.append(r.num_draft_computed)
            else:
                nd0 += 1
                rows0 += q
                ctx0 += r.num_computed + 1
                if q > query0:
                    query0 = q
        total = launches = syncs = 0
        if qs or nd0:
            pq = np.array(qs, dtype=np.int64) if qs else _EMPTY
            pc = np.array(cs, dtype=np.int64) if qs else _EMPTY
            total, launches, syncs = cost.step(pq, pc, nd0, ctx0, len(drafting), query0, rows0)
        if drafting:
            deepest = max(d for _, d in drafting)
            if deepest > 1:
                # passes 1..deepest-1: rows still drafting and their contexts; runs of passes with the
                # same rows are priced together (one vectorised call, as decode runs are)
                cnt = [0] * (deepest + 1)         # drafting requests by depth, and their contexts
                nc = [0] * (deepest + 1)
                for r, d in drafting:
                    cnt[d] += 1
                    nc[d] += r.num_computed
                rows = np.zeros(deepest - 1, dtype=np.int64)
                ctx = np.zeros(deepest - 1, dtype=np.float64)
                n_live = s_live = 0
                for j in range(deepest - 1, 0, -1):     # pass j runs the requests drafting deeper than j
                    n_live += cnt[j + 1]
                    s_live += nc[j + 1]
                    rows[j - 1] = width * n_live
                    ctx[j - 1] = width * (s_live + n_live * (1 + j))
                t, lc, sc = self._passes(rows, ctx)
                total += t
                launches += lc
                syncs += sc
        return total, launches, syncs

    def _passes(self, rows: np.ndarray, ctx: np.ndarray) -> tuple[float, int, int]:
        """Decode-only draft passes of ``rows[i]`` rows attending ``ctx[i]`` keys in all."""
        total, launches, syncs = 0.0, 0, 0
        i, n = 0, rows.shape[0]
        while i < n:
            e = i + 1
            while e < n and rows[e] == rows[i]:
                e += 1
            if rows[i]:
                d, lc, sc = self.cost.decode_run(int(rows[i]), ctx[i:e])
                total += float(d.sum())
                launches += lc * (e - i)
                syncs += sc * (e - i)
            i = e
        return total, launches, syncs

    def estimate(self, batch: int, context: int, k: int, width: int) -> tuple[float, int, int]:
        """The drafter's time for ``batch`` decodes of ``context`` tokens each drafting ``k`` deep,
        none lagging (for ``SpeculationView.step_time``)."""
        kind = self.kind
        if kind == "none" or k == 0:
            return 0.0, 0, 0
        if kind == "ngram":
            return self.host_s * batch, 0, 0
        cost = self.cost
        total, launches, syncs = cost.step(_EMPTY, _EMPTY, batch, batch * (context + 1), batch, 1)
        if kind == "medusa" or k == 1:
            return total, launches, syncs
        rows = batch * width
        j = np.arange(1, k)
        t, lc, sc = self._passes(np.full(k - 1, rows), (rows * (context + 1 + j)).astype(np.float64))
        return total + t, launches + lc, syncs + sc

    def admitted(self, req) -> None:
        """The drafter's KV of a request just admitted with ``num_computed`` prompt tokens from the
        prefix cache: an eager drafter's KV is in those blocks (it prefilled every prompt that wrote
        them); a lazy one's may not be, so it starts from nothing and catches up when it drafts."""
        req.num_draft_computed = req.num_computed if self.eager_prefill else 0

    def prefilled(self, req) -> None:
        """The drafter's KV after a prompt chunk: it prefilled the chunk with the target (lazily
        prefilling drafters catch up when the request first drafts)."""
        if self.eager_prefill:
            req.num_draft_computed = req.num_computed

    def commit(self, req, computed_before: int, depth: int) -> None:
        """The drafter's KV after a step in which ``req`` drafted ``depth`` tokens (0: it did not
        draft, and its drafter KV now lags by the tokens the target computed)."""
        if depth and self.keeps_kv:
            req.num_draft_computed = (computed_before + 1 if self.refeeds_accepted
                                      else min(req.num_computed, computed_before + depth))
