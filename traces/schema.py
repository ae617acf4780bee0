"""The canonical trace: one columnar representation of a request stream, used by the whole simulator.

A trace is one row per request. Required columns:

==================  ============  ====================================================================
``request_id``      int64         unique per trace; readers use the 0-based data row of the source file
``arrival_s``       float64       seconds from the trace start, finite, >= 0, non-decreasing
``prompt_tokens``   int64         >= 1 (prefill length)
``output_tokens``   int64         >= 1 (decode length)
==================  ============  ====================================================================

Optional columns: ``block_hashes`` (list<int64>, prefix-block hashes over ``hash_block_tokens``-token
blocks, recorded as table metadata), ``session_id`` (string), ``priority`` (int32), ``tenant`` (string),
``acceptance_rate`` (float64 in [0, 1]: the rate at which a speculative drafter's tokens are accepted
for this request, for ``acceptance = "column"``).

In memory the simulator uses :class:`Trace`, which holds numpy arrays (block hashes in CSR form). On disk
and between tools the form is an Arrow table (:meth:`Trace.to_arrow`), whose schema metadata carries
``tiersim.hash_block_tokens``, ``tiersim.meta`` (JSON), ``tiersim.name`` and ``tiersim.source``.

Limits (what the simulator can represent; readers refuse values beyond them with the row and field):
arrivals at most :data:`MAX_ARRIVAL_S` seconds after the trace start, and at most :data:`MAX_TOKENS`
prompt or output tokens per request.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from sim.errors import TiersimError

if TYPE_CHECKING:
    import pyarrow as pa

# Canonical columns and their Arrow types, by name. The mappings to ``pyarrow`` types are built on
# first use (module ``__getattr__`` below), so that importing the schema does not import pyarrow.
_REQUIRED_TYPES = {"request_id": "int64", "arrival_s": "float64", "prompt_tokens": "int64", "output_tokens": "int64"}
_OPTIONAL_TYPES = {"block_hashes": "list<int64>", "session_id": "string", "priority": "int32", "tenant": "string",
                   "acceptance_rate": "float64"}
REQUIRED_NAMES = tuple(_REQUIRED_TYPES)
OPTIONAL_NAMES = tuple(_OPTIONAL_TYPES)
CANONICAL_NAMES = REQUIRED_NAMES + OPTIONAL_NAMES
TIME_UNITS: dict[str, float | None] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "datetime": None}


def _arrow_type(name: str):
    import pyarrow as pa

    return pa.list_(pa.int64()) if name == "list<int64>" else getattr(pa, name)()


def canonical_types() -> dict:
    """Canonical column name -> pyarrow type (imports pyarrow)."""
    return __getattr__("CANONICAL_COLUMNS")


def __getattr__(name: str):
    if name in ("REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "CANONICAL_COLUMNS"):
        types = {"REQUIRED_COLUMNS": _REQUIRED_TYPES, "OPTIONAL_COLUMNS": _OPTIONAL_TYPES,
                 "CANONICAL_COLUMNS": {**_REQUIRED_TYPES, **_OPTIONAL_TYPES}}[name]
        value = {k: _arrow_type(v) for k, v in types.items()}
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

META_HASH_BLOCK_TOKENS = b"tiersim.hash_block_tokens"
META_META = b"tiersim.meta"
META_NAME = b"tiersim.name"
META_SOURCE = b"tiersim.source"

_INT32 = np.iinfo(np.int32)

MAX_ARRIVAL_S = 1e9
"""Latest arrival, in seconds after the trace start (31.7 years).

