"""``adaptive-k``: each step, the draft depth that maximises the tokens the step is expected to emit
per second of the step, from observed acceptance and the step's price.

For a batch of ``B`` decodes with estimated acceptance rates ``a_i``, depth ``k`` is expected to emit
``B + sum_i a_i (1 - a_i^k) / (1 - a_i)`` tokens (i.i.d. acceptance) in ``T(k)`` seconds, the
replica's price of the step with depth ``k`` (``SpeculationView.step_time``: the drafter's passes
plus the target's verification). The policy takes the ``k`` in ``0..k_max`` with the most tokens per
second (ties: the smaller). So speculation stops by itself where it stops paying: at small batches
the target's step is memory-bound and ``T(k)`` barely grows with ``k``; as the batch grows
verification turns compute-bound, ``T(k)`` grows with ``B x (1 + k)`` query tokens, and ``k = 0``
(plain decoding) wins.

Estimates (kept in ``observe``): per request, exponentially weighted counts of accepted drafts and of
rejections (``a_i = accepted / (accepted + rejections)``, the maximum-likelihood rate of a truncated
geometric), shrunk towards a global estimate with ``prior_weight`` pseudo-observations; the global
estimate starts at ``prior_alpha``. The policy never reads the acceptance model it samples from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import DraftPlan
from policies.registry import register
from policies.speculation.drafting import DraftingParams, DraftingPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveKParams(DraftingParams):
    k_max: int = 7              # deepest draft it may choose per step (0 turns speculation off)
    ewma: float = 0.05          # weight of the newest verify step in a request's estimate
    prior_alpha: float = 0.5    # acceptance assumed before anything is observed
    prior_weight: float = 4.0   # pseudo-observations of the global estimate behind each request's

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1 (got {self.k_max})")
        if not 0.0 < self.ewma <= 1.0:
            raise ValueError(f"ewma must be in (0, 1] (got {self.ewma})")
        if not 0.0 <= self.prior_alpha < 1.0:
            raise ValueError(f"prior_alpha must be in [0, 1) (got {self.prior_alpha})")
        if self.prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0 (got {self.prior_weight})")
        self.check(self.k_max)


@register("speculation", "adaptive-k")
class AdaptiveK(DraftingPolicy):
    """Per step, the draft depth with the most expected tokens per second (0 turns speculation off)."""

    Params = AdaptiveKParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._req: dict[int, list[float]] = {}       # request idx -> [accepted, trials], discounted
        self._acc = self._trials = 0.0               # global, discounted
        self._ks = np.arange(self.p.k_max + 1)
        self.chosen: dict[int, int] = {}             # depth -> steps that chose it (for reports)

    def alpha(self, req) -> float:
        """The policy's current acceptance estimate for ``req``."""
        p = self.p
        w = p.prior_weight
        g = (self._acc + w * p.prior_alpha) / (self._trials + w)
        s = self._req.get(req.idx)
        if s is None:
            return g
        return (s[0] + w * g) / (s[1] + w)

    def propose(self, decodes, now, view) -> DraftPlan:
        n = len(decodes)
        a = np.minimum(np.array([self.alpha(r) for r in decodes]), 1.0 - 1e-9)
        # expected accepted drafts of each request at each depth: a (1 - a^k) / (1 - a)
        expect = (a[None, :] * (1.0 - a[None, :] ** self._ks[:, None]) / (1.0 - a[None, :])).sum(axis=1)
        best_k, best = 0, -1.0
        for k in range(self.p.k_max + 1):
            rate = (n + float(expect[k])) / view.step_time(k)
            if rate > best * (1.0 + 1e-9):
                best_k, best = k, rate
        self.chosen[best_k] = self.chosen.get(best_k, 0) + 1
        return DraftPlan(draft_tokens=self.depths(n, best_k))

    def observe(self, outcome) -> None:
        keep = 1.0 - self.p.ewma
        for req, d, acc in outcome.accepted:
            trials = acc + (1 if acc < d else 0)
            s = self._req.get(req.idx)
            if s is None:
                self._req[req.idx] = [float(acc), float(trials)]
            else:
                s[0] = keep * s[0] + acc
                s[1] = keep * s[1] + trials
            self._acc = keep * self._acc + acc
            self._trials = keep * self._trials + trials
        for req in outcome.finished:
            self._req.pop(req.idx, None)
