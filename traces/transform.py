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
        "acceptance_rate": tiled(trace.acceptance_rate),
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


def vidur_trim(trace: Trace, max_tokens: int = 4096, *, prefill_scale: float = 1.0,
               decode_scale: float = 1.0) -> Trace:
    """Request lengths exactly as Vidur 0.0.26's trace replay makes them (``TraceReplayRequestGenerator``):
    prompt and output are scaled and truncated to integers, raised to at least 1, and where prompt +
    output exceeds ``max_tokens`` the prompt is cut by the excess (outputs are never cut). Arrivals are
    untouched. Used to replay a trace on tiersim as Vidur replays it (``--trace_request_generator_config_
    max_tokens``, 4096 by default). A request whose output alone reaches ``max_tokens`` would be left with
    no prompt; Vidur would then fail its own check, so this raises.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2:
        raise _bad(trace, f"vidur_trim needs a whole number max_tokens >= 2 (got {max_tokens!r})")
    for name, s in (("prefill_scale", prefill_scale), ("decode_scale", decode_scale)):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise _bad(trace, f"vidur_trim {name} must be finite and > 0 (got {s!r})")
    # float64 product then truncation toward zero, as pandas' astype(int) does in Vidur
    prompt = np.maximum((trace.prompt_tokens * float(prefill_scale)).astype(np.int64), 1)
    output = np.maximum((trace.output_tokens * float(decode_scale)).astype(np.int64), 1)
    excess = np.maximum(prompt + output - int(max_tokens), 0)
    prompt = prompt - excess
    if (prompt < 1).any():
        i = int(np.flatnonzero(prompt < 1)[0])
        raise TraceError(f"vidur_trim: output of {int(output[i])} tokens leaves no room for a prompt under "
                         f"max_tokens={int(max_tokens)}", label=trace.name, row=i + 1, field="output_tokens")
    meta = _meta(trace, "vidur_trim", max_tokens=int(max_tokens), prefill_scale=float(prefill_scale),
                 decode_scale=float(decode_scale), trimmed_requests=int((excess > 0).sum()))
    changes: dict[str, Any] = {"prompt_tokens": prompt, "output_tokens": output, "meta": meta}
    if trace.hash_values is not None:
        # a cut prompt keeps only the prefix blocks it still covers
        offsets = trace.hash_offsets
        have = np.diff(offsets)
        keep = np.minimum(have, -(-prompt // int(trace.hash_block_tokens)))
        rank = np.arange(trace.hash_values.size) - np.repeat(offsets[:-1], have)
        changes["hash_values"] = trace.hash_values[rank < np.repeat(keep, have)]
        changes["hash_offsets"] = np.concatenate(([0], np.cumsum(keep))).astype(np.int64)
    return trace.replace(**changes)
