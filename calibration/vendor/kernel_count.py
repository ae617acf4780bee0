"""Kernels launched per call: from a child process running ``torch.profiler``, and from captured graphs.

Why a child process: Kineto leaves CUPTI attached after a profiling session unless told otherwise
(pytorch/pytorch#144455), which slows every later launch in that process by 10-20% — exactly the
host overheads the ``torch_launch`` and ``validation`` parts measure. So the parts never profile in
their own process: they describe each call as a picklable *spec* (``builder`` = "module:function",
``kwargs``), and a child ``python -m calibration.vendor.kernel_count`` rebuilds the call, warms it up,
profiles one call and prints one JSON line per spec. The parent waits for it (the GPU is otherwise
idle) and keeps whatever finished before its timeout.

Independently, :func:`graph_node_counts` counts the kernel / memcpy / memset nodes of a captured
CUDA graph through the driver API (ctypes on ``libcuda.so.1``): free, in-process, and exactly the
work a graph replay launches.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# CUgraphNodeType values (cuda.h): 0 kernel, 1 memcpy, 2 memset; the rest are not GPU work we count.
_NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset"}


def graph_node_counts(raw_graph: int) -> dict | None:
    """``{"kernel", "memcpy", "memset", "other"}`` node counts of a ``cudaGraph_t`` (None on failure)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        get_nodes = lib.cuGraphGetNodes
        get_type = lib.cuGraphNodeGetType
    except (OSError, AttributeError):
        return None
    get_nodes.restype = ctypes.c_int
    get_nodes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    get_type.restype = ctypes.c_int
    get_type.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    count = ctypes.c_size_t(0)
    if get_nodes(ctypes.c_void_p(raw_graph), None, ctypes.byref(count)) != 0:
        return None
    nodes = (ctypes.c_void_p * max(count.value, 1))()
    if get_nodes(ctypes.c_void_p(raw_graph), nodes, ctypes.byref(count)) != 0:
        return None
    out = {"kernel": 0, "memcpy": 0, "memset": 0, "other": 0}
    for i in range(count.value):
        kind = ctypes.c_int(-1)
        if get_type(ctypes.c_void_p(nodes[i]), ctypes.byref(kind)) != 0:
            return None
        out[_NODE_TYPES.get(kind.value, "other")] += 1
    return out


def new_graph(torch):
    """A ``torch.cuda.CUDAGraph`` that keeps its ``cudaGraph_t`` (for node counts) when supported."""
    try:
        return torch.cuda.CUDAGraph(keep_graph=True), True
    except TypeError:  # torch without keep_graph
        return torch.cuda.CUDAGraph(), False


def finish_graph(graph, keep: bool) -> dict | None:
    """Instantiate a kept graph and return its node counts (None when they cannot be read)."""
    if not keep:
        return None
    try:
        if hasattr(graph, "instantiate"):
            graph.instantiate()
        return graph_node_counts(int(graph.raw_cuda_graph()))
    except Exception:  # noqa: BLE001 - counts are optional; the replay still works
        return None


def per_call(counts: dict | None, calls: int) -> dict | None:
    """Graph node counts divided by the number of calls captured (launches = kernel+memcpy+memset)."""
    if not counts or calls < 1:
        return None
    launches = counts["kernel"] + counts["memcpy"] + counts["memset"]
    return {"kernels": launches / calls, "kernel": counts["kernel"] / calls,
            "memcpy": counts["memcpy"] / calls, "memset": counts["memset"] / calls}


def count_in_child(specs: list[dict], timeout_s: float) -> tuple[list[dict | None], str | None]:
    """Profile each spec's call in one child process; returns (per-spec result or None, note).

    Each result is ``count_kernels``'s dict (without names unless the spec asks ``"names": True``)
    or ``{"error": ...}``. The note says why results are missing (timeout, child failure), else None.
    """
    results: list[dict | None] = [None] * len(specs)
    if not specs:
        return results, None
    if timeout_s < 10:
        return results, f"skipped: {timeout_s:.0f} s left for kernel counting"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    note = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "calibration.vendor.kernel_count"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=str(REPO_ROOT))
    except OSError as exc:
        return results, f"could not start the counting child: {exc}"
    try:
        out, err = proc.communicate(json.dumps(specs), timeout=timeout_s)
        if proc.returncode != 0:
            note = f"counting child exited {proc.returncode}: {err.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by handle
        out, err = proc.communicate()
        note = f"counting child stopped after {timeout_s:.0f} s"
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        try:
            msg = json.loads(line)
            i = int(msg["i"])
        except (ValueError, KeyError, TypeError):
            continue
        if 0 <= i < len(results):
            results[i] = msg.get("count") or {"error": msg.get("error", "no result")}
    return results, note


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _child_main() -> int:
    specs = json.loads(sys.stdin.read() or "[]")
    import torch

    from calibration.torch_ops import count_kernels

    for i, spec in enumerate(specs):
        fn = None
        try:
            fn = _resolve(spec["builder"])(**spec.get("kwargs", {}))
            for _ in range(2):  # first calls may launch one-off work (autotuning, workspace set-up)
                fn()
            torch.cuda.synchronize()
            res = count_kernels(fn)
            if res is None:
                raise RuntimeError("no CUDA device in the counting child")
            if res["kernels"] == 0:  # every counted call launches work: CUPTI saw nothing
                raise RuntimeError("the profiler recorded no GPU activity (CUPTI unavailable?)")
            if not spec.get("names"):
                res.pop("names", None)
            print(json.dumps({"i": i, "count": res}), flush=True)
        except Exception as exc:  # noqa: BLE001 - one spec's failure must not stop the others
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            print(json.dumps({"i": i, "error": f"{type(exc).__name__}: {first}"}), flush=True)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        finally:
            del fn
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
