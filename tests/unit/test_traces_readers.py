"""Readers and load_trace: bundled files, fixtures, and one error case per kind of bad input."""
from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import traces
from traces import BUNDLED, TraceError, bundled_path, load_trace
from traces.readers import read_azure, read_burstgpt, read_csv_trace, read_mooncake, read_parquet_trace

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "traces"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


@pytest.fixture(scope="module")
def conv():
    return load_trace("azure-conv")


@pytest.fixture(scope="module")
def mooncake():
    return load_trace("mooncake-conversation")


def write_azure(tmp_path: Path, rows: list[str], name: str = "AzureLLMInferenceTrace_conv.csv",
                header: str = AZURE_HEADER) -> Path:
    path = tmp_path / name
    path.write_bytes("\r\n".join([header, *rows]).encode())  # CRLF, no final newline, like upstream
    return path


def raises_at(path: Path, *, row: int | None, field: str | None, line: int | None = None, **kw) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_trace(path, **kw)
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    assert path.name in msg
    assert err.row == row and err.field == field and err.line == line, msg
    if row is not None:
        assert f"row {row}" in msg
    if row is not None and field is not None:
        assert f"field '{field}'" in msg
    if line is not None:
        assert f"line {line}" in msg
    return err


# -- bundled files ---------------------------------------------------------------------------------
README_SHA256 = {
    "azure-code": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    "azure-conv": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    "mooncake-conversation": "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df",
    "mooncake-synthetic": "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131",
    "sharegpt-lengths": "6d6c296302a853e2669a674a96f269283e60c57e60363bd450588a1066919f9f",
}


@pytest.mark.parametrize("name", sorted(README_SHA256))
def test_bundled_files_decompress_to_the_upstream_bytes(name):
    path = bundled_path(name)
    assert path.parent.name == "data" and path.parent.parent.name == "traces"
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == README_SHA256[name]
    entry = BUNDLED[name]
    assert entry.license in ("CC-BY-4.0", "Apache-2.0") and entry.attribution and entry.description


def test_mooncake_synthetic_is_bundled_with_its_hashes():
    tr = load_trace("mooncake-synthetic")
    assert len(tr) == 3_993 and tr.has_hashes and tr.hash_block_tokens == 512
    assert tr.prompt_tokens.mean() == pytest.approx(15_325, abs=1)     # the upstream README's mean


def test_bundled_unknown_name_lists_the_known_ones():
    with pytest.raises(TraceError, match="unknown bundled trace 'nope' .*azure-conv.*sharegpt-lengths"):
        bundled_path("nope")


def test_azure_conv(conv):
    assert len(conv) == 19_366
    assert conv.arrival_s[0] == 0.0
    assert conv.arrival_s[-1] == pytest.approx(3501.721937, abs=1e-9)
    assert (conv.prompt_tokens[0], conv.output_tokens[0]) == (374, 44)
    assert conv.meta["format"] == "azure"
    assert conv.meta["time_origin"] == "2023-11-16T18:15:46.68059"
    assert conv.name == "AzureLLMInferenceTrace_conv"
    assert np.array_equal(conv.request_id, np.arange(19_366))
    assert not conv.has_hashes and conv.session_id is None and "sorted" not in conv.meta


def test_azure_code():
    code = load_trace("azure-code")
    assert len(code) == 8_819
    assert code.arrival_s[-1] == pytest.approx(3435.948056, abs=1e-9)
    assert code.prompt_tokens.max() == 7_437 and code.output_tokens.max() == 1_899


