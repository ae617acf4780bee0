"""Pure transformations of a Trace. Each returns a new, validated Trace and appends a record of itself
(``{"op": ..., parameters}``) to ``meta["transforms"]``, which ``Trace.identity()`` carries into results.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from traces.schema import Trace, TraceError, take_rows


def _meta(trace: Trace, op: str, **params: Any) -> dict:
    meta = dict(trace.meta)
    meta["transforms"] = [*trace.meta.get("transforms", []), {"op": op, **params}]
    return meta


def _bad(trace: Trace, detail: str) -> TraceError:
    return TraceError(detail, label=trace.name)


def scale_rate(trace: Trace, factor: float) -> Trace:
    """Compress time by ``factor``: arrivals are divided by it, so factor 8 gives 8x the request rate.

    The source clock no longer applies, so ``meta["clock_origin_s"]`` is reset to 0 (busiest-second
    and busiest-minute counts are then taken from the trace start).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 0):
        raise _bad(trace, f"scale_rate factor must be finite and > 0 (got {factor!r})")
    meta = _meta(trace, "scale_rate", factor=float(factor))
    meta["clock_origin_s"] = 0.0
    return trace.replace(arrival_s=trace.arrival_s / float(factor), meta=meta)


def head(trace: Trace, n: int) -> Trace:
    """The first ``n`` requests (all of them when the trace is shorter)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise _bad(trace, f"head needs a whole number n >= 0 (got {n!r})")
    return take_rows(trace, np.arange(min(int(n), len(trace))), meta=_meta(trace, "head", n=int(n)))


def time_window(trace: Trace, start_s: float, end_s: float, rebase: bool = True) -> Trace:
    """Requests arriving in [start_s, end_s). With ``rebase`` times are shifted by -start_s, so the
    window starts at 0 s and any idle lead-in before its first request is kept."""
    if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
        raise _bad(trace, f"time_window needs 0 <= start_s < end_s, both finite (got {start_s!r}, {end_s!r})")
    lo, hi = np.searchsorted(trace.arrival_s, [start_s, end_s], side="left")
    meta = _meta(trace, "time_window", start_s=float(start_s), end_s=float(end_s), rebase=bool(rebase))
    changes: dict[str, Any] = {"meta": meta}
    if rebase:
        changes["arrival_s"] = trace.arrival_s[lo:hi] - float(start_s)
        meta["clock_origin_s"] = float(trace.meta.get("clock_origin_s", 0.0)) + float(start_s)
    return take_rows(trace, np.arange(lo, hi), **changes)


def repeat(trace: Trace, times: int, *, distinct_hashes: bool = False) -> Trace:
    """``times`` back-to-back copies, copy k shifted by k * (span + mean inter-arrival gap).

    Request ids are renumbered 0..N-1. Copies keep their token counts, sessions and tenants, and by
    default their block hashes too, so copy 2 onward finds its prefixes cached by copy 1; with
    ``distinct_hashes`` each copy's hashes are offset into a range of its own (no cross-copy reuse).
    Used to build long inputs for scaling benchmarks. Needs at least two requests to define the gap.
    """
    if isinstance(times, bool) or not isinstance(times, (int, np.integer)) or times < 1:
        raise _bad(trace, f"repeat needs a whole number times >= 1 (got {times!r})")
    n, times = len(trace), int(times)
    if n < 2:
        raise _bad(trace, f"repeat needs at least 2 requests to define the period (got {n})")
    span = trace.span_s
    period = span + span / (n - 1)
    copy_of_row = np.repeat(np.arange(times), n)

    def tiled(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else np.tile(arr, times)

    changes: dict[str, Any] = {
        "arrival_s": np.tile(trace.arrival_s, times) + copy_of_row * period,
        "request_id": np.arange(n * times, dtype=np.int64),
        "prompt_tokens": tiled(trace.prompt_tokens), "output_tokens": tiled(trace.output_tokens),
        "session_id": tiled(trace.session_id), "priority": tiled(trace.priority), "tenant": tiled(trace.tenant),
        "meta": _meta(trace, "repeat", times=times, period_s=float(period), distinct_hashes=bool(distinct_hashes)),
    }
    if trace.hash_values is not None:
        blocks = trace.hash_values.size
        offsets = np.empty(n * times + 1, dtype=np.int64)
        offsets[:-1] = (trace.hash_offsets[:-1][None, :] + blocks * np.arange(times)[:, None]).ravel()
        offsets[-1] = blocks * times
        values = np.tile(trace.hash_values, times)
        if distinct_hashes and blocks:
            lo, hi = int(trace.hash_values.min()), int(trace.hash_values.max())
            width = hi - lo + 1
            if hi + width * (times - 1) >= 2**63:
                raise _bad(trace, "repeat: distinct hashes would overflow int64")
            values += np.repeat(np.arange(times, dtype=np.int64) * width, blocks)
        changes.update(hash_offsets=offsets, hash_values=values)
    return trace.replace(**changes)
