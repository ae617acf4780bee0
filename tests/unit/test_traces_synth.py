"""Synthetic traces: spec strings, determinism, each length distribution and parameter errors."""
from __future__ import annotations

import numpy as np
import pytest

from traces import (
    EmpiricalLength,
    FixedLength,
    LognormalLength,
    TraceError,
    UniformLength,
    bundled_path,
    parse_length,
    synthesize,
)


@pytest.mark.parametrize("spec,expected", [
    ("fixed:512", FixedLength(512)),
    ("uniform:128:2048", UniformLength(128, 2048)),
    ("lognormal:1024:0.8", LognormalLength(1024.0, 0.8)),
    ("lognormal:1024:0.8:16:8192", LognormalLength(1024.0, 0.8, 16, 8192)),
    ("lognormal:1024:0.8:16:inf", LognormalLength(1024.0, 0.8, 16, None)),
    ("empirical:sharegpt-lengths", EmpiricalLength("sharegpt-lengths")),
])
def test_parse_length_and_canonical_spec(spec, expected):
    parsed = parse_length(spec)
    assert parsed == expected
    assert parse_length(parsed.spec) == parsed


@pytest.mark.parametrize("spec,text", [
    ("fixed", "expected fixed:TOKENS"),
    ("fixed:0", "tokens must be a whole number in [1, 100,000,000]"),
    ("fixed:1.5", "expected fixed:TOKENS with numbers"),
    ("uniform:10", "expected uniform:LO:HI"),
    ("uniform:10:5", "hi must be a whole number in [10, 100,000,000]"),
    ("lognormal:abc:1", "expected lognormal:MEDIAN:SIGMA[:MIN:MAX] with numbers"),
    ("lognormal:100:-1", "sigma must be >= 0"),
    ("lognormal:100:1:5", "expected lognormal:MEDIAN:SIGMA[:MIN:MAX]"),
    ("zipf:3", "unknown kind 'zipf'"),
    ("empirical:", "empirical needs a bundled name or a path"),
])
def test_bad_specs_name_the_spec(spec, text):
    with pytest.raises(TraceError) as info:
        parse_length(spec)
    assert f"bad length spec {spec!r}" in str(info.value) and text in str(info.value)


def test_same_seed_same_bytes_and_source():
    kw = dict(rate_per_s=7.5, num_requests=500, arrival="gamma", cv=2.0, prompt="lognormal:1024:0.8:1:8192",
              output="uniform:1:300", seed=42)
    a, b = synthesize(**kw), synthesize(**kw)
    for col in ("arrival_s", "prompt_tokens", "output_tokens", "request_id"):
        assert getattr(a, col).tobytes() == getattr(b, col).tobytes()
    assert a.source == b.source == ("synth:arrival=gamma,rate_per_s=7.5,cv=2,num_requests=500,"
                                    "prompt=lognormal:1024:0.8:1:8192,output=uniform:1:300,seed=42")
    assert a.meta["params"]["seed"] == 42 and a.meta["format"] == "synthetic"
    c = synthesize(**{**kw, "seed": 43})
    assert c.arrival_s.tobytes() != a.arrival_s.tobytes()


def test_changing_one_distribution_keeps_the_other_draws():
    a = synthesize(rate_per_s=1.0, num_requests=50, prompt="uniform:1:1000", output="uniform:1:1000", seed=3)
    b = synthesize(rate_per_s=1.0, num_requests=50, prompt="fixed:9", output="uniform:1:1000", seed=3)
    assert np.array_equal(a.output_tokens, b.output_tokens)
    assert np.array_equal(a.arrival_s, b.arrival_s)


def test_first_arrival_is_zero_and_count_is_exact():
    t = synthesize(rate_per_s=3.0, num_requests=1, prompt="fixed:5", output="fixed:6")
    assert list(t.arrival_s) == [0.0] and list(t.prompt_tokens) == [5] and list(t.output_tokens) == [6]


