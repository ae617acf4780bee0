"""Source files and columns → validated canonical arrays, with errors that point at the file's row and line.

Readers get a file's bytes from :func:`read_source` (gzip decompressed and checked, a UTF-8 BOM dropped;
CRLF and CR line endings are left to the parsers, which accept them), load the whole table with one
vectorised call (pandas or pyarrow), hand each source column to a :class:`SourceColumns`, and call
:meth:`SourceColumns.raise_problems` once. Checks are vectorised; only when one fails does the reader go
back to the file to find the physical line of the first bad row, so the fast path never pays for error
reporting. Every problem is a :class:`TraceError` naming the file (and row, line and field where there
is one); no decompression, decoding or parsing error escapes as another exception.
"""
from __future__ import annotations

import codecs
import csv
import io
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from traces.schema import (
    ARRIVAL_LIMIT,
    MAX_ARRIVAL_S,
    MAX_TOKENS,
    RowCheck,
    TraceError,
    raise_first_failure,
    show,
)

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_NS_PER_DAY = 86_400 * 10**9
_HEAD_BYTES = 1 << 16
_INT64_MAX = np.iinfo(np.int64).max
_DATE_RANGE = f"{pd.Timestamp.min:%Y-%m-%d} to {pd.Timestamp.max:%Y-%m-%d}"


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes (the extension is not trusted)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _read_bytes(path: Path, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise TraceError(f"cannot read the file: {exc.strerror or exc}", path=path) from None


def _gunzip(path: Path, raw: bytes, limit: int = 0) -> bytes:
    """Decompress gzip data (all members); ``limit`` > 0 returns only the first ``limit`` bytes and
    accepts a stream cut short (to peek at a header). Corrupt or truncated data is a TraceError."""
    out: list[bytes] = []
    size = 0
    data = raw
    try:
        while data:
            d = zlib.decompressobj(wbits=31)
            chunk = d.decompress(data, max(limit - size, 0) if limit else 0)
            out.append(chunk)
            size += len(chunk)
            if limit and size >= limit:
                break
            if not d.eof:
                if limit:
                    break
                raise TraceError(f"truncated gzip data: the stream ends after {len(raw):,} compressed bytes "
                                 "without its end marker (an interrupted download or copy?)", path=path)
            data = d.unused_data
            if not data.strip(b"\x00"):     # zero padding after the last member, as gzip(1) accepts
                break
            if data[:2] != GZIP_MAGIC:
                raise TraceError(f"{len(data):,} bytes of garbage after the end of the gzip data", path=path)
    except zlib.error as exc:
        raise TraceError(f"corrupt gzip data ({str(exc).removeprefix('Error -3 while decompressing data: ')})",
                         path=path) from None
    return b"".join(out)


def read_source(path: Path) -> bytes:
    """The file's content: gzip decompressed (the CRC and length are checked), a UTF-8 BOM removed."""
    raw = _read_bytes(path)
    data = _gunzip(path, raw) if raw[:2] == GZIP_MAGIC else raw
    return data[3:] if data.startswith(UTF8_BOM) else data


def read_head(path: Path, size: int = _HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of the content (decompressed, BOM removed), for format detection."""
    raw = _read_bytes(path, size)
    if raw[:2] == GZIP_MAGIC:
        raw = _read_bytes(path, 16 * size)
        data = _gunzip(path, raw, limit=size)
    else:
        data = raw
    return data[3:] if data.startswith(UTF8_BOM) else data


def check_utf8(path: Path, data: bytes, final: bool = True) -> str:
    """``data`` decoded as UTF-8; anything else is a TraceError naming the line of the first bad byte.
    ``final=False`` for a peek at the start of a file: a character cut at its end is not an error."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as exc:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise TraceError("UTF-16 text; save the file as UTF-8", path=path) from None
        line = (data.count(b"\n", 0, exc.start) or data.count(b"\r", 0, exc.start)) + 1
        raise TraceError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start:,} "
                         f"({exc.reason}); save the file as UTF-8", path=path, line=line) from None


def _first_csv_row(path: Path, text: str) -> list[str]:
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            if row:
                return [c.strip() for c in row]
    except csv.Error as exc:
        raise TraceError(f"cannot read the header: {exc}", path=path, line=1) from None
    return []


