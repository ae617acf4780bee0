"""Token times: a compact log of the steps in which each request emitted tokens, and inter-token
statistics computed from it in compiled passes.

Token times are not logged per token: a request records the runs of consecutive steps in which it
emitted the same number of tokens (one, or more under speculative decoding); when it finishes, those
runs move into the token log and the request object is released. Inter-token statistics come at the
end: per-request mean/p50/p99/max, and exact global percentiles by two-pass histogram selection (no
array of all gaps is ever built).

Inter-token latency (ITL) is defined per emitted token. A token's time is the end of the engine
step that emitted it. A step that emits ``m`` tokens of a request (its own token plus ``m - 1``
accepted drafts) shares the gap since that request's previous step evenly among them: ``m`` gaps of
``gap / m`` each (at the request's first step, which has no gap, its ``m - 1`` further tokens get
gaps of 0). So a request's gaps sum to its last token time minus its first, its mean ITL equals its
TPOT, and with one token per step (no speculation) every gap is a whole step gap, exactly as before.
This is how SGLang's ``bench_serving`` reports ITL under speculative decoding since
sgl-project/sglang#12064 (each streamed chunk's latency divided by its accept length).

``per_step=True`` gives the other common definition, one gap per step that emitted tokens, whatever
their number: what vLLM's ``benchmark_serving`` / ``vllm bench serve`` measures, the time between
consecutive streamed chunks (vllm-project/vllm#27485 notes that it assumes one token per chunk). Under
speculation its mean exceeds TPOT by the mean accepted length; the summary reports it beside the
per-token ITL (``summary["speculation"]["itl_per_step_s"]``).
"""
from __future__ import annotations

import math

import numpy as np

from sim.jit import numba, searchsorted
from sim.metrics.step_log import Growable
from sim.request import STEP_ID_BITS, Request


class TokenLog:
    """Token emission of finished requests, cluster-wide: runs of consecutive steps, each (first step,
    last step, tokens per step) with global step ids, appended when a request finishes. A request's
    runs are contiguous; where they start and how many there are is in the request log (``seg_off``,
    ``seg_cnt``), so no request column is kept (at a million requests it was 40 MB)."""

    def __init__(self) -> None:
        self.first = Growable(np.int64)    # global step ids (see sim.request)
        self.last = Growable(np.int64)
        self.tokens = Growable(np.int32)   # tokens each step of the run emitted

    def add(self, req: Request) -> int:
        """Append a finished request's runs; returns where they start (they stay contiguous)."""
        k = len(req.seg_start)
        n = self.first.n
        if not k:
            return n
        self.first.reserve(k)[n:n + k] = req.seg_start
        self.last.reserve(k)[n:n + k] = req.seg_end
        self.tokens.reserve(k)[n:n + k] = req.seg_tokens
        self.first.n = self.last.n = self.tokens.n = n + k
        return n


# ------------------------------------------------------------------------------ inter-token times
_NB = 1 << 14          # histogram bins for exact global percentiles
_LO, _HI = 1e-9, 1e5   # seconds; gaps at or below _LO share bin 0


@numba.njit(cache=True, nogil=True)
def _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, seg_tokens, step_end, offsets, per_step, buf):
    """The inter-token gaps of request i into ``buf`` (grown as needed); returns (buf, count): per
    emitted token (a step's gap shared by its tokens; see the module docstring), or with
    ``per_step`` one gap per step. Step ids are global (``replica << STEP_ID_BITS | local``);
    ``offsets[replica]`` is where that replica's steps start in ``step_end``."""
    a = seg_off[i]
    b = a + seg_cnt[i]
    need = 0
    for s in range(a, b):
        need += (np.int64(seg_last[s]) - np.int64(seg_first[s]) + 1) * (1 if per_step else seg_tokens[s])
    if need > buf.shape[0]:
        buf = np.empty(need * 2)
    prev = 0.0
    k = 0             # gaps written
    started = False
    for s in range(a, b):
        first = seg_first[s]
        m = 1 if per_step else seg_tokens[s]
        base = offsets[first >> STEP_ID_BITS] - ((first >> STEP_ID_BITS) << STEP_ID_BITS)
        for st in range(first, seg_last[s] + 1):
            t = step_end[base + st]
            if not started:
                for _ in range(m - 1):      # further tokens of the first step: no gap to share
                    buf[k] = 0.0
                    k += 1
                started = True
            elif m == 1:
                buf[k] = t - prev
                k += 1
            else:
                g = (t - prev) / m
                for _ in range(m):
                    buf[k] = g
                    k += 1
            prev = t
    return buf, k


@numba.njit(cache=True, nogil=True)
def _bin(x):
    if x <= _LO:
        return 0
    b = int((np.log(x) - np.log(_LO)) / (np.log(_HI) - np.log(_LO)) * (_NB - 2)) + 1
    return min(max(b, 1), _NB - 1)


@numba.njit(cache=True, nogil=True)
def _kth(a, k):
    """The k-th smallest of ``a[0:n]`` (0-based), reordering ``a`` so that ``a[:k] <= a[k] <= a[k+1:]``
    (Hoare-partition quickselect, median-of-three pivot: average O(n), and even splits on runs of
    equal gaps, which decode steps make many of)."""
    lo = 0
    hi = a.shape[0] - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(cache=True, nogil=True)
