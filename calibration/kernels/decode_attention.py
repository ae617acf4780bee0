"""Part ``decode_attention``: one query token per sequence attending over paged KV, grouped-query heads.

Storage: K and V pools ``[num_blocks, block_size, kv_heads, head_dim]`` of bf16 patterns (2 bytes),
read through a block table ``[batch, max_blocks]``; queries and outputs float32; fp32 accumulation with an
online softmax. Split-K design (flash-decoding):

1. ``decode_split_kernel``: grid (splits, kv_heads, batch), one warp per query head of the kv head's group
   (block = 32 x group threads). A warp reads each token's K row as 8-byte words (4 bf16 per lane,
   ``head_dim/4`` lanes per token, ``128/head_dim`` tokens side by side), four tokens per lane in flight,
   reduces the dot product with butterfly shuffles, and keeps a running max, sum and weighted V. The
   group's warps read the same K/V rows, so all but the first should hit in L1. Each writes a partial
   (max, sum, acc[head_dim]) per split.
2. ``decode_combine_kernel``: grid (q_heads, batch), head_dim threads: merges the splits.

Splits are chosen so that the grid has ~8 blocks per SM when batch x kv_heads is small, each split
>= 256 tokens. Rows: op ``attn_decode``, the model's cost-table key, x = batch, y = context (keys per
sequence), ``bytes`` = K+V bytes read, ``flops`` = 4 x q_heads x head_dim x ctx x batch.
"""
from __future__ import annotations

import math

import numpy as np

from calibration.kernels.devicefns import bf16_bits_to_f32, fill_bf16_words, fill_uniform, shfl_xor, unpack_bf16x4
from calibration.kernels.grid import PointRunner, coarse_first
from calibration.kernels.runtime import cuda, free_device_bytes, jit, l2_bytes, release_memory, sm_count, synchronize
from calibration.kernels.timing import Timer, reps_for, rotation_sets
from calibration.raw import ModelShape, Part, PartContext, make_row
from sim.costs.model import make_key

PART_NAME = "decode_attention"
MASK = -1.0e30  # "minus infinity" that keeps exp() differences finite
GiB = 2**30


@jit(device=True)
def _word_index(block_table, b, t, bs_log2, row_words, head_word):
    """Index of the 8-byte word of token t's row (this lane's 4 dims) in the pool's int64 view."""
    blk = np.int64(block_table[b, t >> bs_log2])
    return ((blk << bs_log2) + (t & ((1 << bs_log2) - 1))) * row_words + head_word


@jit(device=True)
def _dot4(word, q0, q1, q2, q3):
    x0, x1, x2, x3 = unpack_bf16x4(word)
    return (x0 * q0 + x1 * q1) + (x2 * q2 + x3 * q3)


