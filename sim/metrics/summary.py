"""The run summary and the results object: percentiles, throughput, goodput, KV and link figures,
the per-request table, and writing everything to a results directory."""
from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim import results_io
from sim.arrow import categorical, from_numpy
from sim.metrics.columns import STEP_PARQUET, schema_metadata, step_schema
from sim.metrics.requests import REJECT_REASONS, RequestLog
from sim.metrics.step_log import StepLog
from sim.metrics.tokens import TokenLog, histogram_edges, itl_statistics


def _pct(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    p = np.percentile(x, [50, 90, 95, 99])
    return {"mean": float(x.mean()), "p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]),
            "p99": float(p[3]), "max": float(x.max())}


@dataclass
class Results:
    """Everything a run produced; :meth:`write` puts it on disk. The tables are kept as Arrow tables,
    written as they are; ``requests``, ``steps``, ``transfers`` and ``itl_hist`` are pandas DataFrames
    made on first use (a run that only writes its results never imports pandas; the step files can
    be large)."""

    summary: dict
    requests_table: "object"     # pyarrow Table: one row per request (see build_results)
    metadata: dict           # config, hash, cost table identity, trace identity
    timing: dict             # wall-clock figures (not part of the deterministic results)
    step_files: list = field(default_factory=list)
    transfers_table: "object" = None   # pyarrow Table: one row per transfer on a link (sim.memory.transfers)
    itl_hist_table: "object" = None    # pyarrow Table: the token-level ITL histogram's occupied bins
    _frames: dict = field(default_factory=dict, repr=False)

    def _frame(self, name: str, table):
        if name not in self._frames:
            self._frames[name] = None if table is None else table.to_pandas()
        return self._frames[name]

    @property
    def requests(self):
        """One row per request, as a DataFrame."""
        return self._frame("requests", self.requests_table)

    @property
    def transfers(self):
        """One row per transfer on a link, as a DataFrame."""
        return self._frame("transfers", self.transfers_table)

    @property
    def itl_hist(self):
        """The ITL histogram's occupied bins (lo_s, hi_s, count), as a DataFrame."""
        return self._frame("itl_hist", self.itl_hist_table)

    @property
    def steps(self):
        """Per-step log as a DataFrame (replicas in order)."""
        if "steps" not in self._frames:
            import pandas as pd
            import pyarrow.parquet as pq

            frames = [pq.read_table(p).to_pandas() for p in self.step_files if Path(p).exists()]
            self._frames["steps"] = (pd.concat(frames, ignore_index=True) if frames else
                                     step_schema().empty_table().to_pandas())
        return self._frames["steps"]

    def write(self, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write the results directory: every file by temp-and-rename, ``extra_files`` (name -> text,
        e.g. the CLI's ``config.toml``) after the results, and the ``DONE`` marker last
        (``sim.results_io``): a directory without a valid marker is not a finished run."""
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results_io.remove_marker(out)
        results_io.clear_partial(out)
        written = []
        meta = schema_metadata(self.metadata)
        table = self.requests_table.replace_schema_metadata(meta)
        with results_io.atomic_path(out / "requests.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        written.append("requests.parquet")
        # steps: the replicas' spill files, row group by row group, into one file; a single replica's
        # file written with this run's metadata already is that file, and is copied as it stands
        schema = step_schema().with_metadata(meta)
        files = [p for p in self.step_files if Path(p).exists()]
        with results_io.atomic_path(out / "steps.parquet") as tmp:
            if len(files) == 1 and pq.read_schema(files[0]).equals(schema, check_metadata=True):
                shutil.copyfile(files[0], tmp)
                results_io.kill_point("parquet")
            else:
                with pq.ParquetWriter(tmp, schema, **STEP_PARQUET) as writer:
                    for p in files:
                        f = pq.ParquetFile(p)
                        for g in range(f.num_row_groups):
                            writer.write_table(f.read_row_group(g).replace_schema_metadata(meta),
                                               row_group_size=StepLog.CHUNK)
                            results_io.kill_point("parquet")
        written.append("steps.parquet")
        for name, arrow in (("transfers.parquet", self.transfers_table), ("itl_hist.parquet", self.itl_hist_table)):
            if arrow is None:
                continue
            t = arrow.replace_schema_metadata(meta)
            with results_io.atomic_path(out / name) as tmp:
                pq.write_table(t, tmp, compression="zstd")
            written.append(name)
        results_io.write_text_atomic(out / "summary.json", json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        written.append("summary.json")
        results_io.kill_point("between")
        results_io.write_text_atomic(out / "timing.json", json.dumps(self.timing, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            results_io.write_text_atomic(out / name, text)
            written.append(name)
        results_io.write_marker(out, written, volatile=["timing.json"],
                                config_hash=self.metadata.get("config_hash", ""))
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
    if not hasattr(transfers, "groupby"):      # an Arrow table (Results.transfers_table)
        transfers = transfers.to_pandas()
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
    it are garbage-collected; those of killed processes are reaped here, on the next start."""
    results_io.reap_spill_dirs()
    return results_io.new_spill_dir()


def goodput_rule(slo_ttft_s: float, slo_tpot_s: float, slo_itl_s: float, slo_itl_stat: str) -> dict:
    """The SLOs and, in words, which requests count as good (stated in the summary)."""
    parts = [f"TTFT <= {slo_ttft_s:g} s"]
    if slo_tpot_s > 0:
        parts.append(f"TPOT (mean per request) <= {slo_tpot_s * 1e3:g} ms")
    if slo_itl_s > 0:
        parts.append(f"per-request {slo_itl_stat} ITL <= {slo_itl_s * 1e3:g} ms")
    return {"slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s, "slo_itl_s": slo_itl_s,
            "slo_itl_stat": slo_itl_stat, "definition": ", ".join(parts)}


def _nonzero_bins(hist: np.ndarray):
    """The ITL histogram's occupied bins as an Arrow table: lo_s, hi_s, count (see tokens.histogram_edges)."""
    import pyarrow as pa

    edges = histogram_edges()
    nz = np.flatnonzero(hist)
    return pa.table({"lo_s": from_numpy(edges[nz], nan_is_null=True),
                     "hi_s": from_numpy(edges[nz + 1], nan_is_null=True),
                     "count": from_numpy(hist[nz].astype(np.int64))})


def build_results(*, requests: RequestLog, trace, step_logs: list[StepLog], token_log: TokenLog,
                  metadata: dict, kv_info: dict, link_bytes: dict, link_stats: dict, transfer_log,
                  engine_counts: dict, cost_notes: dict, slo_ttft_s: float, slo_tpot_s: float, timing: dict,
                   spill: Path | None = None, kv_tiers: dict | None = None,
                   speculation: dict | None = None, slo_itl_s: float = 0.0,
                   slo_itl_stat: str = "p99", extra_columns: dict | None = None) -> Results:
    import pyarrow as pa

    n = requests.n
    arrival = trace.arrival_s
    for log in step_logs:
        log.close()
    # ---- inter-token statistics from the token log (global step ids: see sim.request)
    offsets = np.zeros(len(step_logs) + 1, dtype=np.int64)
    for r, log in enumerate(step_logs):
        offsets[r + 1] = offsets[r] + log.n
    # (read only: one replica's end times are used in place, not copied; 150 MB at a million requests)
    step_end = (step_logs[0].end_s if len(step_logs) == 1 else
                np.concatenate([log.end_s for log in step_logs]) if step_logs else np.empty(0))
    done = requests.status == 1
    itl = np.empty((n, 4))
    qs = np.array([50.0, 90.0, 95.0, 99.0])
    n_gaps, gap_mean, gap_max, gap_q, itl_hist = itl_statistics(
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
    # the columns pa.Table.from_pandas made of this table's DataFrame: NaN is null, the categoricals are
    # dictionaries (requests.parquet stays byte-identical)
    columns = {
        "idx": np.arange(n, dtype=np.int64), "request_id": trace.request_id,
        "replica": requests.replica,
        "status": categorical(requests.status, ["pending", "finished", "rejected"]),
        "reject_reason": categorical(requests.reason, list(REJECT_REASONS)),
        "arrival_s": arrival, "first_scheduled_s": requests.first_scheduled_s,
        "first_token_s": requests.first_token_s, "finish_s": requests.finish_s,
        "ttft_s": ttft, "itl_mean_s": itl[:, 0], "itl_p50_s": itl[:, 1], "itl_p99_s": itl[:, 2],
        "itl_max_s": itl[:, 3], "tpot_s": tpot, "e2e_s": e2e, "queueing_s": queue,
        "prompt_tokens": trace.prompt_tokens, "output_tokens": trace.output_tokens,
        "generated_tokens": requests.generated, "preemptions": requests.preemptions,
        "swaps": requests.swaps, "prefix_hit_tokens": requests.prefix_hit_tokens,
        "lower_hit_tokens": requests.lower_hit_tokens, "kv_stall_s": requests.kv_stall_s,
        **(extra_columns or {}),      # a disaggregated run's hand-off columns (sim.handoff)
    }
    reqs = pa.table({k: v if isinstance(v, pa.Array) else from_numpy(v, nan_is_null=True)
                     for k, v in columns.items()})

    # ---- summary
    n_done = int(done.sum())
    t0 = float(arrival.min()) if n else 0.0
    t1 = float(np.nanmax(requests.finish_s[done])) if n_done else t0
    span = max(t1 - t0, 1e-12)
    goodput = goodput_rule(slo_ttft_s, slo_tpot_s, slo_itl_s, slo_itl_stat)
    itl_stat = {"mean": itl[:, 0], "p50": itl[:, 1], "p99": itl[:, 2], "max": itl[:, 3]}[slo_itl_stat]
    good = done & (ttft <= slo_ttft_s)
    if slo_tpot_s > 0:
        good &= (tpot <= slo_tpot_s) | (requests.generated <= 1)
    if slo_itl_s > 0:      # a request with one token has no gaps (NaN): nothing to bound
        good &= (itl_stat <= slo_itl_s) | ~np.isfinite(itl_stat)
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
        "goodput": {**goodput, "requests_per_s": int(good.sum()) / span,
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
    transfers = transfer_log.table()
    if kv_tiers is not None:
        summary["kv_tiers"] = {**kv_tiers, "link_utilization_timeline": link_timeline(transfers, t0, t1)}
    if speculation is not None:
        # vLLM's ITL (benchmark_serving): one gap per step that emitted tokens (see sim.metrics.tokens)
        scratch = np.empty((n, 4))
        m, mean, mx, q, _ = itl_statistics(requests.seg_off, requests.seg_cnt, token_log.first.view(),
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
            "hbm_peak_locked_bytes": max(a["peak_locked"] for a in aggs),
            "hbm_mean_locked_bytes": sum(a["locked_weighted"] for a in aggs) / w if w > 0 else 0.0,
            "dram_peak_used_bytes": max(a["peak_dram"] for a in aggs),
            "nvme_peak_used_bytes": max(a["peak_nvme"] for a in aggs),
            "fragmentation_tokens_mean": sum(a["frag_weighted"] for a in aggs) / w if w > 0 else 0.0,
        })
        summary["engine"]["mean_batch_seqs"] = sum(a["num_seqs"] for a in aggs) / rows
        summary["engine"]["mean_batch_tokens"] = sum(a["tokens"] for a in aggs) / rows
        summary["engine"]["launches"] = sum(a["launches"] for a in aggs)
        summary["engine"]["syncs"] = sum(a["syncs"] for a in aggs)
    res = Results(summary=summary, requests_table=reqs, metadata=metadata, timing=timing,
                  step_files=[str(log.path) for log in step_logs if log.enabled and log.path],
                  transfers_table=transfers, itl_hist_table=_nonzero_bins(itl_hist))
    if spill is not None:
        weakref.finalize(res, results_io.release_spill_dir, str(spill))
    return res