def test_duration_mode_keeps_arrivals_inside_the_window():
    t = synthesize(rate_per_s=20.0, duration_s=60.0, prompt="fixed:5", output="fixed:6", seed=1)
    assert t.arrival_s[0] == 0.0 and t.arrival_s[-1] < 60.0
    assert 1000 < len(t) < 1400  # 1,200 expected; a 6-sigma band
    assert "duration_s=60" in t.source


def test_empirical_paired_keeps_rows_together():
    t = synthesize(rate_per_s=1.0, num_requests=2000, lengths="empirical:sharegpt-lengths", seed=5)
    import pandas as pd
    table = pd.read_csv(bundled_path("sharegpt-lengths"))
    rows = set(zip(table["num_prefill_tokens"], table["num_decode_tokens"]))
    assert all((p, o) in rows for p, o in zip(t.prompt_tokens, t.output_tokens))
    assert t.meta["params"]["lengths"] == "empirical:sharegpt-lengths"


def test_default_lengths_are_paired_sharegpt():
    t = synthesize(rate_per_s=1.0, num_requests=10)
    assert "lengths=empirical:sharegpt-lengths" in t.source


def test_empirical_from_a_trace_and_a_path(tmp_path):
    t = synthesize(rate_per_s=1.0, num_requests=300, prompt="empirical:azure-code", output="fixed:1", seed=1)
    assert t.prompt_tokens.max() <= 7_437 and t.prompt_tokens.min() >= 3
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,20\n30,40\n")
    u = synthesize(rate_per_s=1.0, num_requests=100, lengths=f"empirical:{path}", seed=2)
    assert set(zip(u.prompt_tokens, u.output_tokens)) <= {(10, 20), (30, 40)}
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,20\n0,40\n")
    with pytest.raises(TraceError, match="lengths.csv: row 2 \\(line 3\\), field 'num_prefill_tokens'"):
        synthesize(rate_per_s=1.0, num_requests=5, lengths=f"empirical:{path}")
    with pytest.raises(TraceError, match="no such file or bundled name"):
        synthesize(rate_per_s=1.0, num_requests=5, prompt="empirical:nope.csv", output="fixed:1")


@pytest.mark.parametrize("kw,text", [
    (dict(num_requests=10, duration_s=5.0), "exactly one of num_requests and duration_s"),
    (dict(), "exactly one of num_requests and duration_s"),
    (dict(num_requests=0), "num_requests must be a whole number >= 1"),
    (dict(num_requests=5, rate_per_s=0.0), "rate_per_s must be finite and > 0"),
    (dict(num_requests=5, arrival="weibull"), "unknown arrival process 'weibull' (known: poisson, gamma)"),
    (dict(num_requests=5, cv=2.0), "needs arrival='gamma'"),
    (dict(num_requests=5, arrival="gamma", cv=0.0), "cv must be finite and > 0"),
    (dict(num_requests=5, seed=-1), "seed must be a whole number >= 0"),
    (dict(num_requests=5, prompt="fixed:1"), "output length spec is missing"),
    (dict(num_requests=5, lengths="fixed:3"), "paired lengths need an empirical spec"),
    (dict(num_requests=5, lengths="empirical:sharegpt-lengths", prompt="fixed:1"), "not both"),
])
def test_parameter_errors(kw, text):
    kw = {"rate_per_s": 1.0, **kw}
    with pytest.raises(TraceError) as info:
        synthesize(**kw)
    assert str(info.value).startswith("synth: ") and text in str(info.value)


def test_lognormal_clips_and_uniform_is_inclusive():
    t = synthesize(rate_per_s=1.0, num_requests=5000, prompt="lognormal:100:3:10:200", output="uniform:1:2",
                   seed=9)
    assert t.prompt_tokens.min() == 10 and t.prompt_tokens.max() == 200
    assert set(t.output_tokens) == {1, 2}
