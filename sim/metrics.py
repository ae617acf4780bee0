"""Metrics: preallocated per-request columns, a per-step log per replica, and the summary.

Memory stays bounded by active work, not by the length of the trace:
  * step rows go to a Parquet file in fixed-size chunks as the run goes (only each step's end time,
    8 bytes, stays in memory: token times need it), and the summary's step aggregates are accumulated
    per chunk;
  * token times are not logged per token: a request records the runs of consecutive steps in which it
    emitted a token; when it finishes, those runs move into its replica's compact token log and the
    request object is released;
  * inter-token statistics are computed at the end in compiled passes over those runs: per-request
    mean/p50/p99/max, and exact global percentiles by two-pass histogram selection (no array of all
    gaps is ever built).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from policies.base import RequestState
from sim.request import Request

STEP_COLUMNS: dict[str, type] = {
    "step": np.int64, "start_s": np.float64, "duration_s": np.float64,
    "num_seqs": np.int32, "prefill_seqs": np.int32, "prefill_tokens": np.int32, "decode_seqs": np.int32,
    "tokens": np.int32, "hbm_active_bytes": np.int64, "hbm_cached_bytes": np.int64,
    "hbm_locked_bytes": np.int64, "dram_used_bytes": np.int64, "nvme_used_bytes": np.int64,
    "frag_tokens": np.int64, "launches": np.int32, "syncs": np.int32, "preemptions": np.int32,
}
# free bytes per tier, derived when rows are written (capacity - used), not kept in the buffer
FREE_COLUMNS = ("hbm_free_bytes", "dram_free_bytes", "nvme_free_bytes")
# the step log's integer buffer, in this column order (the step index is implicit)
INT_COLUMNS = tuple(k for k in STEP_COLUMNS if k not in ("step", "start_s", "duration_s"))
_I = {k: j for j, k in enumerate(INT_COLUMNS)}

REJECT_REASONS = ("", "exceeds max_model_len", "exceeds KV capacity", "exceeds scheduler token budget",
                  "could not be scheduled")


def _step_schema():
    import pyarrow as pa

    types = {np.int64: pa.int64(), np.int32: pa.int32(), np.float64: pa.float64()}
    return pa.schema([("replica", pa.int16())] + [(k, types[t]) for k, t in STEP_COLUMNS.items()]
                     + [(k, pa.int64()) for k in FREE_COLUMNS])


class _Growable:
    """A 1-D numpy array that grows by half again when full."""

    __slots__ = ("a", "n")

    def __init__(self, dtype, capacity: int = 1 << 14) -> None:
        self.a = np.empty(capacity, dtype=dtype)
        self.n = 0

    def reserve(self, k: int) -> np.ndarray:
        need = self.n + k
        if need > self.a.shape[0]:
            cap = self.a.shape[0]
            while cap < need:
                cap += cap // 2 + 1
            grown = np.empty(cap, dtype=self.a.dtype)
            grown[:self.n] = self.a[:self.n]
            self.a = grown
        return self.a

    def view(self) -> np.ndarray:
        return self.a[:self.n]


class StepLog:
    """One row per engine step of one replica.

    Rows are buffered in a chunk of ``CHUNK`` rows (times, and integer counts and bytes) and written
    to ``path`` (Parquet) when the chunk fills. End times of all steps stay in memory (``end_s``).
    Buffers are zero-filled: a column a writer leaves out reads 0. With ``enabled=False`` only end
    times and the busy time are kept.

    Invariants: ``n`` steps logged; buffer row ``r`` is step ``base + r``; steps ``< base`` are on disk.
    """

    CHUNK = 1 << 16

    def __init__(self, enabled: bool, replica: int, path: Path | None,
                 capacity_bytes: tuple[int, int, int]) -> None:
        self.enabled = enabled
        self.capacity_bytes = capacity_bytes      # KV capacity of (HBM, DRAM, NVMe), whole replica
        self.replica = replica
        self.path = path
        self.n = 0
        self.base = 0
        self.ends = _Growable(np.float64)
        self.f = np.zeros((self.CHUNK, 2))
        self.i = np.zeros((self.CHUNK, len(INT_COLUMNS)), dtype=np.int64) if enabled else np.zeros((0, 0), np.int64)
        self.busy_s = 0.0
        self._writer = None
        # summary aggregates over flushed rows
        self.agg = {"rows": 0, "busy_s": 0.0, "active_weighted": 0.0, "frag_weighted": 0.0,
                    "peak_active": 0, "peak_cached": 0, "peak_dram": 0, "peak_nvme": 0,
                    "num_seqs": 0, "tokens": 0, "launches": 0, "syncs": 0}

    @property
    def end_s(self) -> np.ndarray:
        return self.ends.view()

    def _room(self, k: int) -> int:
        """Buffer row where ``k`` more rows start, flushing the buffer first if they do not fit."""
        r = self.n - self.base
        if r + k > self.f.shape[0]:
            self.flush()
            r = 0
            if k > self.f.shape[0]:
                self.f = np.zeros((k, 2))
                if self.enabled:
                    self.i = np.zeros((k, len(INT_COLUMNS)), dtype=np.int64)
        return r

    def append(self, start_s: float, duration_s: float, end_s: float, row: tuple) -> None:
        """One step. ``row`` holds INT_COLUMNS in order."""
        r = self._room(1)
        self.f[r, 0] = start_s
        self.f[r, 1] = duration_s
        if self.enabled:
            self.i[r] = row
        ends = self.ends.reserve(1)
        ends[self.n] = end_s
        self.ends.n = self.n = self.n + 1
        self.busy_s += duration_s

    def reserve_block(self, k: int) -> int:
        """Buffer row where ``k`` steps written by a compiled kernel start; end times go to
        ``self.ends.a`` from index ``self.n``; the caller then calls :meth:`commit_block`."""
        r = self._room(k)
        self.ends.reserve(k)
        return r

    def commit_block(self, k: int, busy_s: float) -> None:
        self.ends.n = self.n = self.n + k
        self.busy_s += busy_s

    # ------------------------------------------------------------------ output
    def flush(self) -> None:
        """Write the buffered rows to ``path`` and reset the buffer."""
        m = self.n - self.base
        if m == 0:
            return
        if self.enabled:
            import pyarrow as pa
            import pyarrow.parquet as pq

            f, ib = self.f[:m], self.i[:m]
            dur = f[:, 1]
            col = {k: ib[:, j] for j, k in enumerate(INT_COLUMNS)}
            a = self.agg
            a["rows"] += m
            a["busy_s"] += float(dur.sum())
            a["active_weighted"] += float((col["hbm_active_bytes"] * dur).sum())
            a["frag_weighted"] += float((col["frag_tokens"] * dur).sum())
            a["peak_active"] = max(a["peak_active"], int(col["hbm_active_bytes"].max()))
            a["peak_cached"] = max(a["peak_cached"], int(col["hbm_cached_bytes"].max()))
            a["peak_dram"] = max(a["peak_dram"], int(col["dram_used_bytes"].max()))
            a["peak_nvme"] = max(a["peak_nvme"], int(col["nvme_used_bytes"].max()))
            for k in ("num_seqs", "tokens", "launches", "syncs"):
                a[k] += int(col[k].sum())
            schema = _step_schema()
            arrays = [pa.array(np.full(m, self.replica, np.int16)), pa.array(np.arange(self.base, self.n)),
                      pa.array(f[:, 0].copy()), pa.array(dur.copy())]
            arrays += [pa.array(col[k].astype(STEP_COLUMNS[k])) for k in INT_COLUMNS]
            hbm_cap, dram_cap, nvme_cap = self.capacity_bytes
            arrays += [pa.array(hbm_cap - col["hbm_active_bytes"] - col["hbm_cached_bytes"]),
                       pa.array(dram_cap - col["dram_used_bytes"]), pa.array(nvme_cap - col["nvme_used_bytes"])]
            if self._writer is None:
                # a temporary spill file, re-encoded (zstd) when merged into steps.parquet
                self._writer = pq.ParquetWriter(self.path, schema, compression="none")
            self._writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=self.CHUNK)
            self.f[:m] = 0.0
            self.i[:m] = 0
        self.base = self.n

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@numba.njit(cache=True, nogil=True)
def fill_run_rows(f, ib, ends_out, row0, g0, c, upto, start, ends, durations, allocs, free0, cached0,
                  active0, held0, inflight, nc_sum, B, bs, bpb, dram, nvme, launches, syncs):
    """Write steps c..upto-1 of a decode run: times into ``f`` at buffer row ``row0``, end times into
    ``ends_out`` at step index ``g0``, and (when ``ib`` has rows) the KV state at each step's start
    after its allocation (allocations take free blocks first, then evict cached ones). Integer columns
    follow INT_COLUMNS: num_seqs, prefill_seqs, prefill_tokens, decode_seqs, tokens, hbm_active,
    hbm_cached, hbm_locked, dram_used, nvme_used, frag_tokens, launches, syncs, preemptions.
    Returns the busy time of those steps."""
    cum = 0
    for s in range(c):
        cum += allocs[s]
    busy = 0.0
    for j in range(upto - c):
        s = c + j
        r = row0 + j
        f[r, 0] = start if s == 0 else ends[s - 1]
        f[r, 1] = durations[s]
        ends_out[g0 + j] = ends[s]
        busy += durations[s]
        if ib.shape[0] == 0:
            continue
        cum += allocs[s]
        ev = cum - free0
        if ev < 0:
            ev = 0
        act = active0 + cum
        lk = held0 + cum + inflight
        ib[r, 0] = B
        ib[r, 3] = B
        ib[r, 4] = B
        ib[r, 5] = act * bpb
        ib[r, 6] = (cached0 - ev) * bpb
        ib[r, 7] = (lk if lk < act else act) * bpb
        ib[r, 8] = dram
        ib[r, 9] = nvme
        ib[r, 10] = (held0 + cum) * bs - (nc_sum + B * (s + 1))
        ib[r, 11] = launches
        ib[r, 12] = syncs
    return busy


class TokenLog:
    """Token emission of finished requests of one replica: runs of consecutive steps, each (request
    index, first step, last step), appended when a request finishes."""

    def __init__(self) -> None:
        self.req = _Growable(np.int32)      # request index (traces are far below 2**31 requests)
        self.first = _Growable(np.uint32)   # step index within the replica (below 2**32 steps)
        self.last = _Growable(np.uint32)

    def add(self, req: Request) -> int:
        """Append a finished request's runs; returns where they start (they stay contiguous)."""
        k = len(req.seg_start)
        n = self.req.n
        if not k:
            return n
        self.req.reserve(k)[n:n + k] = req.idx
        self.first.reserve(k)[n:n + k] = req.seg_start
        self.last.reserve(k)[n:n + k] = req.seg_end
        self.req.n = self.first.n = self.last.n = n + k
        return n


