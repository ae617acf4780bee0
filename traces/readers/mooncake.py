"""Reader for the Mooncake FAST'25 traces (Kimi; GitHub kvcache-ai/Mooncake, ``FAST25-release/traces``).

Format: JSON lines, plain or gzip, one request per line::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, ...]}

``timestamp`` is milliseconds from the trace start; ``hash_ids`` are chained prefix-block hashes over
512-token blocks, so every row must have exactly ceil(input_length / 512) of them (the last block is
partial). The file is parsed with pyarrow's multithreaded JSON reader; if that fails, a line-by-line
parse finds the first bad line to report. JSON values keep their types: a string, boolean or list where
a number belongs is an error, and so is a key given twice in one object.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

from traces.readers.columns import SourceColumns, check_utf8, default_name, jsonl_line_of_row, read_source
from traces.schema import MAX_TOKENS, Trace, TraceError, csr_from_arrow, show

BLOCK_TOKENS = 512
SCALAR_FIELDS = ("timestamp", "input_length", "output_length")
_ARROW_SCHEMA = pa.schema([("timestamp", pa.float64()), ("input_length", pa.int64()),
                           ("output_length", pa.int64()), ("hash_ids", pa.list_(pa.int64()))])


def read_mooncake(path: str | Path, *, name: str | None = None, block_tokens: int = BLOCK_TOKENS) -> Trace:
    """Load a Mooncake-format JSONL trace into a validated Trace with block hashes.

    ``block_tokens`` is the hash block size (512 for the FAST'25 release); a file with no ``hash_ids``
    at all loads without hashes. ``request_id`` is the 0-based record number.
    """
    path = Path(path)
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or not 1 <= block_tokens <= MAX_TOKENS:
        raise TraceError(f"trace.hash_block_tokens must be a whole number in [1, {MAX_TOKENS:,}] "
                         f"(got {block_tokens!r})", path=path)
    data = read_source(path)
    check_utf8(path, data)
    try:
        frame, hashes = _parse_with_arrow(data)
        cols = SourceColumns(path, jsonl_line_of_row, typed=True)
    except pa.ArrowInvalid:
        frame, hashes, lines, syntax = _parse_with_python(data)
        cols = SourceColumns(path, lambda _path, i: int(lines[i]), typed=True)
        for field, (bad, explain) in syntax.items():
            cols.check(field, bad, explain)
    arrival, origin_s = cols.arrivals(frame["timestamp"], "timestamp", lambda ms: ms / 1000.0)
    prompt = cols.tokens(frame["input_length"], "input_length")
    output = cols.tokens(frame["output_length"], "output_length")
    offsets = values = None
    if hashes is not None:
        offsets, values, missing, malformed = hashes
        cols.check("hash_ids", missing, lambda i: "empty or missing value")
        cols.check("hash_ids", malformed, lambda i: "must be a list of integers, each within int64 (|h| < 2**63)")
        counts = np.diff(offsets)
        expected = -(-prompt // block_tokens)
        cols.check("hash_ids", (counts != expected) & ~missing & ~malformed,
                   lambda i: f"{counts[i]} block hashes for input_length {prompt[i]}, expected "
                             f"ceil({prompt[i]}/{block_tokens}) = {expected[i]}")
    cols.raise_problems()
    return Trace(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output,
                 request_id=np.arange(len(arrival), dtype=np.int64), hash_offsets=offsets,
                 hash_values=values, hash_block_tokens=block_tokens if offsets is not None else None,
                 name=name or default_name(path), source=str(path.resolve()),
                 meta={"format": "mooncake", "rows_read": len(arrival), "clock_origin_s": origin_s})


_Hashes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # offsets, values, missing, null inside


def _parse_with_arrow(data: bytes) -> tuple[pd.DataFrame, _Hashes | None]:
    """Fast path: pyarrow JSON with an explicit schema. Raises ArrowInvalid on anything unexpected."""
    table = pa_json.read_json(pa.BufferReader(data), parse_options=pa_json.ParseOptions(
        explicit_schema=_ARROW_SCHEMA, unexpected_field_behavior="ignore"))
    frame = table.select(list(SCALAR_FIELDS)).to_pandas()
    lists = table.column("hash_ids")
    if len(lists) == 0 or lists.null_count == len(lists):
        return frame, None
    return frame, csr_from_arrow(lists)


def _parse_with_python(data: bytes) -> tuple[pd.DataFrame, _Hashes | None, np.ndarray,
                                             dict[str | None, tuple[np.ndarray, Callable[[int], str]]]]:
    """Slow path, line by line: (columns, hashes, line of each row, {field: (rows with a problem, why)})
    where field None means the whole line (invalid JSON, not an object)."""
    rows: list[dict] = []
    lines: list[int] = []
    problems: dict[str | None, dict[int, str]] = {}
    for line_no, text in enumerate(io.BytesIO(data), start=1):
        if not text.strip():
            continue
        row = len(rows)
        lines.append(line_no)
        repeated: list[str] = []
        try:
            # without its line ending, so a problem at the end of the line is placed there (not at
            # column 1 of the next line) and the column is the one within this line
            obj = json.loads(text.rstrip(b"\r\n"),
                             object_pairs_hook=lambda pairs, seen=repeated: _object(pairs, seen))
        except json.JSONDecodeError as exc:
            problems.setdefault(None, {})[row] = f"invalid JSON: {_json_problem(exc)}"
            obj = {}
        except RecursionError:
            problems.setdefault(None, {})[row] = "invalid JSON: nested too deeply"
            obj = {}
        except ValueError as exc:   # e.g. an integer of more than 4,300 digits
            problems.setdefault(None, {})[row] = f"invalid JSON: {str(exc).split(';')[0][:100]}"
            obj = {}
        if not isinstance(obj, dict):
            problems.setdefault(None, {})[row] = f"not a JSON object: {show(text.strip().decode(errors='replace'))}"
            obj = {}
        for key in repeated:
            if key in SCALAR_FIELDS or key == "hash_ids":
                problems.setdefault(key, {}).setdefault(row, f"key '{key}' appears twice in the object")
        rows.append(obj)
    n = len(rows)
    frame = pd.DataFrame({f: pd.Series([r.get(f) for r in rows], dtype=object) for f in SCALAR_FIELDS})
    syntax = {}
    for field, at in problems.items():
        bad = np.zeros(n, bool)
        bad[list(at)] = True
        syntax[field] = (bad, at.__getitem__)
    line_bad = syntax.get(None, (np.zeros(n, bool),))[0]
    raw_hashes = [r.get("hash_ids") for r in rows]
    hashes = None
    if any(h is not None for h in raw_hashes):
        missing = np.array([h is None for h in raw_hashes], bool) & ~line_bad
        malformed = np.array([h is not None and not _int_list(h) for h in raw_hashes], bool)
        counts = np.array([len(h) if h is not None and not bad else 0
                           for h, bad in zip(raw_hashes, malformed)], np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        values = np.fromiter((v for h, bad in zip(raw_hashes, malformed) if h is not None and not bad
                              for v in h), dtype=np.int64, count=int(offsets[-1]))
        hashes = (offsets, values, missing, malformed)
    return frame, hashes, np.asarray(lines, np.int64), syntax


def _json_problem(exc: json.JSONDecodeError) -> str:
    """What is wrong and where in the line (one line of JSON is decoded at a time), e.g. "Expecting ','
    delimiter at the end of the line (column 56); is the line cut short?"."""
    what = exc.msg.removesuffix(" at")   # "Invalid control character at": json's wording ends in "at"
    if exc.pos >= len(exc.doc):
        return f"{what} at the end of the line (column {exc.colno}); is the line cut short?"
    return f"{what} at column {exc.colno}"


def _object(pairs: list[tuple[str, object]], repeated: list[str]) -> dict:
    """A JSON object from its key/value pairs, noting keys that appear more than once."""
    obj: dict = {}
    for k, v in pairs:
        if k in obj:
            repeated.append(k)
        obj[k] = v
    return obj


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in value)
