"""The per-step log of one replica: a bounded buffer that streams to Parquet in chunks.

Memory stays bounded by the chunk, not by the length of the trace: step rows go to a Parquet spill file
in fixed-size chunks as the run goes (only each step's end time, 8 bytes, stays in memory: token times
need it), and the summary's step aggregates are accumulated per chunk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.jit import numba
from sim.metrics.columns import (
    F_DRAFT,
    F_DURATION,
    F_START,
    F_VERIFY,
    FLOAT_COLUMNS,
    FLOAT_INDEX,
    I_ACCEPTED_TOKENS,
    I_DECODE_SEQS,
    I_DRAFT_KV,
    I_DRAFT_TOKENS,
    I_DRAM_CACHED,
    I_DRAM_USED,
    I_FRAG,
    I_HBM_ACTIVE,
    I_HBM_CACHED,
    I_HBM_LOCKED,
    I_LAUNCHES,
    I_LOADING,
    I_NUM_SEQS,
    I_NVME_CACHED,
    I_NVME_USED,
    I_PADDED_TOKENS,
    I_PREFILL_SEQS,
    I_PREFILL_TOKENS,
    I_SYNCS,
    I_TOKENS,
    INT_COLUMNS,
    INT_INDEX,
    STEP_COLUMNS,
    STEP_PARQUET,
    step_schema,
)


class Growable:
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


# the integer columns an engine step's row sets (``StepLog.append_row``), in this order
ROW_COLUMNS = ("num_seqs", "prefill_seqs", "prefill_tokens", "decode_seqs", "tokens", "hbm_active_bytes",
               "hbm_cached_bytes", "hbm_locked_bytes", "dram_used_bytes", "nvme_used_bytes", "frag_tokens",
               "launches", "syncs", "preemptions", "padded_tokens", "dram_cached_bytes", "nvme_cached_bytes",
               "loading_seqs", "prefix_hit_tokens", "loaded_tokens")
_ROW_INDEX = np.array([INT_INDEX[k] for k in ROW_COLUMNS], dtype=np.intp)
_NO_ROW = (0,) * len(ROW_COLUMNS)


class StepLog:
    """One row per engine step of one replica.

    Rows are buffered in a chunk of ``CHUNK`` rows (times, and integer counts and bytes) and written
    to ``path`` (Parquet) when the chunk fills. End times of all steps stay in memory (``end_s``).
    Buffers are zero-filled: a column a writer leaves out reads 0. With ``enabled=False`` only end
    times and the busy time are kept.

    The spill file is written as ``steps.parquet`` is (``STEP_PARQUET``, with the run's ``metadata``
    in its schema when given), so a single replica's file is the results' file as it stands.

    Invariants: ``n`` steps logged; buffer row ``r`` is step ``base + r``; steps ``< base`` are on disk.
    """

    CHUNK = 1 << 16

    def __init__(self, enabled: bool, replica: int, path: Path | None,
                 capacity_bytes: tuple[int, int, int], metadata: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.metadata = metadata
        self.capacity_bytes = capacity_bytes      # KV capacity of (HBM, DRAM, NVMe), whole replica
        self.replica = replica
        self.path = path
        self.n = 0
        self.base = 0
        self.ends = Growable(np.float64)
        self.f = np.zeros((self.CHUNK, len(FLOAT_COLUMNS)))
        self.i = np.zeros((self.CHUNK, len(INT_COLUMNS)), dtype=np.int64) if enabled else np.zeros((0, 0), np.int64)
        self.busy_s = 0.0
        self._writer = None
        # summary aggregates over flushed rows
        self.agg = {"rows": 0, "busy_s": 0.0, "active_weighted": 0.0, "frag_weighted": 0.0,
                    "locked_weighted": 0.0, "peak_locked": 0, "peak_active": 0, "peak_cached": 0, "peak_dram": 0,
                    "peak_nvme": 0,
                    "peak_dram_cached": 0, "peak_nvme_cached": 0,
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
                self.f = np.zeros((k, len(FLOAT_COLUMNS)))
                if self.enabled:
                    self.i = np.zeros((k, len(INT_COLUMNS)), dtype=np.int64)
        return r

    def append(self, start_s: float, duration_s: float, end_s: float, **columns) -> None:
        """One step; ``columns`` are the other columns by name (see ``sim.metrics.columns``)."""
        self.append_row(start_s, duration_s, end_s, _NO_ROW)
        self.set_last(**columns)

    def append_row(self, start_s: float, duration_s: float, end_s: float, values: tuple) -> None:
        """One engine step with the integer columns ``ROW_COLUMNS`` given in that order (the hot path:
        no keyword dict, one vector store); the other columns read 0 until :meth:`set_last`."""
        r = self._room(1)
        f = self.f[r]
        f[F_START] = start_s
        f[F_DURATION] = duration_s
        if self.enabled:
            self.i[r, _ROW_INDEX] = values
        ends = self.ends.reserve(1)
        ends[self.n] = end_s
        self.ends.n = self.n = self.n + 1
        self.busy_s += duration_s

    def set_last(self, **columns) -> None:
        """Set columns of the last step by name (speculation's, written only when it drafted)."""
        if not self.enabled:
            return
        r = self.n - 1 - self.base
        for k, v in columns.items():
            j = INT_INDEX.get(k)
            if j is None:
                self.f[r, FLOAT_INDEX[k]] = v
            else:
                self.i[r, j] = v

    def extend_last(self, end_s: float) -> None:
        """The last step ended later than logged (it waited for a transfer): move its end."""
        r = self.n - 1 - self.base
        old = self.f[r, F_DURATION]
        self.f[r, F_DURATION] = end_s - self.f[r, F_START]
        self.ends.a[self.n - 1] = end_s
        self.busy_s += self.f[r, F_DURATION] - old

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

            from sim.arrow import from_numpy

            f, ib = self.f[:m], self.i[:m]
            dur = f[:, F_DURATION]
            col = {k: ib[:, j] for j, k in enumerate(INT_COLUMNS)}
            a = self.agg
            a["rows"] += m
            a["busy_s"] += float(dur.sum())
            a["active_weighted"] += float((col["hbm_active_bytes"] * dur).sum())
            a["frag_weighted"] += float((col["frag_tokens"] * dur).sum())
            a["locked_weighted"] += float((col["hbm_locked_bytes"] * dur).sum())
            a["peak_locked"] = max(a["peak_locked"], int(col["hbm_locked_bytes"].max()))
            a["peak_active"] = max(a["peak_active"], int(col["hbm_active_bytes"].max()))
            a["peak_cached"] = max(a["peak_cached"], int(col["hbm_cached_bytes"].max()))
            a["peak_dram"] = max(a["peak_dram"], int(col["dram_used_bytes"].max()))
            a["peak_nvme"] = max(a["peak_nvme"], int(col["nvme_used_bytes"].max()))
            a["peak_dram_cached"] = max(a["peak_dram_cached"], int(col["dram_cached_bytes"].max()))
            a["peak_nvme_cached"] = max(a["peak_nvme_cached"], int(col["nvme_cached_bytes"].max()))
            for k in ("num_seqs", "tokens", "launches", "syncs"):
                a[k] += int(col[k].sum())
            schema = step_schema()
            if self.metadata:
                schema = schema.with_metadata(self.metadata)
            arrays = [from_numpy(np.full(m, self.replica, np.int16))]
            for k, t in STEP_COLUMNS.items():
                if k == "step":
                    arrays.append(from_numpy(np.arange(self.base, self.n)))
                elif k in FLOAT_INDEX:
                    arrays.append(from_numpy(f[:, FLOAT_INDEX[k]]))
                else:
                    arrays.append(from_numpy(col[k].astype(t)))
            hbm_cap, dram_cap, nvme_cap = self.capacity_bytes
            arrays += [from_numpy(hbm_cap - col["hbm_active_bytes"] - col["hbm_cached_bytes"]),
                       from_numpy(dram_cap - col["dram_used_bytes"] - col["dram_cached_bytes"]),
                       from_numpy(nvme_cap - col["nvme_used_bytes"] - col["nvme_cached_bytes"])]
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, schema, **STEP_PARQUET)
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
def fill_run_rows(f, ib, ends_out, row0, g0, c, upto, seg0, start, ends, durations, allocs, free0, cached0,
                  active0, held0, inflight, nc0, B, n, bs, bpb, dram, nvme, dram_cached, nvme_cached, loading,
                  launches, syncs, pad):
    """Write steps c..upto-1 of a run's segment starting at step ``seg0`` (``B`` decodes and, when
    ``n`` > 0, a prefill chunk of ``n`` tokens per step): times into ``f`` at buffer row ``row0``, end
    times into ``ends_out`` at step index ``g0``, and (when ``ib`` has rows) the KV state at each step's
    start after its allocation (allocations take free blocks first, then evict cached ones; the
    ``*0`` figures are the segment's at ``seg0`` before that step's allocation, ``nc0`` the tokens
    computed by every running request; lower tiers and loading requests do not change during a run),
    into the integer columns named by ``sim.metrics.columns``; ``pad`` is the padding of each step (a
    captured graph's rows beyond the segment's own). Returns the busy time, launches and syncs of
    those steps."""
    cum = 0
    for s in range(seg0, c):
        cum += allocs[s]
    busy = 0.0
    nl = 0
    ns = 0
    T = B + n
    for j in range(upto - c):
        s = c + j
        r = row0 + j
        f[r, F_START] = start if s == 0 else ends[s - 1]
        f[r, F_DURATION] = durations[s]
        f[r, F_DRAFT] = 0.0          # decode runs never speculate
        f[r, F_VERIFY] = 0.0
        ends_out[g0 + j] = ends[s]
        busy += durations[s]
        nl += launches[s]
        ns += syncs[s]
        if ib.shape[0] == 0:
            continue
        cum += allocs[s]
        ev = cum - free0
        if ev < 0:
            ev = 0
        act = active0 + cum
        lk = held0 + cum + inflight
        ib[r, I_NUM_SEQS] = B + (1 if n > 0 else 0)
        ib[r, I_DECODE_SEQS] = B
        ib[r, I_TOKENS] = T
        if n > 0:
            ib[r, I_PREFILL_SEQS] = 1
            ib[r, I_PREFILL_TOKENS] = n
        ib[r, I_HBM_ACTIVE] = act * bpb
        ib[r, I_HBM_CACHED] = (cached0 - ev) * bpb
        ib[r, I_HBM_LOCKED] = (lk if lk < act else act) * bpb
        ib[r, I_DRAM_USED] = dram
        ib[r, I_NVME_USED] = nvme
        ib[r, I_DRAM_CACHED] = dram_cached
        ib[r, I_NVME_CACHED] = nvme_cached
        ib[r, I_LOADING] = loading
        ib[r, I_FRAG] = (held0 + cum) * bs - (nc0 + T * (s - seg0 + 1))
        ib[r, I_LAUNCHES] = launches[s]
        ib[r, I_SYNCS] = syncs[s]
        ib[r, I_DRAFT_TOKENS] = 0
        ib[r, I_ACCEPTED_TOKENS] = 0
        ib[r, I_DRAFT_KV] = 0
        ib[r, I_PADDED_TOKENS] = pad
    return busy, nl, ns