Simulated time is a float64 count of seconds. At 1e9 s adjacent float64 values are 1.2e-7 s apart,
still about 100x finer than the shortest engine step (~10 us), so step times and latencies keep their
precision; at 1e18 s they are 128 s apart and a request's whole life rounds away (TTFT = E2E = 0). No
public trace comes close: BurstGPT, the longest, spans 121 days (1.05e7 s)."""

MAX_TOKENS = 10**8
"""Most prompt or output tokens in one request: 100x the longest context window of any current model,
far below int64, so a larger count is a corrupt value rather than a workload."""


class TraceError(TiersimError, ValueError):
    """A trace that cannot be read or is not valid. ``str()`` is one line naming file, row and field.

    ``path`` is the file (or the trace source) and ``row`` the 1-based data row, with ``line`` the
    1-based physical line where the format has lines. ``field`` is the column as the source names it.
    ``more_rows`` counts further bad rows after the first one reported. Any of them may be None.
    Advice in a message names what a user can set: the ``[trace]`` config keys (``trace.columns``,
    ``trace.time_unit``, ``trace.hash_block_tokens``, ...), which match ``load_trace``'s keyword
    arguments one for one, or the CLI's ``--format``.
    """

    def __init__(self, detail: str, *, path: str | PurePath | None = None, row: int | None = None,
                 line: int | None = None, field: str | None = None, more_rows: int = 0,
                 label: str | None = None) -> None:
        self.detail = detail
        self.path = None if path is None else str(path)
        self.row = row
        self.line = line
        self.field = field
        self.more_rows = more_rows
        self.label = label
        super().__init__(self._render())

    def _render(self) -> str:
        parts: list[str] = []
        label = self.label if self.label is not None else (
            PurePath(self.path).name if self.path else None)
        where: list[str] = []
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None and where:
            where.append(f"field '{self.field}'")
        head = ", ".join(where)
        if label:
            parts.append(f"{label}: {head}" if head else label)
        elif head:
            parts.append(head)
        tail = self.detail
        if self.more_rows:
            tail += f" (and {self.more_rows} more row{'s' if self.more_rows != 1 else ''})"
        parts.append(tail)
        return ": ".join(parts).replace("\n", " ")

    def __reduce__(self):  # keep the keyword attributes through pickling (multiprocessing sweeps)
        return (_rebuild_trace_error, (self.detail, self.path, self.row, self.line, self.field,
                                       self.more_rows, self.label))


def _rebuild_trace_error(detail, path, row, line, field, more_rows, label) -> TraceError:
    return TraceError(detail, path=path, row=row, line=line, field=field, more_rows=more_rows,
                      label=label)


ARRIVAL_LIMIT = (f"beyond the {MAX_ARRIVAL_S:.0e} s ({MAX_ARRIVAL_S / 31_557_600:.1f} years) a trace may span, "
                 "past which float64 time loses the resolution of an engine step").replace("e+0", "e")


def beyond_arrival_limit(arrival_s: float) -> str:
    """The detail of an error for an arrival past :data:`MAX_ARRIVAL_S`."""
    return f"arrival {arrival_s:.4g} s after the trace start is {ARRIVAL_LIMIT}"


def show(value: object, limit: int = 40) -> str:
    """``repr`` of a source value for a message, cut to ``limit`` characters (a field may be megabytes)."""
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(str(value)):,} characters)"


@dataclass(frozen=True, slots=True)
class RowCheck:
    """One per-row rule over a column: ``bad[i]`` is True where row i breaks it.

    ``explain(i)`` turns the 0-based row index into the detail of the message. Checks are evaluated
    vectorised; only the first failing row is explained.
    """

    field: str | None
    bad: np.ndarray
    explain: Callable[[int], str]


def raise_first_failure(checks: Iterable[RowCheck], *, path: str | PurePath | None = None,
                        label: str | None = None, row_number: Callable[[int], int] | None = None,
                        line_of: Callable[[int], int | None] | None = None) -> None:
    """Raise a TraceError for the first row (in row order) that fails any check; do nothing if none.

    Among checks failing on that row, the first one listed is reported. ``row_number`` maps the 0-based
    index to the 1-based row to print (default i + 1); ``line_of`` maps it to a file line (default none).
    """
    checks = [c for c in checks if c.bad.any()]
    if not checks:
        return
    any_bad = checks[0].bad.copy()
    for c in checks[1:]:
        any_bad |= c.bad
    i = int(np.argmax(any_bad))
    first = next(c for c in checks if c.bad[i])
    raise TraceError(first.explain(i), path=path, label=label,
                     row=row_number(i) if row_number else i + 1,
                     line=line_of(i) if line_of else None, field=first.field,
                     more_rows=int(np.count_nonzero(any_bad)) - 1)


def _count_check(name: str, values: np.ndarray) -> RowCheck:
    def explain(i: int) -> str:
        v = values[i]
        if v > MAX_TOKENS:
            return f"token count {v:,} exceeds the limit of {MAX_TOKENS:,} per request"
        return f"negative token count {v}" if v < 0 else f"token count {v} (must be >= 1)"
    return RowCheck(name, (values < 1) | (values > MAX_TOKENS), explain)


def _int_array(name: str, values: Any, dtype: type, checks: list[RowCheck]) -> np.ndarray:
    """Coerce to an integer array; float input must hold whole, finite numbers in range (else a RowCheck).

    Booleans are refused: True is not a count. Values outside ``dtype`` are refused, never wrapped.
    """
    arr = np.asarray(values)
    info = np.iinfo(dtype)
    if arr.dtype.kind == "b":
        checks.append(RowCheck(name, np.ones(arr.shape, bool), lambda i: f"a boolean ({arr[i]}), not a number"))
        return np.zeros(arr.shape, dtype)
    if arr.dtype.kind in "iu":
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            too_big = (arr > info.max) if arr.dtype.kind == "u" else (arr < info.min) | (arr > info.max)
            checks.append(RowCheck(name, too_big, lambda i: f"{arr[i]} does not fit in {np.dtype(dtype).name}"))
            return np.zeros(arr.shape, dtype)
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind != "f":
        raise TraceError(f"column '{name}' must hold integers (got {_dtype_name(arr)})", field=name)
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    out_of_range = ~bad & ((arr < info.min) | (arr >= -float(info.min)))
    if (bad | out_of_range).any():
        checks.append(RowCheck(name, bad | out_of_range, lambda i: (
            f"not a whole number: {show(arr[i])}" if bad[i] else f"{arr[i]:g} does not fit in {np.dtype(dtype).name}")))
        return np.zeros(arr.shape, dtype)
    return arr.astype(dtype)


def _dtype_name(arr: np.ndarray) -> str:
    """What an array holds, for messages: 'strings' for text, else the numpy dtype."""
    if arr.dtype.kind in "OUS" and arr.size and isinstance(arr.flat[0], str):
        return "strings"
    return f"dtype {arr.dtype}"


def _float_array(name: str, values: Any, checks: list[RowCheck]) -> np.ndarray:
    """Coerce to float64; booleans and non-numbers are refused (a RowCheck, or a TraceError for a dtype)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "b":
        checks.append(RowCheck(name, np.ones(arr.shape, bool), lambda i: f"a boolean ({arr[i]}), not a number"))
        return np.zeros(arr.shape, np.float64)
    if arr.dtype.kind not in "iuf":
        raise TraceError(f"column '{name}' must hold numbers (got {_dtype_name(arr)})", field=name)
    return arr.astype(np.float64, copy=False)


