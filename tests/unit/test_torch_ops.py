"""calibration.torch_ops against explicit formulas, and the vendor parts' grids and rows (CPU, quick)."""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from calibration import torch_ops  # noqa: E402
from calibration.raw import RAW_COLUMNS, PartContext, model_shape, rows_to_frame  # noqa: E402
from calibration.vendor import keys  # noqa: E402


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def reference_attention(q, k, v, offset: int):
    """Masked softmax in float64: query i (0-based) sees keys 0 .. offset + i; GQA by head groups."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.arange(lk)[None, :] <= (offset + torch.arange(lq))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------- elementwise ops
def test_rope_matches_complex_rotation():
    t, heads, d = 7, 3, 16
    q, k = torch.randn(t, heads, d), torch.randn(t, 2, d)
    pos = torch.tensor([0, 1, 5, 17, 100, 2047, 3])
    cos_t, sin_t = torch_ops.rope_tables(4096, d, dtype=torch.float64)
    qr, kr = torch_ops.rope(q.double(), k.double(), cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1))
    inv_freq = 1.0 / (torch_ops.ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), pos[:, None].double() * inv_freq)
    for x, xr in ((q, qr), (k, kr)):
        z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rot[:, None, :]
        expect = torch.cat((z.real, z.imag), dim=-1)
        assert torch.allclose(xr, expect, atol=1e-12)


def test_rms_norm_and_act_match_formulas():
    x, w = torch.randn(5, 32), torch.randn(32)
    expect = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert rel_err(torch_ops.rms_norm(x, w), expect) < 1e-6
    gu = torch.randn(5, 2 * 24)
    gate, up = gu[:, :24], gu[:, 24:]
    assert rel_err(torch_ops.act(gu), gate * torch.sigmoid(gate) * up) < 1e-6
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(torch_ops.add(a, b), a + b)
    table, ids = torch.randn(10, 4), torch.tensor([3, 0, 9])
    assert torch.equal(torch_ops.embed(ids, table), table[ids])
    logits = torch.randn(4, 50)
    assert torch.equal(torch_ops.sample(logits), logits.argmax(-1))
    w2 = torch.randn(6, 4)
    assert rel_err(torch_ops.linear(a, w2), a @ w2.T) < 1e-6


def test_kv_write_places_tokens_where_expected():
    batch, new, kvh, d, cap, start = 3, 2, 2, 4, 8, 5
    k_cache = torch.full((batch, kvh, cap, d), float("nan"))
    v_cache = torch.full((batch, kvh, cap, d), float("nan"))
    qkv = torch.randn(batch * new, 3 * kvh * d)  # strided views, as the model passes them
    k = qkv[:, :kvh * d].view(batch * new, kvh, d)
    v = qkv[:, 2 * kvh * d:].view(batch * new, kvh, d)
    torch_ops.kv_write(k_cache, v_cache, k, v, start)
    for b in range(batch):
        for j in range(new):
            tok = b * new + j
            assert torch.equal(k_cache[b, :, start + j], k[tok])
            assert torch.equal(v_cache[b, :, start + j], v[tok])
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[start:start + new] = False
    assert torch.isnan(k_cache[:, :, untouched]).all() and torch.isnan(v_cache[:, :, untouched]).all()
    with pytest.raises(ValueError):
        torch_ops.kv_write(k_cache, v_cache, k, v, cap - 1)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("cached", [0, 5, 13])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_prefill_matches_masked_softmax(cached, heads):
    qh, kvh = heads
    batch, lq, d = 2, 6, 16
    q = torch.randn(batch, qh, lq, d)
    k_new, v_new = torch.randn(batch, kvh, lq, d), torch.randn(batch, kvh, lq, d)
    ck, cv = torch.randn(batch, kvh, cached, d), torch.randn(batch, kvh, cached, d)
    k_all, v_all = torch.cat((ck, k_new), 2), torch.cat((cv, v_new), 2)
    expect = reference_attention(q, k_all, v_all, offset=cached)
    # cache-slice form (how the reference model calls it) ...
    out = torch_ops.attention_prefill(q, k_all, v_all)
    assert out.shape == (batch, qh, lq, d)
    assert rel_err(out, expect) < 1e-5
    assert torch_ops.sdpa_backend("prefill") is not None
    # ... and the explicit cached-prefix form
    if cached:
        out2 = torch_ops.attention_prefill(q, k_new, v_new, ck, cv)
        assert rel_err(out2, expect) < 1e-5


def test_lower_right_alignment_differs_from_top_left():
    """With a cached prefix the last query must see every key (top-left alignment would not)."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    out = torch_ops.attention_prefill(q, k, v)
    last_full = reference_attention(q[:, :, -1:], k, v, offset=k.shape[2] - 1)
    assert rel_err(out[:, :, -1:], last_full) < 1e-5
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(top_left, out) > 1e-2
    mask = torch_ops.causal_mask_lower_right(3, 10)
    assert mask.sum(1).tolist() == [8, 9, 10]


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_attention_decode_gqa_matches_reference(heads):
    qh, kvh = heads
    batch, d, cap, ctx = 3, 16, 20, 11
    q = torch.randn(batch, 1, qh, d).transpose(1, 2)  # transposed view, as in the model
    k_cache, v_cache = torch.randn(batch, kvh, cap, d), torch.randn(batch, kvh, cap, d)
    out = torch_ops.attention_decode(q, k_cache, v_cache, ctx)
    expect = reference_attention(q, k_cache[:, :, :ctx], v_cache[:, :, :ctx], offset=ctx - 1)
    assert out.shape == (batch, qh, 1, d)
    assert rel_err(out, expect) < 1e-5
    backend = torch_ops.sdpa_backend("decode")
    assert backend is not None
    if qh != kvh:
        assert "gqa" in backend or "expand" in backend


