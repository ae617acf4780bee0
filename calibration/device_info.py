"""What a calibration ran on: the GPU, the host, library versions, and a device fingerprint.

The fingerprint identifies the *kind* of device (sha256 of name, compute capability, SM count and total
memory), never a particular card: no UUID, serial or bus id is read. Resuming a calibration into a
directory measured on a different fingerprint is refused by the suite. Under the CUDA simulator the
fingerprint is a fixed, clearly marked ``simulated:...`` value.

GPU facts come from ``calibration.kernels.runtime`` (the only module that imports ``numba.cuda``);
library versions from package metadata, so optional heavy packages (torch, cupy) are never imported.
"""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata

LIBRARIES = ("numba", "numba-cuda", "llvmlite", "cuda-bindings", "numpy", "pandas", "pyarrow", "torch",
             "cupy-cuda13x", "cupy-cuda12x", "cupy", "triton")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that matter to measurements (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict:
    """CPU model, logical cores, memory and OS of the host."""
    info: dict = {"cpu_model": platform.processor() or "unknown", "logical_cores": os.cpu_count(),
                  "machine": platform.machine(), "os": f"{platform.system()} {platform.release()}",
                  "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    return info


def fingerprint(gpu: dict) -> str:
    """sha256 over the device kind's identity (simulated: a fixed marked value)."""
    if gpu.get("simulated"):
        return "simulated:" + hashlib.sha256(b"numba-cuda-simulator").hexdigest()[:16]
    if not gpu.get("available"):
        return "no-gpu"
    ident = "|".join(str(gpu.get(k)) for k in ("name", "compute_capability", "sm_count",
                                                 "total_memory_bytes"))
    return hashlib.sha256(ident.encode()).hexdigest()


def collect() -> dict:
    """Everything above in one JSON-able dict: ``gpu``, ``host``, ``libraries``, ``fingerprint``."""
    try:
        from calibration.kernels.runtime import properties

        gpu = properties()
    except Exception as exc:  # a broken driver must not stop the record of what happened
        gpu = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"gpu": gpu, "host": host_info(), "libraries": library_versions(),
            "fingerprint": fingerprint(gpu)}