def csv_header(path: Path, data: bytes | None = None) -> list[str]:
    """Column names of a CSV file (whitespace around names stripped); [] for an empty file.

    ``data`` is the file's content when the caller has it; either way only its start is decoded.
    """
    # a peek for format detection may cut a long header; the reader's header (from the data, up to
    # 1 MiB, more than the csv module's field limit) is whole, so an over-long name is an error there
    size = _HEAD_BYTES if data is None else 16 * _HEAD_BYTES
    head = read_head(path) if data is None else data[:size]
    return _first_csv_row(path, check_utf8(path, head, final=len(head) < size))


def refuse_other_delimiter(path: Path, header: Sequence[str]) -> None:
    """A header that is one field holding ';' or a tab: the file is separated by that, not by commas,
    and every column would be reported missing; say so, with a conversion that keeps quoted values."""
    if len(header) != 1 or not (sep := next((c for c in (";", "\t") if c in header[0]), None)):
        return
    base = path.name.removesuffix(".gz")
    stem = base.rsplit(".", 1)[0] if base.lower().endswith((".csv", ".tsv", ".txt")) else base
    out = path.with_name(stem + ("-comma.csv" if f"{stem}.csv" == base else ".csv"))
    shown, code = ("';'", ";") if sep == ";" else ("tabs", "\\t")
    raise TraceError(f"the header is separated by {shown}, not ','; tiersim reads comma-separated files: "
                     f"convert it (e.g. python -c \"import pandas as pd; pd.read_csv('{path}', sep='{code}')"
                     f".to_csv('{out}', index=False)\")", path=path)


def csv_line_of_row(path: Path, row_index: int) -> int | None:
    """The 1-based file line on which 0-based data row ``row_index`` ends (blank lines skipped, as pandas
    does); None when it cannot be told (e.g. a field longer than the csv module reads)."""
    reader = csv.reader(io.StringIO(read_source(path).decode("utf-8", errors="replace"), newline=""))
    seen_header = False
    data_row = -1
    try:
        for record in reader:
            if not record:
                continue
            if not seen_header:
                seen_header = True
                continue
            data_row += 1
            if data_row == row_index:
                return reader.line_num
    except csv.Error:
        return None
    return None


def jsonl_line_of_row(path: Path, row_index: int) -> int | None:
    """The 1-based line of 0-based JSON-lines record ``row_index``, skipping blank lines."""
    data_row = -1
    for line_no, line in enumerate(io.BytesIO(read_source(path)), start=1):
        if line.strip():
            data_row += 1
            if data_row == row_index:
                return line_no
    return None


def _refuse_bare_cr(path: Path, data: bytes, header: Sequence[str]) -> None:
    """A carriage return outside quotes and not before a newline, in a file whose lines end in newlines:
    CSV parsers end the row there, so the row's later fields would be reported missing. Name the field
    it sits in instead (quoted cells are left to the parser: there it is part of the value)."""
    if b"\n" not in data or re.search(rb"\r(?!\n)", data) is None:
        return
    line, field, quoted, start = 1, 0, False, True
    for i, ch in enumerate(data):
        if ch == 0x22 and (start or quoted):        # a quote opening or closing a quoted field
            quoted = not quoted
        elif quoted:
            pass
        elif ch == 0x2C:                            # ,
            field += 1
        elif ch == 0x0A:                            # \n
            line, field = line + 1, 0
        elif ch == 0x0D and data[i + 1:i + 2] != b"\n":
            name = header[field] if field < len(header) else f"column {field + 1}"
            raise TraceError("a bare carriage return (\\r) inside the line; CSV readers end the row there: "
                             "remove it or quote the cell", path=path, row=line - 1 if line > 1 else None,
                             line=line, field=name)
        start = ch in (0x2C, 0x0A) or (start and ch == 0x20)


