"""Metrics: preallocated per-request columns, a columnar per-step log per replica, and the summary.

Token times are not logged per token. Each request keeps the runs of consecutive engine steps in
which it emitted a token (``Request.seg_start/seg_end``), and each replica logs every step's end time;
at the end, one compiled pass turns those into per-request inter-token statistics and the global
inter-token distribution. Memory stays O(steps + requests), not O(tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
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

REJECT_REASONS = ("", "exceeds max_model_len", "exceeds KV capacity", "exceeds scheduler token budget",
                  "could not be scheduled")


FLOAT_COLUMNS = ("start_s", "duration_s", "end_s")
INT_COLUMNS = tuple(k for k in STEP_COLUMNS if k not in FLOAT_COLUMNS)     # "step" first


class StepLog:
    """One row per engine step of one replica, in two preallocated 2-D buffers (times; counts and
    bytes) that grow by doubling. End times are always kept (token times need them); the other columns
    only when the step log is enabled. Buffers are zero-filled: a column a writer leaves out reads 0."""

    def __init__(self, enabled: bool, capacity: int = 1 << 14) -> None:
        self.enabled = enabled
        self.n = 0
        self.cap = capacity
        self.f = np.zeros((capacity, 3), dtype=np.float64)
        self.i = np.zeros((capacity, len(INT_COLUMNS)), dtype=np.int64) if enabled else np.zeros((0, 0), np.int64)

    @property
    def end_s(self) -> np.ndarray:
        return self.f[:, 2]

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        if need <= self.cap:
            return
        cap = self.cap
        while cap < need:
            cap *= 2
        f = np.zeros((cap, 3))
        f[:self.n] = self.f[:self.n]
        self.f = f
        if self.enabled:
            i = np.zeros((cap, self.i.shape[1]), dtype=np.int64)
            i[:self.n] = self.i[:self.n]
            self.i = i
        self.cap = cap

    def append(self, start_s: float, duration_s: float, end_s: float, row: tuple) -> None:
        """One step. ``row`` holds the integer columns after ``step``, in STEP_COLUMNS order."""
        if self.n == self.cap:
            self._reserve(1)
        i = self.n
        self.f[i] = (start_s, duration_s, end_s)
        if self.enabled:
            self.i[i] = (i, *row)
        self.n = i + 1

    def reserve_block(self, k: int) -> int:
        """Room for ``k`` more rows; returns the first row's index (the caller fills, then commits)."""
        self._reserve(k)
        return self.n

    def extend_ends(self, ends: np.ndarray) -> None:
        """Steps known only by their end times (the step log is off)."""
        k = ends.shape[0]
        self._reserve(k)
        self.f[self.n:self.n + k, 2] = ends
        self.n += k

    def column(self, name: str) -> np.ndarray:
        if name in FLOAT_COLUMNS:
            return self.f[:self.n, FLOAT_COLUMNS.index(name)]
        return self.i[:self.n, INT_COLUMNS.index(name)]

    def frame(self, replica: int):
        import pandas as pd

        data = {"replica": np.full(self.n, replica, dtype=np.int16)}
        for k, t in STEP_COLUMNS.items():
            if k != "end_s":
                data[k] = self.column(k).astype(t)
        return pd.DataFrame(data)


@numba.njit(cache=True, nogil=True)
def fill_run_rows(f, ib, row0, c, upto, start, ends, durations, allocs, free0, cached0, active0, held0,
                  inflight, nc_sum, B, bs, bpb, dram, nvme, launches, syncs):
    """Write steps c..upto-1 of a decode run into the log buffers at ``row0``: times, and the KV state
    at each step's start after its allocation (allocations take free blocks first, then evict cached
    ones). Integer columns follow INT_COLUMNS: step, num_seqs, prefill_seqs, prefill_tokens, decode_seqs,
    tokens, hbm_active, hbm_cached, hbm_locked, dram_used, nvme_used, frag_tokens, launches, syncs,
    preemptions."""
    cum = 0
    for s in range(c):
        cum += allocs[s]
    for j in range(upto - c):
        s = c + j
        r = row0 + j
        f[r, 0] = start if s == 0 else ends[s - 1]
        f[r, 1] = durations[s]
        f[r, 2] = ends[s]
        if ib.shape[0] == 0:
            continue
        cum += allocs[s]
        ev = cum - free0
        if ev < 0:
            ev = 0
        act = active0 + cum
        lk = held0 + cum + inflight
        ib[r, 0] = r
        ib[r, 1] = B
        ib[r, 4] = B
        ib[r, 5] = B
        ib[r, 6] = act * bpb
        ib[r, 7] = (cached0 - ev) * bpb
        ib[r, 8] = (lk if lk < act else act) * bpb
        ib[r, 9] = dram
        ib[r, 10] = nvme
        ib[r, 11] = (held0 + cum) * bs - (nc_sum + B * (s + 1))
        ib[r, 12] = launches
        ib[r, 13] = syncs


