"""``load_trace``: one entry point that picks the reader for a file (or a bundled trace name).

Formats: ``azure``, ``mooncake``, ``burstgpt``, ``csv`` and ``parquet`` (generic, with a column mapping).
With ``format=None`` the format is detected from the extension and, for CSV, from the header.
"""
from __future__ import annotations

import csv
import inspect
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traces.bundled import BUNDLED, bundled_path
from traces.schema import Trace, TraceError

# format name -> the module and function that reads it; imported when a trace of that format is read
# (the readers need pandas, which a cached bundled trace does not)
FORMATS: dict[str, tuple[str, str]] = {
    "azure": ("traces.readers.azure", "read_azure"),
    "mooncake": ("traces.readers.mooncake", "read_mooncake"),
    "burstgpt": ("traces.readers.burstgpt", "read_burstgpt"),
    "csv": ("traces.readers.generic", "read_csv_trace"),
    "parquet": ("traces.readers.generic", "read_parquet_trace"),
}


def reader(format: str) -> Callable[..., Trace]:
    """The reader function of a format (see ``FORMATS``)."""
    import importlib

    module, name = FORMATS[format]
    return getattr(importlib.import_module(module), name)
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_LENGTHS_HEADER = {"num_prefill_tokens", "num_decode_tokens"}


def load_trace(path: str | Path, format: str | None = None, **options: Any) -> Trace:
    """Read a trace file into a validated :class:`Trace`.

    ``path`` is a file (plain or gzip) or a bundled trace name such as ``"azure-conv"``; an existing
    file of that name wins. ``options`` go to the format's reader (e.g. ``keep_failed`` for burstgpt,
    ``columns``/``time_unit``/``time_format`` for csv and parquet, ``name`` for all).
    """
    resolved, bundled_format = _resolve(path)
    if format is None:
        format = bundled_format or detect_format(resolved)
    if format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r} (known: {', '.join(FORMATS)})", path=resolved)
    from traces import cache

    # the cache first: a hit imports no reader (the readers import pandas). Options are keyed, and an
    # entry is stored only after the reader accepted them, so a hit needs no signature check
    got = cache.load(resolved, format, options)
    if got is not None:
        return got
    read = reader(format)
    try:
        inspect.signature(read).bind(resolved, **options)
    except TypeError:
        accepted = [p for p in inspect.signature(read).parameters if p != "path"]
        bad = next(k for k in options if k not in accepted)
        raise TraceError(f"unknown option {bad!r} for format {format!r} (accepted: {', '.join(accepted)})",
                         path=resolved) from None
    try:
        trace = read(resolved, **options)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, RecursionError) as exc:
        # the readers turn these into precise errors; this net keeps any they miss to one line
        raise TraceError(f"cannot read the file: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                         if str(exc) else f"cannot read the file: {type(exc).__name__}", path=resolved) from None
    cache.store(resolved, format, options, trace)
    return trace


def _resolve(path: str | Path) -> tuple[Path, str | None]:
    """An existing file, or a bundled name → (path, the bundled format or None)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate, None
    if candidate.is_dir():
        raise TraceError("a directory, not a trace file", path=candidate)
    if candidate.exists():
        raise TraceError("not a regular file", path=candidate)
    entry = BUNDLED.get(str(path))
    if entry is not None:
        if entry.format == "lengths":
            raise TraceError(f"bundled {entry.name!r} is a length distribution with no arrival times; use it "
                             'in a synthetic trace, e.g. trace.synthetic = '
                             f'"poisson rate=5 n=1000 lengths=empirical:{entry.name}"',
                             label=str(path))
        return bundled_path(entry.name), entry.format
    hint = "" if ("/" in str(path) or "." in candidate.name) else (
        f" and not a bundled trace name (bundled: {', '.join(BUNDLED)})")
    if not Path(path).is_absolute() and ("/" in str(path) or "." in candidate.name):
        hint += f" (a relative path is read against the current directory, {Path.cwd()})"
    raise TraceError(f"no such file{hint}", label=str(path), path=path)


def detect_format(path: Path) -> str:
    """Guess the format from the suffix (``.gz`` ignored), the first bytes and a CSV header."""
    from traces.readers.columns import csv_header, is_gzip, read_head, refuse_other_delimiter

    name = path.name.lower().removesuffix(".gz")
    if name.endswith(_JSON_SUFFIXES):
        return "mooncake"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    with open(path, "rb") as fh:
        if fh.read(4) == b"PAR1":
            return "parquet"
    head = read_head(path)
    if not name.endswith((".csv", ".tsv", ".txt")) and head.lstrip().startswith(b"{"):
        return "mooncake"
    try:
        header = csv_header(path)
    except TraceError:   # not UTF-8 text: that is the error to fix, not the format
        if not is_gzip(path):
            raise
        header = []
    columns = set(header)
    if {"TIMESTAMP", "ContextTokens"} <= columns:
        return "azure"
    if "Request tokens" in columns:
        return "burstgpt"
    if {"arrival_s", "prompt_tokens", "output_tokens"} <= columns:
        return "csv"
    if _LENGTHS_HEADER <= columns:
        raise TraceError("this is a length distribution with no arrival times; use it for synthetic traces "
                         f"(e.g. trace.synthetic = \"poisson rate=5 n=1000 lengths=empirical:{path}\")", path=path)
    refuse_other_delimiter(path, header)
    kind = "gzip " if is_gzip(path) else ""
    shown = ", ".join(header)
    shown = shown if len(shown) <= 120 else shown[:120] + "..."
    raise TraceError(f"cannot tell the trace format of this {kind}file from its name or header "
                     f"(columns: {shown or 'none'}); give --format (or trace.format) azure, mooncake, burstgpt, "
                     "csv or parquet, and for csv or parquet name the columns with trace.columns = "
                     '{arrival_s = "...", prompt_tokens = "...", output_tokens = "..."}', path=path)
