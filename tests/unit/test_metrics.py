"""Inter-token statistics from token runs equal brute force over every gap; the step log streams to
disk in chunks without losing or reordering rows."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.metrics import INT_COLUMNS, StepLog, itl_statistics
from sim.metrics.tokens import _kth, _percentile
from tests.conftest import examples


def _brute_force_gaps(times: list[float], tokens: list[int], per_step: bool) -> list[float]:
    """Gaps by the definition in sim.metrics.tokens, token by token."""
    gaps = []
    for j, (t, m) in enumerate(zip(times, tokens)):
        m = 1 if per_step else m
        if j == 0:
            gaps += [0.0] * (m - 1)
        else:
            gaps += [(t - times[j - 1]) / m] * m
    return gaps


def _numba_percentile_by_sorting(values: list[float], q: float) -> float:
    """Numba's ``np.percentile`` formula (``numba.np.arraymath._collect_percentiles_inner``) on a sorted
    list: the oracle the compiled selection must equal bit for bit (the summary's per-request ITL
    percentiles were computed by Numba's ``np.percentile`` before, and stay byte-identical)."""
    v = sorted(values)
    n = len(v)
    if n == 1:
        return v[0]
    rank = 1 + (n - 1) * (q / 100.0)
    f = math.floor(rank)
    m = rank - f
    return v[int(f - 1)] * (1 - m) + v[int(f)] * m


@settings(max_examples=examples(200), deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1e-9, 0.008, 0.0081, 0.25]) | st.floats(0, 10), min_size=1,
                       max_size=300),
       q=st.sampled_from([50.0, 99.0, 90.0, 1.0]), k=st.integers(0, 299))
def test_compiled_selection_equals_sorting(values, q, k):
    a = np.array(values)
    assert _percentile(a.copy(), q) == _numba_percentile_by_sorting(values, q)
    k = k % len(values)
    b = a.copy()
    x = _kth(b, k)
    assert x == sorted(values)[k] and (b[:k] <= x).all() and (b[k:] >= x).all()
    assert sorted(b.tolist()) == sorted(values)


@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), multi=st.booleans(), per_step=st.booleans())
def test_itl_statistics_match_brute_force(seed, n, multi, per_step):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(5, 400))
    dur = rng.exponential(0.01, steps) * (rng.random(steps) < 0.9) + rng.exponential(1e-4, steps)
    step_end = np.cumsum(dur)
    seg_first, seg_last, seg_tok, seg_ptr, done = [], [], [], [0], []
    all_gaps, per_req = [], []
    for _ in range(n):
        t, tok, k = [], [], int(rng.integers(0, 4))
        s = int(rng.integers(0, steps))
        for _ in range(k):
            if s >= steps:
                break
            e = min(steps - 1, s + int(rng.integers(0, 30)))
            m = int(rng.integers(1, 5)) if multi else 1     # tokens per step of this run (speculation)
            seg_first.append(s)
            seg_last.append(e)
            seg_tok.append(m)
            t.extend(step_end[s:e + 1])
            tok.extend([m] * (e + 1 - s))
            s = e + 1 + int(rng.integers(0, 5))
        seg_ptr.append(len(seg_first))
        done.append(True)
        g = _brute_force_gaps(t, tok, per_step)
        per_req.append(g)
        all_gaps.extend(g)
        if g and not per_step:   # per emitted token, a request's gaps add up to its last token minus its first
            assert np.isclose(sum(g), t[-1] - t[0], rtol=1e-12, atol=1e-15)
    out = np.empty((n, 4))
    qs = np.array([50.0, 90.0, 95.0, 99.0])
    ptr = np.array(seg_ptr)
    total, mean, mx, q, hist = itl_statistics(ptr[:-1], np.diff(ptr).astype(np.int32), np.array(seg_first, np.int64),
                                        np.array(seg_last, np.int64), np.array(seg_tok, np.int32), step_end,
                                        np.array([0, steps]), np.array(done), qs, out, per_step)
    assert total == len(all_gaps) == hist.sum()
    if all_gaps:
        assert np.isclose(mean, np.mean(all_gaps), rtol=1e-12, atol=1e-18)
        assert mx == max(all_gaps)
        np.testing.assert_allclose(q, np.percentile(all_gaps, qs), rtol=1e-12, atol=1e-18)
    for i, g in enumerate(per_req):
        if g:
            assert np.isclose(out[i, 0], np.mean(g)) and np.isclose(out[i, 1], np.percentile(g, 50))
            assert np.isclose(out[i, 2], np.percentile(g, 99)) and out[i, 3] == max(g)
        else:
            assert np.isnan(out[i]).all()


