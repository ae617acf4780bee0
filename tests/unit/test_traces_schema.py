"""Trace construction, validation, the Arrow form, identity, and TraceError formatting."""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from traces import Trace, TraceError
from traces.schema import META_HASH_BLOCK_TOKENS, take_rows


def small(**changes) -> Trace:
    fields = dict(arrival_s=[0.0, 0.5, 2.0], prompt_tokens=[10, 600, 1025], output_tokens=[1, 2, 3],
                  hash_offsets=[0, 1, 3, 6], hash_values=[7, 7, 8, 7, 8, 9], hash_block_tokens=512,
                  session_id=["a", "b", "a"], priority=[0, 1, 2], tenant=["t1", "t1", "t2"],
                  name="small", source="test://small", meta={"format": "test"})
    fields.update(changes)
    return Trace(**fields)


def test_construction_normalises_types_and_freezes_arrays():
    t = small()
    assert len(t) == 3
    assert t.arrival_s.dtype == np.float64 and t.prompt_tokens.dtype == np.int64
    assert t.priority.dtype == np.int32 and t.hash_offsets.dtype == np.int64
    assert list(t.request_id) == [0, 1, 2]
    assert t.meta == {"format": "test", "transforms": []}
    with pytest.raises(ValueError):
        t.arrival_s[0] = 1.0
    view = t.block_hashes(2)
    assert list(view) == [7, 8, 9] and view.base is not None and not view.flags.writeable
    assert list(t.block_hashes(-3)) == [7]
    with pytest.raises(IndexError):
        t.block_hashes(3)


def test_input_arrays_are_copied_not_frozen_in_place():
    arrival = np.array([0.0, 1.0])
    t = Trace(arrival_s=arrival, prompt_tokens=[1, 1], output_tokens=[1, 1])
    arrival[1] = 99.0
    assert arrival.flags.writeable and t.arrival_s[1] == 1.0


def test_unsorted_arrivals_are_sorted_stably():
    t = small(arrival_s=[2.0, 0.5, 0.5], request_id=[10, 11, 12])
    assert t.meta["sorted"] is True
    assert list(t.arrival_s) == [0.5, 0.5, 2.0]
    assert list(t.request_id) == [11, 12, 10]
    assert list(t.prompt_tokens) == [600, 1025, 10]
    assert list(t.session_id) == ["b", "a", "a"]
    assert [list(t.block_hashes(i)) for i in range(3)] == [[7, 8], [7, 8, 9], [7]]


@pytest.mark.parametrize("changes,row,field,text", [
    ({"prompt_tokens": [10, -5, 1025]}, 2, "prompt_tokens", "negative token count -5"),
    ({"output_tokens": [1, 2, 0]}, 3, "output_tokens", "token count 0 (must be >= 1)"),
    ({"arrival_s": [0.0, np.nan, 1.0]}, 2, "arrival_s", "finite"),
    ({"arrival_s": [0.0, 1.0, np.inf]}, 3, "arrival_s", "finite"),
    ({"arrival_s": [-1.0, 1.0, 2.0]}, 1, "arrival_s", ">= 0"),
    ({"prompt_tokens": [10.0, 600.5, 1025.0]}, 2, "prompt_tokens", "not a whole number"),
    ({"request_id": [4, 5, 4]}, 3, "request_id", "duplicate request id 4"),
    ({"prompt_tokens": [10, 600, 1024]}, 3, "block_hashes", "3 blocks for 1024 prompt tokens"),
    ({"session_id": ["a", None, "b"]}, 2, "session_id", "expected a string"),
    ({"priority": [0, 2**31, 1]}, 2, "priority", "int32"),
])
def test_invalid_rows_name_row_and_field(changes, row, field, text):
    with pytest.raises(TraceError) as info:
        small(**changes)
    err = info.value
    assert (err.row, err.field) == (row, field)
    assert str(err).startswith(f"small: row {row}, field '{field}': ") and text in str(err)


