"""Property tests for traces: Arrow round trip, transformation invariants, synthetic generators and
error location in readers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import examples
from traces import (
    LognormalLength,
    Trace,
    TraceError,
    UniformLength,
    describe,
    head,
    load_trace,
    prefix_reuse,
    repeat,
    scale_rate,
    synthesize,
    time_window,
)
from traces.synth import arrival_times

SETTINGS = settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "hash_offsets", "hash_values",
          "session_id", "priority", "tenant")


@st.composite
def traces(draw, min_size: int = 0, max_size: int = 25) -> Trace:
    n = draw(st.integers(min_size, max_size))
    arrival = draw(st.lists(st.floats(0, 1e4, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 2000), min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(-2**40, 2**40), min_size=n, max_size=n, unique=True))
    fields: dict = dict(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, request_id=ids,
                        name=draw(st.text(max_size=8)), source=draw(st.text(max_size=12)),
                        meta={"format": "prop", "note": draw(st.text(max_size=5))})
    if draw(st.booleans()):
        bt = draw(st.sampled_from([16, 512]))
        # small hash alphabet so that prefixes repeat across requests
        hashes = [draw(st.lists(st.integers(0, 6), max_size=min(8, -(-p // bt)))) for p in prompt]
        fields.update(hash_offsets=np.cumsum([0] + [len(h) for h in hashes]),
                      hash_values=[v for h in hashes for v in h], hash_block_tokens=bt)
    if draw(st.booleans()):
        fields["session_id"] = draw(st.lists(st.text(max_size=4), min_size=n, max_size=n))
    if draw(st.booleans()):
        fields["tenant"] = draw(st.lists(st.sampled_from(["ChatGPT", "GPT-4", "é"]), min_size=n, max_size=n))
    if draw(st.booleans()):
        fields["priority"] = draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=n, max_size=n))
    return Trace(**fields)


def same(a: Trace, b: Trace) -> bool:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and (x.dtype != y.dtype or not np.array_equal(x, y))):
            return False
    return a.hash_block_tokens == b.hash_block_tokens


@SETTINGS
@given(traces())
def test_arrow_round_trip_preserves_everything(t):
    back = Trace.from_arrow(t.to_arrow())
    assert same(back, t)
    assert (back.name, back.source, back.meta) == (t.name, t.source, t.meta)
    assert back.identity() == t.identity()
    for i in range(len(t)) if t.has_hashes else ():
        assert np.array_equal(back.block_hashes(i), t.block_hashes(i))


@SETTINGS
@given(traces(), st.floats(1e-3, 1e3))
def test_scale_rate_keeps_requests_and_scales_time(t, factor):
    s = scale_rate(t, factor)
    assert len(s) == len(t) and np.array_equal(s.request_id, t.request_id)
    assert s.prompt_tokens.sum() == t.prompt_tokens.sum() and s.output_tokens.sum() == t.output_tokens.sum()
    assert np.allclose(s.arrival_s * factor, t.arrival_s, rtol=1e-12, atol=1e-9)
    assert np.all(np.diff(s.arrival_s) >= 0)


@SETTINGS
@given(traces(), st.integers(0, 30))
def test_head_is_a_prefix(t, n):
    h = head(t, n)
    k = min(n, len(t))
    assert len(h) == k and np.array_equal(h.request_id, t.request_id[:k])
    assert np.array_equal(h.arrival_s, t.arrival_s[:k])
    if t.has_hashes:
        assert np.array_equal(h.hash_values, t.hash_values[:t.hash_offsets[k]])


@SETTINGS
@given(traces(), st.floats(0, 1e4), st.floats(1e-3, 1e4), st.booleans())
def test_time_window_selects_exactly_the_window(t, start, width, rebase):
    end = start + width
    w = time_window(t, start, end, rebase=rebase)
    inside = (t.arrival_s >= start) & (t.arrival_s < end)
    assert np.array_equal(w.request_id, t.request_id[inside])
    assert w.prompt_tokens.sum() == t.prompt_tokens[inside].sum()
    expected = t.arrival_s[inside] - (start if rebase else 0.0)
    assert np.array_equal(w.arrival_s, expected)


@SETTINGS
@given(traces(min_size=2), st.integers(1, 4), st.booleans())
def test_repeat_concatenates_shifted_copies(t, times, distinct):
    r = repeat(t, times, distinct_hashes=distinct)
    n = len(t)
    assert len(r) == n * times and np.array_equal(r.request_id, np.arange(n * times))
    assert r.prompt_tokens.sum() == times * t.prompt_tokens.sum()
    assert r.output_tokens.sum() == times * t.output_tokens.sum()
    assert np.all(np.diff(r.arrival_s) >= 0)
    period = t.span_s * n / (n - 1)
    for k in range(times):
        copy = slice(k * n, (k + 1) * n)
        assert np.allclose(r.arrival_s[copy], t.arrival_s + k * period, rtol=1e-12, atol=1e-9)
        assert np.array_equal(r.prompt_tokens[copy], t.prompt_tokens)
    if t.has_hashes and distinct and times > 1 and t.hash_values.size:
        first = set(r.hash_values[:r.hash_offsets[n]].tolist())
        later = set(r.hash_values[r.hash_offsets[n]:].tolist())
        assert not first & later


@SETTINGS
@given(traces())
def test_describe_is_consistent(t):
    d = describe(t)
    assert d["requests"] == len(t)
    assert d["total_tokens"] == int(t.prompt_tokens.sum() + t.output_tokens.sum())
    assert d["busiest_second_requests"] <= d["busiest_minute_requests"] <= len(t)
    if d["prefix_reuse"] is not None:
        r = d["prefix_reuse"]
        assert 0 <= r["cached_blocks"] <= r["total_blocks"] - r["distinct_blocks"]  # first sightings miss
        assert 0.0 <= r["token_hit_ratio"] <= 1.0 and 0.0 <= r["block_hit_ratio"] <= 1.0


@SETTINGS
@given(traces())
def test_prefix_reuse_matches_a_replay_into_a_set(t):
    if not t.has_hashes:
        return
    cache: set[int] = set()
    blocks = tokens = 0
    for i in range(len(t)):
        hashes = t.block_hashes(i).tolist()
        for j, h in enumerate(hashes):
            if h not in cache:
                break
            blocks += 1
            tokens += min(t.hash_block_tokens, int(t.prompt_tokens[i]) - j * t.hash_block_tokens)
        cache.update(hashes)
    r = prefix_reuse(t)
    assert (r.cached_blocks, r.cached_tokens) == (blocks, tokens)


# -- synthetic generators --------------------------------------------------------------------------
synth_args = st.fixed_dictionaries({
    "rate_per_s": st.floats(0.01, 1e4),
    "num_requests": st.integers(2, 300),
    "arrival": st.sampled_from(["poisson", "gamma"]),
    "prompt": st.sampled_from(["fixed:7", "uniform:1:4096", "lognormal:1024:1.2:1:32768"]),
    "output": st.sampled_from(["uniform:1:2", "lognormal:64:0.5"]),
    "seed": st.integers(0, 2**32),
})


@settings(max_examples=examples(30), deadline=None)
@given(synth_args, st.floats(0.2, 5.0))
def test_synth_same_seed_identical_different_seed_different(args, cv):
    if args["arrival"] == "gamma":
        args = {**args, "cv": cv}
    a, b = synthesize(**args), synthesize(**args)
    assert same(a, b) and a.source == b.source
    c = synthesize(**{**args, "seed": args["seed"] + 1})
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    assert a.arrival_s[0] == 0.0 and len(a) == args["num_requests"]


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(1, 5000), st.integers(0, 5000), st.floats(1.0, 1e4), st.floats(0.0, 4.0),
       st.integers(1, 100), st.integers(0, 10_000), st.integers(0, 2**32))
def test_lengths_stay_within_bounds(lo, extra, median, sigma, lo_clip, extra_clip, seed):
    rng = np.random.Generator(np.random.PCG64(seed))
    u = UniformLength(lo, lo + extra).sample(rng, 500, "prompt")
    assert u.min() >= lo and u.max() <= lo + extra
    ln = LognormalLength(median, sigma, lo_clip, lo_clip + extra_clip).sample(rng, 500, "output")
    assert ln.dtype == np.int64 and ln.min() >= lo_clip and ln.max() <= lo_clip + extra_clip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_with_cv_one_matches_poisson_statistics(seed):
    rate, n = 4.0, 200_000
    for kind in ("poisson", "gamma"):
        rng = np.random.Generator(np.random.PCG64(seed))
        gaps = np.diff(arrival_times(rng, rate_per_s=rate, arrival=kind, cv=1.0, num_requests=n))
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
        assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)
        # Poisson counts in 1-second bins: variance equals mean
        counts = np.bincount(np.floor(np.cumsum(gaps)).astype(np.int64))[:-1]
        assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_reaches_the_requested_cv(cv):
    rng = np.random.Generator(np.random.PCG64(7))
    gaps = np.diff(arrival_times(rng, rate_per_s=2.0, arrival="gamma", cv=cv, num_requests=200_000))
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


@settings(max_examples=examples(20), deadline=None)
@given(st.floats(0.5, 50.0), st.floats(1.0, 200.0), st.integers(0, 1000))
def test_duration_mode_fills_the_window(rate, duration, seed):
    t = synthesize(rate_per_s=rate, duration_s=duration, prompt="fixed:1", output="fixed:1", seed=seed)
    assert t.arrival_s[0] == 0.0 and t.arrival_s[-1] < duration
    expected = rate * duration
    assert abs(len(t) - expected) < 6 * math.sqrt(expected) + 3


# -- readers: the reported row is the corrupted one ------------------------------------------------
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 40), st.data(), st.sampled_from([
    ("ContextTokens", "-3", "negative token count -3"),
    ("GeneratedTokens", "0", "zero token count"),
    ("ContextTokens", "x7", "not a number"),
    ("TIMESTAMP", "2023-13-45 00:00:00.0000000", "unparsable timestamp"),
]))
def test_azure_reader_reports_the_corrupted_row(tmp_path, n, data, corruption):
    bad_row = data.draw(st.integers(0, n - 1))
    field, value, text = corruption
    rows = []
    for i in range(n):
        cells = {"TIMESTAMP": f"2023-11-16 18:00:{i:02d}.0000000", "ContextTokens": str(i + 1),
                 "GeneratedTokens": str(i + 2)}
        if i == bad_row:
            cells[field] = value
        rows.append(",".join(cells.values()))
    path = tmp_path / f"azure_{n}_{bad_row}.csv"
    path.write_bytes("\r\n".join(["TIMESTAMP,ContextTokens,GeneratedTokens", *rows]).encode())
    with pytest.raises(TraceError) as info:
        load_trace(path)
    err = info.value
    assert (err.row, err.line, err.field, err.more_rows) == (bad_row + 1, bad_row + 2, field, 0)
    assert text in str(err) and path.name in str(err)
