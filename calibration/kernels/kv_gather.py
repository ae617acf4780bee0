"""Part ``kv_gather``: moving KV blocks through a block table (paged attention's and swap-in's pattern).

The pool is ``[num_blocks, block_size, kv_heads, head_dim]`` of 2-byte elements (bf16 patterns), one of
K or V; a block is contiguous, ``block_size * kv_heads * head_dim * 2`` bytes. Kernels move 8-byte words,
four independent loads per thread, one grid row (``blockIdx.y``) per table entry:

- ``gather``: ``dst[j] = pool[table[j]]`` into a contiguous buffer (swap-in staging, prefix reuse).
- ``scatter``: ``pool[table[j]] = src[j]`` (swap-out's or a copy-in's write side).

Coordinates: x = blocks moved, y = block size (tokens), z = bytes per token (kv_heads * head_dim * 2);
``bytes`` = 2 x bytes moved (each read once, written once). Tables are random permutations of the pool,
and small working sets rotate through disjoint tables and destination slices (``extra.rotation_sets``).
"""
from __future__ import annotations

import numpy as np

from calibration.kernels.devicefns import fill_bf16_words
from calibration.kernels.grid import PointRunner, coarse_first
from calibration.kernels.runtime import cuda, free_device_bytes, jit, l2_bytes, release_memory, sm_count, synchronize
from calibration.kernels.timing import Timer, reps_for, rotation_sets
from calibration.raw import Part, PartContext, make_row
from sim.costs.model import make_key

PART_NAME = "kv_gather"
MiB, GiB = 2**20, 2**30


@jit
def gather_kernel(dst, pool, table, words_per_block):
    j = cuda.blockIdx.y
    src0 = table[j] * words_per_block
    dst0 = j * words_per_block
    step = cuda.blockDim.x
    w = cuda.blockIdx.x * step * 4 + cuda.threadIdx.x
    if w + 3 * step < words_per_block:
        v0 = pool[src0 + w]
        v1 = pool[src0 + w + step]
        v2 = pool[src0 + w + 2 * step]
        v3 = pool[src0 + w + 3 * step]
        dst[dst0 + w] = v0
        dst[dst0 + w + step] = v1
        dst[dst0 + w + 2 * step] = v2
        dst[dst0 + w + 3 * step] = v3
    else:
        for u in range(4):
            if w + u * step < words_per_block:
                dst[dst0 + w + u * step] = pool[src0 + w + u * step]


@jit
def scatter_kernel(pool, src, table, words_per_block):
    j = cuda.blockIdx.y
    dst0 = table[j] * words_per_block
    src0 = j * words_per_block
    step = cuda.blockDim.x
    w = cuda.blockIdx.x * step * 4 + cuda.threadIdx.x
    if w + 3 * step < words_per_block:
        v0 = src[src0 + w]
        v1 = src[src0 + w + step]
        v2 = src[src0 + w + 2 * step]
        v3 = src[src0 + w + 3 * step]
        pool[dst0 + w] = v0
        pool[dst0 + w + step] = v1
        pool[dst0 + w + 2 * step] = v2
        pool[dst0 + w + 3 * step] = v3
    else:
        for u in range(4):
            if w + u * step < words_per_block:
                pool[dst0 + w + u * step] = src[src0 + w + u * step]