# ------------------------------------------------------------------------------ inter-token times
_NB = 1 << 14          # histogram bins for exact global percentiles
_LO, _HI = 1e-9, 1e5   # seconds; gaps at or below _LO share bin 0


@numba.njit(cache=True, nogil=True)
def _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, step_end, base, extra, buf):
    """The inter-token gaps of request i into ``buf`` (grown as needed); returns (buf, count)."""
    a = seg_off[i]
    b = a + seg_cnt[i]
    count = 0
    for s in range(a, b):
        count += np.int64(seg_last[s]) - np.int64(seg_first[s]) + 1
    need = count + extra[i]
    if need > buf.shape[0]:
        buf = np.empty(need * 2)
    prev = 0.0
    k = 0
    for s in range(a, b):
        for st in range(np.int64(seg_first[s]), np.int64(seg_last[s]) + 1):
            t = step_end[base + st]
            if k > 0:
                buf[k - 1] = t - prev
            prev = t
            k += 1
    ng = k - 1 if k > 0 else 0
    for j in range(extra[i]):
        buf[ng + j] = 0.0
    return buf, ng + extra[i]


@numba.njit(cache=True, nogil=True)
def _bin(x):
    if x <= _LO:
        return 0
    b = int((np.log(x) - np.log(_LO)) / (np.log(_HI) - np.log(_LO)) * (_NB - 2)) + 1
    return min(max(b, 1), _NB - 1)


