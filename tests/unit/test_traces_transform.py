"""Transformations: exact results on small traces and their records in meta."""
from __future__ import annotations

import numpy as np
import pytest

from traces import Trace, TraceError, head, repeat, scale_rate, time_window


@pytest.fixture
def trace() -> Trace:
    return Trace(arrival_s=[0.0, 1.0, 1.0, 4.0], prompt_tokens=[1, 513, 1024, 5], output_tokens=[4, 3, 2, 1],
                 request_id=[10, 11, 12, 13], hash_offsets=[0, 1, 3, 5, 6], hash_values=[1, 1, 2, 1, 2, 9],
                 hash_block_tokens=512, tenant=["a", "b", "a", "b"], name="t",
                 meta={"format": "test", "clock_origin_s": 30.0})


def test_scale_rate(trace):
    fast = scale_rate(trace, 8)
    assert list(fast.arrival_s) == [0.0, 0.125, 0.125, 0.5]
    assert fast.meta["transforms"] == [{"op": "scale_rate", "factor": 8.0}]
    assert fast.meta["clock_origin_s"] == 0.0 and trace.meta["clock_origin_s"] == 30.0
    assert trace.meta["transforms"] == []  # the input is untouched
    with pytest.raises(TraceError, match="factor must be finite and > 0"):
        scale_rate(trace, 0)


def test_head(trace):
    h = head(trace, 2)
    assert list(h.request_id) == [10, 11] and list(h.block_hashes(1)) == [1, 2]
    assert len(head(trace, 99)) == 4 and len(head(trace, 0)) == 0
    assert h.meta["transforms"] == [{"op": "head", "n": 2}]


def test_time_window(trace):
    w = time_window(trace, 0.5, 4.0)
    assert list(w.request_id) == [11, 12] and list(w.arrival_s) == [0.5, 0.5]
    assert w.meta["clock_origin_s"] == 30.5
    kept = time_window(trace, 1.0, 10.0, rebase=False)
    assert list(kept.arrival_s) == [1.0, 1.0, 4.0]
    assert len(time_window(trace, 5.0, 6.0)) == 0
    with pytest.raises(TraceError, match="0 <= start_s < end_s"):
        time_window(trace, 3.0, 2.0)


def test_repeat(trace):
    r = repeat(trace, 3)
    period = 4.0 + 4.0 / 3
    assert len(r) == 12 and list(r.request_id) == list(range(12))
    assert np.allclose(r.arrival_s[4:8], trace.arrival_s + period)
    assert np.allclose(r.arrival_s[8:], trace.arrival_s + 2 * period)
    assert list(r.block_hashes(5)) == [1, 2] and list(r.tenant[4:8]) == ["a", "b", "a", "b"]
    assert r.meta["transforms"][-1] == {"op": "repeat", "times": 3, "period_s": pytest.approx(period),
                                        "distinct_hashes": False}
    d = repeat(trace, 2, distinct_hashes=True)
    assert list(d.block_hashes(5)) == [1 + 9, 2 + 9]  # hash range 1..9 has width 9
    with pytest.raises(TraceError, match="at least 2 requests"):
        repeat(head(trace, 1), 2)


def test_transforms_chain_into_identity(trace):
    t = head(scale_rate(trace, 2.0), 3)
    assert [x["op"] for x in t.identity()["transforms"]] == ["scale_rate", "head"]
