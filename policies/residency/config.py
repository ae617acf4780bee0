"""``config``: residency as configured. A preempted request goes where ``replica.preemption_mode``
says (vLLM's ``preemption_mode``: recompute, or swap to CPU memory); the KV hierarchy's choices are
this policy's parameters, and their defaults are an HBM-only prefix cache (evicted blocks dropped,
nothing offloaded or prefetched).

Prefetch (``prefetch_depth`` > 0) loads the lower-tier prefixes of the first waiting requests into HBM
and holds them there for those requests, while the held blocks stay within ``prefetch_fraction`` of
HBM and at least as much again is left available to the running batch.

``"auto"`` picks from the replica's tiers (``replica.dram_kv_bytes``, ``replica.nvme_kv_bytes``, the
cluster's shared store) and ``replica.kv_tier_mode``: inclusive tiers write a request's prompt blocks
down to the next tier when it releases them (so an HBM eviction is free) and push a lower tier's
evictions one tier further down; exclusive tiers move every evicted block one tier down.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from policies.base import ResidencyPolicy, ResidencyView
from policies.registry import register

_TIERS = ("hbm", "dram", "nvme", "store")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigResidencyParams:
    offload_to: str = "none"        # "none" | "dram" | "nvme" | "store" | "auto": write-through on release
    hbm_evict_to: str = "drop"      # "drop" | "dram" | "nvme" | "store" | "auto": write-back on eviction
    dram_evict_to: str = "drop"     # "drop" | "nvme" | "store" | "auto"
    nvme_evict_to: str = "drop"     # "drop" | "store" | "auto"
    prefetch_depth: int = 0         # waiting requests, from the head of the queue, to prefetch for
    prefetch_fraction: float = 0.1  # at most this share of HBM held by prefetched blocks
    load: str = "when-faster"       # "when-faster" (Mooncake's threshold) | "always" | "never"

    def __post_init__(self) -> None:
        for key, below in (("offload_to", _TIERS[1:] + ("none",)), ("hbm_evict_to", _TIERS[1:]),
                           ("dram_evict_to", _TIERS[2:]), ("nvme_evict_to", _TIERS[3:])):
            ok = below + ("auto",) + (("drop",) if key != "offload_to" else ())
            if getattr(self, key) not in ok:
                raise ValueError(f"{key} must be one of {', '.join(ok)} (got {getattr(self, key)!r})")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0 (got {self.prefetch_depth})")
        if not 0 < self.prefetch_fraction <= 1:
            raise ValueError(f"prefetch_fraction must be in (0, 1] (got {self.prefetch_fraction})")
        if self.load not in ("when-faster", "always", "never"):
            raise ValueError(f"load must be 'when-faster', 'always' or 'never' (got {self.load!r})")


def _below(view: ResidencyView, tier: str) -> str:
    """The next tier under ``tier`` that has capacity, or "drop"."""
    for t in _TIERS[_TIERS.index(tier) + 1:]:
        if t in view.tiers:
            return t
    return "drop"


@register("residency", "config")
class ConfigResidency(ResidencyPolicy):
    """Preempted KV per replica.preemption_mode; lower tiers as the parameters say (default: none)."""

    Params = ConfigResidencyParams

    def demote_to(self, view: ResidencyView, tier: str, now: float) -> str:
        choice = {"hbm": self.p.hbm_evict_to, "dram": self.p.dram_evict_to, "nvme": self.p.nvme_evict_to}[tier]
        if choice == "auto":
            if tier == "hbm" and view.tier_mode == "inclusive":
                return "drop"           # inclusive: a released block was written through already
            return _below(view, tier)
        return choice if choice in view.tiers else "drop"

    def offloads(self) -> bool:
        return self.p.offload_to != "none"

    def offload_to(self, view: ResidencyView, req, now: float) -> str:
        choice = self.p.offload_to
        if choice == "auto":
            return "none" if view.tier_mode == "exclusive" else _below(view, "hbm").replace("drop", "none")
        return choice if choice in view.tiers else "none"

    def load_or_recompute(self, view: ResidencyView, req, now: float) -> str:
        if self.p.load == "always":
            return "load"
        if self.p.load == "never":
            return "recompute"
        return super().load_or_recompute(view, req, now)

    def prefetch(self, view: ResidencyView, now: float):
        """The head of the queue, while what is held for it stays within ``prefetch_fraction`` of HBM and
        leaves the running batch room to grow."""
        if not self.p.prefetch_depth:
            return ()
        room = self.p.prefetch_fraction * view.num_blocks("hbm") - view.num_prefetched_blocks
        room = min(room, view.num_available_blocks("hbm") - self.p.prefetch_fraction * view.num_blocks("hbm"))
        out = []
        for r in islice(view.waiting, self.p.prefetch_depth):
            need = sum(view.lower_hit_blocks(r).values())
            if need > room:
                break
            if need:
                out.append(r)
                room -= need
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TieredParams(ConfigResidencyParams):
    offload_to: str = "auto"
    hbm_evict_to: str = "auto"
    dram_evict_to: str = "auto"
    nvme_evict_to: str = "auto"
    prefetch_depth: int = 4


@register("residency", "tiered")
class Tiered(ConfigResidency):
    """A KV hierarchy over every configured tier: write-through (inclusive) or move-on-evict
    (exclusive), prefetch for the queue head, load a lower-tier hit when faster than recomputing."""

    Params = TieredParams