@numba.njit(cache=True, nogil=True)
def itl_statistics(seg_off, seg_cnt, seg_first, seg_last, step_end, offsets, replica, extra, done, qs, out):
    """Per request (finished ones): ``out[i]`` = (mean, p50, p99, max) of its inter-token gaps.
    Globally over all gaps: (count, mean, max, exact percentiles ``qs``) by two-pass histogram
    selection with numpy's default linear interpolation."""
    n = seg_off.shape[0]
    hist = np.zeros(_NB, np.int64)
    buf = np.empty(1024)
    total = 0
    ssum = 0.0
    gmax = 0.0
    for i in range(n):
        out[i, :] = np.nan
        if not done[i] or replica[i] < 0:
            continue
        buf, m = _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, step_end, offsets[replica[i]], extra, buf)
        if m == 0:
            continue
        g = buf[:m]
        out[i, 0] = g.mean()
        out[i, 1] = np.percentile(g, 50.0)
        out[i, 2] = np.percentile(g, 99.0)
        out[i, 3] = g.max()
        for j in range(m):
            hist[_bin(g[j])] += 1
            ssum += g[j]
            if g[j] > gmax:
                gmax = g[j]
        total += m
    res = np.full(qs.shape[0], np.nan)
    if total == 0:
        return total, np.nan, np.nan, res
    # ranks needed: floor(pos) and floor(pos) + 1 for each quantile
    cum = np.cumsum(hist)
    lo_rank = np.empty(qs.shape[0], np.int64)
    want = np.zeros(_NB, np.bool_)
    for k in range(qs.shape[0]):
        pos = qs[k] / 100.0 * (total - 1)
        r0 = int(np.floor(pos))
        lo_rank[k] = r0
        for r in (r0, min(r0 + 1, total - 1)):
            want[np.searchsorted(cum, r, side="right")] = True
    # second pass: collect the values in the wanted bins
    kept = 0
    for b in range(_NB):
        if want[b]:
            kept += hist[b]
    vals = np.empty(kept)
    v = 0
    for i in range(n):
        if not done[i] or replica[i] < 0:
            continue
        buf, m = _gaps_of(i, seg_off, seg_cnt, seg_first, seg_last, step_end, offsets[replica[i]], extra, buf)
        for j in range(m):
            b = _bin(buf[j])
            if want[b]:
                vals[v] = buf[j]
                v += 1
    # ascending values: bins are monotone in value, so lower wanted bins come first
    vals = np.sort(vals)
    for k in range(qs.shape[0]):
        pos = qs[k] / 100.0 * (total - 1)
        r0 = lo_rank[k]
        r1 = min(r0 + 1, total - 1)
        got0 = np.nan
        got1 = np.nan
        for r, which in ((r0, 0), (r1, 1)):
            b = np.searchsorted(cum, r, side="right")
            before = cum[b - 1] if b > 0 else 0
            # index of rank r among the collected values: values of lower wanted bins come first
            idx = 0
            for bb in range(b):
                if want[bb]:
                    idx += hist[bb]
            x = vals[idx + (r - before)]
            if which == 0:
                got0 = x
            else:
                got1 = x
        t = pos - r0
        res[k] = got0 + t * (got1 - got0)
    return total, ssum / total, gmax, res


