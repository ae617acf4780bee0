"""Summary statistics of a trace: the figures ``tiersim trace describe FILE`` prints.

Percentiles use linear interpolation between order statistics (numpy's and pandas' default), so they
can be fractional. Busiest-second and busiest-minute counts use bins aligned to the source's clock
(``meta["clock_origin_s"]``), so they match counts by wall-clock second and minute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from traces.schema import Trace


@dataclass(frozen=True, slots=True)
class PrefixReuse:
    """Upper bound on prefix-cache hits: replay in order into an infinite cache that never evicts.

    A request's hit is the longest leading run of its block hashes already inserted by earlier requests
    (hashes are prefix hashes, so a cached block is only usable after a cached predecessor). Token
    counts weight each block by its actual tokens: the last block of a prompt is usually partial.
    """

    block_tokens: int
    total_blocks: int
    distinct_blocks: int
    cached_blocks: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def block_hit_ratio(self) -> float:
        return self.cached_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def token_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def prefix_reuse(trace: Trace) -> PrefixReuse | None:
    """The ideal prefix reuse of a trace with block hashes (None without). Vectorised, O(B log B)."""
    if trace.hash_offsets is None:
        return None
    offsets, values, bt = trace.hash_offsets, trace.hash_values, trace.hash_block_tokens
    counts = np.diff(offsets)
    total = int(values.size)
    prompt_total = int(trace.prompt_tokens.sum())
    if total == 0:
        return PrefixReuse(bt, 0, 0, 0, prompt_total, 0)
    owner = np.repeat(np.arange(len(trace), dtype=np.int64), counts)
    position = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], counts)
    _, first_at, inverse = np.unique(values, return_index=True, return_inverse=True)
    # a block is in the cache iff an earlier request inserted the same hash
    seen = owner[first_at][inverse] < owner
    # leading run per request: the position of its first unseen block (or its block count)
    first_miss = np.full(len(trace), np.iinfo(np.int64).max)
    np.minimum.at(first_miss, owner[~seen], position[~seen])
    hit_len = np.minimum(first_miss, counts)
    hit = position < hit_len[owner]
    block_tokens = np.clip(trace.prompt_tokens[owner] - position * bt, 0, bt)
    return PrefixReuse(block_tokens=int(bt), total_blocks=total, distinct_blocks=int(first_at.size),
                       cached_blocks=int(hit.sum()), prompt_tokens=prompt_total,
                       cached_tokens=int(block_tokens[hit].sum()))


def _token_stats(values: np.ndarray) -> dict[str, float | int | None]:
    if values.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None, "total": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": int(values.min()), "max": int(values.max()), "total": int(values.sum())}


def _busiest(arrival: np.ndarray, phase_s: float, width_s: float) -> int:
    if arrival.size == 0:
        return 0
    bins = np.floor((arrival + phase_s) / width_s).astype(np.int64)
    return int(np.unique(bins, return_counts=True)[1].max())


def describe(trace: Trace) -> dict[str, Any]:
    """Summary figures of a trace as a JSON-ready dict (None where a figure is undefined)."""
    n = len(trace)
    arrival = trace.arrival_s
    span = trace.span_s
    gaps = np.diff(arrival)
    interarrival: dict[str, float | None] = {"mean": None, "p50": None, "cv": None, "max": None}
    if gaps.size:
        mean = float(gaps.mean())
        interarrival = {"mean": mean, "p50": float(np.median(gaps)),
                        "cv": float(gaps.std(ddof=1) / mean) if gaps.size > 1 and mean > 0 else None,
                        "max": float(gaps.max())}
    phase = float(trace.meta.get("clock_origin_s", 0.0)) % 60.0
    prompt, output = _token_stats(trace.prompt_tokens), _token_stats(trace.output_tokens)
    reuse = prefix_reuse(trace)
    d: dict[str, Any] = {
        "name": trace.name,
        "source": trace.source,
        "requests": n,
        "span_s": span,
        "rate_per_s": n / span if span > 0 else None,
        "interarrival_s": interarrival,
        "busiest_second_requests": _busiest(arrival, phase, 1.0),
        "busiest_minute_requests": _busiest(arrival, phase, 60.0),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "total_tokens": prompt["total"] + output["total"],
        "prefix_reuse": None if reuse is None else {
            **asdict(reuse), "block_hit_ratio": reuse.block_hit_ratio, "token_hit_ratio": reuse.token_hit_ratio},
        "sessions": None if trace.session_id is None else int(np.unique(trace.session_id).size),
        "tenants": None,
        "dropped": {k.removeprefix("dropped_"): v for k, v in trace.meta.items() if k.startswith("dropped_")},
        "transforms": list(trace.meta.get("transforms", [])),
        "out_of_order_rows": int(trace.meta.get("out_of_order_rows", 0)),
    }
    if trace.tenant is not None:
        names, counts = np.unique(trace.tenant, return_counts=True)
        d["tenants"] = {str(k): int(v) for k, v in zip(names, counts)}
    return d


def _num(x: float | int | None, digits: int = 1) -> str:
    """1,234 for whole values, 1,234.5 otherwise; '-' for undefined."""
    if x is None:
        return "-"
    if float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _sig(x: float | None, unit: str = "") -> str:
    """Three significant digits, keeping trailing zeros (3.40, 0.0638, 13.2, 217); '-' for undefined."""
    if x is None:
        return "-"
    decimals = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{decimals}f}{unit}"


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"


def format_description(d: dict[str, Any]) -> str:
    """An aligned plain-text table of a :func:`describe` result."""
    rows: list[tuple[str, str]] = [("trace", d["name"]), ("source", d["source"]),
                                   ("requests", _num(d["requests"]))]
    span = d["span_s"]
    rows.append(("time span", f"{_num(span)} s ({span / 60:,.1f} min)"))
    rows.append(("mean rate", _sig(d["rate_per_s"], " req/s")))
    ia = d["interarrival_s"]
    rows.append(("inter-arrival", f"mean {_sig(ia['mean'], ' s')}, median {_sig(ia['p50'], ' s')}, "
                                  f"CV {_sig(ia['cv'])}, longest {_sig(ia['max'], ' s')}"))
    rows.append(("busiest second", _requests(d["busiest_second_requests"])))
    rows.append(("busiest minute", _requests(d["busiest_minute_requests"])))
    rows.append(("total tokens", _num(d["total_tokens"])))
    if d.get("sessions") is not None:
        rows.append(("sessions", _num(d["sessions"])))
    if d.get("tenants"):
        rows.append(("tenants", ", ".join(f"{k} {_num(v)}" for k, v in d["tenants"].items())))
    for reason, count in d.get("dropped", {}).items():
        rows.append(("dropped rows", f"{_num(count)} {reason}"))
    if d.get("out_of_order_rows"):
        count = d["out_of_order_rows"]
        rows.append(("arrival order", f"{_num(count)} row{'' if count == 1 else 's'} given earlier than the row "
                                      "before; re-sorted by arrival (stable)"))
    if d.get("transforms"):
        rows.append(("transforms", "; ".join(
            t["op"] + "(" + ", ".join(f"{k}={v}" for k, v in t.items() if k != "op") + ")"
            for t in d["transforms"])))
    reuse = d.get("prefix_reuse")
    if reuse is not None:
        rows.append(("prefix reuse", f"ideal: infinite cache, {reuse['block_tokens']}-token blocks, "
                                     "replayed in order"))
        rows.append(("  blocks", f"{_num(reuse['total_blocks'])} total, {_num(reuse['distinct_blocks'])} "
                                 f"distinct, {100 * reuse['block_hit_ratio']:.1f} % already cached"))
        rows.append(("  prompt tokens", f"{100 * reuse['token_hit_ratio']:.1f} % already cached"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]

    header = ["tokens", "mean", "p50", "p90", "p99", "min", "max", "total"]
    table = [header] + [[label] + [_num(d[key][c]) for c in header[1:]]
                        for label, key in (("prompt", "prompt_tokens"), ("output", "output_tokens"))]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines.append("")
    for r in table:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    return "\n".join(lines)
