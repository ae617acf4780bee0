"""The reference decoder's cache and masks are right: incremental steps give the one-shot logits."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from calibration import reference_model as rm  # noqa: E402
from calibration.raw import PartContext, rows_to_frame  # noqa: E402
from sim.specs import ModelSpec  # noqa: E402

SPEC = ModelSpec(name="test-llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                 head_dim=8, ffn_size=48, vocab_size=97, max_context_tokens=512)


@pytest.fixture(scope="module")
def model():
    return rm.ReferenceModel(SPEC, device="cpu", dtype=torch.float32, kv_capacity_tokens=256,
                             weight_std=0.2)


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_prefill_then_decode_equals_longer_prefill(model):
    batch, n, cap = 2, 9, 16
    ids = torch.randint(0, SPEC.vocab_size, (batch, n + 1))
    full = model.logits(ids, start=0, cap=cap)
    model.logits(ids[:, :n], start=0, cap=cap)
    step = model.logits(ids[:, n:], start=n, cap=cap)
    assert full.shape == (batch, SPEC.vocab_size)
    assert rel_err(step, full) < 1e-5


def test_chunked_prefill_uses_lower_right_mask(model):
    batch, n, cap = 3, 12, 12
    ids = torch.randint(0, SPEC.vocab_size, (batch, n))
    full = model.logits(ids, start=0, cap=cap)
    model.logits(ids[:, :5], start=0, cap=cap)
    chunked = model.logits(ids[:, 5:], start=5, cap=cap)  # 7 queries over 12 keys
    assert rel_err(chunked, full) < 1e-5


def test_decode_depends_on_the_cache(model):
    """A corrupted cached position must change the decode output (the cache is really read)."""
    batch, n, cap = 1, 6, 8
    ids = torch.randint(0, SPEC.vocab_size, (batch, n + 1))
    model.logits(ids[:, :n], start=0, cap=cap)
    before = model.logits(ids[:, n:], start=n, cap=cap)
    k_cache, _ = model.cache_view(0, batch, cap)
    k_cache[:, :, 2] += 3.0
    after = model.logits(ids[:, n:], start=n, cap=cap)
    assert rel_err(after, before) > 1e-4


def test_steps_and_shapes(model):
    out = model.prefill_step(2, 7)
    assert out.shape == (2,) and out.dtype == torch.long
    assert int(out.max()) < SPEC.vocab_size
    assert model.decode_step(3, 20).shape == (3,)
    with pytest.raises(ValueError):
        model.cache_view(0, 100, 100)
    with pytest.raises(ValueError):
        model.make_step("verify", 1, 1)


def test_mixed_step_equals_the_chunk_and_the_decodes_run_apart():
    """A chunked-prefill step batched with decodes gives each row the logits it gets alone."""
    batch, ctx, chunk, cached = 2, 5, 4, 3
    c_cap = cached + chunk
    a = rm.ReferenceModel(SPEC, dtype=torch.float32, kv_capacity_tokens=32, weight_std=0.2, seed=3)
    b = rm.ReferenceModel(SPEC, dtype=torch.float32, kv_capacity_tokens=32, weight_std=0.2, seed=3)
    prompt = torch.randint(0, SPEC.vocab_size, (1, c_cap))
    dec_ids = torch.randint(0, SPEC.vocab_size, (batch, 1))
    for m in (a, b):   # the chunk's first `cached` tokens go in first
        m.logits(prompt[:, :cached], start=0, cap=c_cap)
    ids, pos, slots, rows = a.mixed_inputs(batch, ctx, chunk, cached,
                                          ids=torch.cat((prompt[0, cached:], dec_ids[:, 0])))
    mixed = a.forward_mixed(ids, pos, slots, rows, batch, ctx, chunk, cached)[0]
    alone_chunk = b.logits(prompt[:, cached:], start=cached, cap=c_cap)
    alone_dec = b.logits(dec_ids, start=ctx, cap=ctx + 1, offset=c_cap)  # the decodes' cache follows the chunk's
    assert mixed.shape == (1 + batch, SPEC.vocab_size)
    assert rel_err(mixed[:1], alone_chunk) < 1e-5
    assert rel_err(mixed[1:], alone_dec) < 1e-5
    # the step writes exactly the new tokens' slots: the chunk's positions and each decode's last one
    assert slots.shape == (chunk + batch, SPEC.num_kv_heads)
    assert len(set(slots.flatten().tolist())) == slots.numel()
    assert a.make_mixed_step(batch, ctx, chunk, cached)().shape == (1 + batch,)
    assert rm.tokens_needed("mixed", batch, ctx, chunk, cached) == c_cap + batch * (ctx + 1)
    with pytest.raises(ValueError, match="cache slots"):
        a.make_mixed_step(8, 8, 4, 0)


def test_tied_embeddings_share_the_table():
    tied = ModelSpec(name="tied", num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1,
                     head_dim=8, ffn_size=32, vocab_size=40, max_context_tokens=64,
                     tied_embeddings=True)
    m = rm.ReferenceModel(tied, kv_capacity_tokens=32)
    assert m.lm_head is m.embed_table
    assert float(m.kv.abs().sum()) > 0  # random, never zeros


def test_validation_grid_follows_the_brief():
    pts = rm.validation_points(quick=False)
    pre = [p for p in pts if p[0] == "prefill"]
    dec = [p for p in pts if p[0] == "decode"]
    assert all(b * n <= 16384 for _, b, n in pre) and ("prefill", 8, 2048) in pre
    assert ("prefill", 8, 4096) not in pre
    assert all(b * c <= 262144 for _, b, c in dec) and ("decode", 32, 8192) in dec
    assert ("decode", 256, 1024) in dec and ("decode", 256, 2048) not in dec
    assert max(rm.tokens_needed(*p) for p in pts) == 256 * 1025
    sub = rm.count_subset(pts)
    assert sub and set(sub) <= set(pts)
    order = rm.run_order(pts)
    assert sorted(order) == sorted(pts)
    assert [p[0] for p in order[:4]] == ["prefill", "decode"] * 2  # both phases covered early


def test_step_flops_match_the_simulator_scale():
    spec = rm.resolve_spec("llama-3.1-8b")
    flops, nbytes = rm.step_flops_bytes(spec, "decode", 1, 1024)
    assert 1.3e10 < flops < 1.8e10  # about 2 x 8e9 parameters
    assert nbytes > spec.weight_bytes * 0.9
    mf, _ = rm.step_flops_bytes(spec, "mixed", 1, 1024, chunk=512, cached=0)
    pf, _ = rm.step_flops_bytes(spec, "prefill", 1, 512)
    assert pf < mf < pf * 1.1   # one decode more than the chunk alone


def test_validation_part_quick_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU quick run only")
    from calibration.vendor.validation import PART

    rows = PART.run(PartContext(quick=True, simulate=False))
    frame = rows_to_frame(rows)
    assert (frame.part == "validation").all() and (frame.variant == "eager").all()
    assert len(frame) == len(rm.validation_points(quick=True))
    assert set(frame.op) == {"prefill", "decode"} and (frame.key == "tiny-llama").all()
    assert (frame.reps >= rm.MIN_REPS).all()
    for e in frame.extra:
        extra = json.loads(e)
        assert "error" not in extra and extra["attention_backend"]


def test_stock_decoder_decode_after_prefill_equals_the_longer_prefill():
    from calibration.torch_unfused import StockDecoder

    dec = StockDecoder(SPEC, dtype=torch.float32, batch=2, capacity_tokens=16, weight_std=0.2)
    ids = torch.randint(0, SPEC.vocab_size, (2, 9))
    full = dec.logits(ids, start=0, cap=12)
    dec.logits(ids[:, :8], start=0, cap=12)
    step = dec.logits(ids[:, 8:], start=8, cap=12)
    assert rel_err(step, full) < 1e-5
    assert dec.make_step("decode", 4, 7)().shape == (4,)    # 4 x 8 positions fit 2 x 16
    with pytest.raises(ValueError, match="positions exceed"):
        dec.make_step("decode", 4, 8)