class RequestLog:
    """Preallocated per-request columns, filled when a request finishes or is rejected."""

    def __init__(self, n: int) -> None:
        self.n = n
        f = lambda: np.full(n, np.nan)  # noqa: E731
        self.replica = np.full(n, -1, dtype=np.int16)
        self.status = np.zeros(n, dtype=np.int8)       # 0 pending, 1 finished, 2 rejected
        self.reason = np.zeros(n, dtype=np.int8)
        self.first_scheduled_s, self.first_token_s, self.finish_s = f(), f(), f()
        self.generated = np.zeros(n, dtype=np.int64)
        self.extra_tokens = np.zeros(n, dtype=np.int64)
        self.seg_off = np.zeros(n, dtype=np.int64)     # where the request's token runs start in its
        self.seg_cnt = np.zeros(n, dtype=np.int32)     # replica's token log, and how many there are
        self.preemptions = np.zeros(n, dtype=np.int32)
        self.swaps = np.zeros(n, dtype=np.int32)
        self.prefix_hit_tokens = np.zeros(n, dtype=np.int64)
        self.num_done = 0

    def finish(self, req: Request) -> None:
        i = req.idx
        if self.status[i] != 0:
            raise RuntimeError(f"request {req.req_id} finished twice")
        if req.num_generated != req.output_tokens:
            raise RuntimeError(f"request {req.req_id} finished with {req.num_generated} of "
                               f"{req.output_tokens} output tokens")
        self.status[i] = 1
        self.replica[i] = req.replica
        self.first_scheduled_s[i] = req.first_scheduled_s
        self.first_token_s[i] = req.first_token_s
        self.finish_s[i] = req.finish_s
        self.generated[i] = req.num_generated
        self.extra_tokens[i] = req.extra_tokens
        self.preemptions[i] = req.num_preemptions
        self.swaps[i] = req.num_swaps
        self.prefix_hit_tokens[i] = req.total_prefix_hit
        self.num_done += 1

    def reject(self, req: Request, reason: int, now: float) -> None:
        i = req.idx
        if self.status[i] != 0:
            raise RuntimeError(f"request {req.req_id} rejected after it was already done")
        self.status[i] = 2
        self.reason[i] = reason
        self.replica[i] = req.replica
        self.finish_s[i] = now
        self.generated[i] = req.num_generated
        req.state = RequestState.REJECTED
        self.num_done += 1


