"""``tenant-fair``: continuous batching that admits the waiting request of the least-served tenant
first (a virtual token counter per tenant, after Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): a tenant's counter grows with the prompt tokens it gets admitted and the output
tokens it receives, so a tenant that floods the queue cannot starve the others.

    tiersim run --plugin configs/plugins/tenant_fair.py --set policies.scheduling.name=tenant-fair

Admission, batching and preemption are otherwise ``fcfs``'s (this class reuses it over a view whose
waiting queue is in fair order). Requests without a tenant count as tenant "".
"""
from __future__ import annotations

from collections import defaultdict

from policies.registry import register
from policies.scheduling.fcfs import FCFS


class _FairOrder:
    """The scheduler's view with its waiting queue reordered (everything else passes through)."""

    def __init__(self, view, waiting) -> None:
        self._view = view
        self.waiting = waiting

    def __getattr__(self, name):
        return getattr(self._view, name)


@register("scheduling", "tenant-fair")
class TenantFair(FCFS):
    """fcfs admission in least-served-tenant order (virtual token counters per tenant)."""

    Params = FCFS.Params

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.served: dict[str, float] = defaultdict(float)

    def _order(self, waiting):
        # recompute-preempted requests keep their place at the front (they hold the oldest claims)
        front = [r for r in waiting if r.num_preemptions > 0]
        rest = [r for r in waiting if r.num_preemptions == 0]
        rank = {}
        for pos, r in enumerate(rest):
            rank[id(r)] = (self.served[r.tenant or ""], pos)
        return front + sorted(rest, key=lambda r: rank[id(r)])

    def schedule(self, view, now):
        plan = super().schedule(_FairOrder(view, self._order(view.waiting)), now)
        for req, n in plan.prefill:
            self.served[req.tenant or ""] += n
        return plan

    def steady_decode(self, view):
        return super().steady_decode(_FairOrder(view, self._order(view.waiting)))

    def observe(self, outcome):
        for req in outcome.finished:
            self.served[req.tenant or ""] += req.output_tokens
