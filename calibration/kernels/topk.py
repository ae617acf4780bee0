"""Part ``topk``: top-k selection over per-block scores (the selection step of Quest-style sparse KV).

Input ``[batch, n_blocks]`` float32 scores; output the indices of the k largest per row (in no particular
order). One thread block per row runs a radix select on order-preserving 32-bit keys: four 8-bit
histogram passes in shared memory find the k-th largest key, then one pass writes every index above it
and as many indices equal to it as are still needed. Rows are checked against numpy at every point.

Coordinates: x = n_blocks, y = k, z = batch; ``bytes`` = scores read once + indices written.
Score arrays are at most a few MB, as resident in L2 as they would be right after the scoring kernel.
"""
from __future__ import annotations

import numpy as np

from calibration.kernels.grid import PointRunner, coarse_first
from calibration.kernels.runtime import cuda, jit
from calibration.kernels.timing import Timer, reps_for
from calibration.raw import Part, PartContext, make_row

PART_NAME = "topk"


@jit(device=True)
def _order_key(bits):
    """float32 bit pattern → unsigned key with the same order as the floats (as int64)."""
    u = np.int64(bits)
    if u >= 0x80000000:
        return 0xFFFFFFFF - u
    return u + 0x80000000


@jit
def topk_kernel(bits, k, out_idx):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    n = bits.shape[1]
    hist = cuda.shared.array(256, np.int32)
    state = cuda.shared.array(2, np.int64)      # [prefix of the k-th key, how many of it to take]
    counters = cuda.shared.array(2, np.int32)   # [written above threshold, seen equal to it]
    if tid == 0:
        state[0] = 0
        state[1] = k
        counters[0] = 0
        counters[1] = 0
    for p in range(4):
        shift = 24 - 8 * p
        for j in range(tid, 256, nthreads):
            hist[j] = 0
        cuda.syncthreads()
        prefix = state[0]
        for i in range(tid, n, nthreads):
            key = _order_key(bits[row, i])
            if (key >> (shift + 8)) == prefix:
                cuda.atomic.add(hist, (key >> shift) & 255, 1)
        cuda.syncthreads()
        if tid == 0:
            remaining = state[1]
            above = 0
            digit = 255
            while digit > 0 and above + hist[digit] < remaining:
                above += hist[digit]
                digit -= 1
            state[0] = (prefix << 8) | digit
            state[1] = remaining - above
        cuda.syncthreads()
    threshold = state[0]
    take_equal = state[1]
    above_count = k - take_equal
    for i in range(tid, n, nthreads):
        key = _order_key(bits[row, i])
        if key > threshold:
            pos = cuda.atomic.add(counters, 0, 1)
            out_idx[row, pos] = i
        elif key == threshold:
            pos = cuda.atomic.add(counters, 1, 1)
            if pos < take_equal:
                out_idx[row, above_count + pos] = i


def topk(scores, k: int, out_idx, threads: int = 256) -> None:
    """Enqueue top-k of each row of device ``scores`` (float32 [batch, n]) into ``out_idx`` (int32)."""
    topk_kernel[scores.shape[0], threads](scores.view(np.uint32), k, out_idx)


def check_rows(scores: np.ndarray, idx: np.ndarray, k: int) -> None:
    """Each row's indices are distinct, in range, and select exactly the k largest values."""
    for r in range(scores.shape[0]):
        chosen = idx[r, :k]
        if len(set(chosen.tolist())) != k or chosen.min() < 0 or chosen.max() >= scores.shape[1]:
            raise AssertionError(f"row {r}: indices not k distinct in-range values")
        want = np.sort(scores[r])[-k:]
        if not np.array_equal(np.sort(scores[r, chosen]), want):
            raise AssertionError(f"row {r}: selected values differ from numpy's top-{k}")


def run(ctx: PartContext) -> list[dict]:
    timer = Timer()
    runner = PointRunner(ctx, PART_NAME)
    rng = np.random.default_rng(99)
    threads = 32 if ctx.quick else 256
    if ctx.quick:
        points = [(64, 8, 2), (200, 16, 1)]
    else:
        points = [(n, k, b) for n in (64, 256, 1024, 4096, 8192) for k in (8, 32, 64, 128, 256)
                  for b in (1, 16, 64, 256) if k <= n]
    base = {**timer.base_extra(), "threads": threads, "algorithm": "radix select, 4x8-bit passes"}
    for n, k, batch in coarse_first(points):
        def measure(n=n, k=k, batch=batch) -> list[dict]:
            host = rng.standard_normal((batch, n)).astype(np.float32)
            host[:, ::7] = host[:, :1]  # ties across the threshold must be handled too
            scores = cuda.to_device(host)
            out = cuda.to_device(np.full((batch, k), -1, dtype=np.int32))
            topk(scores, k, out, threads)
            check_rows(host[:8], out.copy_to_host()[:8], k)  # a few rows: the host check is slow
            est = 4e-6 + batch * n * 4 / 1e12
            samples = timer.device(lambda _: topk(scores, k, out, threads),
                                   reps=2 if ctx.quick else reps_for(est, target_s=0.01, lo=7, hi=20),
                                   warmup=1 if ctx.quick else 2)
            return [make_row(PART_NAME, "radix_select", samples, x=n, y=k, z=batch,
                             nbytes=batch * (n + k) * 4, extra=base)]

        runner.run(f"n={n} k={k} batch={batch}", measure)
    return runner.finish()


PART = Part(
    name=PART_NAME,
    description="top-k indices of per-block scores (radix select, one block per row) vs n, k, batch",
    requires=("numba.cuda",),
    coords="x=n_blocks (scores per row), y=k, z=batch (rows)",
    run=run,
)
