"""``most-free-kv``: the replica with the most HBM KV blocks available; ties go to the one running the
fewest requests, then to the lowest index.

Written for the decode pool of a disaggregated cluster (``cluster.decode_routing``), where a request
arrives with its whole prompt's KV and what a decode replica runs short of is KV blocks: DistServe and
Splitwise route hand-offs to the least loaded decode instance; free KV is the load that backpressure
depends on. It works as the arrival router of a mixed pool too (``policies.routing.name``).
"""
from __future__ import annotations

from policies.base import RoutingPolicy
from policies.registry import register


@register("routing", "most-free-kv")
class MostFreeKV(RoutingPolicy):
    """Most available HBM blocks first; then fewest running requests; then the lowest index."""

    def route(self, request, replicas, now: float) -> int:
        best, key = 0, None
        for i, r in enumerate(replicas):
            k = (-r.num_free_blocks, r.num_running)
            if key is None or k < key:
                best, key = i, k
        return best
