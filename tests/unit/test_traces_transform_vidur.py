"""vidur_trim: request lengths as Vidur 0.0.26's trace replay makes them (prompt cut so that prompt +
output <= max_tokens; outputs kept), exactly, with its record in meta."""
from __future__ import annotations

import numpy as np
import pytest

from traces import Trace, TraceError
from traces.transform import vidur_trim


@pytest.fixture
def trace() -> Trace:
    return Trace(arrival_s=[0.0, 1.0, 2.5, 4.0], prompt_tokens=[4000, 4090, 100, 5000],
                 output_tokens=[96, 10, 50, 1000], request_id=[7, 8, 9, 10], name="t",
                 meta={"format": "test"})


def test_prompt_cut_by_the_excess_outputs_kept(trace):
    out = vidur_trim(trace, 4096)
    # 4000+96 fits exactly; 4090+10 is 4 over; 100+50 fits; 5000+1000 is 1904 over
    assert list(out.prompt_tokens) == [4000, 4086, 100, 3096]
    assert list(out.output_tokens) == [96, 10, 50, 1000]
    assert (out.prompt_tokens + out.output_tokens).max() == 4096
    assert list(out.arrival_s) == list(trace.arrival_s) and list(out.request_id) == [7, 8, 9, 10]
    assert out.meta["transforms"] == [{"op": "vidur_trim", "max_tokens": 4096, "prefill_scale": 1.0,
                                       "decode_scale": 1.0, "trimmed_requests": 2}]
    assert list(trace.prompt_tokens) == [4000, 4090, 100, 5000]   # the input is untouched
    assert out.prompt_tokens.dtype == np.int64


def test_scales_truncate_like_pandas_astype_int_and_floor_at_one(trace):
    out = vidur_trim(trace, 4096, prefill_scale=0.3, decode_scale=0.01)
    # int(4000*0.3)=1200, int(4090*0.3)=1227, int(100*0.3)=30, int(5000*0.3)=1500;
    # outputs int(0.96)=0 -> 1, int(0.1)=0 -> 1, int(0.5)=0 -> 1, int(10.0)=10
    assert list(out.prompt_tokens) == [1200, 1227, 30, 1500]
    assert list(out.output_tokens) == [1, 1, 1, 10]
    assert out.meta["transforms"][0]["trimmed_requests"] == 0


def test_output_that_leaves_no_prompt_is_an_error(trace):
    with pytest.raises(TraceError, match=r"row 4.*output of 1000 tokens leaves no room"):
        vidur_trim(trace, 1000)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(TraceError, match="max_tokens"):
            vidur_trim(trace, bad)
    with pytest.raises(TraceError, match="prefill_scale"):
        vidur_trim(trace, 4096, prefill_scale=0)


def test_prefix_hashes_follow_the_cut_prompt():
    t = Trace(arrival_s=[0.0, 1.0], prompt_tokens=[40, 20], output_tokens=[30, 5], hash_block_tokens=16,
              hash_offsets=[0, 3, 5], hash_values=[1, 2, 3, 1, 4], name="h")
    out = vidur_trim(t, 50)
    # request 0: 40+30 -> prompt 20, covering ceil(20/16) = 2 of its 3 blocks; request 1 fits
    assert list(out.prompt_tokens) == [20, 20]
    assert list(out.hash_offsets) == [0, 2, 4] and list(out.hash_values) == [1, 2, 1, 4]


def test_conv_trace_as_vidur_reports_it():
    from traces import load_trace

    out = vidur_trim(load_trace("azure-conv"))
    assert out.meta["transforms"][-1]["trimmed_requests"] == 1612   # the figure Vidur's run reports
    assert (out.prompt_tokens + out.output_tokens).max() == 4096 and out.prompt_tokens.min() >= 1


def test_config_key_applies_the_trim_after_slicing():
    from sim.config import SimConfig, with_overrides
    from sim.workload import load_trace_for

    cfg = with_overrides(SimConfig(), {"trace.max_requests": 500, "trace.max_total_tokens": 4096})
    t = load_trace_for(cfg)
    assert len(t) == 500 and (t.prompt_tokens + t.output_tokens).max() <= 4096
    assert t.meta["transforms"][-1]["op"] == "vidur_trim" and t.meta["transforms"][-1]["trimmed_requests"] == 23
