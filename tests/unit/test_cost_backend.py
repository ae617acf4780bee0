"""The cost-backend protocol: both backends implement it; SM share and selection cost behave as measured."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from policies import registry
from sim.costs.backend import CostBackend, ShareCurves
from sim.costs.model import StepShape, TransformerOps
from sim.costs.roofline import RooflineBackend
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.specs import load_gpu, load_model


@pytest.fixture(scope="module")
def h100():
    gpu = load_gpu("h100")
    ops = TransformerOps(load_model("llama-3.1-8b"))
    return ops, gpu, TableBackend(ops, gpu, CostTable(resolve_table_dir("h100-sxm-80gb")))


def step_s(cost: StepCostModel, shape: StepShape) -> float:
    return cost.step(shape.prefill_q, shape.prefill_c, shape.num_decode, shape.decode_ctx_sum, shape.num_sampled)[0]


def test_both_backends_implement_the_protocol(h100):
    ops, gpu, table = h100
    for backend in (table, RooflineBackend(ops, gpu), table.for_share(0.5)):
        assert isinstance(backend, CostBackend)
        assert backend.fixed_times(8, 8).shape == (len(ops.ops),)
        assert backend.kernel_counts(8, 8, False, True).dtype == np.int64
        rep = backend.lookup_report()
        assert set(rep["ops"]) >= {"qkv_proj", "attn_decode", "lm_head"}


def test_share_curves_from_the_h100_microkernels(h100):
    _, _, table = h100
    c = table.share_curves
    assert "hbm_stream" in c.source and c.sm_count == 132
    assert c.compute(0.5) == pytest.approx(0.5, rel=0.01)      # FMA rate linear in SMs
    assert 0.95 < c.memory(0.5) <= 1.0                           # HBM saturates with half the SMs
    assert c.memory(0.1) < 0.5                                  # ...but not with a tenth
    assert 1e-6 < c.floor_s < 5e-6
    a = ShareCurves.assumed(132)
    assert a.memory(0.4) == pytest.approx(1.0) and a.memory(0.2) == pytest.approx(0.5, rel=0.02)


def test_reserved_sms_lengthen_compute_bound_prefill_markedly_and_batch1_decode_slightly(h100):
    ops, _, table = h100
    cost = StepCostModel(ops, table, registry.build("execution", "cuda-graph", {}))
    prefill, decode = StepShape.prefill(1, 4096), StepShape.decode(1, 1024)
    half = cost.for_share(0.5)
    assert half is cost.for_share(0.5) and cost.for_share(1.0) is cost
    assert table.for_share(0.5) is table.for_share(0.5) and table.for_share(1.0) is table
    p = step_s(half, prefill) / step_s(cost, prefill)
    d = step_s(half, decode) / step_s(cost, decode)
    assert 1.6 < p < 2.05          # compute-bound: nearly in proportion to the SMs lost
    assert 1.0 < d < 1.05          # memory-bound: HBM is still saturated
    # monotone in the reserved share
    times = [step_s(cost.for_share(f), prefill) for f in (1.0, 0.9, 0.75, 0.5, 0.25)]
    assert all(a < b for a, b in zip(times, times[1:]))
    with pytest.raises(ValueError, match="sm_fraction"):
        table.for_share(0.0)
    # a derived backend's share is a share of the whole GPU
    assert table.for_share(0.5).for_share(0.25) is table.for_share(0.25)
    # decode runs price the same as single steps under a share
    ctx = np.array([1025.0, 1026.0])
    run, _, _ = half.decode_run(1, ctx)
    assert run[0] == pytest.approx(half.step(np.empty(0, np.int64), np.empty(0, np.int64), 1, 1025, 1)[0])


def test_selection_time_from_the_topk_microkernel(h100):
    ops, gpu, table = h100
    t_small = table.selection_time(1, 256, 8)
    assert 20e-6 < t_small < 60e-6                               # measured: 27-53 us over k
    assert table.selection_time(256, 8192, 64) == pytest.approx(72e-6, rel=0.1)
    assert table.selection_time(0, 256, 8) == 0.0
    before = table.extrapolations.get("topk", 0)
    far = table.selection_time(512, 16384, 64)
    assert far > table.selection_time(256, 8192, 64)
    assert table.extrapolations["topk"] == before + 1
    assert table.lookup_report()["selection"]["max_over_grid"] >= 2.0
    roof = RooflineBackend(ops, gpu)
    assert 0 < roof.selection_time(64, 4096, 32) < t_small       # no measurement: a lower bound
    # fewer SMs: rows beyond them run in more waves
    assert table.for_share(0.25).selection_time(256, 4096, 32) > table.selection_time(256, 4096, 32)


@pytest.mark.parametrize("tp", [1, 2])
def test_steps_beyond_every_token_grid_price_as_the_per_op_lookups(tp):
    """Long prompts (Mooncake's reach 100k tokens) take a vector path past the token grids' ends; it
    gives the per-op lookups' times to the bit and the same extrapolation notes, and steps that are
    not beyond every grid keep the per-op path."""
    gpu = load_gpu("h100")
    ops = TransformerOps(load_model("llama-3.1-8b"), tp)
    fast = TableBackend(ops, gpu, CostTable(resolve_table_dir("h100-sxm-80gb")))
    slow = TableBackend(ops, gpu, CostTable(resolve_table_dir("h100-sxm-80gb")))
    assert fast._above is not None
    slow._above = None
    t_min = fast._above.t_min
    rng = np.random.default_rng(tp)
    shapes = [(int(t), int(s)) for t, s in zip(rng.integers(t_min - 50, 8 * t_min, 300), rng.integers(0, 4097, 300))]
    shapes += [(t_min, 1), (t_min + 1, 0), (t_min + 1, 4096)]
    for tokens, sampled in shapes:
        np.testing.assert_array_equal(fast.fixed_times(tokens, sampled), slow.fixed_times(tokens, sampled))
        np.testing.assert_array_equal(fast.kernel_counts(tokens, sampled, True, True),
                                      slow.kernel_counts(tokens, sampled, True, True))
    assert fast.extrapolations == slow.extrapolations and fast.extrapolations
    assert list(fast.ext_over.items()) == list(slow.ext_over.items())
    assert fast.ext_under == slow.ext_under


@given(xp=st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=24, unique=True),
       fp=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=24, max_size=24),
       xs=st.lists(st.floats(-25, 25, allow_nan=False), min_size=1, max_size=16))
def test_compiled_interp_is_numpys_bit_for_bit(xp, fp, xs):
    """The tables' scalar interpolation (``_interp1``, the decode and prefill grids' hot path) returns
    exactly what ``np.interp`` does, grid points and values outside the grid included."""
    from sim.costs.table import _interp1

    grid = np.array(sorted(xp))
    vals = np.array(fp[:grid.size])
    for x in xs + list(grid):
        assert np.float64(_interp1(float(x), grid, vals)).tobytes() == np.float64(np.interp(x, grid, vals)).tobytes()


@given(grid=st.lists(st.floats(1e-3, 1e7, allow_nan=False), min_size=1, max_size=20, unique=True),
       xs=st.lists(st.floats(0.0, 2e7, allow_nan=False), min_size=1, max_size=20))
@example(grid=[10000000.0, 9999999.999999998], xs=[10000001.0])     # two points, one log: argmin takes the first
@example(grid=[1e-12, 1e-10, 5.0], xs=[3.0, 1e-11])                  # clamped to 1e-9: three points, two logs
def test_nearest_grid_point_in_log_space_is_argmins(grid, xs):
    """Kernel counts come from the grid point nearest in log x; the bisection that finds it answers
    what ``np.argmin`` over the log distances does, for any x (grid points and log midpoints
    included: near a tie it asks argmin)."""
    from sim.costs.table import _NearestLog

    g = np.array(sorted(grid))
    near = _NearestLog(g)
    logs = np.log(np.maximum(g, 1e-9))
    mids = np.sqrt(g[:-1] * g[1:]).tolist()
    for x in xs + g.tolist() + mids:
        assert near.index(x) == int(np.argmin(np.abs(logs - np.log(max(x, 1e-9))))), x


def test_kernel_counts_at_every_token_count_of_the_shipped_table(h100):
    """The shipped H100 table's kernel counts, at every token count from 1 to past its grids, are
    the argmin lookups' (the nearest grid point in log x, per op)."""
    ops, gpu, table = h100
    for curve in table.curves.values():
        if curve.ks is None:
            continue
        logs = np.log(np.maximum(curve.xs, 1e-9))
        for x in np.unique(np.geomspace(1, curve.xs[-1] * 2, 3000).round()):
            want = (curve.xs.shape[0] - 1 if x >= curve.xs[-1]
                    else int(np.argmin(np.abs(logs - np.log(max(x, 1e-9))))))
            assert curve._near.index(x) == want or x >= curve.xs[-1]
            k = curve.ks[want]
            assert curve.kernels_at(float(x), -1) == (int(round(k)) if np.isfinite(k) and k > 0 else -1)


