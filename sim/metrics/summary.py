"""The run summary and the results object: percentiles, throughput, goodput, KV and link figures,
the per-request table, and writing everything to a results directory."""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.metrics.columns import step_schema
from sim.metrics.requests import REJECT_REASONS, RequestLog
from sim.metrics.step_log import StepLog
from sim.metrics.tokens import TokenLog, itl_statistics


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
    transfers: "object" = None   # pandas DataFrame: one row per transfer on a link (sim.memory.transfers)
    _steps: "object" = None

    @property
    def steps(self):
        """Per-step log as a DataFrame (replicas in order)."""
        if self._steps is None:
            import pandas as pd
            import pyarrow.parquet as pq

            frames = [pq.read_table(p).to_pandas() for p in self.step_files if Path(p).exists()]
            self._steps = (pd.concat(frames, ignore_index=True) if frames else
                           step_schema().empty_table().to_pandas())
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
        schema = step_schema().with_metadata(meta)
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
        if self.transfers is not None:
            tmp = out / ".transfers.parquet.tmp"
            t = pa.Table.from_pandas(self.transfers, preserve_index=False).replace_schema_metadata(meta)
            pq.write_table(t, tmp, compression="zstd")
            tmp.replace(out / "transfers.parquet")
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        (out / "timing.json").write_text(json.dumps(self.timing, indent=2, sort_keys=True) + "\n")
        return out


def link_timeline(transfers, t0: float, t1: float, windows: int = 60) -> dict:
    """Utilisation of each link kind over simulated time: the busy fraction of each of ``windows``
    equal windows of [t0, t1], summed over replicas (a link of every replica busy reads
    ``num_replicas``); only links that carried anything."""
    span = max(t1 - t0, 1e-12)
    edges = t0 + span * np.arange(windows + 1) / windows
    out: dict = {"window_s": span / windows, "start_s": t0}
    if transfers is None or not len(transfers):
        return out
    for link, g in transfers.groupby("link", sort=True):
        s, e = g["start_s"].to_numpy(), g["end_s"].to_numpy()
        busy = np.zeros(windows)
        for i in range(0, len(s), 8192):          # chunks keep the (transfers x windows) array small
            lo = np.maximum(s[i:i + 8192, None], edges[None, :-1])
            hi = np.minimum(e[i:i + 8192, None], edges[None, 1:])
            busy += np.clip(hi - lo, 0.0, None).sum(axis=0)
        out[link] = [round(float(b) / (span / windows), 6) for b in busy]
    return out


def spill_dir() -> Path:
    """A temporary directory for step files, removed when the process exits or the results that use
    it are garbage-collected."""
    return Path(tempfile.mkdtemp(prefix="tiersim-steps-"))


def build_results(*, requests: RequestLog, trace, step_logs: list[StepLog], token_log: TokenLog,
                  metadata: dict, kv_info: dict, link_bytes: dict, link_stats: dict, transfer_log,
                  engine_counts: dict, cost_notes: dict, slo_ttft_s: float, slo_tpot_s: float, timing: dict,
                   spill: Path | None = None, kv_tiers: dict | None = None,
                   speculation: dict | None = None) -> Results:
    import pandas as pd

    n = requests.n
    arrival = trace.arrival_s
    for log in step_logs:
        log.close()
    # ---- inter-token statistics from the token log (global step ids: see sim.request)
    offsets = np.zeros(len(step_logs) + 1, dtype=np.int64)
    for r, log in enumerate(step_logs):
        offsets[r + 1] = offsets[r] + log.n
    step_end = np.concatenate([log.end_s for log in step_logs]) if step_logs else np.empty(0)
    done = requests.status == 1
    itl = np.empty((n, 4))
    qs = np.array([50.0, 90.0, 95.0, 99.0])
    n_gaps, gap_mean, gap_max, gap_q = itl_statistics(
        requests.seg_off, requests.seg_cnt, token_log.first.view(), token_log.last.view(), token_log.tokens.view(),
        step_end, offsets, done, qs, itl)
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
        "lower_hit_tokens": requests.lower_hit_tokens, "kv_stall_s": requests.kv_stall_s,
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
        "link_stats": {name: {**st, "utilization": st["busy_s"] / span if span > 0 else 0.0}
                       for name, st in sorted(link_stats.items())},
        "engine": {**engine_counts, "steps": num_steps,
                   "busy_s": busy, "utilization": busy / (span * max(len(step_logs), 1)) if busy else None,
                   "preemptions": int(requests.preemptions.sum())},
        "costs": cost_notes,
    }
    transfers = transfer_log.frame()
    if kv_tiers is not None:
        summary["kv_tiers"] = {**kv_tiers, "link_utilization_timeline": link_timeline(transfers, t0, t1)}
    if speculation is not None:
        # vLLM's ITL (benchmark_serving): one gap per step that emitted tokens (see sim.metrics.tokens)
        scratch = np.empty((n, 4))
        m, mean, mx, q = itl_statistics(requests.seg_off, requests.seg_cnt, token_log.first.view(),
                                        token_log.last.view(), token_log.tokens.view(), step_end, offsets, done, qs,
                                        scratch, True)
        speculation["itl_per_step_s"] = (
            {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None} if m == 0 else
            {"mean": float(mean), "p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]),
             "max": float(mx)})
        summary["speculation"] = speculation
    if step_logs and step_logs[0].enabled and num_steps:
        aggs = [log.agg for log in step_logs]
        w = sum(a["busy_s"] for a in aggs)
        rows = sum(a["rows"] for a in aggs)
        summary["kv"].update({
            "dram_peak_cached_bytes": max(a["peak_dram_cached"] for a in aggs),
            "nvme_peak_cached_bytes": max(a["peak_nvme_cached"] for a in aggs),
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
                  step_files=[str(log.path) for log in step_logs if log.enabled and log.path],
                  transfers=transfers)
    if spill is not None:
        weakref.finalize(res, shutil.rmtree, str(spill), True)
    return res