@numba.njit(cache=True)
def _itl_stats(seg_ptr, seg_start, seg_end, step_end, offsets, replica, extra, out, gaps_out):
    """Per request: token times are the end times of its token-emitting steps, plus ``extra[i]``
    tokens that came out together with others (zero gaps); returns the number of gaps written to
    ``gaps_out``. ``out[i]`` = (mean, p50, p99, max) of request i's gaps (NaN if none)."""
    n = seg_ptr.shape[0] - 1
    g = 0
    buf = np.empty(1024)
    for i in range(n):
        a, b = seg_ptr[i], seg_ptr[i + 1]
        if a == b or replica[i] < 0:
            out[i, :] = np.nan
            continue
        base = offsets[replica[i]]
        count = 0
        for s in range(a, b):
            count += seg_end[s] - seg_start[s] + 1
        if count > buf.shape[0]:
            buf = np.empty(count * 2)
        k = 0
        for s in range(a, b):
            for st in range(seg_start[s], seg_end[s] + 1):
                buf[k] = step_end[base + st]
                k += 1
        e = extra[i]
        if k + e < 2:
            out[i, :] = np.nan
            continue
        gaps = np.zeros(k - 1 + e)
        for j in range(k - 1):
            gaps[j] = buf[j + 1] - buf[j]
        for j in range(k - 1 + e):
            gaps_out[g] = gaps[j]
            g += 1
        out[i, 0] = gaps.mean()
        out[i, 1] = np.percentile(gaps, 50.0)
        out[i, 2] = np.percentile(gaps, 99.0)
        out[i, 3] = gaps.max()
    return g


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
        self.preemptions = np.zeros(n, dtype=np.int32)
        self.swaps = np.zeros(n, dtype=np.int32)
        self.prefix_hit_tokens = np.zeros(n, dtype=np.int64)
        self.requests: list[Request | None] = [None] * n
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
        self.preemptions[i] = req.num_preemptions
        self.swaps[i] = req.num_swaps
        self.prefix_hit_tokens[i] = req.total_prefix_hit
        self.requests[i] = req
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
        self.requests[i] = req
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
    """Everything a run produced; :meth:`write` puts it on disk."""

    summary: dict
    requests: "object"       # pandas DataFrame
    steps: "object"          # pandas DataFrame (empty when the step log is off)
    metadata: dict           # config, hash, cost table identity, trace identity
    timing: dict             # wall-clock figures (not part of the deterministic results)

    def write(self, out_dir: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {f"tiersim.{k}": json.dumps(v, sort_keys=True) for k, v in self.metadata.items()}
        for name, frame in (("requests", self.requests), ("steps", self.steps)):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata({**{k: v for k, v in (table.schema.metadata or {}).items()
                                                      if k != b"pandas"}, **meta})
            tmp = out / f".{name}.parquet.tmp"
            pq.write_table(table, tmp, compression="zstd")
            tmp.replace(out / f"{name}.parquet")
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        (out / "timing.json").write_text(json.dumps(self.timing, indent=2, sort_keys=True) + "\n")
        return out


def build_results(*, requests: RequestLog, trace, step_logs: list[StepLog], metadata: dict,
                  kv_info: dict, link_bytes: dict, engine_counts: dict, cost_notes: dict,
                  slo_ttft_s: float, slo_tpot_s: float, timing: dict) -> Results:
    import pandas as pd

    n = requests.n
    arrival = trace.arrival_s
    # ---- inter-token statistics from token-step segments
    seg_ptr = np.zeros(n + 1, dtype=np.int64)
    starts: list[int] = []
    ends: list[int] = []
    for i, req in enumerate(requests.requests):
        if req is not None and requests.status[i] == 1:
            starts.extend(req.seg_start)
            ends.extend(req.seg_end)
        seg_ptr[i + 1] = len(starts)
    offsets = np.zeros(len(step_logs) + 1, dtype=np.int64)
    for r, log in enumerate(step_logs):
        offsets[r + 1] = offsets[r] + log.n
    step_end = np.concatenate([log.column("end_s") for log in step_logs]) if step_logs else np.empty(0)
    itl = np.full((n, 4), np.nan)
    total_tokens = int(requests.generated.sum())
    gaps = np.empty(max(total_tokens, 1))
    extra = np.array([r.extra_tokens if r is not None else 0 for r in requests.requests], dtype=np.int64)
    ng = _itl_stats(seg_ptr, np.asarray(starts, np.int64), np.asarray(ends, np.int64), step_end,
                    offsets, requests.replica.astype(np.int64), extra, itl, gaps)
    gaps = gaps[:ng]

    done = requests.status == 1
    ttft = requests.first_token_s - arrival
    e2e = requests.finish_s - arrival
    queue = requests.first_scheduled_s - arrival
    tpot = np.where(requests.generated > 1,
                    (requests.finish_s - requests.first_token_s) / np.maximum(requests.generated - 1, 1), np.nan)
    for a in (ttft, e2e, queue, tpot):
        a[~done] = np.nan
    reqs = pd.DataFrame({
        "idx": np.arange(n, dtype=np.int64), "request_id": trace.request_id,
        "replica": requests.replica, "status": np.array(["pending", "finished", "rejected"])[requests.status],
        "reject_reason": np.array(REJECT_REASONS)[requests.reason],
        "arrival_s": arrival, "first_scheduled_s": requests.first_scheduled_s,
        "first_token_s": requests.first_token_s, "finish_s": requests.finish_s,
        "ttft_s": ttft, "itl_mean_s": itl[:, 0], "itl_p50_s": itl[:, 1], "itl_p99_s": itl[:, 2],
        "itl_max_s": itl[:, 3], "tpot_s": tpot, "e2e_s": e2e, "queueing_s": queue,
        "prompt_tokens": trace.prompt_tokens, "output_tokens": trace.output_tokens,
        "generated_tokens": requests.generated, "preemptions": requests.preemptions,
        "swaps": requests.swaps, "prefix_hit_tokens": requests.prefix_hit_tokens,
    })
    steps = pd.concat([log.frame(r) for r, log in enumerate(step_logs)], ignore_index=True) \
        if step_logs and step_logs[0].enabled else pd.DataFrame(columns=["replica", *STEP_COLUMNS])

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
    busy = sum(float(log.column("duration_s").sum()) for log in step_logs if log.enabled)
    num_steps = int(sum(log.n for log in step_logs))
    summary = {
        **metadata,
        "requests": {"total": n, "finished": n_done, "rejected": int(rejected.sum()),
                     "rejected_by_reason": by_reason, "pending": int((requests.status == 0).sum())},
        "time": {"first_arrival_s": t0, "last_finish_s": t1, "makespan_s": span},
        "ttft_s": _pct(ttft), "itl_s": _pct(gaps), "tpot_s": _pct(tpot), "e2e_s": _pct(e2e),
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
        c = steps
        w = c["duration_s"].to_numpy()
        alloc = c["hbm_active_bytes"].to_numpy().astype(float)
        summary["kv"].update({
            "hbm_peak_active_bytes": int(c["hbm_active_bytes"].max()),
            "hbm_mean_active_bytes": float(np.average(alloc, weights=w)) if w.sum() > 0 else 0.0,
            "hbm_peak_cached_bytes": int(c["hbm_cached_bytes"].max()),
            "dram_peak_used_bytes": int(c["dram_used_bytes"].max()),
            "nvme_peak_used_bytes": int(c["nvme_used_bytes"].max()),
            "fragmentation_tokens_mean": float(np.average(c["frag_tokens"], weights=w)) if w.sum() > 0 else 0.0,
        })
        summary["engine"]["mean_batch_seqs"] = float(c["num_seqs"].mean())
        summary["engine"]["mean_batch_tokens"] = float(c["tokens"].mean())
        summary["engine"]["launches"] = int(c["launches"].sum())
        summary["engine"]["syncs"] = int(c["syncs"].sum())
    return Results(summary=summary, requests=reqs, steps=steps, metadata=metadata, timing=timing)