@jit
def decode_split_kernel(q, k_words, v_words, block_table, ctx_lens, part_acc, part_ml,
                        lpt_log2, bs_log2, chunk, scale):
    split = cuda.blockIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    kv_heads = cuda.gridDim.y
    group = cuda.blockDim.x >> 5
    lane = cuda.threadIdx.x & 31
    qh = h * group + (cuda.threadIdx.x >> 5)
    lpt = 1 << lpt_log2           # lanes per token row (4 dims each)
    tpw = 32 >> lpt_log2          # token rows side by side in one warp
    sg = lane >> lpt_log2         # which of them this lane works on
    sl = lane & (lpt - 1)         # which 4 dims
    d0 = sl * 4
    row_words = kv_heads * lpt
    head_word = h * lpt + sl
    q0 = q[b, qh, d0] * scale
    q1 = q[b, qh, d0 + 1] * scale
    q2 = q[b, qh, d0 + 2] * scale
    q3 = q[b, qh, d0 + 3] * scale
    ctx = ctx_lens[b]
    start = split * chunk
    end = min(start + chunk, ctx)
    zero = np.float32(0.0)
    m = np.float32(MASK)
    lsum = zero
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    base = start
    while base < end:  # block-uniform trip count: every lane takes part in every shuffle
        t0 = base + sg
        t1 = t0 + tpw
        t2 = t1 + tpw
        t3 = t2 + tpw
        ok0 = t0 < end
        ok1 = t1 < end
        ok2 = t2 < end
        ok3 = t3 < end
        k0 = np.int64(0)
        k1 = np.int64(0)
        k2 = np.int64(0)
        k3 = np.int64(0)
        v0 = np.int64(0)
        v1 = np.int64(0)
        v2 = np.int64(0)
        v3 = np.int64(0)
        if ok0:
            w = _word_index(block_table, b, t0, bs_log2, row_words, head_word)
            k0 = k_words[w]
            v0 = v_words[w]
        if ok1:
            w = _word_index(block_table, b, t1, bs_log2, row_words, head_word)
            k1 = k_words[w]
            v1 = v_words[w]
        if ok2:
            w = _word_index(block_table, b, t2, bs_log2, row_words, head_word)
            k2 = k_words[w]
            v2 = v_words[w]
        if ok3:
            w = _word_index(block_table, b, t3, bs_log2, row_words, head_word)
            k3 = k_words[w]
            v3 = v_words[w]
        s0 = _dot4(k0, q0, q1, q2, q3)
        s1 = _dot4(k1, q0, q1, q2, q3)
        s2 = _dot4(k2, q0, q1, q2, q3)
        s3 = _dot4(k3, q0, q1, q2, q3)
        off = lpt >> 1
        while off > 0:
            s0 += shfl_xor(s0, off)
            s1 += shfl_xor(s1, off)
            s2 += shfl_xor(s2, off)
            s3 += shfl_xor(s3, off)
            off >>= 1
        if not ok0:
            s0 = np.float32(MASK)
        if not ok1:
            s1 = np.float32(MASK)
        if not ok2:
            s2 = np.float32(MASK)
        if not ok3:
            s3 = np.float32(MASK)
        m_new = max(max(m, s0), max(max(s1, s2), s3))
        alpha = math.exp(m - m_new)
        p0 = math.exp(s0 - m_new) if ok0 else zero
        p1 = math.exp(s1 - m_new) if ok1 else zero
        p2 = math.exp(s2 - m_new) if ok2 else zero
        p3 = math.exp(s3 - m_new) if ok3 else zero
        lsum = lsum * alpha + ((p0 + p1) + (p2 + p3))
        x0, x1, x2, x3 = unpack_bf16x4(v0)
        y0, y1, y2, y3 = unpack_bf16x4(v1)
        z0, z1, z2, z3 = unpack_bf16x4(v2)
        w0, w1, w2, w3 = unpack_bf16x4(v3)
        a0 = a0 * alpha + ((p0 * x0 + p1 * y0) + (p2 * z0 + p3 * w0))
        a1 = a1 * alpha + ((p0 * x1 + p1 * y1) + (p2 * z1 + p3 * w1))
        a2 = a2 * alpha + ((p0 * x2 + p1 * y2) + (p2 * z2 + p3 * w2))
        a3 = a3 * alpha + ((p0 * x3 + p1 * y3) + (p2 * z3 + p3 * w3))
        m = m_new
        base += 4 * tpw
    # merge the token rows that shared the warp (lanes sl, sl+lpt, sl+2lpt, ... hold the same dims)
    off = lpt
    while off < 32:
        m_o = shfl_xor(m, off)
        l_o = shfl_xor(lsum, off)
        a0_o = shfl_xor(a0, off)
        a1_o = shfl_xor(a1, off)
        a2_o = shfl_xor(a2, off)
        a3_o = shfl_xor(a3, off)
        m_n = max(m, m_o)
        ea = math.exp(m - m_n)
        eb = math.exp(m_o - m_n)
        lsum = lsum * ea + l_o * eb
        a0 = a0 * ea + a0_o * eb
        a1 = a1 * ea + a1_o * eb
        a2 = a2 * ea + a2_o * eb
        a3 = a3 * ea + a3_o * eb
        m = m_n
        off <<= 1
    if sg == 0:
        part_acc[b, qh, split, d0] = a0
        part_acc[b, qh, split, d0 + 1] = a1
        part_acc[b, qh, split, d0 + 2] = a2
        part_acc[b, qh, split, d0 + 3] = a3
        if lane == 0:
            part_ml[b, qh, split, 0] = m
            part_ml[b, qh, split, 1] = lsum