def test_step_log_streams_chunks_to_parquet_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(StepLog, "CHUNK", 7)
    log = StepLog(True, 3, tmp_path / "s.parquet", (10_000, 2_000, 500))
    for k in range(30):
        log.append(float(k), 1.0, float(k) + 1, **{c: k + j for j, c in enumerate(INT_COLUMNS)})
    log.close()
    import pyarrow.parquet as pq

    df = pq.read_table(tmp_path / "s.parquet").to_pandas()
    assert list(df["step"]) == list(range(30)) and (df["replica"] == 3).all()
    assert list(df["start_s"]) == [float(k) for k in range(30)]
    assert list(df["num_seqs"]) == list(range(30)) and list(df["preemptions"]) == list(
        range(INT_COLUMNS.index("preemptions"), INT_COLUMNS.index("preemptions") + 30))
    assert (df["hbm_free_bytes"] == 10_000 - df["hbm_active_bytes"] - df["hbm_cached_bytes"]).all()
    # below HBM, free = capacity - used - cached (cached blocks are findable and evictable)
    assert (df["dram_free_bytes"] == 2_000 - df["dram_used_bytes"] - df["dram_cached_bytes"]).all()
    assert (df["nvme_free_bytes"] == 500 - df["nvme_used_bytes"] - df["nvme_cached_bytes"]).all()
    assert list(log.end_s) == [float(k) + 1 for k in range(30)]
    assert log.agg["rows"] == 30 and log.busy_s == 30.0


def test_turning_the_step_log_off_changes_no_request_metric():
    import pandas as pd

    from tests.conftest import make_trace, run_checked, small_config

    tr = make_trace(np.linspace(0, 2, 40), np.arange(40) * 7 + 5, (np.arange(40) % 9) * 3 + 1)
    on = run_checked(small_config(**{"metrics.step_log": True}), tr)[1]
    off = run_checked(small_config(**{"metrics.step_log": False}), tr)[1]
    pd.testing.assert_frame_equal(on.requests, off.requests, check_exact=True)
    assert on.summary["itl_s"] == off.summary["itl_s"]
    assert on.summary["engine"]["steps"] == off.summary["engine"]["steps"] > 0
    assert len(off.steps) == 0 and len(on.steps) == on.summary["engine"]["steps"]
    assert "hbm_peak_active_bytes" in on.summary["kv"] and "hbm_peak_active_bytes" not in off.summary["kv"]


def test_positional_step_rows_land_in_their_named_columns(tmp_path):
    """``append_row`` (the engine's hot path) writes what ``append`` with the same columns by name does."""
    from sim.metrics.step_log import ROW_COLUMNS

    cap = (10**9, 10**9, 10**9)
    by_name, by_position = StepLog(True, 0, tmp_path / "a.parquet", cap), StepLog(True, 0, tmp_path / "b.parquet", cap)
    for k in range(3):
        vals = tuple(100 * k + j + 1 for j in range(len(ROW_COLUMNS)))
        by_name.append(float(k), 0.5, k + 0.5, **dict(zip(ROW_COLUMNS, vals)))
        by_position.append_row(float(k), 0.5, k + 0.5, vals)
    assert (by_name.i[:3] == by_position.i[:3]).all() and (by_name.f[:3] == by_position.f[:3]).all()
    assert by_name.i[:3].any() and list(by_position.end_s) == [0.5, 1.5, 2.5]