def _pct(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    p = np.percentile(x, [50, 90, 95, 99])
    return {"mean": float(x.mean()), "p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]),
            "p99": float(p[3]), "max": float(x.max())}


@dataclass
class Results:
    """Everything a run produced; :meth:`write` puts it on disk. ``steps`` is read from the step
    files on first use (they can be large)."""

    summary: dict
    requests: "object"       # pandas DataFrame
    metadata: dict           # config, hash, cost table identity, trace identity
    timing: dict             # wall-clock figures (not part of the deterministic results)
    step_files: list = field(default_factory=list)
    _steps: "object" = None

    @property
    def steps(self):
        """Per-step log as a DataFrame (replicas in order)."""
        if self._steps is None:
            import pandas as pd
            import pyarrow.parquet as pq

            frames = [pq.read_table(p).to_pandas() for p in self.step_files if Path(p).exists()]
            self._steps = (pd.concat(frames, ignore_index=True) if frames else
                           _step_schema().empty_table().to_pandas())
        return self._steps

    def write(self, out_dir: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {f"tiersim.{k}": json.dumps(v, sort_keys=True) for k, v in self.metadata.items()}
        table = pa.Table.from_pandas(self.requests, preserve_index=False)
        table = table.replace_schema_metadata(meta)
        tmp = out / ".requests.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(out / "requests.parquet")
        # steps: the replicas' files, row group by row group, into one file
        schema = _step_schema().with_metadata(meta)
        tmp = out / ".steps.parquet.tmp"
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for p in self.step_files:
                if not Path(p).exists():
                    continue
                f = pq.ParquetFile(p)
                for g in range(f.num_row_groups):
                    writer.write_table(f.read_row_group(g).replace_schema_metadata(meta),
                                       row_group_size=StepLog.CHUNK)
        tmp.replace(out / "steps.parquet")
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        (out / "timing.json").write_text(json.dumps(self.timing, indent=2, sort_keys=True) + "\n")
        return out


def spill_dir() -> Path:
    """A temporary directory for step files, removed when the process exits or the results that use
    it are garbage-collected."""
    return Path(tempfile.mkdtemp(prefix="tiersim-steps-"))


def build_results(*, requests: RequestLog, trace, step_logs: list[StepLog], token_logs: list[TokenLog],
                  metadata: dict, kv_info: dict, link_bytes: dict, engine_counts: dict, cost_notes: dict,
                  slo_ttft_s: float, slo_tpot_s: float, timing: dict, spill: Path | None = None) -> Results:
    import pandas as pd

    n = requests.n
    arrival = trace.arrival_s
    for log in step_logs:
        log.close()
    # ---- inter-token statistics from the token logs
    offsets = np.zeros(len(step_logs) + 1, dtype=np.int64)
    for r, log in enumerate(step_logs):
        offsets[r + 1] = offsets[r] + log.n
    step_end = np.concatenate([log.end_s for log in step_logs]) if step_logs else np.empty(0)
    # one replica: its token log as is; several: concatenated, offsets shifted by each replica's base
    if len(token_logs) == 1:
        seg_first, seg_last, seg_off = token_logs[0].first.view(), token_logs[0].last.view(), requests.seg_off
    else:
        bases = np.zeros(len(token_logs) + 1, dtype=np.int64)
        for r, t in enumerate(token_logs):
            bases[r + 1] = bases[r] + t.req.n
        seg_first = np.concatenate([t.first.view() for t in token_logs]) if token_logs else np.empty(0, np.uint32)
        seg_last = np.concatenate([t.last.view() for t in token_logs]) if token_logs else np.empty(0, np.uint32)
        seg_off = requests.seg_off + bases[np.maximum(requests.replica, 0)]
    done = requests.status == 1
    itl = np.empty((n, 4))
    qs = np.array([50.0, 90.0, 95.0, 99.0])
    n_gaps, gap_mean, gap_max, gap_q = itl_statistics(
        seg_off, requests.seg_cnt, seg_first, seg_last, step_end, offsets, requests.replica.astype(np.int64),
        requests.extra_tokens, done, qs, itl)
    itl_summary = ({"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
                   if n_gaps == 0 else
                   {"mean": float(gap_mean), "p50": float(gap_q[0]), "p90": float(gap_q[1]),
                    "p95": float(gap_q[2]), "p99": float(gap_q[3]), "max": float(gap_max)})

    ttft = requests.first_token_s - arrival
    e2e = requests.finish_s - arrival
    queue = requests.first_scheduled_s - arrival
    tpot = np.where(requests.generated > 1,
                    (requests.finish_s - requests.first_token_s) / np.maximum(requests.generated - 1, 1), np.nan)
    for a in (ttft, e2e, queue, tpot):
        a[~done] = np.nan
    reqs = pd.DataFrame({
        "idx": np.arange(n, dtype=np.int64), "request_id": trace.request_id,
        "replica": requests.replica,
        "status": pd.Categorical.from_codes(requests.status, ["pending", "finished", "rejected"]),
        "reject_reason": pd.Categorical.from_codes(requests.reason, list(REJECT_REASONS)),
        "arrival_s": arrival, "first_scheduled_s": requests.first_scheduled_s,
        "first_token_s": requests.first_token_s, "finish_s": requests.finish_s,
        "ttft_s": ttft, "itl_mean_s": itl[:, 0], "itl_p50_s": itl[:, 1], "itl_p99_s": itl[:, 2],
        "itl_max_s": itl[:, 3], "tpot_s": tpot, "e2e_s": e2e, "queueing_s": queue,
        "prompt_tokens": trace.prompt_tokens, "output_tokens": trace.output_tokens,
        "generated_tokens": requests.generated, "preemptions": requests.preemptions,
        "swaps": requests.swaps, "prefix_hit_tokens": requests.prefix_hit_tokens,
    }, copy=False)

    # ---- summary
    n_done = int(done.sum())
    t0 = float(arrival.min()) if n else 0.0
    t1 = float(np.nanmax(requests.finish_s[done])) if n_done else t0
    span = max(t1 - t0, 1e-12)
    good = done & (ttft <= slo_ttft_s) & ((tpot <= slo_tpot_s) | (requests.generated <= 1))
    rejected = requests.status == 2
    by_reason = {REJECT_REASONS[k]: int((requests.reason[rejected] == k).sum())
                 for k in np.unique(requests.reason[rejected])}
    out_tokens = int(requests.generated[done].sum())
    prompt_tokens = int(trace.prompt_tokens[done].sum())
    busy = sum(log.busy_s for log in step_logs)
    num_steps = int(sum(log.n for log in step_logs))
    summary = {
        **metadata,
        "requests": {"total": n, "finished": n_done, "rejected": int(rejected.sum()),
                     "rejected_by_reason": by_reason, "pending": int((requests.status == 0).sum())},
        "time": {"first_arrival_s": t0, "last_finish_s": t1, "makespan_s": span},
        "ttft_s": _pct(ttft), "itl_s": itl_summary, "tpot_s": _pct(tpot), "e2e_s": _pct(e2e),
        "queueing_s": _pct(queue),
        "throughput": {"requests_per_s": n_done / span, "output_tokens_per_s": out_tokens / span,
                       "prompt_tokens_per_s": prompt_tokens / span,
                       "total_tokens_per_s": (out_tokens + prompt_tokens) / span},
        "goodput": {"slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
                    "requests_per_s": int(good.sum()) / span,
                    "fraction": int(good.sum()) / n if n else 0.0},
        "kv": kv_info,
        "links": link_bytes,
        "engine": {**engine_counts, "steps": num_steps,
                   "busy_s": busy, "utilization": busy / (span * max(len(step_logs), 1)) if busy else None,
                   "preemptions": int(requests.preemptions.sum())},
        "costs": cost_notes,
    }
    if step_logs and step_logs[0].enabled and num_steps:
        aggs = [log.agg for log in step_logs]
        w = sum(a["busy_s"] for a in aggs)
        rows = sum(a["rows"] for a in aggs)
        summary["kv"].update({
            "hbm_peak_active_bytes": max(a["peak_active"] for a in aggs),
            "hbm_mean_active_bytes": sum(a["active_weighted"] for a in aggs) / w if w > 0 else 0.0,
            "hbm_peak_cached_bytes": max(a["peak_cached"] for a in aggs),
            "dram_peak_used_bytes": max(a["peak_dram"] for a in aggs),
            "nvme_peak_used_bytes": max(a["peak_nvme"] for a in aggs),
            "fragmentation_tokens_mean": sum(a["frag_weighted"] for a in aggs) / w if w > 0 else 0.0,
        })
        summary["engine"]["mean_batch_seqs"] = sum(a["num_seqs"] for a in aggs) / rows
        summary["engine"]["mean_batch_tokens"] = sum(a["tokens"] for a in aggs) / rows
        summary["engine"]["launches"] = sum(a["launches"] for a in aggs)
        summary["engine"]["syncs"] = sum(a["syncs"] for a in aggs)
    res = Results(summary=summary, requests=reqs, metadata=metadata, timing=timing,
                  step_files=[str(log.path) for log in step_logs if log.enabled and log.path])
    if spill is not None:
        weakref.finalize(res, shutil.rmtree, str(spill), True)
    return res