def test_count_kernels_is_none_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert torch_ops.count_kernels(lambda: torch.ones(3) + 1) is None


# ----------------------------------------------------------------------------- keys and parts
@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b"])
def test_keys_match_the_simulator_op_list(name):
    from sim.costs.model import TransformerOps
    from sim.specs import load_model

    shape = model_shape(name)
    want = set(TransformerOps(load_model(name)).required_table_entries())
    have = {("gemm", keys.gemm_key(n, k)) for n, k in shape.gemms}
    have.add(("attn_prefill", keys.attention_key(shape)))
    have.add(("attn_decode", keys.attention_key(shape)))
    have |= set(keys.elementwise_keys(shape).items())
    assert have == want


def test_full_grids_follow_the_brief():
    from calibration.vendor import attention, gemm, ops

    shape = model_shape("llama-3.1-8b")
    pts = gemm.gemm_points((shape,), quick=False, cuda=True)
    assert len({(n, k) for n, k, _ in pts}) == len(shape.gemms)
    lm = [m for n, k, m in pts if n == shape.vocab_size]
    assert max(lm) == gemm.LM_HEAD_MAX_M and max(m for _, _, m in pts) == 16384
    pre = attention.prefill_grid(shape, quick=False, cuda=True)
    assert all(q + c <= 16384 for q, c, _ in pre) and (8192, 8192, 1) in pre
    dec = attention.decode_grid(shape, quick=False, cuda=True)
    assert (64, 32768) in dec and (128, 32768) not in dec  # 8 GiB of one layer's KV
    assert max(t for op, _, _, t in ops.op_points((shape,), False, True) if op == "sample") <= 4096


def _quick_ctx():
    return PartContext(quick=True, simulate=False, models=(keys.tiny_shape(),))


def _check_rows(rows, part):
    assert rows
    frame = rows_to_frame(rows)
    assert list(frame.columns) == list(RAW_COLUMNS)
    assert (frame.part == part).all()
    for row in rows:
        extra = json.loads(row["extra"])
        assert "error" not in extra, extra
        assert row["reps"] > 0 and row["median_s"] > 0
    return frame


