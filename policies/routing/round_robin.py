"""``round-robin``: the i-th arriving request goes to replica i mod N."""
from __future__ import annotations

from policies.base import RoutingPolicy
from policies.registry import register


@register("routing", "round-robin")
class RoundRobin(RoutingPolicy):
    """Request i (in arrival order) goes to replica i mod N; needs no replica state."""

    reads_state = False

    def route(self, request, replicas, now: float) -> int:
        return request.idx % len(replicas)
