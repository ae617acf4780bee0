"""Device-side building blocks shared by the parts, each with a stand-in for the CUDA simulator.

The simulator lacks warp shuffles, cache-hinted loads, ``nanosleep`` and libdevice, so each helper here has
a real-GPU body and a simulator body chosen once at import. The stand-ins compute the same function under
the same calling rule (``shfl_xor`` must be called by every thread of the block the same number of times,
which the kernels guarantee by keeping their loop trip counts block-uniform).

Also here: integer-hash fill kernels, so that no measurement ever runs on zeros (METHOD.md) and large
buffers never cross PCIe just to be initialised.
"""
from __future__ import annotations

import numpy as np

from calibration.kernels.runtime import SIMULATED, cuda, jit

FULL_MASK = 0xFFFFFFFF

if SIMULATED:
    @jit(device=True)
    def shfl_xor(value, lane_mask):
        """Warp butterfly exchange, emulated through shared memory and two block barriers."""
        buf = cuda.shared.array(1024, np.float32)
        t = cuda.threadIdx.x
        buf[t] = value
        cuda.syncthreads()
        other = buf[t ^ lane_mask]
        cuda.syncthreads()
        return np.float32(other)

    @jit(device=True)
    def poll_load(arr, i):
        """Re-read host-written memory (the simulator shares one address space)."""
        return arr[i]

    @jit(device=True)
    def backoff():
        pass

    @jit(device=True)
    def bf16_to_f32(half_bits):
        """bf16 bit pattern (0..65535) → float32."""
        return np.array([int(half_bits) << 16], dtype=np.uint32).view(np.float32)[0]

    @jit(device=True)
    def unpack_bf16x4(word):
        """An int64 word holding 4 bf16 patterns (little-endian) → 4 float32 values."""
        f = (np.array([word], dtype=np.int64).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return f[0], f[1], f[2], f[3]

    POLL_METHOD = "simulator"
else:
    @jit(device=True)
    def shfl_xor(value, lane_mask):
        """Warp butterfly exchange (all 32 lanes take part)."""
        return cuda.shfl_xor_sync(FULL_MASK, value, lane_mask)

    if cuda is not None and getattr(cuda, "ldcv", None) is not None:
        @jit(device=True)
        def poll_load(arr, i):
            """``ld.global.cv``: discard any cached copy of a system-memory line and fetch it again."""
            return cuda.ldcv(arr, i)

        POLL_METHOD = "ld.global.cv"
    else:
        @jit(device=True)
        def poll_load(arr, i):
            """An atomic add of 0 forces a read at the point of coherence."""
            return cuda.atomic.add(arr, i, 0)

        POLL_METHOD = "atomic.add(0)"

    @jit(device=True)
    def backoff():
        """Yield the issue slot for about a microsecond while spinning."""
        cuda.nanosleep(np.uint32(1000))

    if cuda is not None:
        from numba.cuda import libdevice

        @jit(device=True)
        def bf16_to_f32(half_bits):
            """bf16 bit pattern (0..65535) → float32: the bf16 bits are the float32's high half."""
            return libdevice.int_as_float(np.int32(half_bits << 16))

        @jit(device=True)
        def unpack_bf16x4(word):
            """An int64 word holding 4 bf16 patterns (little-endian) → 4 float32 values."""
            return (libdevice.int_as_float(np.int32((word & 0xFFFF) << 16)),
                    libdevice.int_as_float(np.int32(((word >> 16) & 0xFFFF) << 16)),
                    libdevice.int_as_float(np.int32(((word >> 32) & 0xFFFF) << 16)),
                    libdevice.int_as_float(np.int32(((word >> 48) & 0xFFFF) << 16)))
    else:  # keeps the module importable without numba-cuda
        bf16_to_f32 = jit(device=True)(lambda half_bits: 0.0)
        unpack_bf16x4 = jit(device=True)(lambda word: (0.0, 0.0, 0.0, 0.0))


@jit(device=True)
def hash32(x):
    """A 32-bit integer mix (Mueller's lowbias32); input and output in [0, 2**32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@jit
def fill_uniform(out, seed):
    """out[i] = a value in [0.5, 1.5) from a hash of (i, seed); any float dtype."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, out.size, stride):
        h = hash32((i ^ (seed * 0x3C6EF35)) & 0xFFFFFFFF)
        out[i] = 0.5 + h * (1.0 / 4294967296.0)


@jit(device=True)
def random_bf16_bits(h):
    """A finite, non-zero bf16 pattern with magnitude in [2**-7, 2) from 16 hash bits."""
    sign = h & 1
    exponent = 120 + ((h >> 1) & 7)
    mantissa = (h >> 4) & 0x7F
    return (sign << 15) | (exponent << 7) | mantissa


@jit
def fill_bf16_words(out, seed):
    """Fill an int64 view of a 2-byte-element buffer with four random bf16 patterns per word."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, out.size, stride):
        a = hash32((i ^ (seed * 0x3C6EF35)) & 0xFFFFFFFF)
        b = hash32((a + 0x9E3779B) & 0xFFFFFFFF)
        h0 = random_bf16_bits(a & 0xFFFF)
        h1 = random_bf16_bits(a >> 16)
        h2 = random_bf16_bits(b & 0xFFFF)
        h3 = random_bf16_bits(b >> 16)
        if h3 >= 32768:  # keep the top half's sign bit representable in a signed 64-bit word
            h3 = h3 - 65536
        out[i] = (h3 << 48) | (h2 << 32) | (h1 << 16) | h0


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Host reference: uint16 bf16 patterns → float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Host: float32 → bf16 patterns by truncation (exact round trip through bf16_bits_to_f32)."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