def test_gemm_part_quick_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import gemm

    shape = keys.tiny_shape()
    frame = _check_rows(gemm.PART.run(_quick_ctx()), "gemm")
    assert set(frame.key) == {keys.gemm_key(n, k) for n, k in shape.gemms}
    assert set(frame.x) == set(gemm.M_QUICK_CPU)
    row = frame[(frame.key == keys.gemm_key(*shape.gemms[0])) & (frame.x == 8)].iloc[0]
    n, k = shape.gemms[0]
    assert row.flops == 2 * 8 * n * k and row.bytes == 4 * (8 * k + k * n + 8 * n)


def test_attention_part_quick_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import attention

    frame = _check_rows(attention.PART.run(_quick_ctx()), "attention")
    pre = frame[frame.op == "attn_prefill"]
    assert len(pre) == len(attention.prefill_grid(keys.tiny_shape(), True, False))
    assert set(pre.y) == set(attention.C_QUICK_CPU) and set(pre.z) == set(attention.SEQS_QUICK_CPU)
    assert (frame.key == keys.attention_key(keys.tiny_shape())).all()
    assert all(json.loads(e)["attention_backend"] for e in frame.extra)


def test_ops_part_quick_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import ops

    frame = _check_rows(ops.PART.run(_quick_ctx()), "ops")
    want = keys.elementwise_keys(keys.tiny_shape())
    assert {(op, key) for op, key in zip(frame.op, frame.key)} == set(want.items())
    assert set(frame.x) == set(ops.TOKENS_QUICK_CPU)


def test_launch_part_quick_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import launch

    frame = _check_rows(launch.PART.run(_quick_ctx()), "torch_launch")
    calls = frame[frame.variant == "eager_call_host"]
    assert (calls.op == "").all()  # never mixed with the rows that price ops
    ops_seen = {json.loads(e)["table_op"] for e in calls.extra}
    assert {"gemm", "rms_norm", "attn_prefill", "attn_decode", "sample"} <= ops_seen
    assert "eager_dispatch" in set(frame.variant)


