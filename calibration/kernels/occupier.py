"""A persistent kernel that holds N SMs until the host lets go: the persistent-megakernel case of SM share.

One block per held SM. Each block asks for the most dynamic shared memory a block may have (227 KiB on
Hopper, after the opt-in attribute); every block on an SM also takes 1 KiB reserved, and an SM has 228 KiB,
so nothing else can start on an SM that holds an occupier block, and N blocks land on N distinct SMs.
Thread 0 of each block records which SM it holds (``%smid``, through a two-line CUDA C function linked
into the kernel, when NVRTC links it; else -1), then polls a host flag in mapped memory (about every
20 us, ``nanosleep`` in between; at most ``poll_cap`` polls: a host that never lets go cannot hang the
GPU) and exits when the flag is set. :meth:`Occupier.probe` launches small blocks that record their SMs,
to check that none lands on a held one.

Host protocol (:class:`Occupier`): ``hold(n, stream)`` launches on a non-blocking stream (never the legacy
default stream, which other work would wait behind), waits until all ``n`` blocks report their SM,
``release()`` sets the flag and waits for the kernel to end on that stream. While a hold lasts nothing
may synchronise the whole device (it would wait for the occupier): time with events on a stream.

Under the CUDA simulator a launch blocks the host, so the flag is set before the launch and only the
protocol (every block reports, the kernel ends on the flag) is exercised.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from calibration.kernels.devicefns import poll_load
from calibration.kernels.runtime import SIMULATED, cuda, jit, sm_count

SMID_SOURCE = Path(__file__).with_name("smid.cu")
THREADS = 64
UNKNOWN_SM = 9999            # the SM id a block reports when %smid is not linked in
POLL_CAP = 1_000_000          # polls per block, about 20 us apart: the kernel ends by itself after ~20-30 s
BACKOFF_NS = 20_000           # one poll of host memory per block every ~20 us (little PCIe traffic)

if SIMULATED:
    @jit(device=True)
    def backoff():
        pass
else:
    @jit(device=True)
    def backoff():
        """Sleep about 20 us between polls."""
        cuda.nanosleep(np.uint32(BACKOFF_NS))
OPT_IN_FALLBACK_BYTES = 227 * 1024
PROBE_BLOCKS_PER_SM = 4
DYN_DTYPE = np.dtype(np.int32) if SIMULATED else np.int32   # the simulator sizes dynamic arrays by itemsize
_KERNELS: dict[str, object] = {}
_ERRORS: dict[str, str] = {}


def _smid_function():
    """``smid()`` for device code: the linked CUDA C function, or a stand-in (simulator, no NVRTC)."""
    if SIMULATED:
        @jit(device=True)
        def smid_sim():
            return np.int32(cuda.blockIdx.x % 2)
        return smid_sim
    return cuda.declare_device("tiersim_smid", "int32()", link=[str(SMID_SOURCE)], abi="c")


def _make_kernels(smid):
    @jit
    def occupier_kernel(flag, held, poll_cap):
        """held[block] = SM id + 1 once started; ends when flag[0] != 0 (or after poll_cap polls)."""
        dyn = cuda.shared.array(0, DYN_DTYPE)   # the reservation, not the data, is the point
        if cuda.threadIdx.x == 0:
            dyn[0] = 1
            held[cuda.blockIdx.x] = smid() + 1
            cuda.threadfence_system()
            polls = 0
            while polls < poll_cap:
                if poll_load(flag, 0) != 0:
                    break
                polls += 1
                backoff()
            held[cuda.blockIdx.x] = -held[cuda.blockIdx.x] - 1 if polls >= poll_cap else held[cuda.blockIdx.x]
        cuda.syncthreads()

    @jit
    def probe_kernel(out):
        if cuda.threadIdx.x == 0:
            out[cuda.blockIdx.x] = smid()

    return occupier_kernel, probe_kernel


def kernels() -> tuple[object, object, str]:
    """(occupier, probe, how SMs are identified); the linked ``%smid`` version when it compiles."""
    if "occupier" not in _KERNELS:
        try:
            if not SIMULATED and os.environ.get("TIERSIM_OCCUPIER_SMID") != "1":
                # lease 1: the linked-%smid test launch left the context with an illegal address; the
                # SM ids are a diagnostic only, so they are off unless asked for
                raise RuntimeError("linked %smid off (TIERSIM_OCCUPIER_SMID=1 turns it on)")
            occ, probe = _make_kernels(_smid_function())
            how = "simulator stand-in" if SIMULATED else "%smid (linked CUDA C)"
            if not SIMULATED:   # compile now, so that a link failure falls back here and not mid-hold
                flag = cuda.mapped_array(1, dtype=np.int64)
                flag[0] = 1
                held = cuda.mapped_array(1, dtype=np.int64)
                occ[1, THREADS, 0, 0](flag, held, 1)
                out = cuda.device_array(1, dtype=np.int32)
                probe[1, 32](out)
                cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - no NVRTC link here: SMs go unidentified
            _ERRORS["smid"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

            @jit(device=True)
            def no_smid():
                # a started block must leave held != 0 (held = smid + 1): 9999 marks "SM unknown"; with
                # -1 here no block ever looked started (lease 2's hold timed out with every block running)
                return np.int32(UNKNOWN_SM)
            occ, probe = _make_kernels(no_smid)
            how = f"unidentified ({_ERRORS['smid']})"
        _KERNELS.update(occupier=occ, probe=probe, how=how)
    return _KERNELS["occupier"], _KERNELS["probe"], _KERNELS["how"]


def max_dynamic_shared_bytes() -> int:
    """The opt-in limit of dynamic shared memory per block (227 KiB on Hopper)."""
    if SIMULATED:
        return 1024
    from calibration.kernels.runtime import device_attribute

    return device_attribute(cuda.get_current_device(), "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN") or OPT_IN_FALLBACK_BYTES


def allow_dynamic_shared(kernel, nbytes: int) -> str:
    """Raise ``kernel``'s dynamic shared-memory limit to ``nbytes`` (and prefer shared over L1); '' or why not."""
    if SIMULATED:
        return ""
    try:
        from numba.cuda.cudadrv.driver import binding, driver

        for overload in kernel.overloads.values():
            fn = overload._codelibrary.get_cufunc()
            attr = binding.CUfunction_attribute
            driver.cuKernelSetAttribute(attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes), fn.handle,
                                        fn.device.id)
            fn.set_shared_memory_carveout(100)
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class Occupier:
    """Holds SMs with :func:`kernels`' occupier. Invariants: at most one hold at a time; after
    ``release`` returns the kernel has ended (its stream is idle); ``held_sms`` lists the SMs of the last
    hold (-1 where unidentified)."""

    def __init__(self, stream=0) -> None:
        self.kernel, self.probe_kernel, self.smid_how = kernels()
        self.stream = stream
        self.smem = max_dynamic_shared_bytes()
        self.flag = cuda.mapped_array(1, dtype=np.int64)
        self.flag[0] = 0
        self.held = cuda.mapped_array(max(sm_count(), 1), dtype=np.int64)
        # allocated now: nothing is allocated or freed while a hold lasts
        self.probe_out = cuda.device_array(PROBE_BLOCKS_PER_SM * max(sm_count(), 1), dtype=np.int32)
        self.blocks = 0
        self.opt_in_error = ""
        self.held_sms: list[int] = []
        self._attr_done = False

    def hold(self, blocks: int, timeout_s: float = 10.0) -> list[int]:
        """Launch ``blocks`` occupier blocks and wait until each has started; their SMs."""
        if self.blocks:
            raise RuntimeError("an occupier hold is already active")
        if blocks <= 0:
            self.held_sms = []
            return []
        self.flag[0] = 1 if SIMULATED else 0   # simulator: launches block the host, so let go at once
        self.held[:] = 0
        if not self._attr_done:
            self.kernel[1, THREADS, self.stream, 0]  # specialise (compiled already by kernels())
            self.opt_in_error = allow_dynamic_shared(self.kernel, self.smem)
            self._attr_done = True
        smem = self.smem if not self.opt_in_error else 48 * 1024
        try:
            self.kernel[blocks, THREADS, self.stream, smem](self.flag, self.held, POLL_CAP)
        except Exception as exc:  # noqa: BLE001 - lease 2: the opt-in did not take (INVALID_VALUE at launch)
            if smem <= 48 * 1024:
                raise
            self.opt_in_error = f"launch with {smem} B of dynamic shared memory refused ({type(exc).__name__}); 48 KiB"
            self.smem = smem = 48 * 1024
            self.kernel[blocks, THREADS, self.stream, smem](self.flag, self.held, POLL_CAP)
        self.blocks = blocks
        deadline = time.perf_counter() + timeout_s
        while np.count_nonzero(self.held[:blocks]) < blocks:
            if time.perf_counter() > deadline:
                started = int(np.count_nonzero(self.held[:blocks]))
                self.release()
                raise TimeoutError(f"only {started} of {blocks} occupier blocks started within {timeout_s:.0f} s "
                                   f"(more blocks than SMs, or SMs busy)")
        self.held_sms = [-1 if int(abs(v)) - 1 == UNKNOWN_SM else int(abs(v)) - 1 for v in self.held[:blocks]]
        return self.held_sms

    def release(self) -> bool:
        """Let the blocks go and wait for the kernel to end; False if a block ran out of polls first."""
        if not self.blocks:
            return True
        self.flag[0] = 1
        if hasattr(self.stream, "synchronize"):
            self.stream.synchronize()
        else:
            cuda.synchronize()
        timed_out = bool(np.any(self.held[:self.blocks] < 0))
        self.blocks = 0
        return not timed_out

    def exclusive(self) -> bool:
        """Whether a held SM can take no other block: the opt-in shared memory was granted (228 KiB per
        SM = 227 KiB + 1 KiB reserved per block)."""
        return not self.opt_in_error and self.smem >= 200 * 1024

    def probe(self, stream=0) -> list[int]:
        """SMs that a few one-warp blocks per SM ran on (launched on ``stream``, waited for there)."""
        out = self.probe_out
        self.probe_kernel[out.size, 32, stream](out)
        got = out.copy_to_host(stream=stream)
        if hasattr(stream, "synchronize"):
            stream.synchronize()
        return [int(v) for v in got]