def test_structural_errors():
    with pytest.raises(TraceError, match="shape"):
        small(output_tokens=[1, 2])
    with pytest.raises(TraceError, match="length n \\+ 1"):
        small(hash_offsets=[0, 1, 6])
    with pytest.raises(TraceError, match="positive integer"):
        small(hash_block_tokens=None)
    with pytest.raises(TraceError, match="no block hashes"):
        small(hash_offsets=None, hash_values=None)


def test_trace_error_format_and_pickle():
    err = TraceError("negative token count -5", path="/data/AzureLLMInferenceTrace_conv.csv", row=17,
                     line=18, field="ContextTokens", more_rows=3)
    assert str(err) == ("AzureLLMInferenceTrace_conv.csv: row 17 (line 18), field 'ContextTokens': "
                        "negative token count -5 (and 3 more rows)")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.path, back.row, back.line, back.field) == (
        err.path, 17, 18, "ContextTokens")
    assert str(TraceError("x", path="a.csv", row=2, more_rows=1)) == "a.csv: row 2: x (and 1 more row)"
    assert str(TraceError("bare")) == "bare"


def test_arrow_round_trip_keeps_everything():
    t = small(meta={"format": "test", "note": [1, 2]})
    table = t.to_arrow()
    assert table.column_names == ["request_id", "arrival_s", "prompt_tokens", "output_tokens",
                                  "block_hashes", "session_id", "priority", "tenant"]
    assert table.schema.field("block_hashes").type == pa.list_(pa.int64())
    assert table.schema.metadata[META_HASH_BLOCK_TOKENS] == b"512"
    back = Trace.from_arrow(table)
    assert back.identity() == t.identity()
    assert back.meta == t.meta and back.name == "small" and back.source == "test://small"
    df = t.to_pandas()
    assert list(df["block_hashes"][1]) == [7, 8] and list(df["tenant"]) == ["t1", "t1", "t2"]


def test_from_arrow_handles_slices_and_chunks():
    t = small()
    table = pa.concat_tables([t.to_arrow().slice(1, 2), t.to_arrow().slice(0, 1)])
    back = Trace.from_arrow(table, name="chunked")
    assert list(back.request_id) == [0, 1, 2] and back.meta.get("sorted") is True
    assert [list(back.block_hashes(i)) for i in range(3)] == [[7], [7, 8], [7, 8, 9]]


def test_from_arrow_errors():
    table = small().to_arrow()
    with pytest.raises(TraceError, match="missing column 'output_tokens'") as info:
        Trace.from_arrow(table.drop_columns(["output_tokens"]))
    assert info.value.field == "output_tokens"
    nulls = table.set_column(2, "prompt_tokens", pa.array([1, None, 3], pa.int64()))
    with pytest.raises(TraceError) as info:
        Trace.from_arrow(nulls)
    assert (info.value.row, info.value.field) == (2, "prompt_tokens")
    bare = table.replace_schema_metadata({})
    with pytest.raises(TraceError, match="no 'tiersim.hash_block_tokens' metadata .* set trace.hash_block_tokens"):
        Trace.from_arrow(bare)
    assert Trace.from_arrow(bare, hash_block_tokens=512, source="x").source == "x"


def test_identity_is_content_addressed():
    a, b = small(), small(name="other", source="elsewhere")
    assert a.identity()["sha256"] == b.identity()["sha256"]
    assert a.identity()["num_requests"] == 3 and a.identity()["name"] == "small"
    assert small(output_tokens=[1, 2, 4]).identity()["sha256"] != a.identity()["sha256"]
    assert small(tenant=None).identity()["sha256"] != a.identity()["sha256"]


def test_take_rows_and_validate():
    t = take_rows(small(), np.array([2, 0]))
    assert t.meta.get("sorted") is True  # the gathered arrivals were out of order
    assert list(t.request_id) == [0, 2] and list(t.block_hashes(1)) == [7, 8, 9]
    t.validate()


def test_empty_trace_is_valid():
    t = Trace(arrival_s=[], prompt_tokens=[], output_tokens=[])
    assert len(t) == 0 and t.span_s == 0.0
    assert len(Trace.from_arrow(t.to_arrow())) == 0
