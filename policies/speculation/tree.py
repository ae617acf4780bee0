"""``tree``: ``width`` candidate chains of ``depth`` draft tokens per decode, verified together in
one target pass with a tree-attention mask (SpecInfer, Medusa, EAGLE's trees).

The verifier runs ``1 + width x depth`` query tokens per request (the request's last token and every
tree node): each is a GEMM row and an LM-head row, and each attends to the request's KV plus its own
ancestors, so attention reads the KV once and does ``1 + width x depth`` times the FLOPs (priced so by
the cost backend's multi-query decode attention). KV slots are reserved for every node before
verification; the accepted path is kept and the rest rolled back. Drafting: a draft model or EAGLE
head runs ``depth`` passes, the first over the requests, the rest over ``width`` rows per request;
Medusa's heads score all positions in one pass.

Acceptance: the longest accepted prefix among the chains. With each chain an independent draw of the
acceptance model (``S(j) = P(chain accepts >= j)``) the expected tokens per target step are
``1 + sum_{j=1..depth} [1 - (1 - S(j))^width]``; i.i.d. rate ``a``: ``S(j) = a^j``. Independent
chains are an idealisation (real trees branch on distinct first tokens, of which the target keeps at
most one), which makes this an upper bound for a tree of that shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import DraftPlan
from policies.registry import register
from policies.speculation.drafting import DraftingParams, DraftingPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeParams(DraftingParams):
    width: int = 2      # draft chains under one root
    depth: int = 4      # draft tokens per chain

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1 (got {self.width})")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1 (got {self.depth})")
        self.check(self.depth)


@register("speculation", "tree")
class Tree(DraftingPolicy):
    """A width x depth draft tree per decode, verified with a tree-attention mask."""

    Params = TreeParams

    def propose(self, decodes, now, view) -> DraftPlan:
        return DraftPlan(draft_tokens=self.depths(len(decodes), self.p.depth), width=self.p.width)

    def accepted(self, rng, req, num_draft: int) -> int:
        return self.acceptance.sample_tree(rng, req, self.p.width, num_draft)