def test_mooncake_conversation(mooncake):
    assert len(mooncake) == 12_031
    assert mooncake.arrival_s[0] == 0.0 and mooncake.arrival_s[-1] == pytest.approx(3536.999)
    assert mooncake.hash_block_tokens == 512
    assert list(mooncake.block_hashes(0)) == list(range(14))
    assert mooncake.block_hashes(1)[0] == 0 and len(mooncake.block_hashes(1)) == 15
    assert mooncake.hash_values.size == 288_500
    blocks = np.diff(mooncake.hash_offsets)
    assert np.array_equal(blocks, -(-mooncake.prompt_tokens // 512))


def test_loading_is_fast():
    best = min(_timed(lambda: load_trace("azure-conv")) for _ in range(3))
    assert best < 0.3


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- Azure bad inputs ------------------------------------------------------------------------------
GOOD = "2023-11-16 18:15:46.6805900,374,44"


def test_azure_negative_token_count(tmp_path):
    path = write_azure(tmp_path, [GOOD] * 16 + ["2023-11-16 18:15:47.0000000,-5,10"])
    err = raises_at(path, row=17, line=18, field="ContextTokens")
    assert str(err) == ("AzureLLMInferenceTrace_conv.csv: row 17 (line 18), field 'ContextTokens': "
                        "negative token count -5")


def test_azure_zero_output_tokens(tmp_path):
    path = write_azure(tmp_path, [GOOD, "2023-11-16 18:15:47.0000000,12,0"])
    err = raises_at(path, row=2, line=3, field="GeneratedTokens")
    assert "zero token count" in str(err)


def test_azure_first_bad_row_and_how_many_more(tmp_path):
    rows = [GOOD, "2023-11-16 18:15:47.0000000,abc,4", GOOD, "2023-11-16 18:15:48.0000000,,4",
            "2023-11-16 18:15:49.0000000,7,1.5", "nonsense,3,3"]
    err = raises_at(write_azure(tmp_path, rows), row=2, line=3, field="ContextTokens")
    assert "not a number: 'abc'" in str(err) and str(err).endswith("(and 3 more rows)")
    assert err.more_rows == 3


def test_azure_empty_field(tmp_path):
    err = raises_at(write_azure(tmp_path, [GOOD, "2023-11-16 18:15:47.0000000,5,"]),
                    row=2, line=3, field="GeneratedTokens")
    assert "empty or missing value" in str(err)


def test_azure_fractional_token_count(tmp_path):
    err = raises_at(write_azure(tmp_path, [GOOD, "2023-11-16 18:15:47.0000000,5.5,3"]),
                    row=2, line=3, field="ContextTokens")
    assert "not a whole number" in str(err)


def test_azure_unparsable_timestamp(tmp_path):
    err = raises_at(write_azure(tmp_path, [GOOD, GOOD, "2023-11-16 25:99:00.0000000,5,3"]),
                    row=3, line=4, field="TIMESTAMP")
    assert "unparsable timestamp '2023-11-16 25:99:00.0000000'" in str(err)


def test_azure_missing_column(tmp_path):
    path = write_azure(tmp_path, ["2023-11-16 18:15:46.6805900,374"], name="trace.csv",
                       header="TIMESTAMP,ContextTokens")
    with pytest.raises(TraceError) as info:
        read_azure(path)
    assert str(info.value) == "trace.csv: missing column 'GeneratedTokens' (found: TIMESTAMP, ContextTokens)"
    assert info.value.field == "GeneratedTokens" and info.value.row is None


def test_azure_row_with_too_many_fields(tmp_path):
    err = raises_at(write_azure(tmp_path, [GOOD, GOOD + ",99"]), row=None, line=3, field=None)
    assert str(err) == "AzureLLMInferenceTrace_conv.csv: line 3: expected 3 fields, found 4"


def test_binary_file_is_not_text(tmp_path):
    path = tmp_path / "blob.csv"
    path.write_bytes(b"TIMESTAMP\xff\xfe,ContextTokens\n")
    with pytest.raises(TraceError, match="blob.csv: line 1: not UTF-8 text: byte 0xff"):
        load_trace(path, format="azure")


def test_azure_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text(f"{AZURE_HEADER}\n{GOOD}\n\n\n2023-11-16 18:15:47.0000000,5,-1\n")
    raises_at(path, row=2, line=5, field="GeneratedTokens", format="azure")


def test_azure_gzip_and_plain_agree(tmp_path, conv):
    plain = tmp_path / "conv.csv"
    plain.write_bytes(gzip.decompress(bundled_path("azure-conv").read_bytes()))
    again = read_azure(plain)
    assert again.identity()["sha256"] == conv.identity()["sha256"]


def test_unsorted_rows_are_sorted_and_flagged(tmp_path):
    path = write_azure(tmp_path, ["2023-11-16 18:00:05.0000000,1,1", "2023-11-16 18:00:01.5000000,2,2",
                                  "2023-11-16 18:00:03.0000000,3,3"])
    t = read_azure(path)
    assert t.meta["sorted"] is True
    assert list(t.arrival_s) == [0.0, 1.5, 3.5]
    assert list(t.prompt_tokens) == [2, 3, 1] and list(t.request_id) == [1, 2, 0]


# -- Mooncake --------------------------------------------------------------------------------------
def mooncake_line(ts: int, n_in: int, n_out: int = 10, hashes: list[int] | None = None) -> str:
    hashes = list(range(-(-n_in // 512))) if hashes is None else hashes
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": hashes})


def test_mooncake_plain_file_and_ms_timestamps(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([mooncake_line(1500, 600), mooncake_line(4000, 512, hashes=[0]),
                               mooncake_line(4000, 1, hashes=[7])]) + "\n")
    t = load_trace(path)
    assert list(t.arrival_s) == [0.0, 2.5, 2.5]
    assert list(t.block_hashes(0)) == [0, 1] and list(t.block_hashes(2)) == [7]
    assert t.meta["clock_origin_s"] == 1.5


def test_mooncake_hash_count_mismatch(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([mooncake_line(0, 600), mooncake_line(1, 1025, hashes=[0, 1])]))
    err = raises_at(path, row=2, line=2, field="hash_ids")
    assert "2 block hashes for input_length 1025, expected ceil(1025/512) = 3" in str(err)


def test_mooncake_bad_json_line(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    lines = [mooncake_line(0, 600), "", '{"timestamp": 1, "input_length": 5,', mooncake_line(2, 10)]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    err = raises_at(path, row=2, line=3, field=None)
    assert "invalid JSON" in str(err)


def test_mooncake_negative_length_after_blank_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([mooncake_line(0, 600), "", mooncake_line(1, 600, n_out=-3)]))
    err = raises_at(path, row=2, line=3, field="output_length")
    assert "negative token count -3" in str(err)


def test_mooncake_non_numeric_and_missing_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([mooncake_line(0, 600),
                               '{"timestamp": 1, "input_length": "lots", "output_length": 3, "hash_ids": [0]}',
                               '{"timestamp": 2, "output_length": 3, "hash_ids": [0]}']))
    err = raises_at(path, row=2, line=2, field="input_length")
    assert "a string ('lots'), not a number" in str(err) and err.more_rows == 1


def test_mooncake_hash_ids_not_integers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([mooncake_line(0, 600), mooncake_line(1, 10, hashes=["a"])]))
    raises_at(path, row=2, line=2, field="hash_ids")


def test_mooncake_without_hashes_loads_without_hashes(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n')
    t = read_mooncake(path)
    assert not t.has_hashes and t.hash_block_tokens is None


# -- BurstGPT --------------------------------------------------------------------------------------
def test_burstgpt_original_layout_drops_failed_rows():
    t = load_trace(FIXTURES / "burstgpt_original_handwritten.csv")
    assert t.meta["format"] == "burstgpt" and t.meta["dropped_failed"] == 3 and t.meta["rows_read"] == 10
    assert len(t) == 7
    assert list(t.request_id) == [0, 2, 3, 5, 6, 8, 9]  # source rows, so dropped rows leave gaps
    assert list(t.arrival_s) == [0.0, 113.0, 113.0, 231.0, 296.0, 407.0, 493.0]
    assert list(t.tenant) == ["ChatGPT", "GPT-4", "ChatGPT", "GPT-4", "ChatGPT", "GPT-4", "ChatGPT"]
    assert t.session_id is None and t.output_tokens.min() >= 1
    assert traces.describe(t)["dropped"] == {"failed": 3}


def test_burstgpt_v3_layout_has_sessions():
    t = load_trace(FIXTURES / "burstgpt_v3_handwritten.csv")
    assert t.meta["dropped_failed"] == 2 and len(t) == 6
    assert list(t.session_id) == ["s-0001", "s-0001", "s-0003", "s-0002", "s-0004", "s-0003"]
    assert t.arrival_s[1] == pytest.approx(7.75) and t.meta["clock_origin_s"] == 12.5
    assert list(t.prompt_tokens[:2]) == [512, 790]


def test_burstgpt_keep_failed():
    t = read_burstgpt(FIXTURES / "burstgpt_v3_handwritten.csv", keep_failed=True)
    assert len(t) == 8 and t.meta["kept_failed"] == 2 and "dropped_failed" not in t.meta
    assert t.meta["failed_request_ids"] == [1, 5]
    assert list(t.output_tokens[[1, 5]]) == [1, 1]


def test_burstgpt_bad_request_tokens_reports_source_row(tmp_path):
    path = tmp_path / "BurstGPT_1.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "1,ChatGPT,10,0,10,API log\n"       # failed: dropped, but still counts as row 1
                    "2,ChatGPT,-4,5,1,API log\n")
    raises_at(path, row=2, line=3, field="Request tokens")


# -- generic CSV / Parquet -------------------------------------------------------------------------
MAPPING = {"arrival_s": "arrived_at", "prompt_tokens": "num_prefill_tokens",
           "output_tokens": "num_decode_tokens"}


@pytest.mark.parametrize("unit,values,expected", [
    ("s", ["10.5", "11", "12.25"], [0.0, 0.5, 1.75]),
    ("ms", ["1000", "1500", "4000"], [0.0, 0.5, 3.0]),
    ("us", ["5", "250005", "1000005"], [0.0, 0.25, 1.0]),
])
def test_generic_csv_numeric_units(tmp_path, unit, values, expected):
    path = tmp_path / "vidur.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens,extra\n"
                    + "".join(f"{v},{i + 1},{i + 2},x\n" for i, v in enumerate(values)))
    t = load_trace(path, format="csv", columns=MAPPING, time_unit=unit)
    assert np.allclose(t.arrival_s, expected, atol=1e-12, rtol=0)
    assert list(t.prompt_tokens) == [1, 2, 3] and t.meta["time_unit"] == unit


@pytest.mark.parametrize("fmt,values", [
    ("%d/%m/%Y %H:%M:%S", ["16/11/2023 18:00:00", "16/11/2023 18:00:02", "16/11/2023 18:01:00"]),
    (None, ["2023-11-16T18:00:00", "2023-11-16T18:00:02", "2023-11-16T18:01:00"]),
])
def test_generic_csv_datetime_unit(tmp_path, fmt, values):
    path = tmp_path / "t.csv"
    path.write_text("when,p,o\n" + "".join(f"{v},5,6\n" for v in values))
    t = read_csv_trace(path, columns={"arrival_s": "when", "prompt_tokens": "p", "output_tokens": "o"},
                       time_unit="datetime", time_format=fmt)
    assert list(t.arrival_s) == [0.0, 2.0, 60.0]
    assert t.meta["time_origin"] == "2023-11-16T18:00:00" and t.meta["clock_origin_s"] == 64_800.0


def test_generic_csv_bad_datetime(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("when,p,o\n16/11/2023 18:00:00,5,6\nyesterday,5,6\n")
    err = raises_at(path, row=2, line=3, field="when", format="csv",
                    columns={"arrival_s": "when", "prompt_tokens": "p", "output_tokens": "o"},
                    time_unit="datetime", time_format="%d/%m/%Y %H:%M:%S")
    assert "unparsable timestamp 'yesterday' (expected format '%d/%m/%Y %H:%M:%S')" in str(err)


def test_generic_csv_missing_mapped_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens\n0,1\n")
    with pytest.raises(TraceError) as info:
        load_trace(path, format="csv", columns=MAPPING)
    assert str(info.value) == ("t.csv: missing column 'num_decode_tokens' (mapped to 'output_tokens' by trace.columns; "
                               "found: arrived_at, num_prefill_tokens)")
    assert info.value.field == "num_decode_tokens"


def test_generic_csv_unknown_canonical_name_and_unit(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    with pytest.raises(TraceError, match="unknown canonical column 'prompt' .*known: request_id"):
        load_trace(path, columns={"prompt": "x"})
    with pytest.raises(TraceError, match="unknown trace.time_unit 'h' \\(known: s, ms, us, ns, datetime\\)"):
        load_trace(path, time_unit="h")


def test_generic_csv_optional_columns_and_duplicate_ids(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,arrival_s,prompt_tokens,output_tokens,who,prio\n"
                    "7,0,1,2,alice,1\n9,1,3,4,bob,-2\n")
    t = load_trace(path, columns={"request_id": "id", "tenant": "who", "priority": "prio"})
    assert list(t.request_id) == [7, 9] and list(t.tenant) == ["alice", "bob"]
    assert t.priority.dtype == np.int32 and list(t.priority) == [1, -2]
    path.write_text("id,arrival_s,prompt_tokens,output_tokens\n7,0,1,2\n7,1,3,4\n")
    err = raises_at(path, row=2, line=3, field="id", columns={"request_id": "id"})
    assert "duplicate request id 7" in str(err)


def test_generic_parquet_with_mapping_and_hashes(tmp_path):
    table = pa.table({"t_ms": pa.array([0, 250, 1000], pa.int64()),
                      "inp": pa.array([3, 40, 17], pa.int64()), "out": pa.array([1, 2, 3], pa.int64()),
                      "h": pa.array([[1], [1, 2, 3], [4, 5]], pa.list_(pa.int32()))})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    t = load_trace(path, columns={"arrival_s": "t_ms", "prompt_tokens": "inp", "output_tokens": "out",
                                  "block_hashes": "h"}, time_unit="ms", hash_block_tokens=16)
    assert list(t.arrival_s) == [0.0, 0.25, 1.0]
    assert list(t.block_hashes(1)) == [1, 2, 3] and t.hash_block_tokens == 16
    with pytest.raises(TraceError, match="metadata is none; set trace.hash_block_tokens"):
        read_parquet_trace(path, columns={"arrival_s": "t_ms", "prompt_tokens": "inp",
                                          "output_tokens": "out", "block_hashes": "h"})


def test_generic_parquet_datetime_column(tmp_path):
    times = pd.to_datetime(["2024-05-10 00:00:01", "2024-05-10 00:00:03.5"], format="ISO8601")
    path = tmp_path / "t.parquet"
    pd.DataFrame({"ts": times, "p": [4, 5], "o": [6, 7]}).to_parquet(path)
    columns = {"arrival_s": "ts", "prompt_tokens": "p", "output_tokens": "o"}
    assert list(load_trace(path, columns=columns, time_unit="datetime").arrival_s) == [0.0, 2.5]
    with pytest.raises(TraceError, match='holds date-times; set trace.time_unit = "datetime"'):
        load_trace(path, columns=columns)


def test_generic_parquet_bad_value_names_row_and_field(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"arrival_s": [0.0, 1.0, 2.0], "prompt_tokens": [1, 0, 3],
                             "output_tokens": [1, 1, 1]}), path)
    err = raises_at(path, row=2, line=None, field="prompt_tokens")
    assert str(err) == "t.parquet: row 2, field 'prompt_tokens': zero token count (must be >= 1)"


def test_parquet_written_from_a_trace_reads_back_exactly(tmp_path, mooncake):
    path = tmp_path / "m.parquet"
    pq.write_table(mooncake.to_arrow(), path)
    back = load_trace(path)
    assert back.identity()["sha256"] == mooncake.identity()["sha256"]
    assert back.meta == mooncake.meta and back.name == mooncake.name


# -- load_trace: detection and its errors ----------------------------------------------------------
def test_detection_by_extension_and_header(tmp_path):
    assert traces.detect_format(bundled_path("azure-code")) == "azure"
    assert traces.detect_format(bundled_path("mooncake-conversation")) == "mooncake"
    assert traces.detect_format(FIXTURES / "burstgpt_v3_handwritten.csv") == "burstgpt"
    odd = tmp_path / "requests.log"
    odd.write_text(mooncake_line(0, 5) + "\n")
    assert traces.detect_format(odd) == "mooncake"


def test_unknown_format(conv):
    with pytest.raises(TraceError) as info:
        load_trace(bundled_path("azure-conv"), format="sharegpt")
    assert str(info.value) == ("AzureLLMInferenceTrace_conv.csv.gz: unknown trace format 'sharegpt' "
                               "(known: azure, mooncake, burstgpt, csv, parquet)")


def test_nonexistent_file(tmp_path):
    missing = tmp_path / "nope" / "trace.csv"
    with pytest.raises(TraceError) as info:
        load_trace(missing)
    assert str(info.value) == f"{missing}: no such file"
    with pytest.raises(TraceError, match="not a bundled trace name .*azure-conv"):
        load_trace("azure-cnov")


def test_unknown_option_for_a_format():
    with pytest.raises(TraceError, match="unknown option 'keep_failed' for format 'azure' \\(accepted: name\\)"):
        load_trace("azure-conv", keep_failed=True)


def test_undetectable_csv_says_to_pass_a_format(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(TraceError,
                       match="x.csv: cannot tell the trace format .*columns: a, b.*--format .*trace.columns"):
        load_trace(path)


def test_length_file_is_not_a_trace():
    with pytest.raises(TraceError, match="length distribution with no arrival times"):
        load_trace("sharegpt-lengths")
    with pytest.raises(TraceError, match="length distribution with no arrival times"):
        load_trace(bundled_path("sharegpt-lengths"))


def test_format_detection_reports_an_encoding_error_not_an_unknown_format(tmp_path):
    from traces import load_trace
    from traces.schema import TraceError

    bad = tmp_path / "t.csv"
    bad.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n\xff\n")
    with pytest.raises(TraceError, match="line 3: not UTF-8 text: byte 0xff"):
        load_trace(bad)
    wide = tmp_path / "w.csv"
    wide.write_bytes("TIMESTAMP,ContextTokens,GeneratedTokens\n".encode("utf-16"))
    with pytest.raises(TraceError, match="UTF-16 text; save the file as UTF-8"):
        load_trace(wide)