def read_csv_columns(path: Path, required: Sequence[str], optional: Sequence[str] = (),
                     as_text: Iterable[str] = ()) -> pd.DataFrame:
    """Read the named columns of a CSV (gzip allowed) in one vectorised pass.

    Missing required columns raise ``missing column 'X' (found: ...)``, and a wanted column that appears
    twice raises an error naming both positions. Columns in ``as_text`` are kept as strings (timestamps,
    ids); others get pandas' type inference, checked later by SourceColumns. All columns are parsed (not
    only the wanted ones) so that a row with too many fields is an error rather than silently cut short.
    """
    data = read_source(path)
    if not data.strip():
        raise TraceError("the file is empty (no header, no rows)", path=path)
    header = csv_header(path, data)
    refuse_other_delimiter(path, header)
    _refuse_bare_cr(path, data, header)
    wanted = [c for c in (*required, *optional) if c in header]
    for col in wanted:
        at = [i + 1 for i, c in enumerate(header) if c == col]
        if len(at) > 1:
            raise TraceError(f"column '{col}' appears {len(at)} times (columns {', '.join(map(str, at))}); "
                             "keep one", path=path, field=col)
    for col in required:
        if col not in header:
            raise TraceError(f"missing column '{col}' (found: {_names(header)})", path=path, field=col)
    text_cols = set(as_text)
    try:
        # pandas' own names for the header (leading spaces dropped, duplicates numbered), so dtypes apply
        names = pd.read_csv(io.BytesIO(data), nrows=0, skipinitialspace=True).columns
        # only an empty field is missing: "nan" or "NA" written in a file is a value, reported as written
        frame = pd.read_csv(io.BytesIO(data), low_memory=False, skipinitialspace=True,
                            keep_default_na=False, na_values=[""],
                            dtype={n: str for n, c in zip(names, header) if c in text_cols})
    except pd.errors.ParserError as exc:
        message = str(exc).splitlines()[0]
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
        if found:
            expected, line, saw = found.groups()
            raise TraceError(f"expected {expected} fields, found {saw}", path=path, line=int(line)) from None
        found = re.search(r"EOF inside string starting at row (\d+)", message)
        if found:
            raise TraceError("a quoted field is never closed (the file ends inside it)", path=path,
                             line=int(found.group(1)) + 1) from None
        raise TraceError(f"cannot parse as CSV: {message.removeprefix('Error tokenizing data. ')}", path=path) from None
    except pd.errors.EmptyDataError:
        raise TraceError("the file is empty (no header, no rows)", path=path) from None
    except UnicodeDecodeError:   # pandas decodes in chunks; find the line of the first bad byte
        check_utf8(path, data)
        raise
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas takes the leading fields of a first row longer than the header as an index: refuse it
        raise TraceError(f"expected {len(header)} fields, found {len(header) + frame.index.nlevels}",
                         path=path, line=csv_line_of_row(path, 0))
    if len(frame.columns) != len(header):
        raise TraceError(f"the header has {len(header)} columns but the rows {len(frame.columns)}", path=path)
    frame.columns = header
    return frame[wanted]


def _names(header: Sequence[str], limit: int = 160) -> str:
    text = ", ".join(header) or "nothing"
    return text if len(text) <= limit else text[:limit] + f"... ({len(header)} columns)"