def test_failed_point_becomes_a_row_not_an_abort(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import ops

    real = torch_ops.act

    def broken(x):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(torch_ops, "act", broken)
    rows = ops.PART.run(_quick_ctx())
    monkeypatch.setattr(torch_ops, "act", real)
    bad = [r for r in rows if r["op"] == "act"]
    good = [r for r in rows if r["op"] != "act"]
    assert bad and all(r["reps"] == 0 and "planted failure" in json.loads(r["extra"])["error"]
                       for r in bad)
    assert good and all(r["reps"] > 0 for r in good)
    assert len(rows_to_frame(rows)) == len(rows)


# ----------------------------------------------------------------------------- CUDA branches, faked
class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = 0.0

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    def __init__(self, keep_graph=False):
        self.keep = keep_graph

    def replay(self):
        pass

    def instantiate(self):
        pass

    def raw_cuda_graph(self):
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA code paths on the CPU: events read the host clock, graphs capture nothing.

    Only control flow is under test here (names, arithmetic, row assembly); the real device run
    checks the numbers.
    """
    import contextlib

    from calibration.vendor import kernel_count, timing

    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "Event", _FakeEvent, raising=False)
    monkeypatch.setattr(cuda, "Stream", _FakeStream, raising=False)
    monkeypatch.setattr(cuda, "CUDAGraph", _FakeGraph, raising=False)
    monkeypatch.setattr(cuda, "stream", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(cuda, "graph", lambda g, **kw: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(cuda, "current_stream", _FakeStream, raising=False)
    monkeypatch.setattr(cuda, "synchronize", lambda: None, raising=False)
    monkeypatch.setattr(cuda, "_sleep", lambda cycles: None, raising=False)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None, raising=False)
    monkeypatch.setattr(cuda, "mem_get_info", lambda: (80 * 2**30, 80 * 2**30), raising=False)
    monkeypatch.setattr(kernel_count, "graph_node_counts",
                        lambda raw: {"kernel": 6, "memcpy": 0, "memset": 0, "other": 0})
    # no child process: it would import the real (CPU) torch and count nothing
    monkeypatch.setattr(kernel_count, "count_in_child",
                        lambda specs, timeout: ([{"kernels": 2, "kernel": 2, "memcpy": 0, "memset": 0}]
                                                * len(specs), None))
    env = timing.TorchEnv(torch, torch.device("cpu"), torch.float32, True, "fake-gpu", 256 * 1024,
                          torch.__version__)
    monkeypatch.setattr(timing, "torch_env", lambda quick: env)
    return env


@pytest.mark.parametrize("part_module", ["gemm", "attention", "ops", "launch"])
def test_cuda_branches_of_the_parts(fake_cuda, part_module):
    import importlib

    from calibration.vendor import launch

    part = importlib.import_module(f"calibration.vendor.{part_module}").PART
    rows = part.run(_quick_ctx())
    frame = rows_to_frame(rows)
    extras = [json.loads(e) for e in frame.extra]
    assert all("error" not in e for e in extras), [e["error"] for e in extras if "error" in e]
    timed = [e for e in extras if "method" in e]
    if part_module != "launch":
        assert {e["method"] for e in timed} <= {"graph", "events-primed"}
        assert all(e["kernels"] == 2 and e["kernels_source"] == "profiler" for e in extras)
    else:
        assert {"graph_replay", "graph_fit", "graph_fit_host", "sync", "launch_sync"} <= set(frame.variant)
        assert set(frame[frame.variant == "graph_replay"].x) == set(launch.GRAPH_SIZES)


def test_cuda_branches_of_the_validation(fake_cuda):
    from calibration import reference_model as rm
    from calibration.vendor.validation import PART

    rows = PART.run(_quick_ctx())
    frame = rows_to_frame(rows)
    assert sorted(set(frame.variant)) == ["eager", "graph"]
    n = len(rm.validation_points(quick=True))
    assert len(frame) == 2 * n
    extras = [json.loads(e) for e in frame.extra]
    assert all("error" not in e for e in extras)
    assert all(e["kernels"] in (2, 6) for e in extras)  # profiler subset, graph count elsewhere


def test_graph_failure_falls_back_to_eager_timing(fake_cuda, monkeypatch):
    from calibration.vendor import ops

    def broken_graph(g, **kw):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "graph", broken_graph, raising=False)
    extras = [json.loads(r["extra"]) for r in ops.PART.run(_quick_ctx())]
    assert all(e["method"] == "events-primed" and "error" not in e for e in extras)
    tried = [e for e in extras if "timing_notes" in e]  # the calls short enough to try a graph
    assert tried and all("capture refused" in e["timing_notes"][0] for e in tried)


# ----------------------------------------------------------------------------- plumbing
def test_zero_budget_skips_points_without_failing():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor import gemm

    ctx = PartContext(quick=True, simulate=False, models=(keys.tiny_shape(),), budget_s=0.0)
    assert gemm.PART.run(ctx) == []


def test_counting_child_reports_per_spec_errors():
    if torch.cuda.is_available():
        pytest.skip("CPU expectation")
    from calibration.vendor.kernel_count import count_in_child, graph_node_counts

    specs = [{"builder": "calibration.vendor.ops:count_call",
              "kwargs": {"shape": keys.shape_dict(keys.tiny_shape()), "op": "add", "tokens": 4}},
             {"builder": "calibration.vendor.no_such_module:f", "kwargs": {}}]
    results, note = count_in_child(specs, timeout_s=120)
    assert note is None
    assert all(r is not None and "error" in r for r in results)
    assert "ModuleNotFoundError" in results[1]["error"]
    assert count_in_child(specs, timeout_s=1)[1].startswith("skipped")
    assert graph_node_counts(0) is None  # no libcuda here (or a null graph rejected)
