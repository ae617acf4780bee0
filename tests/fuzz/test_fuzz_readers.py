"""Hypothesis against every trace reader: random bytes, damaged real files and mutated cells.

The oracle, everywhere: ``load_trace`` either raises a TraceError whose message is one short line naming
the file (and the row and field when one cell was changed), or returns a Trace that satisfies the schema
(arrivals finite, sorted, within MAX_ARRIVAL_S; token counts in [1, MAX_TOKENS]). For mutated cells a
small reference says which values are valid; an accepted value must be the value the file holds, and a
plainly written valid number must be accepted.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import examples
from tests.fuzz import corpus_gen as cg
from traces import Trace, TraceError, load_trace
from traces.schema import MAX_ARRIVAL_S, MAX_TOKENS

FUZZ = settings(max_examples=examples(60), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROW = 2                                   # the mutated data row (0-based), reported as row 3
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="tiersim-fuzz-") as d:
        yield Path(d)


def load(path: Path, fmt: str | None) -> Trace | TraceError:
    try:
        return load_trace(path, format=fmt)
    except TraceError as exc:
        return exc


def check_error(err: TraceError, path: Path, row: int | None = None, field: str | None = None) -> None:
    msg = str(err)
    assert "\n" not in msg and len(msg) <= cg.MAX_MESSAGE_CHARS, msg
    assert path.name in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    if field is not None:
        assert f"'{field}'" in msg, msg
    assert not cg._BAD_ADVICE.search(msg), msg


def check_trace(t: Trace) -> None:
    t.validate()
    assert np.all(np.isfinite(t.arrival_s)) and (len(t) == 0 or t.arrival_s.max() <= MAX_ARRIVAL_S)
    for a in (t.prompt_tokens, t.output_tokens):
        assert a.dtype == np.int64 and (len(t) == 0 or (a.min() >= 1 and a.max() <= MAX_TOKENS))


def reader_fmt(f: cg.CsvFormat) -> str:
    return "burstgpt" if f.name.startswith("burstgpt") else f.name


# ------------------------------------------------------------------ references for one cell
def ref_tokens(value: object) -> int | None:
    """The token count a cell holds, or None if it holds none (text from CSV, typed values from JSON)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    if not isinstance(value, (int, float)):
        return None
    return int(value) if 1 <= value <= MAX_TOKENS else None


