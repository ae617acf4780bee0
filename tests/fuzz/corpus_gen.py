"""The hostile-user corpus: malformed traces (every format) and malformed configs, run through the CLI.

Each :class:`Case` is a set of small files, a ``tiersim`` command line and what a correct tiersim does
with it: refuse it (exit 2, one line naming the file or key, and the row and field where there is one)
or run it (exit 0 with sane results). :func:`classify` sorts an outcome into

    traceback   the process died with an uncaught exception (or any exit status but 0 and 2)
    silent      it ran although it should have been refused, or ran with wrong results
    vague       exit 2, but the message misses the file/key, row or field, is not one line, is very
                long, or advises an option no CLI flag or config key accepts; or a correct input refused
    clear       exit 2 with a message that passes every check
    ok          a correct run

Report (the counts quoted in the issue's note; ``--mode exec`` starts a fresh ``python -m sim.cli``
per case, ``fork`` (the default, ~10x faster) forks one from a process that has imported tiersim)::

    python -m tests.fuzz.corpus_gen report [--mode fork|exec] [--only traces|configs|features] [-v]

``write-fixtures DIR`` stores every case as files plus ``manifest.json``; ``tests/data/fuzz`` holds the
cases that failed before issue 13, replayed by ``tests/fuzz/test_regression_corpus.py``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ("--set", "costs.backend=roofline", "--set", "model.name=llama-3.2-1b", "--set", "trace.max_requests=20",
        "--no-progress")
MAX_MESSAGE_CHARS = 400
MEMORY_LIMIT_BYTES = 6 * 2**30
# advice that names a Python keyword argument rather than a CLI option or a config key
_BAD_ADVICE = re.compile(r"(?<![\w.-])(columns|time_unit|time_format|hash_block_tokens|keep_failed|block_tokens|"
                         r"format)=|\bpass (columns|time_unit|time_format|hash_block_tokens|format)\b")


@dataclass(frozen=True)
class Case:
    """One hostile input. ``argv`` may contain ``{dir}``, the directory the files are written into."""

    id: str
    group: str                                    # traces | configs | features
    files: dict[str, bytes]
    argv: tuple[str, ...]
    expect: str                                   # "error" | "ok"
    names: tuple[str, ...] = ()                   # the message must contain each (file name, key)
    row: int | None = None
    line: int | None = None
    field: str | None = None
    not_in: tuple[str, ...] = ()
    check: dict = dataclasses.field(default_factory=dict)   # ok runs: requests, dropped, stdout

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["files"] = sorted(self.files)
        return d

    @classmethod
    def from_json(cls, d: dict, files: dict[str, bytes]) -> "Case":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        for k in ("argv", "names", "not_in"):
            kw[k] = tuple(kw[k])
        return cls(**{**kw, "files": files})


# ============================================================================ base files
AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
AZURE_ROWS = [["2023-11-16 18:15:46.6805900", "374", "44"], ["2023-11-16 18:15:50.9951690", "396", "109"],
              ["2023-11-16 18:15:51.9897990", "879", "32"], ["2023-11-16 18:15:53.3045160", "91", "34"],
              ["2023-11-16 18:15:53.7908760", "91", "24"], ["2023-11-16 18:15:54.8640010", "381", "19"]]
BURST_HEADER = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]
BURST_ROWS = [["5", "ChatGPT", "472", "18", "490", "Conversation log"],
              ["45", "ChatGPT", "1087", "0", "1087", "Conversation log"],
              ["118", "GPT-4", "417", "276", "693", "Conversation log"],
              ["125", "ChatGPT", "97", "108", "205", "API log"],
              ["130", "ChatGPT", "1370", "149", "1519", "Conversation log"],
              ["141", "GPT-4", "330", "0", "330", "API log"]]
BURST3_HEADER = ["Timestamp", "Session ID", "Elapsed time", "Model", "Request tokens", "Response tokens",
                 "Total tokens", "Log Type"]
BURST3_ROWS = [[r[0], f"s-{i % 3}", "1.5", *r[1:]] for i, r in enumerate(BURST_ROWS)]
CSV_HEADER = ["arrival_s", "prompt_tokens", "output_tokens"]
CSV_ROWS = [["0.0", "120", "30"], ["0.25", "64", "8"], ["0.75", "900", "120"], ["1.5", "33", "64"],
            ["2.0", "512", "16"], ["3.25", "77", "5"]]
MOON_ROWS = [{"timestamp": 0, "input_length": 6758, "output_length": 500},
             {"timestamp": 27, "input_length": 7319, "output_length": 490},
             {"timestamp": 3111, "input_length": 1024, "output_length": 121},
             {"timestamp": 3200, "input_length": 513, "output_length": 17},
             {"timestamp": 7002, "input_length": 90, "output_length": 250},
             {"timestamp": 9999, "input_length": 2049, "output_length": 64}]
for _i, _r in enumerate(MOON_ROWS):
    _r["hash_ids"] = [1000 * _i + k for k in range(-(-_r["input_length"] // 512))]


@dataclass(frozen=True)
class CsvFormat:
    name: str                     # the --format value
    header: list[str]
    rows: list[list[str]]
    tokens: tuple[str, str]       # prompt and output columns
    time: str
    datetime: bool = False
    eol: str = "\n"


CSV_FORMATS = [
    CsvFormat("azure", AZURE_HEADER, AZURE_ROWS, ("ContextTokens", "GeneratedTokens"), "TIMESTAMP", True, "\r\n"),
    CsvFormat("burstgpt", BURST_HEADER, BURST_ROWS, ("Request tokens", "Response tokens"), "Timestamp"),
    CsvFormat("burstgpt-v3", BURST3_HEADER, BURST3_ROWS, ("Request tokens", "Response tokens"), "Timestamp"),
    CsvFormat("csv", CSV_HEADER, CSV_ROWS, ("prompt_tokens", "output_tokens"), "arrival_s"),
]


def csv_text(header: list[str], rows: list[list[str]], eol: str = "\n") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=eol)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def moon_line(row: dict, raw: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> str:
    """One JSON object; ``raw`` replaces a field's JSON text verbatim (to inject invalid values)."""
    raw = raw or {}
    parts = [f'"{k}": {raw.get(k, json.dumps(v))}' for k, v in row.items() if k not in drop]
    parts += [f'"{k}": {v}' for k, v in raw.items() if k not in row]
    return "{" + ", ".join(parts) + "}"


def moon_text(rows: list[dict], mutate: dict[int, str] | None = None, eol: str = "\n") -> str:
    lines = [moon_line(r) for r in rows]
    for i, text in (mutate or {}).items():
        lines[i] = text
    return eol.join(lines) + eol


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _fmt_arg(fmt: str) -> str:
    return "burstgpt" if fmt.startswith("burstgpt") else fmt


def _run(path: str, fmt: str | None, *extra: str) -> tuple[str, ...]:
    args = ("run", "--trace", "{dir}/" + path)
    if fmt:
        args += ("--format", _fmt_arg(fmt))
    return args + BASE + ("--out", "{dir}/out") + extra


def _describe(path: str, fmt: str | None) -> tuple[str, ...]:
    return ("trace", "describe", "{dir}/" + path) + (("--format", _fmt_arg(fmt)) if fmt else ())


# ============================================================================ trace cases
TOKEN_BAD = ["", "abc", "1.5", "0", "-5", "1e30", "9223372036854775808", "99999999999999999999", "100000001",
             "nan", "inf", "-inf", "true", "0x10", "1,5"]