@given(pts=st.lists(st.tuples(st.integers(1, 12), st.floats(0, 1), st.sampled_from([1.0, 2.0, 3.0, np.nan, np.inf])),
                    min_size=1, max_size=40))
def test_a_curve_merges_repeated_points_by_their_median(pts):
    """Grid points at the same x merge into their median time (and their nan-median kernel count,
    unknown when none is finite): per x, what the points there give, in any input order."""
    import warnings

    from sim.costs.table import Curve1D

    xs, ts, ks = (np.array(c, dtype=float) for c in zip(*pts))
    c = Curve1D(xs, ts, None, ks)
    assert c.xs.tolist() == sorted(set(xs.tolist()))
    for x, t, k in zip(c.xs, c.ts, c.ks):
        at = xs == x
        assert t == np.median(ts[at])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = np.nanmedian(ks[at]) if np.isfinite(ks[at]).any() else np.nan
        assert (np.isnan(k) and np.isnan(want)) or k == want


EXECUTIONS_FOR_RUNS = [("cuda-graph", {}), ("cuda-graph", {"capture_sizes": "vllm"}),
                       ("cuda-graph", {"host": "reference-h200", "host_overlap": True}),
                       ("cuda-graph", {"capture_sizes": [1, 2, 4, 8]}),      # eager above 8: the general way
                       ("host-launched", {}), ("persistent", {})]


