"""``prefix-affinity``: send a request where the longest part of its prompt is already cached, unless
that replica is much busier than the least loaded one (then load wins), as prefix-aware routers in
SGLang and Mooncake's Conductor do.

    tiersim run --plugin configs/plugins/prefix_affinity.py --set cluster.num_replicas=4 \
        --set policies.routing.name=prefix-affinity --trace mooncake-conversation --format mooncake
"""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import RoutingPolicy
from policies.registry import register


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixAffinityParams:
    max_imbalance_tokens: int = 32768   # a cache hit is not worth queueing behind this many more tokens

    def __post_init__(self) -> None:
        if self.max_imbalance_tokens < 0:
            raise ValueError(f"max_imbalance_tokens must be >= 0 (got {self.max_imbalance_tokens})")


@register("routing", "prefix-affinity")
class PrefixAffinity(RoutingPolicy):
    """Most cached prompt tokens first, within a load margin; else least loaded."""

    Params = PrefixAffinityParams

    def route(self, request, replicas, now):
        loads = [r.queued_tokens for r in replicas]
        least = min(loads)
        best, best_hit = loads.index(least), -1
        for i, r in enumerate(replicas):
            if loads[i] - least > self.p.max_imbalance_tokens:
                continue
            hit = r.prefix_hit_tokens(request)
            if hit > best_hit or (hit == best_hit and loads[i] < loads[best]):
                best, best_hit = i, hit
        return best
