"""Reader for the Mooncake FAST'25 traces (Kimi; GitHub kvcache-ai/Mooncake, ``FAST25-release/traces``).

Format: JSON lines, plain or gzip, one request per line::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, ...]}

``timestamp`` is milliseconds from the trace start; ``hash_ids`` are chained prefix-block hashes over
512-token blocks, so every row must have exactly ceil(input_length / 512) of them (the last block is
partial). The file is parsed with pyarrow's multithreaded JSON reader; if that fails, a line-by-line
parse finds the first bad line to report.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

from traces.readers.columns import SourceColumns, default_name, is_gzip, jsonl_line_of_row, open_binary, rebase_seconds
from traces.schema import Trace, TraceError, csr_from_arrow

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
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise TraceError(f"block_tokens must be a positive integer (got {block_tokens!r})", path=path)
    try:
        frame, hashes = _parse_with_arrow(path)
        cols = SourceColumns(path, jsonl_line_of_row)
    except pa.ArrowInvalid:
        frame, hashes, lines, syntax = _parse_with_python(path)
        cols = SourceColumns(path, lambda _path, i: int(lines[i]))
        cols.check(None, syntax[0], syntax[1])
    ts_ms = cols.numbers(frame["timestamp"], "timestamp")
    prompt = cols.tokens(frame["input_length"], "input_length")
    output = cols.tokens(frame["output_length"], "output_length")
    offsets = values = None
    if hashes is not None:
        offsets, values, missing, malformed = hashes
        cols.check("hash_ids", missing, lambda i: "empty or missing value")
        cols.check("hash_ids", malformed, lambda i: "must be a list of integers")
        counts = np.diff(offsets)
        expected = -(-prompt // block_tokens)
        cols.check("hash_ids", (counts != expected) & ~missing & ~malformed,
                   lambda i: f"{counts[i]} block hashes for input_length {prompt[i]}, expected "
                             f"ceil({prompt[i]}/{block_tokens}) = {expected[i]}")
    cols.raise_problems()
    arrival, origin_s = rebase_seconds(ts_ms / 1000.0)
    return Trace(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output,
                 request_id=np.arange(len(arrival), dtype=np.int64), hash_offsets=offsets,
                 hash_values=values, hash_block_tokens=block_tokens if offsets is not None else None,
                 name=name or default_name(path), source=str(path.resolve()),
                 meta={"format": "mooncake", "rows_read": len(arrival), "clock_origin_s": origin_s})


_Hashes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # offsets, values, missing, null inside


def _parse_with_arrow(path: Path) -> tuple[pd.DataFrame, _Hashes | None]:
    """Fast path: pyarrow JSON with an explicit schema. Raises ArrowInvalid on anything unexpected."""
    stream = pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None)
    with stream:
        table = pa_json.read_json(stream, parse_options=pa_json.ParseOptions(
            explicit_schema=_ARROW_SCHEMA, unexpected_field_behavior="ignore"))
    frame = table.select(list(SCALAR_FIELDS)).to_pandas()
    lists = table.column("hash_ids")
    if len(lists) == 0 or lists.null_count == len(lists):
        return frame, None
    return frame, csr_from_arrow(lists)


def _parse_with_python(path: Path) -> tuple[pd.DataFrame, _Hashes | None, np.ndarray,
                                            tuple[np.ndarray, Callable[[int], str]]]:
    """Slow path, line by line: (columns, hashes, line of each row, (rows with a syntax problem, why))."""
    rows: list[dict] = []
    lines: list[int] = []
    problems: dict[int, str] = {}
    with open_binary(path) as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            row = len(rows)
            lines.append(line_no)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                problems[row] = f"invalid JSON: {exc.msg} at column {exc.colno}"
                obj = {}
            except UnicodeDecodeError as exc:
                problems[row] = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
                obj = {}
            if not isinstance(obj, dict):
                problems[row] = f"not a JSON object: {text.strip()[:40].decode(errors='replace')!r}"
                obj = {}
            rows.append(obj)
    n = len(rows)
    frame = pd.DataFrame({f: pd.Series([r.get(f) for r in rows], dtype=object) for f in SCALAR_FIELDS})
    syntax_bad = np.zeros(n, bool)
    syntax_bad[list(problems)] = True
    syntax = (syntax_bad, lambda i: problems[i])
    raw_hashes = [r.get("hash_ids") for r in rows]
    hashes = None
    if any(h is not None for h in raw_hashes):
        missing = np.array([h is None for h in raw_hashes], bool) & ~syntax_bad
        malformed = np.array([h is not None and not _int_list(h) for h in raw_hashes], bool)
        counts = np.array([len(h) if h is not None and not bad else 0
                           for h, bad in zip(raw_hashes, malformed)], np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        values = np.fromiter((v for h, bad in zip(raw_hashes, malformed) if h is not None and not bad
                              for v in h), dtype=np.int64, count=int(offsets[-1]))
        hashes = (offsets, values, missing, malformed)
    return frame, hashes, np.asarray(lines, np.int64), syntax


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in value)