def launch_config(words_per_block: int, num_blocks: int, threads: int) -> tuple[tuple[int, int], int]:
    """Grid (x covers one block's words, y = table entry) and block size."""
    gx = -(-words_per_block // (threads * 4))
    return (gx, num_blocks), threads


def gather(dst, pool, table, words_per_block: int, threads: int = 256) -> None:
    """Enqueue ``dst[j] = pool[table[j]]`` (int64-word views; table int32 on the device)."""
    grid, block = launch_config(words_per_block, table.size, threads)
    gather_kernel[grid, block](dst, pool, table, words_per_block)


def scatter(pool, src, table, words_per_block: int, threads: int = 256) -> None:
    """Enqueue ``pool[table[j]] = src[j]``."""
    grid, block = launch_config(words_per_block, table.size, threads)
    scatter_kernel[grid, block](pool, src, table, words_per_block)


def _shapes(ctx: PartContext) -> list[tuple[int, int]]:
    """Distinct (kv_heads, head_dim) of the requested models (a tiny one in quick mode)."""
    if ctx.quick or not ctx.models:
        return [(1, 16)] if ctx.quick else [(8, 128)]
    return list(dict.fromkeys((m.num_kv_heads, m.head_dim) for m in ctx.models))


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    l2 = l2_bytes()
    rng = np.random.default_rng(2024)
    threads = 32 if ctx.quick else 256
    if ctx.quick:
        block_sizes, counts = [8, 16], [2, 5]
        pool_bytes, dst_bytes = 64 * 16 * 32, 16 * 16 * 32
    else:
        block_sizes, counts = [8, 16, 32, 64, 128], [1, 4, 16, 64, 256, 1024, 4096]
        free = free_device_bytes()
        pool_bytes = int(min(4 * GiB, 0.4 * free))
        dst_bytes = int(min(GiB, 0.15 * free))
    mem = {"pool": cuda.device_array(pool_bytes // 8, dtype=np.int64),
           "dst": cuda.device_array(dst_bytes // 8, dtype=np.int64)}
    fill_bf16_words[min(4 * sm_count(), 1024), threads](mem["pool"], 11)
    fill_bf16_words[min(4 * sm_count(), 1024), threads](mem["dst"], 12)
    synchronize()
    base = {**timer.base_extra(), "element_bytes": 2, "word_bytes": 8, "threads": threads}

    def verify(wpb: int, pool_blocks: int) -> list[dict]:
        pool, dst = mem["pool"], mem["dst"]
        n = 3
        table_h = rng.choice(pool_blocks, size=n, replace=False).astype(np.int32)
        table = cuda.to_device(table_h)
        gather(dst, pool, table, wpb, threads)
        got = dst[:n * wpb].copy_to_host().reshape(n, wpb)
        for j, b in enumerate(table_h):
            if not np.array_equal(got[j], pool[int(b) * wpb:(int(b) + 1) * wpb].copy_to_host()):
                raise AssertionError(f"gather moved the wrong words for table entry {j}")
        src = cuda.to_device(got[::-1].copy().reshape(-1))  # write the blocks back, reversed
        scatter(pool, src, table, wpb, threads)
        back = np.stack([pool[int(b) * wpb:(int(b) + 1) * wpb].copy_to_host() for b in table_h])
        if not np.array_equal(back, got[::-1]):
            raise AssertionError("scatter wrote the wrong words")
        return []

    for kvh, head_dim in _shapes(ctx):
        token_bytes = kvh * head_dim * 2
        key = make_key(d=head_dim, kvh=kvh)
        for bs in block_sizes:
            block_bytes = bs * token_bytes
            wpb = block_bytes // 8
            pool_blocks = pool_bytes // block_bytes
            runner.run(f"verify kvh={kvh} d={head_dim} bs={bs}",
                       lambda wpb=wpb, pool_blocks=pool_blocks: verify(wpb, pool_blocks))
            perm = rng.permutation(pool_blocks).astype(np.int32)
            for n in coarse_first(counts):
                moved = n * block_bytes
                label = f"kvh={kvh} d={head_dim} bs={bs} n={n}"
                if n > pool_blocks or moved > dst_bytes:
                    runner.note_skipped(label, "larger than the buffers")
                    continue

                def measure(n=n, moved=moved, wpb=wpb, bs=bs, key=key, token_bytes=token_bytes,
                            perm=perm) -> list[dict]:
                    pool, dst = mem["pool"], mem["dst"]
                    sets = rotation_sets(2 * moved, l2, available_bytes=dst_bytes)
                    sets = max(1, min(sets, len(perm) // n, dst_bytes // moved))
                    tables = [cuda.to_device(perm[k * n:(k + 1) * n]) for k in range(sets)]
                    slices = [dst[k * n * wpb:(k + 1) * n * wpb] for k in range(sets)]
                    est = 2 * moved / 2.5e12 + 4e-6
                    reps = 3 if ctx.quick else reps_for(est, target_s=0.02, lo=7, hi=20)
                    rows = []
                    for variant, fn in (("gather", lambda i: gather(slices[i % sets], pool,
                                                                    tables[i % sets], wpb, threads)),
                                        ("scatter", lambda i: scatter(pool, slices[i % sets],
                                                                      tables[i % sets], wpb, threads))):
                        samples = timer.device(fn, reps=reps, warmup=1 if ctx.quick else 2)
                        rows.append(make_row(PART_NAME, variant, samples, key=key, x=n, y=bs,
                                             z=token_bytes, nbytes=2 * moved,
                                             extra={**base, "rotation_sets": sets, "block_bytes": wpb * 8}))
                    return rows

                runner.run(label, measure)
    rows = runner.finish(pool_bytes=pool_bytes)
    mem.clear()
    release_memory()
    return rows


PART = Part(
    name=PART_NAME,
    description="KV-block gather/scatter through a block table vs block size and blocks moved",
    requires=("numba.cuda",),
    coords="x=blocks moved, y=block size (tokens), z=bytes per token (kv_heads*head_dim*2)",
    run=run,
)