def _percentile(a, q):
    """``np.percentile(a, q)`` as Numba computes it (0 < q < 100, no NaN; reorders ``a``): linear
    interpolation between the order statistics around rank ``1 + (n - 1) q / 100``, in the same float
    operations as ``numba.np.arraymath._collect_percentiles_inner``, so the values are bit-identical.
    Written out because compiling Numba's own ``np.percentile`` (with its NaN, infinity and argument
    checks) took most of a first run's compile time."""
    n = a.shape[0]
    if n == 1:
        return a[0]
    rank = 1 + (n - 1) * (q / 100.0)
    f = math.floor(rank)
    m = rank - f
    k = int(f - 1)
    lower = _kth(a, k)
    upper = a[k + 1]
    for j in range(k + 2, n):       # the (k+1)-th smallest: the least of what lies above the k-th
        if a[j] < upper:
            upper = a[j]
    return lower * (1 - m) + upper * m


@numba.njit(cache=True, nogil=True)
def itl_statistics(seg_off, seg_cnt, seg_first, seg_last, seg_tokens, step_end, offsets, done, qs, out,
                   per_step=False):
    """Per request (finished ones): ``out[i]`` = (mean, p50, p99, max) of its inter-token gaps.
    Globally over all gaps: (count, mean, max, exact percentiles ``qs``, histogram) by two-pass
    histogram selection with numpy's default linear interpolation; gaps per emitted token, or per step
    with ``per_step`` (see the module docstring). The histogram counts every gap in ``_NB`` log-spaced
    bins (:func:`histogram_edges`; 0.2 % wide): plots draw the token-level ITL distribution from it, the
    same quantity whose percentiles the summary reports."""
    n = seg_off.shape[0]
    hist = np.zeros(_NB, np.int64)
    buf = np.empty(1024)
    total = 0
    ssum = 0.0
    gmax = 0.0
    for i in range(n):
        out[i, :] = np.nan
        if not done[i]:
            continue
        buf, m = _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, seg_tokens, step_end, offsets, per_step, buf)
        if m == 0:
            continue
        g = buf[:m]
        c = 0.0         # the mean as Numba's ``g.mean()`` sums: in order, from 0
        gm = g[0]
        for j in range(m):
            x = g[j]
            c += x
            if x > gm:
                gm = x
            hist[_bin(x)] += 1
            ssum += x
        out[i, 0] = c / m
        out[i, 3] = gm
        if gm > gmax:
            gmax = gm
        out[i, 1] = _percentile(g, 50.0)    # (reorders the request's gaps: after every in-order sum)
        out[i, 2] = _percentile(g, 99.0)
        total += m
    res = np.full(qs.shape[0], np.nan)
    if total == 0:
        return total, np.nan, np.nan, res, hist
    # ranks needed: floor(pos) and floor(pos) + 1 for each quantile
    cum = hist.copy()
    for b in range(1, _NB):
        cum[b] += cum[b - 1]
    lo_rank = np.empty(qs.shape[0], np.int64)
    want = np.zeros(_NB, np.bool_)
    for k in range(qs.shape[0]):
        pos = qs[k] / 100.0 * (total - 1)
        r0 = int(math.floor(pos))
        lo_rank[k] = r0
        for r in (r0, min(r0 + 1, total - 1)):
            want[searchsorted(cum, r, True)] = True
    # second pass: collect the values in the wanted bins
    kept = 0
    for b in range(_NB):
        if want[b]:
            kept += hist[b]
    vals = np.empty(kept)
    v = 0
    for i in range(n):
        if not done[i]:
            continue
        buf, m = _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, seg_tokens, step_end, offsets, per_step, buf)
        for j in range(m):
            b = _bin(buf[j])
            if want[b]:
                vals[v] = buf[j]
                v += 1
    for k in range(qs.shape[0]):
        pos = qs[k] / 100.0 * (total - 1)
        r0 = lo_rank[k]
        r1 = min(r0 + 1, total - 1)
        got0 = np.nan
        got1 = np.nan
        for r, which in ((r0, 0), (r1, 1)):
            b = searchsorted(cum, r, True)
            before = cum[b - 1] if b > 0 else 0
            # index of rank r among the collected values: values of lower wanted bins come first
            idx = 0
            for bb in range(b):
                if want[bb]:
                    idx += hist[bb]
            # bins are monotone in value, so the values of lower wanted bins are the smaller ones
            x = _kth(vals, idx + (r - before))
            if which == 0:
                got0 = x
            else:
                got1 = x
        t = pos - r0
        res[k] = got0 + t * (got1 - got0)
    return total, ssum / total, gmax, res, hist


def histogram_edges() -> np.ndarray:
    """Edges (seconds) of the ITL histogram's ``_NB`` bins: bin 0 holds gaps <= 1 ns (tokens emitted in
    the same step), bin b >= 1 holds gaps in [edges[b], edges[b + 1])."""
    inner = np.exp(np.log(_LO) + (np.arange(_NB - 1) / (_NB - 2)) * (np.log(_HI) - np.log(_LO)))
    return np.concatenate([[0.0], inner, [np.inf]])