def _rate_array(values: Any, checks: list[RowCheck]) -> np.ndarray:
    """``acceptance_rate``: finite numbers in [0, 1]."""
    arr = _float_array("acceptance_rate", values, checks)
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        checks.append(RowCheck("acceptance_rate", bad, lambda i: f"acceptance rate {show(arr[i])} is not in [0, 1]"))
    return arr


def _str_array(name: str, values: Any, checks: list[RowCheck]) -> np.ndarray:
    arr = np.asarray(values, dtype=object)
    bad = np.fromiter((not isinstance(v, str) for v in arr), dtype=bool, count=arr.size)
    if bad.any():
        checks.append(RowCheck(name, bad, lambda i: f"expected a string, got {show(arr[i])}"))
    return arr


def _frozen(arr: np.ndarray) -> np.ndarray:
    """A contiguous read-only array the caller cannot change behind the trace's back.

    Writeable input is copied (the caller still holds it); read-only input, such as another Trace's
    arrays, is shared as it is.
    """
    if arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Trace:
    """A validated request stream, numpy-backed, in arrival order. Immutable: arrays are read-only.

    Invariants (checked on construction, see :meth:`validate`): all per-request arrays have the same
    length n; ``arrival_s`` is finite, >= 0 and non-decreasing (unsorted input is sorted stably by
    arrival, ``meta["sorted"]`` is set and ``meta["out_of_order_rows"]`` counts the rows given earlier
    than the row before them); token counts are >= 1; request ids are unique; when hashes
    are present, ``hash_offsets`` is a CSR index of length n + 1 into ``hash_values`` starting at 0,
    and request i has at most ceil(prompt_tokens[i] / hash_block_tokens) blocks.

    ``meta`` holds provenance: ``format``, ``rows_read``, ``dropped_*`` counts (rows a reader dropped,
    and why), ``transforms`` (list of dicts, one per transformation applied), ``clock_origin_s`` (the
    source clock at arrival 0, used to align per-second and per-minute counts) and reader-specific keys.
    Treat it as read-only; it must be JSON-serialisable.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    request_id: np.ndarray | None = None
    hash_offsets: np.ndarray | None = None
    hash_values: np.ndarray | None = None
    hash_block_tokens: int | None = None
    session_id: np.ndarray | None = None
    priority: np.ndarray | None = None
    tenant: np.ndarray | None = None
    acceptance_rate: np.ndarray | None = None
    name: str = "trace"
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen dataclass: normalise fields once, here
        checks: list[RowCheck] = []
        try:
            arrival = _float_array("arrival_s", self.arrival_s, checks)
            n = arrival.shape[0] if arrival.ndim == 1 else -1
            if arrival.ndim != 1:
                self._fail(f"arrival_s must be one-dimensional (got shape {arrival.shape})")
            prompt = _int_array("prompt_tokens", self.prompt_tokens, np.int64, checks)
            output = _int_array("output_tokens", self.output_tokens, np.int64, checks)
            rid = (np.arange(n, dtype=np.int64) if self.request_id is None
                   else _int_array("request_id", self.request_id, np.int64, checks))
            optional: dict[str, np.ndarray | None] = {
                "session_id": None if self.session_id is None else _str_array("session_id", self.session_id, checks),
                "tenant": None if self.tenant is None else _str_array("tenant", self.tenant, checks),
                "priority": None if self.priority is None else _int_array("priority", self.priority, np.int32,
                                                                              checks),
                "acceptance_rate": None if self.acceptance_rate is None else _rate_array(self.acceptance_rate,
                                                                                         checks),
            }
        except TraceError as exc:
            self._fail(exc.detail, field=exc.field)
        columns = {"arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output,
                   "request_id": rid}
        for key, arr in {**columns, **optional}.items():
            if arr is not None and arr.shape != (n,):
                self._fail(f"column '{key}' has shape {arr.shape}, expected ({n},) like arrival_s")
        # conversion problems first: their placeholder values must not be judged as values
        raise_first_failure(checks, path=self.source or None, label=self.name)
        offsets, values = self._normalised_hashes(n)
        self._check_rows(arrival, prompt, output, rid, offsets)

        if not isinstance(self.meta, Mapping):
            self._fail(f"meta must be a mapping (got {type(self.meta).__name__})")
        meta = copy.deepcopy(dict(self.meta))
        meta.setdefault("transforms", [])
        early = int(np.count_nonzero(arrival[1:] < arrival[:-1])) if n > 1 else 0
        if early:
            order = np.argsort(arrival, kind="stable")
            columns = {k: v[order] for k, v in columns.items()}
            optional = {k: None if v is None else v[order] for k, v in optional.items()}
            if offsets is not None:
                offsets, values = _take_csr(offsets, values, order)
            meta["sorted"] = True
            meta["out_of_order_rows"] = early
        for key, arr in {**columns, **optional, "hash_offsets": offsets, "hash_values": values}.items():
            put(self, key, None if arr is None else _frozen(arr))
        put(self, "meta", meta)
        put(self, "name", str(self.name))
        put(self, "source", str(self.source))

    def _fail(self, detail: str, **where: Any) -> None:
        raise TraceError(detail, path=self.source or None, label=self.name, **where)

    def _normalised_hashes(self, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.hash_offsets is None and self.hash_values is None:
            if self.hash_block_tokens is not None:
                self._fail("hash_block_tokens is set but there are no block hashes")
            return None, None
        if self.hash_offsets is None or self.hash_values is None:
            self._fail("block hashes need both hash_offsets and hash_values")
        offsets = np.asarray(self.hash_offsets, dtype=np.int64)
        values = np.asarray(self.hash_values, dtype=np.int64)
        if offsets.shape != (n + 1,) or values.ndim != 1:
            self._fail(f"hash_offsets must have length n + 1 = {n + 1} (got shape {offsets.shape})")
        if offsets[0] != 0 or offsets[-1] != values.shape[0] or np.any(np.diff(offsets) < 0):
            self._fail("hash_offsets must start at 0, be non-decreasing and end at len(hash_values)")
        bt = self.hash_block_tokens
        if bt is None or isinstance(bt, bool) or int(bt) != bt or bt < 1:
            self._fail(f"hash_block_tokens must be a positive integer when hashes are present (got {bt!r})")
        object.__setattr__(self, "hash_block_tokens", int(bt))
        return offsets, values

    def _check_rows(self, arrival, prompt, output, rid, offsets) -> None:
        checks = [RowCheck("arrival_s", ~np.isfinite(arrival) | (arrival < 0),
                           lambda i: f"arrival must be finite and >= 0 (got {show(arrival[i])})"),
                  RowCheck("arrival_s", arrival > MAX_ARRIVAL_S, lambda i: beyond_arrival_limit(arrival[i])),
                  _count_check("prompt_tokens", prompt), _count_check("output_tokens", output)]
        if rid.size:
            order = np.argsort(rid, kind="stable")
            dup_sorted = np.zeros(rid.shape, bool)
            dup_sorted[1:] = rid[order][1:] == rid[order][:-1]
            dup = np.zeros(rid.shape, bool)
            dup[order] = dup_sorted
            checks.append(RowCheck("request_id", dup, lambda i: f"duplicate request id {rid[i]}"))
        if offsets is not None:
            blocks = np.diff(offsets)
            most = -(-prompt // self.hash_block_tokens)
            checks.append(RowCheck(
                "block_hashes", blocks > most,
                lambda i: f"{blocks[i]} blocks for {prompt[i]} prompt tokens "
                          f"(at most {most[i]} blocks of {self.hash_block_tokens} tokens)"))
        raise_first_failure(checks, path=self.source or None, label=self.name)

    # ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def __repr__(self) -> str:
        span = float(self.arrival_s[-1]) if len(self) else 0.0
        extras = [k for k in OPTIONAL_NAMES if self._optional(k) is not None]
        return (f"Trace(name={self.name!r}, requests={len(self)}, span_s={span:.3f}, "
                f"optional={extras}, source={self.source!r})")

    def _optional(self, key: str) -> Any:
        return self.hash_offsets if key == "block_hashes" else getattr(self, key)

    @property
    def has_hashes(self) -> bool:
        """True when the trace carries prefix-block hashes."""
        return self.hash_offsets is not None

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival (0.0 for fewer than two requests)."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    def block_hashes(self, i: int) -> np.ndarray:
        """Request i's block hashes (a read-only view into ``hash_values``); i may be negative."""
        if self.hash_offsets is None:
            raise TraceError("this trace has no block hashes", label=self.name)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"request index {i} out of range for {n} requests")
        i %= n
        return self.hash_values[self.hash_offsets[i]:self.hash_offsets[i + 1]]

    def validate(self) -> None:
        """Re-run the construction checks (including arrival order); raise TraceError on the first."""
        self._check_rows(self.arrival_s, self.prompt_tokens, self.output_tokens, self.request_id,
                         self.hash_offsets)
        a = self.arrival_s
        if len(a) > 1 and np.any(a[1:] < a[:-1]):
            i = int(np.argmax(a[1:] < a[:-1])) + 1
            self._fail(f"arrival {show(a[i])} is earlier than the previous one", row=i + 1, field="arrival_s")

    def replace(self, **changes: Any) -> "Trace":
        """A new, re-validated Trace with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        """The canonical Arrow table: required columns, then the optional ones present, with metadata."""
        import pyarrow as pa

        arrays: dict[str, pa.Array] = {
            "request_id": pa.array(self.request_id, pa.int64()),
            "arrival_s": pa.array(self.arrival_s, pa.float64()),
            "prompt_tokens": pa.array(self.prompt_tokens, pa.int64()),
            "output_tokens": pa.array(self.output_tokens, pa.int64()),
        }
        if self.hash_offsets is not None:
            if self.hash_offsets[-1] > np.iinfo(np.int32).max:
                raise TraceError("too many block hashes for an Arrow list column (> 2**31)", label=self.name)
            arrays["block_hashes"] = pa.ListArray.from_arrays(
                pa.array(self.hash_offsets.astype(np.int32)), pa.array(self.hash_values, pa.int64()))
        if self.session_id is not None:
            arrays["session_id"] = pa.array(self.session_id, pa.string())
        if self.priority is not None:
            arrays["priority"] = pa.array(self.priority, pa.int32())
        if self.tenant is not None:
            arrays["tenant"] = pa.array(self.tenant, pa.string())
        if self.acceptance_rate is not None:
            arrays["acceptance_rate"] = pa.array(self.acceptance_rate, pa.float64())
        metadata = {META_META: json.dumps(self.meta, sort_keys=True, default=str).encode(),
                    META_NAME: self.name.encode(), META_SOURCE: self.source.encode()}
        if self.hash_block_tokens is not None:
            metadata[META_HASH_BLOCK_TOKENS] = str(self.hash_block_tokens).encode()
        schema = pa.schema([pa.field(k, canonical_types()[k], nullable=False) for k in arrays],
                           metadata=metadata)
        return pa.Table.from_arrays(list(arrays.values()), schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table, *, source: str | None = None, name: str | None = None,
                   hash_block_tokens: int | None = None, path: str | PurePath | None = None) -> "Trace":
        """Build a validated Trace from a canonical Arrow table (e.g. one written by :meth:`to_arrow`).

        ``source``/``name``/``hash_block_tokens`` default to the ``tiersim.*`` schema metadata. Extra
        columns are ignored; missing or duplicate required columns, nulls, booleans, values that do not
        fit and malformed metadata raise TraceError. ``path`` is the file the table came from: errors
        then name that file and its row (not the trace name the metadata stores).
        """
        import pyarrow as pa

        md = table.schema.metadata or {}
        source = source if source is not None else md.get(META_SOURCE, b"").decode(errors="replace")
        label = name if name is not None else (
            md[META_NAME].decode(errors="replace") if META_NAME in md else None)
        where: dict[str, Any] = {"path": path} if path is not None else {"path": source or None, "label": label}

        def fail(detail: str, **at: Any) -> NoReturn:
            raise TraceError(detail, **where, **at)

        found = table.column_names
        for col in CANONICAL_NAMES:
            if found.count(col) > 1:
                at = [i + 1 for i, c in enumerate(found) if c == col]
                fail(f"column '{col}' appears {len(at)} times (columns {', '.join(map(str, at))})", field=col)
        for col in REQUIRED_NAMES:
            if col not in found:
                fail(f"missing column '{col}' (found: {', '.join(found) or 'none'})", field=col)
        np_cols: dict[str, np.ndarray] = {}
        offsets = values = None
        for col in CANONICAL_NAMES:
            if col not in found:
                continue
            chunked = table.column(col)
            if chunked.null_count:
                fail("empty or missing value", row=_first_null(chunked) + 1, field=col)
            if col != "block_hashes":
                np_cols[col] = chunked.to_numpy()
                continue
            try:
                lists = chunked.cast(canonical_types()[col]) if chunked.type != canonical_types()[col] else chunked
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                fail(f"column type {chunked.type} cannot be read as a list of int64 hashes: "
                     f"{str(exc).splitlines()[0][:120]}", field=col)
            offsets, values, _, null_inside = csr_from_arrow(lists)
            if null_inside.any():
                fail("null inside the list of hashes", row=int(np.argmax(null_inside)) + 1, field=col)
        if offsets is not None and hash_block_tokens is None:
            hash_block_tokens = _metadata_block_tokens(md, fail)
        meta: Any = {}
        if META_META in md:
            try:
                meta = json.loads(md[META_META])
            except (ValueError, RecursionError) as exc:   # JSONDecodeError and UnicodeDecodeError
                fail(f"metadata '{META_META.decode()}' is not valid JSON ({str(exc).splitlines()[0][:80]})")
            if not isinstance(meta, dict):
                fail(f"metadata '{META_META.decode()}' must be a JSON object (got {type(meta).__name__})")
        try:
            return cls(arrival_s=np_cols["arrival_s"], prompt_tokens=np_cols["prompt_tokens"],
                       output_tokens=np_cols["output_tokens"], request_id=np_cols["request_id"],
                       hash_offsets=offsets, hash_values=values,
                       hash_block_tokens=hash_block_tokens if offsets is not None else None,
                       session_id=np_cols.get("session_id"), priority=np_cols.get("priority"),
                       tenant=np_cols.get("tenant"), acceptance_rate=np_cols.get("acceptance_rate"),
                       name="trace" if label is None else label, source=source, meta=meta)
        except TraceError as exc:
            if path is None:
                raise
            raise TraceError(exc.detail, path=path, row=exc.row, field=exc.field,
                             more_rows=exc.more_rows) from None

    def to_pandas(self):
        """The canonical table as a pandas DataFrame (``block_hashes`` as one int64 array per row)."""
        return self.to_arrow().to_pandas()

    def identity(self) -> dict:
        """What a simulation result records about its input: name, source, size, transforms, sha256,
        and ``dropped_rows`` (reason -> count of rows the reader dropped from the file) when it dropped any.

        The digest covers the canonical column bytes (little-endian, in canonical order, strings
        length-prefixed UTF-8) and the hash block size, so equal digests mean equal request streams.
        """
        h = hashlib.sha256()

        def feed(tag: str, data: bytes) -> None:
            h.update(f"{tag}:{len(data)}:".encode())
            h.update(data)

        feed("request_id", self.request_id.astype("<i8").tobytes())
        feed("arrival_s", self.arrival_s.astype("<f8").tobytes())
        feed("prompt_tokens", self.prompt_tokens.astype("<i8").tobytes())
        feed("output_tokens", self.output_tokens.astype("<i8").tobytes())
        if self.hash_offsets is not None:
            feed("block_hashes.offsets", self.hash_offsets.astype("<i8").tobytes())
            feed("block_hashes.values", self.hash_values.astype("<i8").tobytes())
            feed("hash_block_tokens", str(self.hash_block_tokens).encode())
        for key in ("session_id", "tenant"):
            arr = getattr(self, key)
            if arr is not None:
                feed(key, b"".join(len(b).to_bytes(4, "little") + b for b in (s.encode() for s in arr)))
        if self.priority is not None:
            feed("priority", self.priority.astype("<i4").tobytes())
        if self.acceptance_rate is not None:
            feed("acceptance_rate", self.acceptance_rate.astype("<f8").tobytes())
        out = {"name": self.name, "source": self.source, "num_requests": len(self),
               "transforms": copy.deepcopy(self.meta.get("transforms", [])), "sha256": h.hexdigest()}
        dropped = self.dropped_rows
        if dropped:   # only then: results of traces that drop nothing stay byte-identical
            out["dropped_rows"] = dropped
        return out

    @property
    def dropped_rows(self) -> dict[str, int]:
        """Rows the reader dropped from the source file, by reason (``meta["dropped_<reason>"]``), nonzero only."""
        return {k.removeprefix("dropped_"): int(v) for k, v in self.meta.items()
                if k.startswith("dropped_") and isinstance(v, int) and v}


def _metadata_block_tokens(md: Mapping[bytes, bytes], fail: Callable[..., NoReturn]) -> int:
    """The hash block size stored in a table's ``tiersim.hash_block_tokens`` metadata, checked."""
    key = META_HASH_BLOCK_TOKENS.decode()
    if META_HASH_BLOCK_TOKENS not in md:
        fail(f"block_hashes present but no '{key}' metadata gives their block size; "
             "set trace.hash_block_tokens to it")
    raw = md[META_HASH_BLOCK_TOKENS]
    text = raw.decode(errors="replace").strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_TOKENS:
        fail(f"metadata '{key}' must be a whole number of tokens in [1, {MAX_TOKENS:,}] (got {show(text)}); "
             "set trace.hash_block_tokens to override it")
    return int(text)