@jit
def decode_combine_kernel(part_acc, part_ml, out):
    qh = cuda.blockIdx.x
    b = cuda.blockIdx.y
    d = cuda.threadIdx.x
    splits = part_ml.shape[2]
    big = np.float32(MASK)
    for s in range(splits):
        big = max(big, part_ml[b, qh, s, 0])
    num = np.float32(0.0)
    den = np.float32(0.0)
    for s in range(splits):
        w = math.exp(part_ml[b, qh, s, 0] - big)
        num += w * part_acc[b, qh, s, d]
        den += w * part_ml[b, qh, s, 1]
    out[b, qh, d] = num / den if den > 0 else np.float32(0.0)


def plan_splits(batch: int, kv_heads: int, ctx_max: int, sms: int, *, min_chunk: int = 256,
                max_splits: int = 128) -> tuple[int, int]:
    """(splits, chunk tokens): ~8 blocks per SM when batch x kv_heads is small, chunks >= min_chunk."""
    want = math.ceil(8 * sms / max(1, batch * kv_heads))
    splits = max(1, min(want, math.ceil(ctx_max / min_chunk), max_splits))
    chunk = math.ceil(ctx_max / splits)
    return splits, chunk


def validate_shape(q_heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    """Raise ValueError for shapes these kernels do not handle."""
    if q_heads % kv_heads or q_heads // kv_heads > 32:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}, group <= 32")
    lpt = head_dim // 4
    if head_dim % 4 or lpt & (lpt - 1) or not 1 <= lpt <= 32:
        raise ValueError(f"head_dim={head_dim} unsupported: head_dim/4 must be a power of two <= 32")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two")


class DecodeAttention:
    """Device buffers and launch plan for one shape: call ``launch`` to enqueue both kernels."""

    def __init__(self, *, batch: int, q_heads: int, kv_heads: int, head_dim: int, block_size: int,
                 ctx_max: int, sms: int, min_chunk: int = 256) -> None:
        validate_shape(q_heads, kv_heads, head_dim, block_size)
        lpt = head_dim // 4
        self.batch, self.q_heads, self.kv_heads, self.head_dim = batch, q_heads, kv_heads, head_dim
        self.block_size = block_size
        self.lpt_log2 = lpt.bit_length() - 1
        self.bs_log2 = block_size.bit_length() - 1
        self.splits, self.chunk = plan_splits(batch, kv_heads, ctx_max, sms, min_chunk=min_chunk)
        self.scale = np.float32(1.0 / math.sqrt(head_dim))
        self.part_acc = cuda.device_array((batch, q_heads, self.splits, head_dim), dtype=np.float32)
        self.part_ml = cuda.device_array((batch, q_heads, self.splits, 2), dtype=np.float32)
        self.out = cuda.device_array((batch, q_heads, head_dim), dtype=np.float32)

    def launch(self, q, k_words, v_words, block_table, ctx_lens) -> None:
        group = self.q_heads // self.kv_heads
        decode_split_kernel[(self.splits, self.kv_heads, self.batch), 32 * group](
            q, k_words, v_words, block_table, ctx_lens, self.part_acc, self.part_ml,
            self.lpt_log2, self.bs_log2, self.chunk, self.scale)
        decode_combine_kernel[(self.q_heads, self.batch), self.head_dim](
            self.part_acc, self.part_ml, self.out)


def reference(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, block_table: np.ndarray,
              ctx_lens: np.ndarray) -> np.ndarray:
    """float64 numpy decode attention; pools are uint16 bf16 patterns [blocks, block_size, kvh, d]."""
    batch, q_heads, head_dim = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = q_heads // kv_heads
    out = np.zeros((batch, q_heads, head_dim))
    for b in range(batch):
        t = np.arange(int(ctx_lens[b]))
        blocks = block_table[b, t // block_size]
        keys = bf16_bits_to_f32(k_pool[blocks, t % block_size]).astype(np.float64)  # [t, kvh, d]
        vals = bf16_bits_to_f32(v_pool[blocks, t % block_size]).astype(np.float64)
        for qh in range(q_heads):
            h = qh // group
            s = keys[:, h, :] @ q[b, qh].astype(np.float64) / math.sqrt(head_dim)
            p = np.exp(s - s.max())
            out[b, qh] = p @ vals[:, h, :] / p.sum()
    return out


def check_against_numpy(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, block_size: int,
                        ctx_lens: list[int], seed: int = 0, min_chunk: int = 256, sms: int = 8) -> float:
    """Run the kernels on fresh random inputs and return ||out - ref|| / ||ref|| (outputs poisoned first)."""
    rng = np.random.default_rng(seed)
    max_blocks = max(math.ceil(c / block_size) for c in ctx_lens)
    num_blocks = batch * max_blocks + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_pool = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    v_pool = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    for pool in (k_pool, v_pool):  # random finite bf16: keep sign and mantissa, exponent in [120, 127]
        pool &= np.uint16(0x807F)
        pool |= (rng.integers(120, 128, size=shape, dtype=np.uint16) << 7).astype(np.uint16)
    table = rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
    q = rng.standard_normal((batch, q_heads, head_dim)).astype(np.float32)
    lens = np.asarray(ctx_lens, dtype=np.int32)
    attn = DecodeAttention(batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                           block_size=block_size, ctx_max=int(lens.max()), sms=sms, min_chunk=min_chunk)
    attn.out.copy_to_device(np.full(attn.out.shape, np.nan, dtype=np.float32))
    attn.launch(cuda.to_device(q), cuda.to_device(k_pool.reshape(-1).view(np.int64)),
                cuda.to_device(v_pool.reshape(-1).view(np.int64)), cuda.to_device(table),
                cuda.to_device(lens))
    got = attn.out.copy_to_host().astype(np.float64)
    ref = reference(q, k_pool, v_pool, table, lens)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _shapes(ctx: PartContext) -> list[ModelShape]:
    if ctx.quick or not ctx.models:
        return [ModelShape(name="tiny", hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                           ffn_size=128, vocab_size=256, gemms=())]
    return list(ctx.models)


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    sms, l2 = sm_count(), l2_bytes()
    block_size = 16
    if ctx.quick:
        batches, contexts, kv_cap = [1], [40], 2**16
    else:
        batches, contexts = [1, 4, 16, 64, 256], [128, 512, 2048, 8192, 32768]
        kv_cap = int(min(8 * GiB, 0.6 * free_device_bytes()))  # K and V together
    base = {**timer.base_extra(), "kv_dtype": "bf16 (2-byte patterns)", "accumulate": "fp32",
            "block_size": block_size, "kernels_per_call": 2}
    seen_shapes: set[tuple[int, int, int]] = set()
    for shape in _shapes(ctx):
        dims = (shape.num_heads, shape.num_kv_heads, shape.head_dim)
        if dims in seen_shapes:
            continue
        seen_shapes.add(dims)
        qh, kvh, d = dims
        try:
            validate_shape(qh, kvh, d, block_size)
        except ValueError as exc:
            runner.note_skipped(shape.name, str(exc))
            ctx.progress(f"{PART_NAME}: skipping {shape.name}: {exc}")
            continue
        key = make_key(d=d, dtype="bf16", kvh=kvh, qh=qh)
        verified: dict[str, object] = {}

        def verify(qh=qh, kvh=kvh, d=d, verified=verified, shape=shape) -> list[dict]:
            lens = [24] if ctx.quick else [300, 77, 1000]
            err = check_against_numpy(batch=len(lens), q_heads=qh, kv_heads=kvh, head_dim=d,
                                      block_size=block_size, ctx_lens=lens,
                                      min_chunk=16 if ctx.quick else 64, sms=sms)
            verified["verify_rel_err"] = err
            ctx.progress(f"{PART_NAME}: {shape.name} vs numpy: rel err {err:.2e}")
            if not err < 1e-3:
                raise AssertionError(f"decode attention disagrees with numpy (rel err {err:.3g})")
            return []

        runner.run(f"verify {shape.name}", verify)
        token_bytes = 2 * kvh * d * 2  # K and V
        pool_tokens = (kv_cap // token_bytes) // block_size * block_size
        pool_blocks = pool_tokens // block_size
        mem: dict = {}

        def allocate(mem=mem, words=pool_tokens * kvh * d // 4) -> list[dict]:
            for name, seed in (("k", 21), ("v", 22)):
                mem[name] = cuda.device_array(words, dtype=np.int64)
                fill_bf16_words[min(4 * sms, 1024), 32 if ctx.quick else 256](mem[name], seed)
            synchronize()
            return []

        if not runner.run(f"allocate {shape.name} KV pools", allocate):
            mem.clear()
            release_memory()
            continue
        rng = np.random.default_rng(7)
        perm = rng.permutation(pool_blocks).astype(np.int32)
        points = [(b, c) for b in batches for c in contexts]
        for batch, ctx_len in coarse_first(points):
            label = f"{shape.name} batch={batch} ctx={ctx_len}"
            kv_bytes = batch * ctx_len * token_bytes
            if batch * ctx_len > pool_tokens:
                runner.note_skipped(label, f"KV {kv_bytes / GiB:.1f} GiB over the {kv_cap / GiB:.1f} GiB cap")
                continue

            def measure(batch=batch, ctx_len=ctx_len, kv_bytes=kv_bytes, qh=qh, kvh=kvh, d=d, key=key,
                        mem=mem, perm=perm, verified=verified, shape=shape, pool_tokens=pool_tokens,
                        token_bytes=token_bytes) -> list[dict]:
                k_words, v_words = mem["k"], mem["v"]
                n_blk = math.ceil(ctx_len / block_size)
                need = batch * n_blk
                sets = rotation_sets(kv_bytes, l2, available_bytes=pool_tokens * token_bytes)
                sets = max(1, min(sets, len(perm) // need))
                tables = [cuda.to_device(perm[k * need:(k + 1) * need].reshape(batch, n_blk))
                          for k in range(sets)]
                lens = cuda.to_device(np.full(batch, ctx_len, dtype=np.int32))
                q_flat = cuda.device_array(batch * qh * d, dtype=np.float32)
                fill_uniform[4, 32](q_flat, batch + ctx_len)
                q = q_flat.reshape(batch, qh, d)
                attn = DecodeAttention(batch=batch, q_heads=qh, kv_heads=kvh, head_dim=d,
                                       block_size=block_size, ctx_max=ctx_len, sms=sms,
                                       min_chunk=64 if ctx.quick else 256)
                est = kv_bytes / 2e12 + 10e-6
                samples = timer.device(lambda i: attn.launch(q, k_words, v_words, tables[i % sets], lens),
                                       reps=2 if ctx.quick else reps_for(est, target_s=0.03, lo=7, hi=20),
                                       warmup=0 if ctx.quick else 2)
                out = attn.out.copy_to_host()
                if not np.all(np.isfinite(out)):
                    raise AssertionError("non-finite attention output")
                return [make_row(PART_NAME, "paged_splitk", samples, op="attn_decode", key=key,
                                 x=batch, y=ctx_len, nbytes=kv_bytes,
                                 flops=4.0 * qh * d * ctx_len * batch,
                                 extra={**base, **verified, "model": shape.name, "splits": attn.splits,
                                        "chunk_tokens": attn.chunk, "rotation_sets": sets,
                                        "threads_per_block": 32 * (qh // kvh)})]

            runner.run(label, measure)
        mem.clear()
        release_memory()
    return runner.finish(kv_cap_bytes=kv_cap)


PART = Part(
    name=PART_NAME,
    description="paged decode attention (GQA, bf16 KV, split-K online softmax) vs batch and context",
    requires=("numba.cuda",),
    coords="x=batch (sequences), y=context tokens per sequence, z=-",
    run=run,
)