class SourceColumns:
    """Validates one source table's columns and collects every per-row problem found.

    Each method returns the canonical array (bad rows hold a harmless placeholder) and records a
    RowCheck; :meth:`raise_problems` then reports the first bad row across all columns. Series must keep
    the source's 0-based row positions as their index, so rows a reader dropped still report correctly.
    ``typed`` sources (JSON) have value types of their own: a string where a number belongs is refused
    there, while in CSV every value is text. Booleans are never numbers.
    Invariant: nothing returned is trusted until ``raise_problems`` has been called and returned.
    """

    def __init__(self, path: Path, line_of: Callable[[Path, int], int | None] | None, *,
                 typed: bool = False) -> None:
        self.path = path
        self._line_of = line_of
        self._typed = typed
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

    def _wrong_type(self, series: pd.Series) -> tuple[np.ndarray, Callable[[int], str]]:
        """Rows whose value has a type no number may have: booleans, date-times, and (typed) strings."""
        kind = series.dtype.kind
        if kind == "b":
            return np.ones(len(series), bool), lambda i: f"a boolean ({series.iloc[i]}), not a number"
        if kind in "mM":
            return np.ones(len(series), bool), lambda i: f"a date-time ({series.iloc[i]}), not a number"
        if kind != "O":
            return np.zeros(len(series), bool), str
        values = series.to_numpy()
        is_bool = np.fromiter((isinstance(v, (bool, np.bool_)) for v in values), bool, len(values))
        is_text = (np.fromiter((isinstance(v, str) for v in values), bool, len(values)) if self._typed
                   else np.zeros(len(values), bool))
        is_other = (np.fromiter((isinstance(v, (list, dict)) for v in values), bool, len(values)))

        def explain(i: int) -> str:
            v = values[i]
            if is_bool[i]:
                return f"a boolean ({str(v).lower() if self._typed else v}), not a number"
            kind = "a string" if isinstance(v, str) else "a list" if isinstance(v, list) else "an object"
            return f"{kind} ({show(v)}), not a number"

        return is_bool | is_text | is_other, explain

    def tokens(self, series: pd.Series, field: str) -> np.ndarray:
        """A token-count column → int64 in [1, MAX_TOKENS]; anything else in a row is an error."""
        return self.integers(series, field, minimum=1, maximum=MAX_TOKENS)

    def integers(self, series: pd.Series, field: str, *, minimum: int | None = None,
                 maximum: int | None = None, dtype: type = np.int64) -> np.ndarray:
        """A whole-number column → ``dtype``, optionally bounded. Values that do not fit are refused with
        what the file says, never wrapped around."""
        self._track(series)
        wrong, wrong_why = self._wrong_type(series)
        too_big = np.zeros(len(series), bool)
        if pd.api.types.is_integer_dtype(series.dtype) and not series.hasnans:
            raw = series.to_numpy()
            number = raw.astype(np.float64)
            if raw.dtype.kind == "u":
                too_big = raw > _INT64_MAX
                raw = np.where(too_big, 0, raw)
            values = raw.astype(np.int64)
            bad = too_big.copy()
        else:
            clean = series.where(~wrong, np.nan) if wrong.any() else series
            number = pd.to_numeric(clean, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            unfit = ~np.isfinite(number) | (number != np.round(number))
            too_big = ~unfit & (np.abs(number) >= 2.0**63)
            bad = unfit | too_big
            values = np.where(bad, 0, number).astype(np.int64)
        bad |= wrong
        info = np.iinfo(dtype)
        low = info.min if minimum is None else max(minimum, info.min)
        high = info.max if maximum is None else min(maximum, info.max)
        bad |= (values < low) | (values > high)
        word = "token count" if minimum == 1 else "value"

        def explain(i: int) -> str:
            raw = series.iloc[i]
            if wrong[i]:
                return wrong_why(i)
            if _is_empty(raw):
                return "empty or missing value"
            if not np.isfinite(number[i]):
                return f"not a number: {show(raw)}"
            if number[i] != np.round(number[i]):
                return f"not a whole number: {show(raw)}"
            if too_big[i] or values[i] > high:
                text = f"{int(raw):,}" if isinstance(raw, (int, np.integer)) else (
                    f"{float(raw):g}" if isinstance(raw, (float, np.floating)) else show(raw))
                if maximum is not None and number[i] > 0:
                    return f"{word} {text} exceeds the limit of {maximum:,}" + (
                        " per request" if minimum == 1 else "")
                return f"{text} does not fit in {np.dtype(dtype).name}"
            v = values[i]
            if minimum == 1 and v < 0:
                return f"negative token count {v}"
            if minimum == 1 and v == 0:
                return "zero token count (must be >= 1)"
            if minimum is not None and v < minimum:
                return f"{v} is below the minimum {minimum}"
            return f"{v} does not fit in {np.dtype(dtype).name}"

        self._check(field, bad, explain)
        return np.where(bad, 0, values).astype(dtype)

    def _numbers(self, series: pd.Series, field: str) -> tuple[np.ndarray, np.ndarray]:
        self._track(series)
        wrong, wrong_why = self._wrong_type(series)
        clean = series.where(~wrong, np.nan) if wrong.any() else series
        number = pd.to_numeric(clean, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(number) | wrong

        def explain(i: int) -> str:
            raw = series.iloc[i]
            if wrong[i]:
                return wrong_why(i)
            return "empty or missing value" if _is_empty(raw) else f"not a finite number: {show(raw)}"

        self._check(field, bad, explain)
        return np.where(bad, 0.0, number), bad

    def numbers(self, series: pd.Series, field: str) -> np.ndarray:
        """A real-valued column → float64; must be finite numbers."""
        return self._numbers(series, field)[0]

    def arrivals(self, series: pd.Series, field: str,
                 to_seconds: Callable[[np.ndarray], np.ndarray] = lambda v: v) -> tuple[np.ndarray, float]:
        """Numeric arrival times → (seconds from the earliest, the source clock at that origin in seconds).

        ``to_seconds`` converts the column's unit (linear, e.g. ``lambda v: v / 1000`` for ms). Times are
        re-based before they are converted, so epoch milliseconds 384 ms apart are 0.384 s apart, not
        0.38399982; whole numbers beyond 2**53 (epoch nanoseconds) are re-based in integers. A trace may
        span at most MAX_ARRIVAL_S; later rows are errors that name the earliest one.
        """
        values, bad = self._numbers(series, field)
        good = ~bad
        if not good.any():
            return np.zeros(len(values)), 0.0
        j = int(np.flatnonzero(good)[np.argmin(values[good])])
        raw = series.to_numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            delta = to_seconds(values - values[j])
            if (raw.dtype.kind in "iu" and not bad.any() and float(np.abs(raw).max()) > 2.0**53
                    and float(raw.max()) - float(raw.min()) < 2.0**62):
                delta = to_seconds((raw.astype(np.int64) - np.int64(raw[j])).astype(np.float64))
        far = good & ~(delta <= MAX_ARRIVAL_S)

        def explain(i: int) -> str:
            return (f"{show(series.iloc[i])} is {delta[i]:.3g} s after the earliest arrival "
                    f"({show(series.iloc[j])} on row {int(self._index[j]) + 1}), {ARRIVAL_LIMIT}")

        self._check(field, far, explain)
        return np.where(far | bad, 0.0, delta), float(to_seconds(values[j]))

    def datetimes(self, series: pd.Series, field: str, fmt: str | None) -> np.ndarray:
        """A date-time column → int64 nanoseconds since the Unix epoch (naive times read as UTC); see
        :meth:`datetime_arrivals`, which most readers want."""
        return self._datetimes(series, field, fmt)[0]

    def _datetimes(self, series: pd.Series, field: str, fmt: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(int64 nanoseconds since the Unix epoch, naive times read as UTC; rows that are not dates).

        ``fmt`` is a strptime format; None lets pandas infer one from the first value. Values already
        typed as date-times (Parquet) are used directly. Dates outside pandas' range (1677 to 2262) are
        refused as such, not as unparsable.
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
                raise TraceError(f"bad trace.time_format {fmt!r}: {str(exc).splitlines()[0][:120]}",
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
            try:
                pd.to_datetime(pd.Series([raw]), format=fmt if fmt else "mixed")
            except pd.errors.OutOfBoundsDatetime:
                return f"date {show(raw)} is outside the range tiersim can represent ({_DATE_RANGE})"
            except (ValueError, TypeError):
                pass
            expected = f" (expected format {fmt!r})" if fmt else ""
            return f"unparsable timestamp {show(raw)}{expected}"

        self._check(field, bad, explain)
        return np.where(bad, 0, ns), bad

    def datetime_arrivals(self, series: pd.Series, field: str, fmt: str | None) -> tuple[np.ndarray, float, str]:
        """A date-time column → (seconds from the earliest, its seconds since midnight, its ISO time);
        a trace may span at most MAX_ARRIVAL_S. See :meth:`datetimes` and :func:`rebase_datetimes`."""
        ns, bad = self._datetimes(series, field, fmt)
        good = ~bad
        if not good.any():
            return np.zeros(len(ns)), 0.0, ""
        j = int(np.flatnonzero(good)[np.argmin(ns[good])])
        # in float: 1677 to 2262 is more nanoseconds than int64 holds, so integer differences could wrap
        delta = (ns.astype(np.float64) - float(ns[j])) / 1e9
        far = good & (delta > MAX_ARRIVAL_S)

        def explain(i: int) -> str:
            return (f"{show(series.iloc[i])} is {delta[i] / 31_557_600:.1f} years after the earliest arrival "
                    f"({show(series.iloc[j])} on row {int(self._index[j]) + 1}), {ARRIVAL_LIMIT}")

        self._check(field, far, explain)
        arrival, origin, iso = rebase_datetimes(ns[good])
        out = np.zeros(len(ns))
        out[good] = arrival
        return out, origin, iso

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