TOKEN_OK = ["42.0", " 42", "100000000"]
TIME_BAD_S = ["", "abc", "nan", "inf", "1e18", "1e300", "-1e300", "1e308", "true", "2e9"]
TIME_OK_S = ["-5", "0.5"]
TIME_BAD_DT = ["", "garbage", "1500-01-01 00:00:00.0000000", "2300-01-01 00:00:00.0000000",
               "2023-13-01 00:00:00.0000000", "2023-11-16T18:15:46", "2023-11-16 18:15:52",
               "1980-01-01 00:00:00.0000000"]
TIME_OK_DT = ["2023-11-16 18:15:52.5"]
OUT_OF_RANGE_DATES = ("1500-01-01 00:00:00.0000000", "2300-01-01 00:00:00.0000000")


def _ok_check(fmt: str, rows: int) -> dict:
    if fmt.startswith("burstgpt"):
        failed = sum(1 for r in (BURST_ROWS if fmt == "burstgpt" else BURST3_ROWS)[:rows]
                     if r[BURST_HEADER.index("Response tokens") + (2 if fmt != "burstgpt" else 0)] == "0")
        return {"requests": rows - failed, "dropped": failed}
    return {"requests": rows}


def csv_cases(f: CsvFormat) -> Iterator[Case]:
    file = f"{f.name}.csv"
    base = csv_text(f.header, f.rows, f.eol)
    n = len(f.rows)
    ok = _ok_check(f.name, n)
    g = "traces"

    def case(name, content, expect, **kw):
        kw.setdefault("names", (file,) if expect == "error" else ())
        if expect == "ok":
            kw.setdefault("check", ok)
        data = content.encode() if isinstance(content, str) else content
        return Case(f"{f.name}/{name}", g, {file: data}, kw.pop("argv", _run(file, f.name)), expect, **kw)

    def cell(r: int, col: str, value: str, rows=None) -> str:
        rows = [list(x) for x in (rows or f.rows)]
        rows[r][f.header.index(col)] = value
        return csv_text(f.header, rows, f.eol)

    # ---- field values (row 3)
    for col in f.tokens:
        for v in TOKEN_BAD:
            if v == "0" and col == "Response tokens":   # BurstGPT's failed-request marker: dropped, counted
                fails = _ok_check(f.name, n)
                yield case(f"{col}={v!r}", cell(2, col, v), "ok",
                           check={"requests": fails["requests"] - 1, "dropped": fails["dropped"] + 1})
                continue
            yield case(f"{col}={v!r}", cell(2, col, v), "error", row=3, field=col,
                       not_in=("negative",) if v in ("1e30", "9223372036854775808", "99999999999999999999") else ())
        for v in TOKEN_OK:
            yield case(f"{col}={v!r}", cell(2, col, v), "ok")
        yield case(f"{col}=all-booleans", csv_text(f.header, [
            [("True" if c == col else x) for c, x in zip(f.header, r)] for r in f.rows], f.eol),
            "error", row=1, field=col)
    if f.datetime:
        bad, good = TIME_BAD_DT, TIME_OK_DT
    else:
        bad, good = TIME_BAD_S, TIME_OK_S
    for v in bad:
        far = v in ("-1e300", "1e308", "1e300", "1e18", "2e9", "1980-01-01 00:00:00.0000000")
        row = 1 if v in ("-1e300", "1980-01-01 00:00:00.0000000") else 3   # the earliest is the origin
        yield case(f"{f.time}={v!r}", cell(2, f.time, v), "error", row=None if far else row,
                   field=f.time, not_in=("unparsable",) if v in OUT_OF_RANGE_DATES else ())
    for v in good:
        yield case(f"{f.time}={v!r}", cell(2, f.time, v), "ok")

    # ---- container and structure
    header_line = csv_text(f.header, [], f.eol)
    yield case("empty-file", b"", "error")
    yield case("header-only", header_line, "error", not_in=("window",))
    yield case("whitespace-only", "  \n \n", "error")
    yield case("bom", b"\xef\xbb\xbf" + base.encode(), "ok")
    yield case("bom-detect", b"\xef\xbb\xbf" + base.encode(), "ok", argv=_run(file, None))
    yield case("crlf" if f.eol == "\n" else "lf", base.replace(f.eol, "\r\n" if f.eol == "\n" else "\n"), "ok")
    yield case("cr-only", base.replace(f.eol, "\r"), "ok")
    yield case("blank-lines", base.replace(f.eol, f.eol + f.eol, 2) + f.eol * 3, "ok")
    yield case("no-final-newline", base.rstrip(), "ok")
    yield case("utf16", base.encode("utf-16"), "error")
    yield case("latin1-byte", cell(2, f.tokens[0], "4\udce92").encode("utf-8", "surrogateescape"), "error",
               line=4)
    yield case("nul-byte", cell(2, f.tokens[0], "4\x002"), "error", row=3, field=f.tokens[0])
    rnd = random.Random(13)
    yield case("binary-garbage", bytes(rnd.randrange(256) for _ in range(300)), "error")
    dup = [*f.header, f.tokens[0]]
    yield case("duplicate-used-column", csv_text(dup, [[*r, "7"] for r in f.rows], f.eol), "error",
               field=None, names=(file, f.tokens[0]))
    yield case("duplicate-unused-column", csv_text([*f.header, "note", "note"], [[*r, "a", "b"] for r in f.rows],
                                                   f.eol), "ok")
    yield case("missing-column", csv_text([c for c in f.header if c != f.tokens[1]],
                                          [[x for c, x in zip(f.header, r) if c != f.tokens[1]] for r in f.rows],
                                          f.eol), "error", names=(file, f.tokens[1]))
    yield case("extra-column", csv_text([*f.header, "extra"], [[*r, "x"] for r in f.rows], f.eol), "ok")
    rows = [list(r) for r in f.rows]
    rows[2] = [*rows[2], "1", "2"]
    yield case("too-many-fields", csv_text(f.header, rows, f.eol), "error", line=4)
    rows = [list(r) for r in f.rows]
    rows[0] = [*rows[0], "1", "2"]      # pandas would take the first two fields as an index
    yield case("first-row-too-many-fields", csv_text(f.header, rows, f.eol), "error", line=2)
    rows = [list(r) for r in f.rows]
    rows[2] = rows[2][:-1]
    if f.header[-1] in f.tokens:
        yield case("too-few-fields", csv_text(f.header, rows, f.eol), "error", row=3, field=f.header[-1])
    else:   # the short row lacks a column the reader does not use
        yield case("too-few-fields", csv_text(f.header, rows, f.eol), "ok")
    yield case("huge-field", cell(2, f.tokens[0], "9" * 200_000), "error", row=3, field=f.tokens[0])
    # a column name longer than the csv module reads (131,072 characters) is refused, not worked around
    yield case("huge-header", csv_text([*f.header, "h" * 200_000], [[*r, "1"] for r in f.rows], f.eol), "error",
               line=1)
    yield case("quoted-newline", cell(2, f.tokens[0], "4\n2"), "error", row=3, field=f.tokens[0])
    yield case("unclosed-quote", base.replace(f.rows[2][-1] + f.eol, '"' + f.rows[2][-1] + f.eol, 1), "error")
    yield case("padded-header", csv_text([f" {c} " for c in f.header], f.rows, f.eol), "ok")
    if f.name != "csv":   # the generic reader's canonical names are lower case already
        yield case("lowercase-header", csv_text([c.lower() for c in f.header], f.rows, f.eol), "error")

    # ---- gzip
    gzfile = file + ".gz"
    packed = gz(base.encode())

    def gcase(name, data, expect, **kw):
        kw.setdefault("names", (gzfile,) if expect == "error" else ())
        if expect == "ok":
            kw.setdefault("check", ok)
        return Case(f"{f.name}/gzip-{name}", g, {gzfile: data}, _run(gzfile, f.name), expect, **kw)

    yield gcase("ok", packed, "ok")
    yield gcase("truncated", packed[: len(packed) // 2], "error")
    yield gcase("truncated-tail", packed[:-4], "error")
    body = bytearray(packed)
    body[len(body) // 2] ^= 0xFF
    yield gcase("corrupt-body", bytes(body), "error")
    crc = bytearray(packed)
    crc[-6] ^= 0xFF
    yield gcase("bad-crc", bytes(crc), "error")
    yield gcase("magic-only", b"\x1f\x8b", "error")
    yield gcase("magic-then-garbage", b"\x1f\x8b" + bytes(rnd.randrange(256) for _ in range(200)), "error")
    yield gcase("trailing-garbage", packed + b"garbage!", "error")
    yield gcase("empty-payload", gz(b""), "error")
    yield gcase("two-members", gz(base.encode()[:40]) + gz(base.encode()[40:]), "ok")


MOON_TOKEN_BAD = ['""', '"abc"', "1.5", "0", "-5", "1e30", "9223372036854775808", "99999999999999999999",
                  "100000001", "NaN", "Infinity", "-Infinity", "true", "null", '"12"', "[]", "{}"]
MOON_TOKEN_OK = ["1024.0"]
MOON_TIME_BAD = ['""', '"abc"', "NaN", "Infinity", "1e21", "1e300", "-1e300", "true", "null", "2e12", "[1]"]
MOON_TIME_OK = ["-5", "10"]
MOON_HASH_BAD = ['"abc"', "[1.5, 2]", "[true, 1]", "[18446744073709551616, 1]", "[1]", "null", "{}",
                 '["a", "b"]', "[[1], [2]]"]


def mooncake_cases() -> Iterator[Case]:
    file = "mooncake.jsonl"
    n = len(MOON_ROWS)

    def case(name, content, expect, **kw):
        kw.setdefault("names", (file,) if expect == "error" else ())
        if expect == "ok":
            kw.setdefault("check", {"requests": n})
        data = content.encode() if isinstance(content, str) else content
        return Case(f"mooncake/{name}", "traces", {file: data}, kw.pop("argv", _run(file, "mooncake")), expect,
                    **kw)

    def field_value(key: str, raw: str) -> str:
        rows = MOON_ROWS
        if key == "input_length":   # no hashes at all, so the hash count cannot disagree with the length
            rows = [{k: v for k, v in r.items() if k != "hash_ids"} for r in MOON_ROWS]
        return moon_text(rows, {2: moon_line(rows[2], {key: raw})})

    for key in ("input_length", "output_length"):
        for raw in MOON_TOKEN_BAD:
            yield case(f"{key}={raw}", field_value(key, raw), "error", row=3, field=key,
                       not_in=("negative",) if raw in ("1e30", "9223372036854775808", "99999999999999999999") else ())
        for raw in MOON_TOKEN_OK:
            yield case(f"{key}={raw}", field_value(key, raw), "ok")
    for raw in MOON_TIME_BAD:
        far = raw in ("1e21", "1e300", "-1e300", "2e12")
        yield case(f"timestamp={raw}", field_value("timestamp", raw), "error",
                   row=None if far else 3, field="timestamp")
    for raw in MOON_TIME_OK:
        yield case(f"timestamp={raw}", field_value("timestamp", raw), "ok")
    for raw in MOON_HASH_BAD:
        yield case(f"hash_ids={raw}", field_value("hash_ids", raw), "error", row=3, field="hash_ids")
    row = dict(MOON_ROWS[2])
    yield case("missing-key", moon_text(MOON_ROWS, {2: moon_line(row, drop=("output_length",))}), "error",
               row=3, field="output_length")
    yield case("duplicate-key", moon_text(MOON_ROWS, {2: moon_line(row)[:-1] + ', "output_length": 9}'}),
               "error", row=3, field="output_length")
    yield case("deep-nesting", moon_text(MOON_ROWS, {2: "[" * 100_000 + "]" * 100_000}), "error", row=3)
    yield case("deep-nesting-in-field", moon_text(MOON_ROWS, {2: moon_line(row, {"extra": "[" * 100_000 + "]"
                                                                                    * 100_000})}), "ok")
    # a line Python's json cannot parse as a whole has no field to name, only its row and line
    yield case("deep-nesting-in-hash_ids", moon_text(MOON_ROWS, {2: moon_line(row, {"hash_ids": "[" * 50_000 + "]"
                                                                                       * 50_000})}),
               "error", row=3)
    yield case("top-level-array", moon_text(MOON_ROWS, {2: "[1, 2, 3]"}), "error", row=3)
    yield case("top-level-number", moon_text(MOON_ROWS, {2: "42"}), "error", row=3)
    yield case("truncated-line", moon_text(MOON_ROWS, {2: moon_line(row)[:25]}), "error", row=3)
    yield case("empty-object", moon_text(MOON_ROWS, {2: "{}"}), "error", row=3)
    yield case("extra-field", moon_text(MOON_ROWS, {2: moon_line(row, {"note": '"hi"'})}), "ok")
    yield case("no-hashes", moon_text([{k: v for k, v in r.items() if k != "hash_ids"} for r in MOON_ROWS]), "ok")
    base = moon_text(MOON_ROWS)
    yield case("empty-file", b"", "error")
    yield case("blank-only", "\n\n  \n", "error")
    yield case("bom", b"\xef\xbb\xbf" + base.encode(), "ok")
    yield case("bom-detect", b"\xef\xbb\xbf" + base.encode(), "ok", argv=_run(file, None))
    yield case("crlf", base.replace("\n", "\r\n"), "ok")
    yield case("blank-lines", base.replace("\n", "\n\n"), "ok")
    yield case("latin1-byte", base.replace('"output_length": 121', '"output_length": 121, "n": "\udce9"')
               .encode("utf-8", "surrogateescape"), "error", line=3)
    yield case("utf16", base.encode("utf-16"), "error")
    yield case("nul-byte", base.replace('"output_length": 121', '"output_length": 1\x0021'), "error", row=3)
    yield case("huge-number", base.replace('"output_length": 121', '"output_length": ' + "9" * 200_000), "error",
               row=3)
    rnd = random.Random(7)
    yield case("binary-garbage", bytes(rnd.randrange(256) for _ in range(300)), "error")
    packed = gz(base.encode())
    gzfile = file + ".gz"
    for name, data, expect in (("gzip-ok", packed, "ok"), ("gzip-truncated", packed[: len(packed) // 2], "error"),
                               ("gzip-truncated-tail", packed[:-4], "error"),
                               ("gzip-corrupt-body", packed[:30] + bytes(b ^ 0xFF for b in packed[30:40])
                                + packed[40:], "error"),
                               ("gzip-bad-crc", packed[:-8] + bytes(b ^ 0xFF for b in packed[-8:-4]) + packed[-4:],
                                "error"),
                               ("gzip-trailing-garbage", packed + b"garbage!", "error"),
                               ("gzip-empty-payload", gz(b""), "error")):
        yield Case(f"mooncake/{name}", "traces", {gzfile: data}, _run(gzfile, "mooncake"), expect,
                   names=(gzfile,) if expect == "error" else (), check={"requests": n} if expect == "ok" else {})


def parquet_cases() -> Iterator[Case]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from traces import Trace

    file = "trace.parquet"
    trace = Trace(arrival_s=np.array([0.0, 0.5, 1.0, 2.5, 3.0, 4.0]),
                  prompt_tokens=np.array([100, 2000, 513, 40, 64, 700]),
                  output_tokens=np.array([10, 20, 30, 40, 50, 60]), name="stored-name", source="somewhere.csv",
                  hash_offsets=np.array([0, 1, 5, 7, 8, 9, 11]), hash_values=np.arange(11),
                  hash_block_tokens=512, meta={"format": "test"})
    canonical = trace.to_arrow()

    def write(table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    def with_meta(**changes: bytes | None) -> bytes:
        md = dict(canonical.schema.metadata)
        for k, v in changes.items():
            key = ("tiersim." + k).encode()
            if v is None:
                md.pop(key, None)
            else:
                md[key] = v
        return write(canonical.replace_schema_metadata(md))

    def plain(**cols) -> bytes:
        base = {"arrival_s": pa.array([0.0, 0.5, 1.0, 2.5]), "prompt_tokens": pa.array([100, 200, 300, 400]),
                "output_tokens": pa.array([10, 20, 30, 40])}
        for k, v in cols.items():
            if v is None:
                base.pop(k)
            else:
                base[k] = v
        return write(pa.table(base))

    def case(name, data, expect, **kw):
        kw.setdefault("names", (file,) if expect == "error" else ())
        if expect == "ok":
            kw.setdefault("check", {})
        return Case(f"parquet/{name}", "traces", {file: data}, kw.pop("argv", _run(file, "parquet")), expect, **kw)

    good = write(canonical)
    yield case("canonical-ok", good, "ok", check={"requests": 6})
    yield case("plain-ok", plain(), "ok", check={"requests": 4})
    yield case("empty-file", b"", "error")
    yield case("truncated", good[: len(good) // 2], "error")
    yield case("truncated-footer", good[:-10], "error")
    mid = bytearray(good)
    for i in range(40, 120):
        mid[i] ^= 0x5A
    yield case("corrupt-pages", bytes(mid), "error")
    yield case("magic-then-garbage", b"PAR1" + bytes(random.Random(3).randrange(256) for _ in range(300)), "error")
    yield case("meta-not-json", with_meta(meta=b"{not json"), "error", not_in=("stored-name",))
    yield case("meta-not-object", with_meta(meta=b"[1, 2]"), "error", not_in=("stored-name",))
    yield case("meta-not-utf8", with_meta(meta=b"\xff\xfe"), "error", not_in=("stored-name",))
    for v in (b"abc", b"0", b"-3", b"1.5", b"", b"99999999999999999999999"):
        yield case(f"hash_block_tokens={v.decode()!r}", with_meta(hash_block_tokens=v), "error",
                   field=None, not_in=("stored-name",))
    yield case("hash_block_tokens-missing", with_meta(hash_block_tokens=None), "error",
               field=None, not_in=("stored-name",))
    yield case("name-not-utf8", with_meta(name=b"\xff"), "ok", check={"requests": 6})
    bad_row = canonical.set_column(2, "prompt_tokens", pa.array([100, 2000, -5, 40, 64, 700], pa.int64()))
    yield case("stored-name-with-bad-row", write(bad_row), "error", row=3, field="prompt_tokens",
               not_in=("stored-name",))
    yield case("bool-tokens", plain(prompt_tokens=pa.array([True, True, False, True])), "error", row=1,
               field="prompt_tokens")
    yield case("uint64-huge", plain(output_tokens=pa.array([10, 2**63 + 5, 30, 40], pa.uint64())), "error", row=2,
               field="output_tokens", not_in=("negative",))
    yield case("float-huge", plain(output_tokens=pa.array([10.0, 1e30, 30.0, 40.0])), "error", row=2,
               field="output_tokens", not_in=("negative",))
    yield case("float-fraction", plain(output_tokens=pa.array([10.0, 1.5, 30.0, 40.0])), "error", row=2,
               field="output_tokens")
    yield case("tokens-over-max", plain(prompt_tokens=pa.array([100, 10**9, 300, 400])), "error", row=2,
               field="prompt_tokens")
    yield case("nulls", plain(prompt_tokens=pa.array([100, None, 300, 400])), "error", row=2, field="prompt_tokens")
    yield case("string-arrival", plain(arrival_s=pa.array(["0", "x", "1", "2"])), "error", row=2, field="arrival_s")
    yield case("bool-arrival", plain(arrival_s=pa.array([False, True, True, True])), "error", row=1,
               field="arrival_s")
    yield case("inf-arrival", plain(arrival_s=pa.array([0.0, float("inf"), 1.0, 2.0])), "error", row=2,
               field="arrival_s")
    yield case("far-arrival", plain(arrival_s=pa.array([0.0, 1e18, 1.0, 2.0])), "error", row=2, field="arrival_s")
    yield case("datetime-arrival", plain(arrival_s=pa.array(np.array(["2024-01-01T00:00:00", "2024-01-01T00:00:01",
                                                                      "2024-01-01T00:00:02", "2024-01-01T00:00:04"],
                                                                     "datetime64[ms]"))), "error",
               field="arrival_s")
    yield case("missing-column", plain(output_tokens=None), "error", names=(file, "output_tokens"))
    yield case("extra-column", plain(note=pa.array(["a", "b", "c", "d"])), "ok", check={"requests": 4})
    dup = pa.Table.from_arrays([pa.array([0.0, 1.0]), pa.array([5, 6]), pa.array([7, 8]), pa.array([9, 9])],
                               names=["arrival_s", "prompt_tokens", "output_tokens", "output_tokens"])
    yield case("duplicate-column", write(dup), "error", names=(file, "output_tokens"))
    strings = canonical.set_column(canonical.schema.get_field_index("block_hashes"), "block_hashes",
                                   pa.array([["a"], ["b"] * 4, ["c"] * 2, ["d"], ["e"], ["f"] * 2]))
    yield case("hashes-strings", write(strings), "error", field=None)
    yield case("empty-table", write(canonical.slice(0, 0)), "error", not_in=("window",))
    yield case("csv-named-parquet", csv_text(CSV_HEADER, CSV_ROWS).encode(), "error")


def describe_cases() -> Iterator[Case]:
    rows = [list(r) for r in CSV_ROWS]
    rows[2][0] = "1e300"
    yield Case("describe/csv-far-arrival", "traces", {"far.csv": csv_text(CSV_HEADER, rows).encode()},
               _describe("far.csv", "csv"), "error", names=("far.csv",), field="arrival_s")
    rows[2][0] = "1e9"
    yield Case("describe/csv-at-bound", "traces", {"bound.csv": csv_text(CSV_HEADER, rows).encode()},
               _describe("bound.csv", "csv"), "ok")
    yield Case("describe/empty", "traces", {"e.csv": b""}, _describe("e.csv", "csv"), "error", names=("e.csv",))
    yield Case("describe/truncated-gzip", "traces", {"t.csv.gz": gz(csv_text(AZURE_HEADER, AZURE_ROWS).encode())[:50]},
               _describe("t.csv.gz", "azure"), "error", names=("t.csv.gz",))
    yield Case("describe/unknown-header", "traces", {"x.csv": b"a,b\n1,2\n"}, _describe("x.csv", None), "error",
               names=("x.csv",))
    yield Case("describe/directory", "traces", {"d/keep": b""}, _describe("d", None), "error", names=("d",))
    yield Case("describe/missing", "traces", {}, _describe("nope.csv", None), "error", names=("nope.csv",))
    yield Case("describe/bom-detect", "traces", {"b.csv": b"\xef\xbb\xbf" + csv_text(AZURE_HEADER, AZURE_ROWS)
                                                 .encode()}, _describe("b.csv", None), "ok")
    yield Case("describe/burstgpt-dropped", "traces", {"bg.csv": csv_text(BURST_HEADER, BURST_ROWS).encode()},
               _describe("bg.csv", "burstgpt"), "ok", check={"stdout": "dropped"})
    yield Case("describe/all-failed", "traces", {"bg.csv": csv_text(
        BURST_HEADER, [[*r[:3], "0", *r[4:]] for r in BURST_ROWS]).encode()}, _run("bg.csv", "burstgpt"), "error",
        names=("bg.csv",))


def detection_cases() -> Iterator[Case]:
    yield Case("detect/unknown-header", "traces", {"x.csv": b"ts,a,b\n1,2,3\n"}, _run("x.csv", None), "error",
               names=("x.csv",))
    yield Case("detect/garbage.csv", "traces", {"g.csv": bytes(random.Random(5).randrange(256) for _ in range(400))},
               _run("g.csv", None), "error", names=("g.csv",))
    yield Case("detect/garbage.jsonl", "traces", {"g.jsonl": b"\x00\x01garbage\xff\n"}, _run("g.jsonl", None),
               "error", names=("g.jsonl",))
    yield Case("detect/truncated-gzip", "traces", {"t.csv.gz": gz(csv_text(AZURE_HEADER, AZURE_ROWS).encode())[:30]},
               _run("t.csv.gz", None), "error", names=("t.csv.gz",))
    yield Case("detect/lengths-file", "traces", {"l.csv": b"num_prefill_tokens,num_decode_tokens\n10,2\n"},
               _run("l.csv", None), "error", names=("l.csv",))


# ============================================================================ config cases
MODEL_TOML = (ROOT / "sim/presets/models/llama-3.2-1b.toml").read_text()
GPU_TOML = (ROOT / "sim/presets/gpus/h100-sxm-80gb.toml").read_text()


def _set(*pairs: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    args: tuple[str, ...] = ("run",) + BASE + ("--out", "{dir}/out")
    for p in pairs:
        args += ("--set", p)
    return args + extra


# (--set text, expected, key the message must name); "ok" runs the bundled trace's first 20 requests
SET_CASES: list[tuple[str, str, str]] = [
    *[(f"trace.rate_scale={v}", e, "trace.rate_scale") for v, e in (
        ("nan", "error"), ("inf", "error"), ("-inf", "error"), ("-1", "error"), ("0", "error"), ("1e-300", "error"),
        ("1e-12", "error"), ("1e300", "error"), ("true", "error"), ('"x"', "error"), ("[1]", "error"),
        ("{a=1}", "error"), ("2", "ok"), ("0.5", "ok"))],
    *[(f"trace.max_requests={v}", e, "trace.max_requests") for v, e in (
        ("-1", "error"), ("1.5", "error"), ("true", "error"), ('"x"', "error"), ("nan", "error"), ("30", "ok"))],
    *[(f"trace.start_s={v}", e, "trace.start_s") for v, e in (
        ("nan", "error"), ("inf", "error"), ("-1", "error"), ("1e300", "error"), ("2e9", "error"),
        ("1e6", "error"), ("true", "error"), ("10", "ok"))],
    *[(f"trace.end_s={v}", e, "trace.end_s") for v, e in (
        ("nan", "error"), ("inf", "error"), ("-1", "error"), ("1e300", "error"), ("100", "ok"))],
    *[(f"trace.repeat={v}", e, "trace.repeat") for v, e in (
        ("0", "error"), ("-1", "error"), ("1000000000", "error"), ("1.5", "error"), ("3", "ok"))],
    *[(f"trace.max_total_tokens={v}", e, "trace.max_total_tokens") for v, e in (
        ("1", "error"), ("-1", "error"), ("2", "error"), ("true", "error"), ("4096", "ok"))],
    *[(f"trace.synthetic={json.dumps(v)}", e, "trace.synthetic") for v, e in (
        ("poisson rate=5 n=1e3 prompt=fixed:100 output=fixed:10", "ok"), ("poisson rate=0 n=10", "error"),
        ("poisson rate=nan n=10", "error"), ("poisson rate=inf n=10", "error"), ("poisson rate=-1 n=10", "error"),
        ("gamma rate=5 cv=0 n=10", "error"), ("gamma rate=5 cv=1e-300 n=10", "error"),
        ("gamma rate=5 cv=nan n=10", "error"), ("poisson rate=5 n=0", "error"), ("poisson rate=5 n=-1", "error"),
        ("poisson rate=5 n=1.5", "error"), ("poisson rate=5 n=1e12", "error"),
        ("poisson rate=5 duration=1e300", "error"), ("poisson rate=1e300 duration=10", "error"),
        ("poisson rate=5 duration=nan", "error"), ("poisson rate=5 n=10 prompt=bogus", "error"),
        ("poisson rate=5 n=10 prompt=fixed:0", "error"), ("poisson rate=5 n=10 seed=-1", "error"),
        ("poisson rate=5 n=10 seed=x", "error"), ("uniform rate=5 n=10", "error"), ("poisson n=10", "error"),
        ("poisson rate=5 n=10 bogus=1", "error"), ("poisson rate=5 n=10 duration=5", "error"),
        ("poisson rate=5 n=10 rate", "error"), ("", "ok"),
        ("gamma rate=5 cv=3 n=20 prompt=fixed:100 output=fixed:10", "ok"))],
    ('trace.path="/nonexistent/x.csv"', "error", "x.csv"),
    ('trace.format="bogus"', "error", "trace.format"),
    ('trace.bundled="nope"', "error", "trace.bundled"),
    ('trace.bundled="sharegpt-lengths"', "error", "trace.bundled"),
    ("trace.bundled=5", "error", "trace.bundled"),
    *[(f"replica.block_size_tokens={v}", e, "replica.block_size_tokens") for v, e in (
        ("0", "error"), ("-1", "error"), ("1099511627776", "error"), ("1.5", "error"), ("true", "error"),
        ("32", "ok"))],
    *[(f"replica.gpu_memory_utilization={v}", e, "replica.gpu_memory_utilization") for v, e in (
        ("nan", "error"), ("inf", "error"), ("0", "error"), ("1.5", "error"), ("0.5", "ok"))],
    ("replica.gpu_memory_utilization=1e-300", "error", "gpu_memory_utilization"),
    *[(f"replica.activation_reserve_bytes={v}", e, "replica.activation_reserve_bytes") for v, e in (
        ("-1", "error"), ("4611686018427387904", "error"), ("nan", "error"))],
    *[(f"replica.tensor_parallel_size={v}", e, "replica.tensor_parallel_size") for v, e in (
        ("0", "error"), ("3", "error"), ("1024", "error"), ("2", "ok"))],
    *[(f"replica.max_model_len={v}", e, "replica.max_model_len") for v, e in (
        ("-1", "error"), ("1000000000", "error"), ("4096", "ok"))],
    ('replica.preemption_mode="bogus"', "error", "replica.preemption_mode"),
    ('replica.prefix_caching="yes"', "error", "replica.prefix_caching"),
    ("replica.prefix_caching=1", "error", "replica.prefix_caching"),
    *[(f"replica.dram_kv_bytes={v}", e, "replica.dram_kv_bytes") for v, e in (
        ("-1", "error"), ("4611686018427387904", "error"), ("1.5", "error"))],
    ("replica.nvme_kv_bytes=4611686018427387904", "error", "replica.nvme_kv_bytes"),
    *[(f"replica.num_hbm_blocks={v}", e, "replica.num_hbm_blocks") for v, e in (
        ("-1", "error"), ("1000000000000", "error"), ("128", "ok"))],
    ("replica.bulk_decode=0", "error", "replica.bulk_decode"),
    *[(f"cluster.num_replicas={v}", e, "cluster.num_replicas") for v, e in (
        ("0", "error"), ("-1", "error"), ("1000000000", "error"), ("1.5", "error"), ("2", "ok"))],
    *[(f"metrics.slo_ttft_s={v}", e, "metrics.slo_ttft_s") for v, e in (
        ("nan", "error"), ("inf", "error"), ("0", "error"), ("-1", "error"), ('"x"', "error"), ("0.5", "ok"))],
    *[(f"metrics.slo_tpot_s={v}", e, "metrics.slo_tpot_s") for v, e in (
        ("nan", "error"), ("inf", "error"), ("-0.1", "error"))],
    ('metrics.step_log="no"', "error", "metrics.step_log"),
    ('costs.backend="x"', "error", "costs.backend"),
    ('costs.table="/nonexistent/table"', "error", "/nonexistent/table"),   # with costs.backend="table"
    ('costs.fallback="x"', "error", "costs.fallback"),
    ('model.name="nope"', "error", "nope"),
    ("model.name=5", "error", "model.name"),
    ('hardware.gpu="nope"', "error", "nope"),
    ('hardware.server="nope"', "error", "nope"),
    *[(f"seed={v}", e, "seed") for v, e in (("-1", "error"), ("1.5", "error"), ("true", "error"), ('"x"', "error"),
                                            ("9223372036854775807", "ok"))],
    *[(f"policies.execution.{v}", e, k) for v, e, k in (
        ("dispatch_s=-0.5", "error", "dispatch_s"), ("dispatch_s=nan", "error", "dispatch_s"),
        ("dispatch_s=inf", "error", "dispatch_s"), ("cpu_overhead_s=inf", "error", "cpu_overhead_s"),
        ("cpu_overhead_s=nan", "error", "cpu_overhead_s"), ("dispatch_s=1e-5", "ok", ""))],
    *[(f"policies.scheduling.{v}", e, k) for v, e, k in (
        ("max_num_seqs=0", "error", "max_num_seqs"), ("max_num_seqs=-1", "error", "max_num_seqs"),
        ("max_num_seqs=1.5", "error", "max_num_seqs"), ("watermark=nan", "error", "watermark"),
        ("watermark=-1", "error", "watermark"), ("bogus=1", "error", "bogus"), ("max_num_seqs=8", "ok", ""))],
    ('policies.scheduling.name="nope"', "error", "nope"),
    ("policies.scheduling.name=1", "error", "policies.scheduling.name"),
    ('policies.bogus.name="x"', "error", "policies.bogus"),
    ('policies.scheduling="fcfs"', "ok", ""),
    ("trace=5", "error", "trace"),
    ("trace.rate_scale.x=1", "error", "trace.rate_scale"),
    ("bogus=1", "error", "bogus"),
    ("replica.bogus=1", "error", "replica.bogus"),
    ("noequals", "error", "noequals"),
    ("=5", "error", "=5"),
    ("a..b=1", "error", "a..b"),
    ("trace.rate_scale=", "error", "trace.rate_scale"),
]
# keys whose execution policy must be host-launched for the parameter to exist
_NEEDS_HOST_LAUNCHED = ("policies.execution.dispatch_s", "policies.execution.cpu_overhead_s")


def config_cases() -> Iterator[Case]:
    for i, (text, expect, key) in enumerate(SET_CASES):
        pairs: tuple[str, ...] = (text,)
        if text.startswith(_NEEDS_HOST_LAUNCHED):
            pairs = ('policies.execution.name="host-launched"', text)
        if text.startswith("costs.table="):
            pairs = ('costs.backend="table"', text)
        yield Case(f"set/{i:03d} {text[:60]}", "configs", {}, _set(*pairs), expect,
                   names=(key,) if (expect == "error" and key) else (), check={} if expect == "ok" else {})
    yield Case("set/end-before-start", "configs", {}, _set("trace.start_s=10", "trace.end_s=5"), "error",
               names=("trace.end_s",))
    yield Case("set/window-empty", "configs", {}, _set("trace.start_s=100000", "trace.end_s=200000"), "error",
               names=("trace.start_s",), not_in=())
    yield Case("set/repeat-with-one-request", "configs", {}, _set("trace.max_requests=1", "trace.repeat=2"),
               "error", names=("trace.repeat",))
    # --config files
    good = '[trace]\nmax_requests = 20\n[costs]\nbackend = "roofline"\n[model]\nname = "llama-3.2-1b"\n'
    for name, content, expect, names in (
            ("not-utf8", b"[trace]\nbundled = \"\xff\xfe\"\n", "error", ("c.toml",)),
            ("invalid-toml", b"[trace\nrate_scale = 2\n", "error", ("c.toml",)),
            ("binary", bytes(random.Random(11).randrange(256) for _ in range(200)), "error", ("c.toml",)),
            ("unknown-section", b"[bogus]\nx = 1\n", "error", ("bogus",)),
            ("section-not-table", b"trace = 5\n", "error", ("trace",)),
            ("bad-value", b"[trace]\nrate_scale = nan\n", "error", ("trace.rate_scale",)),
            ("empty", b"", "ok", ()),
            ("bom", b"\xef\xbb\xbf" + good.encode(), "ok", ()),
            ("crlf", good.replace("\n", "\r\n").encode(), "ok", ()),
            ("good", good.encode(), "ok", ())):
        yield Case(f"config-file/{name}", "configs", {"c.toml": content},
                   ("run", "--config", "{dir}/c.toml") + BASE + ("--out", "{dir}/out"), expect, names=names)
    yield Case("config-file/directory", "configs", {"cfgdir/keep": b""},
               ("run", "--config", "{dir}/cfgdir") + BASE, "error", names=("cfgdir",))
    yield Case("config-file/missing", "configs", {}, ("run", "--config", "{dir}/none.toml") + BASE, "error",
               names=("none.toml",))
    # --out
    yield Case("out/existing-file", "configs", {"taken": b"x"}, ("run",) + BASE + ("--out", "{dir}/taken"), "error",
               names=("--out", "taken"))
    yield Case("out/under-a-file", "configs", {"taken": b"x"}, ("run",) + BASE + ("--out", "{dir}/taken/sub"),
               "error", names=("--out", "taken"))
    yield Case("out/unwritable", "configs", {}, ("run",) + BASE + ("--out", "/proc/tiersim-out"), "error",
               names=("--out", "/proc/tiersim-out"))
    yield Case("out/config-key-existing-file", "configs", {"taken": b"x"},
               ("run",) + BASE + ("--set", 'output.dir="{dir}/taken"'), "error", names=("output.dir", "taken"))
    yield Case("sweep/out-existing-file", "configs", {"taken": b"x"},
               ("sweep", "--grid", "trace.rate_scale=1,2", "--out", "{dir}/taken", "--quiet"), "error",
               names=("--out", "taken"))
    yield Case("sweep/config-directory", "configs", {"cfgdir/keep": b""},
               ("sweep", "--config", "{dir}/cfgdir", "--grid", "trace.rate_scale=1,2", "--out", "{dir}/o"), "error",
               names=("cfgdir",))
    # presets given as paths
    bad_models = {
        "string-field": MODEL_TOML.replace("num_layers = 16", 'num_layers = "16"'),
        "float-for-int": MODEL_TOML.replace("num_layers = 16", "num_layers = 16.5"),
        "nan-field": MODEL_TOML.replace("hidden_size = 2048", "hidden_size = nan"),
        "bool-field": MODEL_TOML.replace("num_layers = 16", "num_layers = true"),
        "missing-key": MODEL_TOML.replace("num_layers = 16\n", ""),
        "unknown-key": MODEL_TOML + "bogus = 1\n",
        "not-toml": "num_layers = = 16\n",
    }
    for name, text in bad_models.items():
        key = {"string-field": "num_layers", "float-for-int": "num_layers", "nan-field": "hidden_size",
               "bool-field": "num_layers", "missing-key": "num_layers", "unknown-key": "bogus",
               "not-toml": "m.toml"}[name]
        yield Case(f"model-file/{name}", "configs", {"m.toml": text.encode()},
                   _set('model.name="{dir}/m.toml"'), "error", names=("m.toml", key))
    yield Case("model-file/not-utf8", "configs", {"m.toml": MODEL_TOML.encode().replace(b"llama-3.2-1b", b"\xff")},
               _set('model.name="{dir}/m.toml"'), "error", names=("m.toml",))
    yield Case("model-file/directory", "configs", {"d.toml/keep": b""}, _set('model.name="{dir}/d.toml"'), "error",
               names=("d.toml",))
    yield Case("gpu-file/inf-bandwidth", "configs", {"g.toml": GPU_TOML.replace(
        "hbm_bandwidth_bytes_per_s = 3.35e12", "hbm_bandwidth_bytes_per_s = inf").encode()},
        _set('hardware.gpu="{dir}/g.toml"'), "error", names=("g.toml", "hbm_bandwidth_bytes_per_s"))
    yield Case("gpu-file/string-sm-count", "configs", {"g.toml": GPU_TOML.replace(
        "sm_count = 132", 'sm_count = "132"').encode()},
        _set('hardware.gpu="{dir}/g.toml"'), "error", names=("g.toml", "sm_count"))
    yield Case("cli/seed-negative", "configs", {}, ("run",) + BASE + ("--seed", "-1"), "error", names=("seed",))


# ============================================================================ feature cases (new in issue 13)
def feature_cases() -> Iterator[Case]:
    ms = "ts_ms,in,out,user\n0,120,30,a\n250,64,8,b\n750,900,120,a\n1500,33,64,c\n2000,512,16,b\n"
    cols = 'trace.columns={arrival_s="ts_ms", prompt_tokens="in", output_tokens="out"}'
    yield Case("features/csv-columns-ms", "features", {"my.csv": ms.encode()},
               _run("my.csv", "csv", "--set", cols, "--set", 'trace.time_unit="ms"'), "ok", check={"requests": 5})
    yield Case("features/csv-columns-dotted", "features", {"my.csv": ms.encode()},
               _run("my.csv", "csv", "--set", 'trace.columns.arrival_s="ts_ms"', "--set",
                    'trace.columns.prompt_tokens="in"', "--set", 'trace.columns.output_tokens="out"', "--set",
                    'trace.time_unit="ms"'), "ok", check={"requests": 5})
    yield Case("features/csv-columns-missing", "features", {"my.csv": ms.encode()},
               _run("my.csv", "csv", "--set", 'trace.columns={arrival_s="ts"}'), "error", names=("my.csv", "ts"))
    yield Case("features/csv-columns-unknown-canonical", "features", {"my.csv": ms.encode()},
               _run("my.csv", "csv", "--set", 'trace.columns={arrival="ts_ms"}'), "error",
               names=("trace.columns",))
    yield Case("features/csv-time-unit-bad", "features", {"my.csv": ms.encode()},
               _run("my.csv", "csv", "--set", cols, "--set", 'trace.time_unit="h"'), "error",
               names=("trace.time_unit",))
    yield Case("features/columns-with-azure", "features", {"a.csv": csv_text(AZURE_HEADER, AZURE_ROWS).encode()},
               _run("a.csv", "azure", "--set", cols), "error", names=("trace.columns",))
    dt = "when,in,out\n2024-05-01 10:00:00,120,30\n2024-05-01 10:00:01.5,64,8\n2024-05-01 10:00:03,900,120\n"
    yield Case("features/csv-datetime", "features", {"dt.csv": dt.encode()},
               _run("dt.csv", "csv", "--set", 'trace.columns={arrival_s="when", prompt_tokens="in", '
                                              'output_tokens="out"}', "--set", 'trace.time_unit="datetime"',
                    "--set", 'trace.time_format="%Y-%m-%d %H:%M:%S.%f"'), "error", row=1, field="when")
    yield Case("features/csv-datetime-inferred", "features", {"dt.csv": dt.encode()},
               _run("dt.csv", "csv", "--set", 'trace.columns={arrival_s="when", prompt_tokens="in", '
                                              'output_tokens="out"}', "--set", 'trace.time_unit="datetime"'),
               "ok", check={"requests": 3})
    yield Case("features/mooncake-hash-block", "features", {"m.jsonl": moon_text(MOON_ROWS).encode()},
               _run("m.jsonl", "mooncake", "--set", "trace.hash_block_tokens=256"), "error",
               row=1, field="hash_ids")
    yield Case("features/unknown-header-advice", "features", {"x.csv": ms.encode()}, _run("x.csv", None), "error",
               names=("x.csv", "trace.columns"))


def all_cases() -> list[Case]:
    cases = [c for f in CSV_FORMATS for c in csv_cases(f)]
    cases += [*mooncake_cases(), *parquet_cases(), *describe_cases(), *detection_cases(), *config_cases(),
              *feature_cases()]
    ids = Counter(c.id for c in cases)
    dup = [k for k, v in ids.items() if v > 1]
    assert not dup, dup
    return cases


# ============================================================================ running and classifying
@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    out_dir: Path | None


def write_files(case: Case, directory: Path) -> None:
    for name, data in case.files.items():
        p = directory / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def argv_for(case: Case, directory: Path) -> list[str]:
    return [a.replace("{dir}", str(directory)) for a in case.argv]


def _limit_memory() -> None:
    """Cap a case's address space so an absurd config fails with MemoryError instead of waking the
    kernel's OOM killer on a shared machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_exec(case: Case, directory: Path, timeout: float = 300) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TIERSIM_DEBUG", None)
    try:
        p = subprocess.run([sys.executable, "-m", "sim.cli", *argv_for(case, directory)], capture_output=True,
                           text=True, cwd=directory, env=env, timeout=timeout, errors="replace",
                           preexec_fn=_limit_memory)
        return Outcome(p.returncode, p.stdout, p.stderr, directory / "out")
    except subprocess.TimeoutExpired:
        return Outcome(-9, "", "timed out", None)


def run_fork(case: Case, directory: Path, timeout: float = 300) -> Outcome:
    """Like run_exec, from a forked child of this (already imported) process: same semantics, no startup."""
    import signal

    out_path, err_path = directory / ".stdout", directory / ".stderr"
    pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            os.chdir(directory)
            fo, fe = os.open(out_path, os.O_WRONLY | os.O_CREAT), os.open(err_path, os.O_WRONLY | os.O_CREAT)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            signal.alarm(int(timeout))
            _limit_memory()
            from sim.cli import main

            try:
                rc = main(argv_for(case, directory))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)

    def read(p: Path) -> str:
        return p.read_text(errors="replace") if p.exists() else ""

    return Outcome(rc, read(out_path), read(err_path), directory / "out")


def message_problems(case: Case, msg: str, directory: Path) -> list[str]:
    """What keeps an error message from being clear (empty when it is)."""
    problems = []
    text = msg.strip()
    if text.count("\n"):
        problems.append("more than one line")
    text = text.removeprefix("tiersim: error: ")
    if len(text) > MAX_MESSAGE_CHARS:
        problems.append(f"{len(text)} characters long")
    for name in case.names:
        name = name.replace("{dir}", str(directory))
        if name not in text:
            problems.append(f"does not name {name!r}")
    if case.row is not None and not re.search(rf"\brow {case.row}\b", text):
        problems.append(f"no 'row {case.row}'")
    if case.line is not None and not re.search(rf"\bline {case.line}\b", text):
        problems.append(f"no 'line {case.line}'")
    if case.field is not None and f"'{case.field}'" not in text:
        problems.append(f"no field '{case.field}'")
    bad = _BAD_ADVICE.search(text)
    if bad:
        problems.append(f"advises {bad.group(0)!r}, which no option or key accepts")
    for s in case.not_in:
        if s in text:
            problems.append(f"says {s!r}")
    return problems


def run_problems(case: Case, o: Outcome) -> list[str]:
    """What is wrong with a run that exited 0."""
    if case.argv[0] == "trace":
        want = case.check.get("stdout")
        return [] if not want or want in o.stdout else [f"stdout lacks {want!r}"]
    summary_path = o.out_dir / "summary.json" if o.out_dir else None
    if summary_path is None or not summary_path.exists():
        return ["no summary.json"]
    s = json.loads(summary_path.read_text())
    problems = []
    rq = s["requests"]
    if rq["finished"] + rq["rejected"] != rq["total"] or rq["total"] == 0:
        problems.append(f"requests {rq}")
    if "requests" in case.check and rq["total"] != case.check["requests"]:
        problems.append(f"{rq['total']} requests, expected {case.check['requests']}")
    if rq["finished"] and not (s["ttft_s"]["p50"] or 0) > 0:
        problems.append(f"TTFT p50 = {s['ttft_s']['p50']}")
    if rq["finished"] and not (s["e2e_s"]["p50"] or 0) > 0:
        problems.append(f"E2E p50 = {s['e2e_s']['p50']}")
    if "dropped" in case.check:
        want = case.check["dropped"]
        got = json.dumps(s["trace"])
        if f'"failed": {want}' not in got:
            problems.append(f"summary.json trace entry lacks the {want} dropped failed rows")
        if want and "dropped" not in o.stdout:
            problems.append("printed summary does not mention dropped rows")
    return problems


def classify(case: Case, o: Outcome, directory: Path) -> tuple[str, str]:
    if "Traceback (most recent call last)" in o.stderr or o.rc not in (0, 2):
        last = [ln for ln in o.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {o.rc}"]
        return "traceback", last[0][:200]
    if o.rc == 0:
        if case.expect == "error":
            return "silent", "ran (exit 0)"
        problems = run_problems(case, o)
        return ("silent", "; ".join(problems)) if problems else ("ok", "")
    msg = o.stderr.strip()
    if case.expect == "ok":
        return "vague", "refused a correct input: " + msg[:200]
    problems = message_problems(case, msg, directory)
    return ("vague", "; ".join(problems) + " | " + msg[:200]) if problems else ("clear", msg[:200])


def run_case(case: Case, mode: str = "fork") -> tuple[str, str]:
    directory = Path(tempfile.mkdtemp(prefix="tiersim-fuzz-"))
    try:
        write_files(case, directory)
        o = (run_fork if mode == "fork" else run_exec)(case, directory)
        return classify(case, o, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


CATEGORIES = ("traceback", "silent", "vague", "clear", "ok")


def report(cases: list[Case], mode: str, verbose: bool, json_out: str | None) -> dict:
    if mode == "fork":
        import sim.cli  # noqa: F401  (import once, before forking)
        import sim.engine  # noqa: F401
        import traces  # noqa: F401
    results: dict[str, dict[str, int]] = {}
    detail = []
    for case in cases:
        cat, why = run_case(case, mode)
        results.setdefault(case.group, Counter())[cat] += 1
        detail.append({"id": case.id, "group": case.group, "expect": case.expect, "outcome": cat, "why": why})
        if verbose and cat not in ("clear", "ok"):
            print(f"{cat:9} {case.id}: {why!r}", flush=True)
    print(f"{'group':10}" + "".join(f"{c:>11}" for c in CATEGORIES) + f"{'total':>8}")
    for group, counts in results.items():
        print(f"{group:10}" + "".join(f"{counts.get(c, 0):>11}" for c in CATEGORIES) + f"{sum(counts.values()):>8}")
    if json_out:
        Path(json_out).write_text(json.dumps(detail, indent=1))
    return {g: dict(c) for g, c in results.items()}


FIXTURE_MAX_BYTES = 16_384


def write_fixtures(cases: list[Case], out: Path, only_ids: set[str] | None) -> None:
    """Each case's files under ``out/<slug>/`` and ``manifest.json`` with its command and expected outcome.

    Cases with a file over FIXTURE_MAX_BYTES (200,000-character fields, 100,000-deep nesting) are listed
    with ``"generated": true`` and no files: the regression test rebuilds them with :func:`all_cases`.
    """
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for case in cases:
        if only_ids is not None and case.id not in only_ids:
            continue
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", case.id).strip("_")[:80]
        entry = {**case.to_json(), "dir": slug}
        if any(len(data) > FIXTURE_MAX_BYTES for data in case.files.values()):
            entry["generated"] = True
        else:
            d = out / slug
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            write_files(case, d)
        manifest.append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=True) + "\n")


def read_fixtures(directory: Path) -> list[Case]:
    """The cases :func:`write_fixtures` stored, files read back (generated ones rebuilt)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    generated = {c.id: c for c in all_cases()} if any(e.get("generated") for e in manifest) else {}
    cases = []
    for entry in manifest:
        if entry.get("generated"):
            files = generated[entry["id"]].files
        else:
            files = {name: (directory / entry["dir"] / name).read_bytes() for name in entry["files"]}
        cases.append(Case.from_json(entry, files))
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.corpus_gen")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="run every case through the CLI and count outcomes")
    r.add_argument("--mode", choices=("fork", "exec"), default="fork")
    r.add_argument("--only", choices=("traces", "configs", "features"))
    r.add_argument("--match", help="only cases whose id contains this")
    r.add_argument("--json", help="write per-case outcomes to this file")
    r.add_argument("-v", "--verbose", action="store_true")
    w = sub.add_parser("write-fixtures", help="store cases as files plus manifest.json")
    w.add_argument("dir")
    w.add_argument("--ids-from", help="a --json report: keep the cases whose outcome was not clear/ok")
    args = p.parse_args(argv)
    cases = all_cases()
    if args.cmd == "report":
        cases = [c for c in cases if (not args.only or c.group == args.only)
                 and (not args.match or args.match in c.id)]
        report(cases, args.mode, args.verbose, args.json)
        return 0
    ids = None
    if args.ids_from:
        ids = {d["id"] for d in json.loads(Path(args.ids_from).read_text()) if d["outcome"] not in ("clear", "ok")}
    write_fixtures(cases, Path(args.dir), ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Case", "all_cases", "classify", "read_fixtures", "run_case", "write_fixtures", "CATEGORIES"]