def _first_null(chunked: pa.ChunkedArray) -> int:

    base = 0
    for chunk in chunked.chunks:
        if chunk.null_count:
            return base + int(np.argmax(chunk.is_null().to_numpy(zero_copy_only=False)))
        base += len(chunk)
    return 0


def _take_csr(offsets: np.ndarray, values: np.ndarray, order: Sequence[int] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Gather rows ``order`` of a CSR list column; returns new (offsets, values)."""
    order = np.asarray(order, dtype=np.int64)
    starts = offsets[:-1][order]
    lengths = offsets[1:][order] - starts
    new_offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # index of each output element in the input: its row start plus its position inside the row
    pos = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1], lengths)
    return new_offsets, values[np.repeat(starts, lengths) + pos]


def csr_from_arrow(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A list-of-integers Arrow column → (offsets, values, missing, null_inside), CSR in int64.

    ``missing[i]`` marks a null list and ``null_inside[i]`` a list holding a null element; such rows get
    no values, so the CSR stays valid and the caller can report them by row. Sliced input is handled.
    """
    import pyarrow as pa

    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    if lists.type != pa.list_(pa.int64()):
        lists = lists.cast(pa.list_(pa.int64()))
    n = len(lists)
    raw = lists.offsets.to_numpy().astype(np.int64)  # positions in the (unsliced) child array
    child = lists.values
    missing = lists.is_null().to_numpy(zero_copy_only=False)
    null_inside = np.zeros(n, bool)
    if child.null_count:
        null_at = np.flatnonzero(child.is_null().to_numpy(zero_copy_only=False))
        rows = np.searchsorted(raw, null_at, side="right") - 1
        null_inside[rows[(rows >= 0) & (rows < n)]] = True
        null_inside &= ~missing
        child = child.fill_null(0)
    values = child.to_numpy()
    keep = ~(missing | null_inside)
    if keep.all():
        return raw - raw[0], values[raw[0]:raw[-1]], missing, null_inside
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.where(keep, np.diff(raw), 0), out=offsets[1:])
    return offsets, _take_csr(raw, values, np.flatnonzero(keep))[1], missing, null_inside


def take_rows(trace: Trace, index: np.ndarray, **changes: Any) -> Trace:
    """A new Trace holding rows ``index`` (in that order) of ``trace``; ``changes`` override fields."""
    index = np.asarray(index, dtype=np.int64)
    fields: dict[str, Any] = {
        "arrival_s": trace.arrival_s[index], "prompt_tokens": trace.prompt_tokens[index],
        "output_tokens": trace.output_tokens[index], "request_id": trace.request_id[index],
        "session_id": None if trace.session_id is None else trace.session_id[index],
        "priority": None if trace.priority is None else trace.priority[index],
        "tenant": None if trace.tenant is None else trace.tenant[index],
        "acceptance_rate": None if trace.acceptance_rate is None else trace.acceptance_rate[index],
    }
    if trace.hash_offsets is not None:
        fields["hash_offsets"], fields["hash_values"] = _take_csr(trace.hash_offsets, trace.hash_values, index)
    fields.update(changes)
    return dataclasses.replace(trace, **fields)
