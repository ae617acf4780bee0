"""What every drafting policy shares: the drafter it declares (``SpeculationPolicy.drafter``), the
acceptance model it samples, and their parameters.

Parameters (in ``[policies.speculation]``, next to the policy's own):

=====================  ===========================================================================
``drafter``            ``"model"`` (a draft model), ``"eagle"``, ``"medusa"``, ``"ngram"`` or
                       ``"none"`` (free drafts); see ``policies.base.Drafter``
``draft_model``        the draft model's preset (``drafter = "model"``), e.g. ``llama-3.2-1b``
``eagle_layers``       decoder layers of an EAGLE head (the EAGLE paper uses 1)
``medusa_heads``       Medusa heads (one per draft position; a draft may be at most this deep)
``draft_prefill``      ``"eager"`` (the default, as vLLM does: a draft model or EAGLE head prefills
                       every prompt with the target) or ``"lazy"`` (only when the request first drafts,
                       as one catch-up chunk: a policy that drafts nothing pays nothing)
``ngram_host_s``       host seconds per request per n-gram proposal. Default 3 us: vLLM's Numba n-gram
                       matcher took 1.9 s over its whole 5,000-request ShareGPT benchmark (vLLM PR
                       #13365), some 10^6 request-steps, i.e. 2-4 us each; the cost grows with the
                       context (vLLM PR #24986 parallelises it for that reason)
``ngram_match_rate``   fraction of a request's steps on which prompt lookup finds a match and so
                       proposes anything (a property of the workload: repetitive, retrieval-heavy and
                       code-editing traffic match often, open chat rarely; the default assumes always)
``acceptance``         ``"iid"``, ``"positional"``, ``"column"``, ``"empirical"`` or ``"forced"``,
                       with ``alpha``, ``alphas``, ``file``, ``reject_stride``; see
                       ``policies.speculation.acceptance``
=====================  ===========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import DRAFTER_KINDS, Drafter, SpeculationPolicy
from policies.speculation.acceptance import Empirical, build_acceptance, check_acceptance_params


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftingParams:
    drafter: str = "model"             # "model" | "eagle" | "medusa" | "ngram" | "none" (free drafts)
    draft_model: str = "llama-3.2-1b"  # drafter = "model": a model preset (or TOML path) with the target's vocabulary
    eagle_layers: int = 1              # drafter = "eagle": decoder layers of the target's shape in the head
    medusa_heads: int = 4              # drafter = "medusa": heads (one draft token each)
    draft_prefill: str = "eager"       # "eager": the drafter prefills every prompt; "lazy": when it first drafts
    ngram_host_s: float = 3e-6         # drafter = "ngram": host seconds per drafting request (vLLM #13365)
    ngram_match_rate: float = 1.0      # drafter = "ngram": share of decodes whose lookup finds a match
    acceptance: str = "iid"            # "iid" | "positional" | "column" | "empirical" | "forced" (rejection)
    alpha: float = 0.7                 # acceptance = "iid": probability each draft token is accepted
    alphas: tuple = ()                 # acceptance = "positional": conditional acceptance per draft position
    file: str = ""                     # acceptance = "empirical": accepted-length histogram (shipped name or path)
    reject_stride: int = 4             # acceptance = "forced": every reject_stride-th output position is rejected

    def check(self, depth: int) -> None:
        """Validate the shared keys for drafts up to ``depth`` deep (called by each policy's
        ``__post_init__``; slotted dataclasses cannot call ``super().__post_init__``)."""
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if self.drafter not in DRAFTER_KINDS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTER_KINDS)} (got {self.drafter!r})")
        if self.drafter == "model" and not self.draft_model:
            raise ValueError("draft_model: drafter = \"model\" needs a model preset name")
        if self.eagle_layers < 1:
            raise ValueError(f"eagle_layers must be >= 1 (got {self.eagle_layers})")
        if self.medusa_heads < 1:
            raise ValueError(f"medusa_heads must be >= 1 (got {self.medusa_heads})")
        if self.drafter == "medusa" and depth > self.medusa_heads:
            raise ValueError(f"medusa_heads = {self.medusa_heads}: Medusa drafts at most one token per head, "
                             f"so drafts of depth {depth} need at least {depth} heads")
        if self.draft_prefill not in ("eager", "lazy"):
            raise ValueError(f"draft_prefill must be 'eager' or 'lazy' (got {self.draft_prefill!r})")
        if self.ngram_host_s < 0:
            raise ValueError(f"ngram_host_s must be >= 0 (got {self.ngram_host_s})")
        if not 0.0 <= self.ngram_match_rate <= 1.0:
            raise ValueError(f"ngram_match_rate must be in [0, 1] (got {self.ngram_match_rate})")
        check_acceptance_params(self)
        if self.acceptance == "empirical":
            k = Empirical.load(self.file).max_depth
            if depth > k:
                raise ValueError(f"file: {self.file!r} measured drafts of {k} tokens; drafts of depth {depth} "
                                 f"would need acceptance beyond what it measured")

    def make_drafter(self) -> Drafter:
        return Drafter(kind=self.drafter, model=self.draft_model if self.drafter == "model" else "",
                       layers=self.eagle_layers, heads=self.medusa_heads,
                       host_s=self.ngram_host_s if self.drafter == "ngram" else 0.0,
                       lazy_prefill=self.draft_prefill == "lazy")


class DraftingPolicy(SpeculationPolicy):
    """A speculation policy with a declared drafter and an acceptance model (subclasses decide the
    depth of each draft)."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.acceptance = build_acceptance(self.p)
        self._drafter = self.p.make_drafter()
        self._ngram = self._drafter.kind == "ngram" and self.p.ngram_match_rate < 1.0

    def drafter(self) -> Drafter:
        return self._drafter

    def accepted(self, rng, req, num_draft: int) -> int:
        return self.acceptance.sample(rng, req, num_draft)

    def depths(self, n: int, k: int) -> tuple[int, ...]:
        """``k`` for each of ``n`` decodes; with prompt lookup, 0 where no n-gram matched (drawn from
        the policy's own generator)."""
        if not self._ngram or k == 0:
            return (k,) * n
        hit = self.rng.random(n) < self.p.ngram_match_rate
        return tuple(k if h else 0 for h in hit.tolist())
