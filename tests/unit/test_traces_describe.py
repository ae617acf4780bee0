"""describe() against the figures in the traces README, and the prefix-reuse rule on small cases."""
from __future__ import annotations

import pytest

from traces import Trace, describe, format_description, load_trace, prefix_reuse


@pytest.fixture(scope="module")
def described():
    return {name: describe(load_trace(name)) for name in ("azure-conv", "azure-code", "mooncake-conversation")}


def approx(value, rel=5e-4):
    return pytest.approx(value, rel=rel)


def test_azure_conv_figures(described):
    d = described["azure-conv"]
    assert d["requests"] == 19_366
    assert d["span_s"] == pytest.approx(3501.7, abs=0.05)
    assert round(d["rate_per_s"], 2) == 5.53
    ia = d["interarrival_s"]
    assert (round(ia["mean"], 3), round(ia["p50"], 3), round(ia["cv"], 2)) == (0.181, 0.118, 1.09)
    assert round(ia["max"], 1) == 4.3
    assert (d["busiest_second_requests"], d["busiest_minute_requests"]) == (19, 502)
    p, o = d["prompt_tokens"], d["output_tokens"]
    assert (round(p["mean"], 1), p["p50"], p["p90"], p["p99"], p["min"], p["max"]) == (
        1154.7, 1020, 2734.5, 4142, 2, 14_050)
    assert (round(o["mean"], 1), o["p50"], o["p90"], o["p99"], o["min"], o["max"]) == (
        211.1, 129, 424, 601, 7, 1000)
    assert d["prefix_reuse"] is None


def test_azure_code_figures(described):
    d = described["azure-code"]
    assert round(d["rate_per_s"], 2) == 2.57 and d["span_s"] == pytest.approx(3435.9, abs=0.05)
    ia = d["interarrival_s"]
    assert (round(ia["mean"], 3), round(ia["p50"], 3), round(ia["cv"], 1)) == (0.390, 0.064, 13.2)
    assert round(ia["max"], 1) == 217.2
    assert (d["busiest_second_requests"], d["busiest_minute_requests"]) == (67, 585)
    p, o = d["prompt_tokens"], d["output_tokens"]
    assert (round(p["mean"], 1), p["p50"], round(p["p90"], 1), p["p99"]) == (2047.8, 1469, 5187.6, 7436)
    assert (round(o["mean"], 1), o["p50"], o["p90"], round(o["p99"], 1), o["max"]) == (27.9, 13, 55, 251.5, 1899)


def test_mooncake_conversation_figures(described):
    d = described["mooncake-conversation"]
    assert d["requests"] == 12_031 and round(d["rate_per_s"], 2) == 3.40
    p, o = d["prompt_tokens"], d["output_tokens"]
    assert (round(p["mean"], 1), p["p50"], p["p90"], round(p["p99"], 1), p["min"], p["max"]) == (
        12_035.1, 6909, 27_367, 85_400.4, 891, 126_195)
    assert (round(o["mean"], 1), o["p50"], o["p90"], round(o["p99"], 1), o["min"], o["max"]) == (
        342.6, 350, 597, 1118.5, 1, 2000)
    r = d["prefix_reuse"]
    assert (r["total_blocks"], r["distinct_blocks"], r["block_tokens"]) == (288_500, 182_790, 512)
    assert round(100 * r["block_hit_ratio"], 1) == 36.6
    assert round(100 * r["token_hit_ratio"], 1) == 37.4


def test_format_description_is_an_aligned_table(described):
    text = format_description(described["mooncake-conversation"])
    lines = text.splitlines()
    assert lines[0].startswith("trace") and "conversation_trace" in lines[0]
    assert any(line.startswith("mean rate") and "3.40 req/s" in line for line in lines)
    assert any("36.6 % already cached" in line for line in lines)
    assert any("37.4 % already cached" in line for line in lines)
    values_start = {line.index(line.split("  ", 1)[1].strip()) for line in lines[:8]}
    assert len(values_start) == 1  # values line up in one column
    table = lines[lines.index("") + 1:]
    assert table[0].split() == ["tokens", "mean", "p50", "p90", "p99", "min", "max", "total"]
    assert table[1].split()[:3] == ["prompt", "12,035.1", "6,909"]
    assert len({len(row) for row in table}) == 1


def test_prefix_reuse_counts_leading_runs_and_partial_blocks():
    # request 0 inserts [1, 2]; request 1 shares block 1 only (its block 2 differs: 3);
    # request 2 repeats request 0's prefix but with a 100-token last block; request 3 has [9, 2]:
    # block 2 was seen, but not after a cached predecessor, so it is not a prefix hit
    t = Trace(arrival_s=[0, 1, 2, 3], prompt_tokens=[1024, 1024, 612, 1024], output_tokens=[1, 1, 1, 1],
              hash_offsets=[0, 2, 4, 6, 8], hash_values=[1, 2, 1, 3, 1, 2, 9, 2], hash_block_tokens=512)
    r = prefix_reuse(t)
    assert (r.total_blocks, r.distinct_blocks, r.cached_blocks) == (8, 4, 3)
    assert r.cached_tokens == 512 + 512 + 100 and r.prompt_tokens == 1024 * 3 + 612
    assert r.block_hit_ratio == 3 / 8


def test_describe_small_and_empty_traces():
    one = describe(Trace(arrival_s=[0.0], prompt_tokens=[3], output_tokens=[4]))
    assert one["rate_per_s"] is None and one["interarrival_s"]["mean"] is None and one["total_tokens"] == 7
    empty = describe(Trace(arrival_s=[], prompt_tokens=[], output_tokens=[]))
    assert empty["requests"] == 0 and empty["busiest_second_requests"] == 0
    assert "requests" in format_description(empty)