def ref_seconds(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


CELL = st.one_of(st.sampled_from(cg.TOKEN_BAD + cg.TOKEN_OK + cg.TIME_BAD_S + cg.TIME_OK_S), TEXT,
                 st.integers(-10**21, 10**21).map(str), st.floats(allow_nan=True).map(repr),
                 st.floats(1, 1e8).map(lambda x: repr(float(round(x)))))
TEXT_FORMATS = [f for f in cg.CSV_FORMATS if not f.datetime]


# ------------------------------------------------------------------ CSV readers: one cell
@pytest.mark.parametrize("f", cg.CSV_FORMATS, ids=[f.name for f in cg.CSV_FORMATS])
@FUZZ
@given(cell=CELL, which=st.sampled_from([0, 1]))
def test_csv_token_cell(workdir, f, cell, which):
    col = f.tokens[which]
    rows = [list(r) for r in f.rows]
    rows[ROW][f.header.index(col)] = cell
    path = workdir / f"{f.name}.csv"
    path.write_text(cg.csv_text(f.header, rows, f.eol), newline="")
    got = load(path, reader_fmt(f))
    want = ref_tokens(cell)
    failed_marker = col == "Response tokens" and ref_seconds(cell) == 0.0
    if isinstance(got, TraceError):
        check_error(got, path, row=ROW + 1, field=col)
        plain = PLAIN_NUMBER.fullmatch(cell.lstrip(" ")) is not None
        assert not (plain and want is not None), f"refused the valid count {cell!r}: {got}"
        return
    check_trace(got)
    if failed_marker:   # BurstGPT's failed request (0 response tokens): dropped and counted
        assert got.meta["dropped_failed"] >= 1 and ROW not in got.request_id
        return
    assert want is not None, f"accepted {cell!r} as a token count"
    i = int(np.flatnonzero(got.request_id == ROW)[0])
    assert (got.prompt_tokens if which == 0 else got.output_tokens)[i] == want


@pytest.mark.parametrize("f", TEXT_FORMATS, ids=[f.name for f in TEXT_FORMATS])
@FUZZ
@given(cell=CELL)
def test_csv_arrival_cell(workdir, f, cell):
    rows = [list(r) for r in f.rows]
    rows[ROW][f.header.index(f.time)] = cell
    path = workdir / f"{f.name}.csv"
    path.write_text(cg.csv_text(f.header, rows, f.eol), newline="")
    got = load(path, reader_fmt(f))
    want = ref_seconds(cell)
    times = [float(r[f.header.index(f.time)]) for r in f.rows]
    if want is not None:
        times[ROW] = want
    spans = want is not None and max(times) - min(times) <= MAX_ARRIVAL_S
    if isinstance(got, TraceError):
        check_error(got, path, field=f.time)
        assert re.search(r"\brow \d+", str(got)), str(got)
        plain = PLAIN_NUMBER.fullmatch(cell.lstrip(" ")) is not None
        assert not (plain and spans), f"refused the valid time {cell!r}: {got}"
        return
    check_trace(got)
    assert spans, f"accepted {cell!r} as an arrival time"
    kept = [t for t, r in zip(times, f.rows) if not (f.name.startswith("burstgpt") and r[f.header.index(
        "Response tokens")] == "0")]
    np.testing.assert_allclose(got.arrival_s, np.sort(np.array(kept) - min(kept)), rtol=1e-12, atol=1e-9)


@FUZZ
@given(when=st.datetimes(min_value=datetime(1600, 1, 1), max_value=datetime(2400, 1, 1)),
       digit=st.integers(0, 9))
def test_azure_timestamp_cell(workdir, when, digit):
    f = cg.CSV_FORMATS[0]
    cell = (f"{when.year:04d}-{when.month:02d}-{when.day:02d} {when.hour:02d}:{when.minute:02d}:"
            f"{when.second:02d}.{when.microsecond:06d}{digit}")
    rows = [list(r) for r in f.rows]
    rows[ROW][0] = cell
    path = workdir / "azure.csv"
    path.write_text(cg.csv_text(f.header, rows, f.eol), newline="")
    got = load(path, "azure")
    day = timedelta(days=1)
    lo, hi = datetime(1677, 9, 21), datetime(2262, 4, 12)        # pandas' nanosecond range
    others = [datetime.fromisoformat(r[0][:26]) for i, r in enumerate(f.rows) if i != ROW]
    span = max(abs((when - o).total_seconds()) for o in others)
    near_edge = abs(when - lo) < day or abs(when - hi) < day or abs(span - MAX_ARRIVAL_S) < 86_400
    fits = lo < when < hi and span <= MAX_ARRIVAL_S
    if isinstance(got, TraceError):
        check_error(got, path, field="TIMESTAMP")
        assert "unparsable" not in str(got), str(got)   # a well-formed date is out of range, not unparsable
        assert near_edge or not fits, f"refused {cell!r}: {got}"
        return
    check_trace(got)
    assert near_edge or fits, f"accepted {cell!r}"


# ------------------------------------------------------------------ Mooncake: one typed value
JSON_VALUE = st.one_of(st.integers(-2**70, 2**70), st.integers(1, MAX_TOKENS), st.floats(allow_nan=True),
                       st.booleans(), st.none(), TEXT, st.lists(st.integers(-5, 5), max_size=3),
                       st.floats(1, 1e8).map(lambda x: float(round(x))))


@FUZZ
@given(value=JSON_VALUE, key=st.sampled_from(["timestamp", "input_length", "output_length"]))
def test_mooncake_value(workdir, value, key):
    rows = [{k: v for k, v in r.items() if k != "hash_ids"} for r in cg.MOON_ROWS]
    lines = [json.dumps(r) for r in rows]
    lines[ROW] = cg.moon_line(rows[ROW], {key: json.dumps(value)})
    path = workdir / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = load(path, "mooncake")
    if key == "timestamp":
        ms = [float(r["timestamp"]) for r in rows]
        want = None if isinstance(value, (bool, str)) else ref_seconds(value)
        if want is not None:
            ms[ROW] = want
        want = want if want is not None and (max(ms) - min(ms)) / 1000 <= MAX_ARRIVAL_S else None
    else:
        want = None if isinstance(value, str) else ref_tokens(value)
    if isinstance(got, TraceError):
        check_error(got, path, field=key)
        assert want is None, f"refused {key}={json.dumps(value)}: {got}"
        return
    check_trace(got)
    assert want is not None, f"accepted {key}={json.dumps(value)}"
    if key != "timestamp":
        i = int(np.flatnonzero(got.request_id == ROW)[0])
        assert (got.prompt_tokens if key == "input_length" else got.output_tokens)[i] == want


@FUZZ
@given(value=st.one_of(st.lists(JSON_VALUE, max_size=4), JSON_VALUE))
def test_mooncake_hash_ids(workdir, value):
    lines = [json.dumps(r) for r in cg.MOON_ROWS]
    lines[ROW] = cg.moon_line(cg.MOON_ROWS[ROW], {"hash_ids": json.dumps(value)})
    path = workdir / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = load(path, "mooncake")
    need = -(-cg.MOON_ROWS[ROW]["input_length"] // 512)
    valid = isinstance(value, list) and len(value) == need and all(
        isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in value)
    if isinstance(got, TraceError):
        check_error(got, path, row=ROW + 1)
        assert not valid
        return
    check_trace(got)
    assert valid and list(got.block_hashes(ROW)) == value


# ------------------------------------------------------------------ Parquet: one typed value
PARQUET_VALUE = st.one_of(
    st.tuples(st.just(pa.int64()), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just(pa.uint64()), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(pa.float64()), st.floats(allow_nan=True)),
    st.tuples(st.just(pa.float64()), st.integers(1, MAX_TOKENS).map(float)),
    st.tuples(st.just(pa.bool_()), st.booleans()),
    st.tuples(st.just(pa.int32()), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just(pa.string()), TEXT))


@FUZZ
@given(typed=PARQUET_VALUE, col=st.sampled_from(["prompt_tokens", "output_tokens", "arrival_s"]),
       canonical=st.booleans())
def test_parquet_value(workdir, typed, col, canonical):
    """One value of one column, of any Arrow type; the others are 1 (or "1", True). Through the generic
    reader (a plain table) numbers written as text are read like CSV; a canonical file (Trace.to_arrow,
    read through Trace.from_arrow) must hold numbers, and its arrivals are used as they are (no re-basing)."""
    typ, value = typed
    fill = {pa.bool_(): True, pa.string(): "1"}.get(typ, 1)
    values = [fill] * 4
    values[ROW] = value
    base = {"arrival_s": pa.array([0.0, 0.5, 1.0, 2.5]), "prompt_tokens": pa.array([100, 200, 300, 400]),
            "output_tokens": pa.array([10, 20, 30, 40])}
    base[col] = pa.array(values, typ)
    if canonical:
        good = Trace(arrival_s=np.array([0.0, 0.5, 1.0, 2.5]), prompt_tokens=np.array([100, 200, 300, 400]),
                     output_tokens=np.array([10, 20, 30, 40]), name="stored").to_arrow()
        table = good.set_column(good.schema.get_field_index(col), col, base[col])
    else:
        table = pa.table(base)
    path = workdir / "t.parquet"
    pq.write_table(table, path)
    got = load(path, "parquet")
    bad_type = typ == pa.bool_() or (typ == pa.string() and canonical)
    if col == "arrival_s":
        v = None if bad_type else ref_seconds(value)
        want = v is not None and (0 <= v <= MAX_ARRIVAL_S if canonical else abs(v - 1) <= MAX_ARRIVAL_S)
    else:
        want = not bad_type and ref_tokens(value) is not None
    if isinstance(got, TraceError):
        check_error(got, path, field=col)
        assert "stored" not in str(got), str(got)       # the file is named, not the trace name it stores
        assert not want, f"refused {typ} {value!r} in {col}: {got}"
        return
    check_trace(got)
    assert want, f"accepted {typ} {value!r} in {col}"
    if col != "arrival_s":
        assert getattr(got, col)[np.flatnonzero(got.request_id == ROW)[0]] == ref_tokens(value)


# ------------------------------------------------------------------ whole files: bytes and damage
BASES = {f.name: (cg.csv_text(f.header, f.rows, f.eol).encode(), reader_fmt(f), ".csv") for f in cg.CSV_FORMATS}
BASES["mooncake"] = (cg.moon_text(cg.MOON_ROWS).encode(), "mooncake", ".jsonl")
REQUESTS = {"azure": 6, "burstgpt": 4, "burstgpt-v3": 4, "csv": 6, "mooncake": 6}   # BurstGPT drops 2 failed


@pytest.mark.parametrize("name", sorted(BASES))
@FUZZ
@given(data=st.data())
def test_damaged_file(workdir, name, data):
    base, fmt, suffix = BASES[name]
    how = data.draw(st.sampled_from(["cut", "junk", "flip", "bom-crlf", "random"]))
    if how == "cut":
        content = base[:data.draw(st.integers(0, len(base)))]
    elif how == "junk":
        at = data.draw(st.integers(0, len(base)))
        content = base[:at] + data.draw(st.binary(max_size=40)) + base[at:]
    elif how == "flip":
        b = bytearray(base)
        for _ in range(data.draw(st.integers(1, 3))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        content = bytes(b)
    elif how == "bom-crlf":
        content = b"\xef\xbb\xbf" + base.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    else:
        content = data.draw(st.binary(max_size=300))
    zipped = data.draw(st.booleans())
    path = workdir / (name + suffix + (".gz" if zipped else ""))
    path.write_bytes(cg.gz(content) if zipped else content)
    got = load(path, fmt)
    if isinstance(got, TraceError):
        check_error(got, path)
        assert how != "bom-crlf", f"refused a BOM and CRLF: {got}"
        return
    check_trace(got)
    if how == "bom-crlf" or content == base:
        assert len(got) == REQUESTS[name]


@pytest.mark.parametrize("name", sorted(BASES))
@FUZZ
@given(data=st.data())
def test_damaged_gzip(workdir, name, data):
    base, fmt, suffix = BASES[name]
    packed = gzip.compress(base, mtime=0)
    how = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate":
        content = packed[:data.draw(st.integers(0, len(packed) - 1))]
    elif how == "flip":
        b = bytearray(packed)
        i = data.draw(st.integers(10, len(b) - 1))          # past the header's mtime/flags: the data itself
        b[i] ^= data.draw(st.integers(1, 255))
        content = bytes(b)
    else:
        content = packed + data.draw(st.binary(min_size=1, max_size=20).filter(lambda x: x.strip(b"\0")))
    path = workdir / (name + suffix + ".gz")
    path.write_bytes(content)
    got = load(path, fmt)
    if how == "truncate" and len(content) >= 2:   # a cut gzip stream always loses its end marker
        assert isinstance(got, TraceError), "accepted a truncated gzip file"
    if isinstance(got, TraceError):
        check_error(got, path)
        return
    check_trace(got)


@FUZZ
@given(content=st.binary(max_size=400), suffix=st.sampled_from([".parquet", ".csv", ".jsonl", ""]))
def test_random_bytes_without_a_format(workdir, content, suffix):
    path = workdir / f"blob{suffix}"
    path.write_bytes(content)
    got = load(path, None)
    if isinstance(got, TraceError):
        check_error(got, path)
    else:
        check_trace(got)


def test_csv_text_helper_round_trips_awkward_cells():
    text = cg.csv_text(["a", "b"], [["1,5", 'x"y'], ["4\n2", ""]])
    assert list(csv.reader(io.StringIO(text))) == [["a", "b"], ["1,5", 'x"y'], ["4\n2", ""]]


def test_a_bare_carriage_return_in_a_cell_names_that_cell(workdir):
    """Found by the fuzzer: an unquoted ``\\r`` in the arrival column split the row for the parser, and
    the error named the row's last field as missing."""
    path = workdir / "bare-cr.csv"
    path.write_bytes(b"arrival_s,prompt_tokens,output_tokens\n0.0,120,30\n0.25,64,8\n\r,900,120\n1.5,33,64\n")
    got = load(path, "csv")
    assert isinstance(got, TraceError)
    check_error(got, path, row=3, field="arrival_s")
    assert "line 4" in str(got)
    path.write_bytes(b"arrival_s,prompt_tokens,output_tokens\r\n0.0,120,30\r\n0.25,64,8\r\n")
    assert len(load(path, "csv")) == 2                # CRLF line ends are not bare
