"""``least-loaded``: send each request to the replica with the fewest tokens still to process.

    tiersim run --plugin configs/plugins/least_loaded.py --set cluster.num_replicas=4 \
        --set policies.routing.name=least-loaded
"""
from __future__ import annotations

from policies.base import RoutingPolicy
from policies.registry import register


@register("routing", "least-loaded")
class LeastLoaded(RoutingPolicy):
    """Fewest queued prompt/recompute tokens first; ties broken at random (seeded)."""

    def route(self, request, replicas, now):
        loads = [r.queued_tokens + r.num_running for r in replicas]
        best = min(loads)
        ties = [i for i, x in enumerate(loads) if x == best]
        return ties[0] if len(ties) == 1 else int(self.rng.choice(ties))
