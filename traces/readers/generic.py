"""Reader for any CSV or Parquet trace, given which source column holds each canonical column.

``columns`` maps canonical names to source columns, e.g. ``{"arrival_s": "arrived_at",
"prompt_tokens": "num_prefill_tokens", "output_tokens": "num_decode_tokens"}``. A canonical column not
in the mapping is taken from a source column of the same name when one exists, so a file written from
``Trace.to_pandas()`` needs no mapping. ``time_unit`` says what the arrival column holds: ``s``, ``ms``,
``us``, ``ns`` (numbers) or ``datetime`` (text parsed with ``time_format``, a strptime format, or
inferred when None; Parquet timestamp columns are used as they are). Arrivals are re-based so the first
is 0.0 s. From the command line and config files these are the ``[trace]`` keys ``columns``,
``time_unit``, ``time_format`` and ``hash_block_tokens``, which is why messages name those keys.

``block_hashes`` can only come from Parquet (a list<int64> column), with ``hash_block_tokens`` given or
stored in the file's ``tiersim.hash_block_tokens`` metadata. A Parquet file carrying ``tiersim.meta``
metadata (written from :meth:`Trace.to_arrow`) and read with no mapping comes back exactly as written.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from traces.readers.columns import (
    SourceColumns,
    csv_header,
    csv_line_of_row,
    default_name,
    read_csv_columns,
    refuse_other_delimiter,
)
from traces.schema import (
    CANONICAL_COLUMNS,
    MAX_TOKENS,
    META_HASH_BLOCK_TOKENS,
    META_META,
    REQUIRED_COLUMNS,
    TIME_UNITS,
    Trace,
    TraceError,
    csr_from_arrow,
    show,
)

_TEXT_COLUMNS = ("session_id", "tenant")


def read_csv_trace(path: str | Path, *, columns: Mapping[str, str] | None = None, time_unit: str = "s",
                   time_format: str | None = None, name: str | None = None) -> Trace:
    """Load a CSV (plain or gzip) trace with a column mapping; see the module docstring."""
    path = Path(path)
    header = csv_header(path)
    if not header:
        raise TraceError("the file is empty (no header, no rows)", path=path)
    refuse_other_delimiter(path, header)
    mapping = _resolve_mapping(path, columns, header, time_unit, time_format)
    if "block_hashes" in mapping:
        raise TraceError("CSV has no list type for block hashes; store them in Parquet", path=path,
                         field=mapping["block_hashes"])
    text = [mapping[k] for k in _TEXT_COLUMNS if k in mapping]
    if time_unit == "datetime":
        text.append(mapping["arrival_s"])
    frame = read_csv_columns(path, list(dict.fromkeys(mapping.values())), as_text=text)
    return _build(path, frame, mapping, time_unit, time_format, None, None, "csv", name,
                  SourceColumns(path, csv_line_of_row))


def read_parquet_trace(path: str | Path, *, columns: Mapping[str, str] | None = None,
                       time_unit: str = "s", time_format: str | None = None,
                       hash_block_tokens: int | None = None, name: str | None = None) -> Trace:
    """Load a Parquet trace with a column mapping; see the module docstring."""
    path = Path(path)
    _check_block_tokens(path, hash_block_tokens)
    schema = _parquet(path, lambda: pq.read_schema(path))
    metadata = schema.metadata or {}
    if columns is None and time_unit == "s" and META_META in metadata:
        table = _parquet(path, lambda: pq.read_table(path))
        return Trace.from_arrow(table, source=str(path.resolve()), name=name,
                                hash_block_tokens=hash_block_tokens, path=path)
    mapping = _resolve_mapping(path, columns, schema.names, time_unit, time_format)
    for source in dict.fromkeys(mapping.values()):
        at = [i + 1 for i, c in enumerate(schema.names) if c == source]
        if len(at) > 1:
            raise TraceError(f"column '{source}' appears {len(at)} times (columns {', '.join(map(str, at))})",
                             path=path, field=source)
    table = _parquet(path, lambda: pq.read_table(path, columns=list(dict.fromkeys(mapping.values()))))
    scalar = [c for k, c in mapping.items() if k != "block_hashes"]
    frame = _parquet(path, lambda: table.select(list(dict.fromkeys(scalar))).to_pandas())
    hashes = None
    if "block_hashes" in mapping:
        if hash_block_tokens is None:
            raw = metadata.get(META_HASH_BLOCK_TOKENS)
            text = None if raw is None else raw.decode(errors="replace").strip()
            if text is None or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_TOKENS:
                got = "none" if text is None else show(text)
                raise TraceError(f"block hashes need their block size: the file's "
                                 f"'{META_HASH_BLOCK_TOKENS.decode()}' metadata is {got}; set trace.hash_block_tokens",
                                 path=path, field=mapping["block_hashes"])
            hash_block_tokens = int(text)
        hashes = table.column(mapping["block_hashes"])
    return _build(path, frame, mapping, time_unit, time_format, hashes, hash_block_tokens, "parquet",
                  name, SourceColumns(path, None))


def _parquet(path: Path, read):
    """Run a pyarrow read of ``path``; whatever pyarrow raises on a corrupt file becomes a TraceError."""
    try:
        return read()
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise TraceError(f"cannot read as Parquet: {detail}", path=path) from None


def _check_block_tokens(path: Path, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS):
        raise TraceError(f"trace.hash_block_tokens must be a whole number in [1, {MAX_TOKENS:,}] (got {value!r})",
                         path=path)


def _resolve_mapping(path: Path, columns: Mapping[str, str] | None, available: list[str],
                     time_unit: str, time_format: str | None) -> dict[str, str]:
    """Canonical name → source column, after checking the mapping, the time unit and the header."""
    if time_unit not in TIME_UNITS:
        raise TraceError(f"unknown trace.time_unit {time_unit!r} (known: {', '.join(TIME_UNITS)})", path=path)
    if time_format is not None and time_unit != "datetime":
        raise TraceError(f'trace.time_format is only used with trace.time_unit = "datetime" '
                         f"(got {time_unit!r})", path=path)
    given = dict(columns or {})
    unknown = [k for k in given if k not in CANONICAL_COLUMNS]
    if unknown:
        raise TraceError(f"unknown canonical column '{unknown[0]}' in trace.columns "
                         f"(known: {', '.join(CANONICAL_COLUMNS)})", path=path)
    found = _listed(available)
    mapping: dict[str, str] = {}
    for canonical in CANONICAL_COLUMNS:
        if canonical in given:
            source = given[canonical]
            if source not in available:
                raise TraceError(f"missing column '{source}' (mapped to '{canonical}' by trace.columns; "
                                 f"found: {found})", path=path, field=source)
            mapping[canonical] = source
        elif canonical in available:
            mapping[canonical] = canonical
        elif canonical in REQUIRED_COLUMNS and canonical != "request_id":
            raise TraceError(f"missing column '{canonical}' (found: {found}); map it with "
                             f'trace.columns = {{{canonical} = "SOURCE_COLUMN"}}', path=path, field=canonical)
    return mapping


def _listed(names: list[str], limit: int = 160) -> str:
    text = ", ".join(names) or "nothing"
    return text if len(text) <= limit else text[:limit] + f"... ({len(names)} columns)"


def _build(path: Path, frame: pd.DataFrame, src: dict[str, str], time_unit: str,
           time_format: str | None, hashes: pa.ChunkedArray | None, hash_block_tokens: int | None,
           file_format: str, name: str | None, cols: SourceColumns) -> Trace:
    """Validate the columns of ``frame`` named by ``src`` (canonical → source) and assemble the Trace."""
    meta: dict = {"format": file_format, "rows_read": len(frame), "columns": dict(src),
                  "time_unit": time_unit}
    if time_unit == "datetime":
        arrival, meta["clock_origin_s"], meta["time_origin"] = cols.datetime_arrivals(
            frame[src["arrival_s"]], src["arrival_s"], time_format)
    else:
        if pd.api.types.is_datetime64_any_dtype(frame[src["arrival_s"]].dtype):
            raise TraceError(f"column '{src['arrival_s']}' holds date-times; set trace.time_unit = \"datetime\"",
                             path=path, field=src["arrival_s"])
        unit = TIME_UNITS[time_unit]
        arrival, meta["clock_origin_s"] = cols.arrivals(frame[src["arrival_s"]], src["arrival_s"],
                                                        lambda v: v * unit)
    prompt = cols.tokens(frame[src["prompt_tokens"]], src["prompt_tokens"])
    output = cols.tokens(frame[src["output_tokens"]], src["output_tokens"])
    request_id = None
    if "request_id" in src:
        request_id = cols.integers(frame[src["request_id"]], src["request_id"])
        repeated = pd.Series(request_id).duplicated().to_numpy()
        cols.check(src["request_id"], repeated, lambda i: f"duplicate request id {request_id[i]}")
    priority = (cols.integers(frame[src["priority"]], src["priority"], dtype=np.int32)
                if "priority" in src else None)
    text = {k: cols.strings(frame[src[k]], src[k]) for k in _TEXT_COLUMNS if k in src}
    rate = cols.numbers(frame[src["acceptance_rate"]], src["acceptance_rate"]) if "acceptance_rate" in src else None
    offsets = values = None
    if hashes is not None:
        offsets, values = _hash_csr(hashes, cols, src["block_hashes"])
        blocks = np.diff(offsets)
        most = -(-prompt // hash_block_tokens)
        cols.check(src["block_hashes"], blocks > most,
                   lambda i: f"{blocks[i]} blocks for {prompt[i]} prompt tokens "
                             f"(at most {most[i]} blocks of {hash_block_tokens} tokens)")
    cols.raise_problems()
    return Trace(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, request_id=request_id,
                 hash_offsets=offsets, hash_values=values,
                 hash_block_tokens=hash_block_tokens if offsets is not None else None,
                 session_id=text.get("session_id"), tenant=text.get("tenant"), priority=priority,
                 acceptance_rate=rate, name=name or default_name(path), source=str(path.resolve()), meta=meta)


def _hash_csr(column: pa.ChunkedArray, cols: SourceColumns, field: str) -> tuple[np.ndarray, np.ndarray]:
    """A list-of-integers Arrow column → CSR (offsets, values); nulls are reported as bad rows."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not (
            pa.types.is_integer(column.type.value_type)):
        raise TraceError(f"column type {column.type} is not a list of integers", path=cols.path, field=field)
    offsets, values, missing, null_inside = csr_from_arrow(column)
    cols.check(field, missing, lambda i: "empty or missing value")
    cols.check(field, null_inside, lambda i: "null inside the list of hashes")
    return offsets, values
