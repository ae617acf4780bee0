"""Source columns → validated canonical arrays, with errors that point at the file's row and line.

Readers load a whole table with one vectorised call (pandas or pyarrow), hand each source column to a
:class:`SourceColumns`, and call :meth:`SourceColumns.raise_problems` once. Checks are vectorised; only
when one fails does the reader go back to the file to find the physical line of the first bad row, so
the fast path never pays for error reporting.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from traces.schema import RowCheck, TraceError, raise_first_failure

GZIP_MAGIC = b"\x1f\x8b"
_NS_PER_DAY = 86_400 * 10**9


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes (the extension is not trusted)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a possibly gzip-compressed file for reading bytes (decompressed)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def open_text(path: Path) -> io.TextIOBase:
    """Open a possibly gzip-compressed UTF-8 file, keeping line endings as written (``newline=''``)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="")


def csv_header(path: Path) -> list[str]:
    """Column names of a CSV file (whitespace around names stripped); [] for an empty file."""
    try:
        with open_text(path) as fh:
            for row in csv.reader(fh):
                if row:
                    return [c.strip() for c in row]
    except UnicodeDecodeError as exc:
        raise TraceError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", path=path) from None
    return []


def csv_line_of_row(path: Path, row_index: int) -> int | None:
    """The 1-based file line on which 0-based data row ``row_index`` ends (blank lines skipped, as pandas does)."""
    with open_text(path) as fh:
        reader = csv.reader(fh)
        seen_header = False
        data_row = -1
        for record in reader:
            if not record:
                continue
            if not seen_header:
                seen_header = True
                continue
            data_row += 1
            if data_row == row_index:
                return reader.line_num
    return None


def jsonl_line_of_row(path: Path, row_index: int) -> int | None:
    """The 1-based line of 0-based JSON-lines record ``row_index``, skipping blank lines."""
    with open_text(path) as fh:
        data_row = -1
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                data_row += 1
                if data_row == row_index:
                    return line_no
    return None