@pytest.mark.parametrize("name,params", EXECUTIONS_FOR_RUNS)
@given(batch=st.integers(1, 300), per_seq=st.integers(0, 140_000), k=st.integers(1, 64),
       share=st.sampled_from([1.0, 0.5]))
def test_linear_step_pass_is_exact(h100, name, params, batch, per_seq, k, share):
    """A dense decode run priced in one compiled pass (``ExecutionPolicy.linear_step`` with
    ``CostBackend.decode_linear_run``) equals the general way (attention times, then the execution
    policy's ``step_times`` and step overhead) bit for bit, launches, syncs and the extrapolation
    counts included; policies and backends without the pass take the general way."""
    ops, gpu, _ = h100
    runs = []
    for fast in (True, False):
        table = TableBackend(ops, gpu, CostTable(resolve_table_dir("h100-sxm-80gb")))
        cost = StepCostModel(ops, table, registry.build("execution", name, params)).for_share(share)
        ctx0 = batch * per_seq
        if fast:
            d, lc, sc = cost.dense_decode_run(batch, ctx0, k)
        else:
            d, lc, sc = cost.decode_run(batch, np.arange(ctx0, ctx0 + batch * k, batch, dtype=np.float64))
        runs.append((np.asarray(d).tobytes(), lc, sc, dict(table.extrapolations), dict(table.ext_over),
                     dict(table.ext_under), cost.steps_priced))
    assert runs[0] == runs[1]


