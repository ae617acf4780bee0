"""The one place that imports ``numba.cuda``: simulator detection, the ``jit`` decorator, device facts.

Every kernel module takes ``cuda`` and ``jit`` from here, so that a machine without numba-cuda can still
import the part modules (the suite then skips the parts, saying why) and so that ``cuda`` is a module
global of each kernel module, which the CUDA simulator needs to swap in its fake module.

Under ``NUMBA_ENABLE_CUDASIM=1`` numba runs every CUDA thread as a Python thread: grids must be tiny, and
device facts below are stand-ins (``simulated=True``).
"""
from __future__ import annotations

import gc
import importlib
import os
from typing import Any

import numpy as np

# numba-cuda 0.30 registers an overload for np.row_stack, which NumPy 2.4+ removed (the lent H100
# image has such a NumPy); give it the alias it expects before numba.cuda is imported.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

try:  # numba-cuda is optional for the rest of tiersim
    from numba import cuda
    IMPORT_ERROR: str = ""
except Exception as exc:  # ImportError, or CUDA bindings missing at import
    cuda = None  # type: ignore[assignment]
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def simulating() -> bool:
    """True when numba runs kernels in its CUDA simulator (read by numba once, at import)."""
    for name in ("numba.cuda.core.config", "numba.core.config"):
        try:
            return bool(int(importlib.import_module(name).ENABLE_CUDASIM))
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _missing(*_args: Any, **_kwargs: Any):
    raise RuntimeError(f"numba.cuda is not importable ({IMPORT_ERROR})")


def jit(*args: Any, **kwargs: Any):
    """``cuda.jit`` when numba-cuda is importable, else a decorator whose kernels raise when called."""
    if cuda is not None:
        return cuda.jit(*args, **kwargs)
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return _MissingKernel()
    return lambda fn: _MissingKernel()


class _MissingKernel:
    def __getitem__(self, _config: Any) -> "_MissingKernel":
        return self

    __call__ = staticmethod(_missing)


SIMULATED = cuda is not None and simulating()

if cuda is not None:  # spinner and single-block launches are deliberate: no low-occupancy warnings
    for _config in ("numba.cuda.core.config", "numba.core.config"):
        try:
            importlib.import_module(_config).CUDA_LOW_OCCUPANCY_WARNINGS = 0
        except (ImportError, AttributeError):
            pass


def device_attribute(dev: Any, name: str) -> int | None:
    """One ``CU_DEVICE_ATTRIBUTE_<name>`` of ``dev`` or None (CUDA 13 removed a few, e.g. clock rates)."""
    try:
        return int(getattr(dev, name))
    except Exception:  # unknown attribute, driver error
        return None


def sm_count() -> int:
    """Streaming multiprocessors of the current device (2 under the simulator, for tiny grids)."""
    if SIMULATED:
        return 2
    value = device_attribute(cuda.get_current_device(), "MULTIPROCESSOR_COUNT")
    return value or 1


def l2_bytes() -> int:
    """L2 size in bytes (0 when unknown or simulated: no cache to defeat)."""
    if SIMULATED:
        return 0
    return device_attribute(cuda.get_current_device(), "L2_CACHE_SIZE") or 50 * 2**20


def free_device_bytes() -> int:
    """Free device memory in bytes (a few MiB under the simulator, to keep quick grids tiny)."""
    if SIMULATED:
        return 64 * 2**20
    free, _total = cuda.current_context().get_memory_info()
    return int(free)


def release_memory() -> None:
    """Free device buffers that are no longer referenced now, not at numba's next flush."""
    gc.collect()
    if cuda is None or SIMULATED:
        return
    try:
        ctx = cuda.current_context()
        pending = getattr(ctx, "deallocations", None)
        if pending is None:
            pending = getattr(getattr(ctx, "memory_manager", None), "deallocations", None)
        if pending is not None:
            pending.clear()
    except Exception:  # best effort: a poisoned context fails here too, and the part reports that
        pass


def synchronize() -> None:
    """Wait for the device; raises the CUDA error of any earlier asynchronous failure."""
    if cuda is not None:
        cuda.synchronize()


def properties() -> dict:
    """Facts about the current device for metadata (no UUID, no serial numbers)."""
    if cuda is None:
        return {"available": False, "reason": f"numba.cuda not importable: {IMPORT_ERROR}"}
    if SIMULATED:
        return {"available": True, "simulated": True, "name": "numba CUDA simulator",
                "compute_capability": "sim", "sm_count": sm_count(), "total_memory_bytes": 0,
                "l2_bytes": 0}
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    major, minor = dev.compute_capability
    info: dict[str, Any] = {"available": True, "simulated": False, "name": name,
                            "compute_capability": f"{major}.{minor}"}
    for key, attr in (("sm_count", "MULTIPROCESSOR_COUNT"), ("l2_bytes", "L2_CACHE_SIZE"),
                      ("sm_clock_khz", "CLOCK_RATE"), ("memory_clock_khz", "MEMORY_CLOCK_RATE"),
                      ("memory_bus_width_bits", "GLOBAL_MEMORY_BUS_WIDTH"),
                      ("max_threads_per_sm", "MAX_THREADS_PER_MULTIPROCESSOR"),
                      ("max_threads_per_block", "MAX_THREADS_PER_BLOCK"),
                      ("registers_per_sm", "MAX_REGISTERS_PER_MULTIPROCESSOR"),
                      ("shared_memory_per_sm_bytes", "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR"),
                      ("shared_memory_per_block_bytes", "MAX_SHARED_MEMORY_PER_BLOCK"),
                      ("async_engine_count", "ASYNC_ENGINE_COUNT"),
                      ("can_map_host_memory", "CAN_MAP_HOST_MEMORY"),
                      ("ecc_enabled", "ECC_ENABLED"), ("compute_mode", "COMPUTE_MODE")):
        info[key] = device_attribute(dev, attr)
    try:
        free, total = cuda.current_context().get_memory_info()
        info["total_memory_bytes"], info["free_memory_bytes_at_start"] = int(total), int(free)
    except Exception as exc:
        info["total_memory_bytes"] = None
        info["memory_info_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from numba.cuda.cudadrv.driver import driver
        info["driver_version"] = "%d.%d" % driver.get_version()
    except Exception as exc:
        info["driver_version"] = f"unknown ({type(exc).__name__})"
    try:
        info["runtime_version"] = "%d.%d" % tuple(cuda.runtime.get_version())
    except Exception as exc:
        info["runtime_version"] = f"unknown ({type(exc).__name__})"
    return info