def read_csv_columns(path: Path, required: Sequence[str], optional: Sequence[str] = (),
                     as_text: Iterable[str] = ()) -> pd.DataFrame:
    """Read the named columns of a CSV (gzip allowed) in one vectorised pass.

    Missing required columns raise ``missing column 'X' (found: ...)``. Columns in ``as_text`` are kept
    as strings (timestamps, ids); others get pandas' type inference, checked later by SourceColumns.
    All columns are parsed (not only the wanted ones) so that a row with too many fields is an error
    rather than silently cut short.
    """
    header = csv_header(path)
    for col in required:
        if col not in header:
            raise TraceError(f"missing column '{col}' (found: {', '.join(header) or 'nothing'})",
                             path=path, field=col)
    wanted = [c for c in (*required, *optional) if c in header]
    text = set(as_text)
    try:
        frame = pd.read_csv(path, low_memory=False, compression="gzip" if is_gzip(path) else None,
                            dtype={c: str for c in header if c in text}, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        message = str(exc).splitlines()[0]
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
        if found:
            expected, line, saw = found.groups()
            raise TraceError(f"expected {expected} fields, found {saw}", path=path, line=int(line)) from None
        raise TraceError(f"cannot parse as CSV: {message}", path=path) from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", path=path) from None
    frame.columns = [c.strip() for c in frame.columns]
    return frame[wanted]


class SourceColumns:
    """Validates one source table's columns and collects every per-row problem found.

    Each method returns the canonical array (bad rows hold a harmless placeholder) and records a
    RowCheck; :meth:`raise_problems` then reports the first bad row across all columns. Series must keep
    the source's 0-based row positions as their index, so rows a reader dropped still report correctly.
    Invariant: nothing returned is trusted until ``raise_problems`` has been called and returned.
    """

    def __init__(self, path: Path, line_of: Callable[[Path, int], int | None] | None) -> None:
        self.path = path
        self._line_of = line_of
        self._checks: list[RowCheck] = []
        self._index: np.ndarray | None = None

    def _track(self, series: pd.Series) -> None:
        index = series.index.to_numpy()
        if self._index is None:
            self._index = index
        elif not np.array_equal(self._index, index):
            raise ValueError("all columns given to one SourceColumns must share their row index")

    def _check(self, field: str | None, bad: np.ndarray, explain: Callable[[int], str]) -> None:
        self._checks.append(RowCheck(field, np.asarray(bad, dtype=bool), explain))

    def tokens(self, series: pd.Series, field: str) -> np.ndarray:
        """A token-count column → int64; empty, non-numeric, fractional, zero or negative values are errors."""
        return self.integers(series, field, minimum=1)

    def integers(self, series: pd.Series, field: str, *, minimum: int | None = None,
                 dtype: type = np.int64) -> np.ndarray:
        """A whole-number column → ``dtype``, optionally with a lower bound."""
        self._track(series)
        if pd.api.types.is_integer_dtype(series.dtype) and not series.hasnans:
            values = series.to_numpy(dtype=np.int64)
            bad = np.zeros(len(values), bool)
            number = values.astype(np.float64)
        else:
            number = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            bad = ~np.isfinite(number) | (number != np.round(number))
            values = np.where(bad, 0, number).astype(np.int64)
        if minimum is not None:
            bad = bad | (values < minimum)
        if dtype is np.int32:
            info = np.iinfo(np.int32)
            bad = bad | (values < info.min) | (values > info.max)

        def explain(i: int) -> str:
            raw = series.iloc[i]
            if _is_empty(raw):
                return "empty or missing value"
            if not np.isfinite(number[i]):
                return f"not a number: {raw!r}"
            if number[i] != np.round(number[i]):
                return f"not a whole number: {raw!r}"
            v = values[i]
            if minimum == 1 and v < 0:
                return f"negative token count {v}"
            if minimum == 1 and v == 0:
                return "zero token count (must be >= 1)"
            if minimum is not None and v < minimum:
                return f"{v} is below the minimum {minimum}"
            return f"{v} does not fit in {np.dtype(dtype).name}"

        self._check(field, bad, explain)
        return values.astype(dtype)

    def numbers(self, series: pd.Series, field: str) -> np.ndarray:
        """A real-valued column (e.g. timestamps in a numeric unit) → float64; must be finite."""
        self._track(series)
        number = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(number)

        def explain(i: int) -> str:
            raw = series.iloc[i]
            return "empty or missing value" if _is_empty(raw) else f"not a finite number: {raw!r}"

        self._check(field, bad, explain)
        return np.where(bad, 0.0, number)

    def datetimes(self, series: pd.Series, field: str, fmt: str | None) -> np.ndarray:
        """A date-time column → int64 nanoseconds since the Unix epoch (naive times read as UTC).

        ``fmt`` is a strptime format; None lets pandas infer one from the first value. Values already
        typed as date-times (Parquet) are used directly.
        """
        self._track(series)
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            parsed = series.dt.tz_convert("UTC").dt.tz_localize(None)
        elif pd.api.types.is_datetime64_dtype(series.dtype):
            parsed = series
        else:
            try:
                parsed = pd.to_datetime(series, format=fmt, errors="coerce")
            except (ValueError, TypeError) as exc:  # a format pandas itself rejects
                raise TraceError(f"bad timestamp format {fmt!r}: {exc}".splitlines()[0],
                                 path=self.path, field=field) from None
            if fmt is None and (parsed.isna() & series.notna()).any():
                # pandas inferred one format from the first value and some values do not fit it:
                # parse value by value instead (slower, so only when needed)
                parsed = pd.to_datetime(series, format="mixed", errors="coerce", utc=True)
            if isinstance(parsed.dtype, pd.DatetimeTZDtype):
                parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
        bad = parsed.isna().to_numpy()
        ns = parsed.dt.as_unit("ns").to_numpy(dtype="datetime64[ns]").view(np.int64)

        def explain(i: int) -> str:
            raw = series.iloc[i]
            if _is_empty(raw):
                return "empty or missing value"
            expected = f" (expected format {fmt!r})" if fmt else ""
            return f"unparsable timestamp {raw!r}{expected}"

        self._check(field, bad, explain)
        return np.where(bad, 0, ns)

    def strings(self, series: pd.Series, field: str) -> np.ndarray:
        """A text column → object array of str; empty values are errors. Numbers are kept as their text."""
        self._track(series)
        bad = series.isna().to_numpy() | (series.astype(str).str.strip() == "").to_numpy()
        self._check(field, bad, lambda i: "empty or missing value")
        return np.asarray(series.astype(str).str.strip().to_numpy(dtype=object), dtype=object)

    def check(self, field: str | None, bad: np.ndarray, explain: Callable[[int], str]) -> None:
        """Add a reader-specific rule (e.g. Mooncake's hash count per row); field None for whole-row problems."""
        self._check(field, bad, explain)

    def raise_problems(self) -> None:
        """Raise TraceError for the first bad row (file row and line), with the count of further bad rows."""
        index = self._index if self._index is not None else np.zeros(0, np.int64)

        def line_of(i: int) -> int | None:
            return self._line_of(self.path, int(index[i])) if self._line_of else None

        raise_first_failure(self._checks, path=self.path, row_number=lambda i: int(index[i]) + 1,
                            line_of=line_of)


def _is_empty(raw: object) -> bool:
    return raw is None or (isinstance(raw, float) and np.isnan(raw)) or raw is pd.NA or (
        isinstance(raw, str) and not raw.strip())


def rebase_seconds(seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Shift arrivals so the earliest is 0.0; returns (arrival_s, the source clock at arrival 0)."""
    if seconds.size == 0:
        return seconds.astype(np.float64), 0.0
    origin = float(seconds.min())
    return seconds - origin, origin


def rebase_datetimes(ns: np.ndarray) -> tuple[np.ndarray, float, str]:
    """Epoch nanoseconds → (arrival_s from the earliest, its seconds since midnight, its ISO time).

    Differences are taken in integer nanoseconds before converting, so microsecond timestamps a day
    apart stay exact; the clock origin is seconds since midnight (not since 1970) for the same reason.
    """
    if ns.size == 0:
        return np.zeros(0, np.float64), 0.0, ""
    first = int(ns.min())
    arrival = (ns - first).astype(np.float64) / 1e9
    iso = str(np.datetime64(first, "ns"))
    if "." in iso:
        iso = iso.rstrip("0").rstrip(".")
    return arrival, (first % _NS_PER_DAY) / 1e9, iso


def default_name(path: Path) -> str:
    """A short trace name from a file name: the stem without compression and format suffixes."""
    name = path.name
    for suffix in (".gz", ".csv", ".jsonl", ".json", ".ndjson", ".parquet", ".pq"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or path.name