def test_the_cuda_graph_policy_offers_the_linear_pass_and_the_table_backend_takes_it(h100):
    """The fast pass is used where it applies (a graphed decode step on the full GPU), not only declared."""
    ops, gpu, table = h100
    graph = registry.build("execution", "cuda-graph", {})
    cost = StepCostModel(ops, table, graph)
    seq = cost.sequence(8, 8, False, True, 8)
    base, terms, launches, syncs = graph.linear_step(seq, table.launch)
    assert (launches, syncs) == (1, 1) and len(terms) == 1
    d = table.decode_linear_run(8, 8 * 1000, 8, 5, terms[0][1], base)
    want = table.decode_attention_times(8, np.arange(8000, 8040, 8, dtype=np.float64)) * terms[0][1] + base
    assert d is not None and d.tobytes() == want.tobytes()
    assert registry.build("execution", "host-launched", {}).linear_step(seq, table.launch) is None
    assert table.for_share(0.5).decode_linear_run(8, 8000, 8, 5, terms[0][1], base) is None

    class Slower(type(graph)):      # a plugin that prices graphed steps its own way
        def step_times(self, seq, var_s, launch):
            t = super().step_times(seq, var_s, launch)
            return type(t)(duration_s=t.duration_s * 1.1, launches=t.launches, syncs=t.syncs)

    slower = Slower()
    assert slower.linear_step(seq, table.launch) is None
    d_slow = StepCostModel(ops, table, slower).dense_decode_run(8, 8000, 5)[0]
    assert np.allclose(d_slow, 1.1 * StepCostModel(ops, table, graph).dense_decode_run(8, 8000, 5)[0], rtol=1e-12)
    assert table.for_share(0.5).decode_linear_run(8, 8000, 8, 5, terms[0][1], base) is None


@given(a=st.lists(st.sampled_from([0.0, 1.0, 2.5, 7.0]) | st.floats(-1e6, 1e6), min_size=1, max_size=40),
       x=st.sampled_from([0.0, 1.0, 2.5, 7.0]) | st.floats(-2e6, 2e6))
def test_compiled_searchsorted_answers_numpys(a, x):
    """The bisection the compiled paths use in place of Numba's ``np.searchsorted`` (ties included)."""
    from sim.jit import searchsorted

    s = np.sort(np.array(a))
    assert searchsorted(s, x) == np.searchsorted(s, x)
    assert searchsorted(s, x, True) == np.searchsorted(s, x, side="right")
    c = np.cumsum(np.abs(s).astype(np.int64) % 3)       # the ITL pass's cumulative histogram counts
    assert searchsorted(c, int(x) % 50, True) == np.searchsorted(c, int(x) % 50, side="right")


@given(x=st.lists(st.floats(-1e12, 1e12) | st.sampled_from([0.0, -0.0, 1e-300, 3.0]), max_size=400))
def test_the_python_sum_adds_in_numpys_order(x):
    """``policies.base._numpy_sum`` gives the float ``np.sum`` does (its pairwise order), on both
    sides of the 8-term and 128-term blocks."""
    from policies.base import _numpy_sum

    got = _numpy_sum(list(x))
    want = float(np.sum(np.array(x, dtype=np.float64)))
    assert got == want and np.signbit(got) == np.signbit(want)


@given(n=st.integers(1, 60), data=st.data())
def test_a_kernel_sequences_aggregates_are_the_numpy_formulas(n, data):
    """KernelSequence's aggregates, computed in Python numbers, equal the array formulas they replace,
    bit for bit (GPU total, kernel count, variable-op weights)."""
    from policies.base import KernelSequence

    ints = st.integers(0, 40)
    gpu = np.array(data.draw(st.lists(st.floats(0, 1e-2) | st.just(0.0), min_size=n, max_size=n)))
    kernels = np.array(data.draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64)
    var = np.array(data.draw(st.lists(st.sampled_from([-1, -1, -1, 0, 1]), min_size=n, max_size=n)), dtype=np.int64)
    repeat = np.array(data.draw(st.lists(st.sampled_from([0, 1, 32, 80]), min_size=n, max_size=n)), dtype=np.int64)
    switch = data.draw(st.floats(0, 1e-5))
    seq = KernelSequence(op_gpu_s=gpu, op_kernels=kernels, op_var=var, op_host_s=np.zeros(n), op_repeat=repeat,
                         switch_s=switch)
    calls = np.where(kernels > 0, repeat, 0)
    assert seq.num_kernels == int((kernels * calls).sum())
    total = float((calls * (np.where(var < 0, gpu, 0.0) + kernels * switch)).sum())
    assert seq.total_gpu_s == total
    want = [float(calls[var == v].sum()) for v in range(2)]
    assert seq.var_weight.tolist() == want and seq.var_weight.dtype == np.float64
    assert seq.var_terms == tuple((v, w) for v, w in enumerate(want) if w)
