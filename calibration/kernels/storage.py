"""Part ``storage``: local-disk reads with O_DIRECT vs request size, and the disk -> DRAM -> GPU path.

A file of random bytes is written to ``ctx.scratch_dir`` (fsync'd, its cached pages dropped) and removed
at the end. Reads go into page-aligned buffers (anonymous ``mmap``, or pinned memory for the GPU path),
one request at a time (queue depth 1).

Variants (x = request or chunk bytes, median_s = seconds per request/chunk, ``bytes`` = x):

- ``direct_seq``, ``direct_rand``: O_DIRECT reads, sequential or at random aligned offsets. When the
  file system refuses O_DIRECT (tmpfs, some overlays) the reads are buffered instead and the variants are
  ``buffered_seq``, ``buffered_rand`` (``extra.o_direct`` says why).
- ``disk_to_gpu_serial``: read a chunk into a pinned buffer, then copy it to the device, one after the
  other. ``disk_to_gpu_pipelined``: two pinned buffers; the copy of chunk i (async) overlaps the read of
  chunk i+1. End-to-end bandwidth = x / median_s.
"""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np

from calibration.kernels.grid import PointRunner
from calibration.kernels.runtime import SIMULATED, cuda, synchronize
from calibration.raw import Part, PartContext, make_row

PART_NAME = "storage"
KiB, MiB, GiB = 2**10, 2**20, 2**30
ALIGN = 4096


def _write_file(path: Path, size: int) -> None:
    """Random (incompressible) contents, fsync'd, then dropped from the page cache where possible."""
    tile = np.random.default_rng(5).integers(0, 256, size=min(size, 16 * MiB), dtype=np.uint8).tobytes()
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            chunk = tile[:min(len(tile), size - written)]
            fh.write(chunk)
            written += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def filesystem_of(path: Path) -> dict:
    """The mount holding ``path``: file-system type and source device (from /proc/mounts)."""
    best = {"mount_point": "", "type": "unknown", "source": "unknown"}
    try:
        resolved = str(path.resolve())
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount_point"]):
                    best = {"mount_point": mount, "type": fields[2], "source": fields[0]}
    except OSError:
        pass
    return best


def _open_direct(path: Path, probe: memoryview) -> tuple[int, str]:
    """An fd opened with O_DIRECT if the file system takes it (probed with one read), else buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | flag)
        except OSError as exc:
            return os.open(path, os.O_RDONLY), f"refused at open: {exc.strerror}"
        try:
            os.preadv(fd, [probe[:ALIGN]], 0)
            return fd, "yes"
        except OSError as exc:
            os.close(fd)
            return os.open(path, os.O_RDONLY), f"refused at read: {exc.strerror}"
    return os.open(path, os.O_RDONLY), "not available on this platform"


def _read_exact(fd: int, buf: memoryview, offset: int) -> None:
    got = os.preadv(fd, [buf], offset)
    if got != len(buf):
        raise OSError(f"short read: {got} of {len(buf)} bytes at offset {offset}")


def run(ctx: PartContext) -> list[dict]:
    runner = PointRunner(ctx, PART_NAME, reserve_s=3.0)
    if ctx.quick:
        file_size, req_sizes, chunk_sizes, reps = 4 * MiB, [4 * KiB, 64 * KiB, MiB], [256 * KiB, MiB], 3
        rep_cap, path_bytes = MiB, 2 * MiB
    else:
        file_size = GiB
        req_sizes = [4 * KiB * 4**k for k in range(7)]  # 4 KiB ... 16 MiB
        chunk_sizes = [MiB, 4 * MiB, 16 * MiB]
        reps, rep_cap, path_bytes = 5, 64 * MiB, 64 * MiB
    scratch = Path(ctx.scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"tiersim-storage-{os.getpid()}.bin"
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        ctx.progress(f"{PART_NAME}: writing {file_size / MiB:.0f} MiB to {scratch}")
        _write_file(path, file_size)
        ctx.progress(f"{PART_NAME}: written in {time.perf_counter() - t0:.1f} s")
        host_buf = mmap.mmap(-1, max(req_sizes))
        view = memoryview(host_buf)
        fd, direct = _open_direct(path, view)
        mode = "direct" if direct == "yes" else "buffered"
        fs = filesystem_of(scratch)
        base = {"o_direct": direct, "queue_depth": 1, "file_bytes": file_size, "timer": "host perf_counter",
                "filesystem": fs["type"], "block_device": fs["source"]}
        ctx.progress(f"{PART_NAME}: {fs['type']} on {fs['source']}, O_DIRECT: {direct}")
        rng = np.random.default_rng(17)
        try:
            for req in req_sizes:
                n_req = max(2, min(256, rep_cap // req, file_size // req))
                span = n_req * req

                def sequential(req=req, n_req=n_req, span=span) -> list[dict]:
                    samples = []
                    for r in range(reps):
                        start = (r * span) % max(ALIGN, file_size - span + 1) // ALIGN * ALIGN
                        t = time.perf_counter()
                        for j in range(n_req):
                            _read_exact(fd, view[:req], start + j * req)
                        samples.append((time.perf_counter() - t) / n_req)
                    return [make_row(PART_NAME, f"{mode}_seq", samples, x=req, nbytes=req,
                                     extra={**base, "requests_per_sample": n_req})]

                def random(req=req, n_req=n_req) -> list[dict]:
                    slots = file_size // req
                    samples = []
                    for _ in range(reps):
                        offsets = rng.integers(0, slots, size=n_req) * req
                        t = time.perf_counter()
                        for off in offsets:
                            _read_exact(fd, view[:req], int(off))
                        samples.append((time.perf_counter() - t) / n_req)
                    return [make_row(PART_NAME, f"{mode}_rand", samples, x=req, nbytes=req,
                                     extra={**base, "requests_per_sample": n_req})]

                runner.run(f"seq {req}", sequential)
                runner.run(f"rand {req}", random)
            if cuda is not None:
                for chunk in chunk_sizes:
                    runner.run(f"disk_to_gpu {chunk}",
                               lambda chunk=chunk: _disk_to_gpu(fd, file_size, chunk, path_bytes, reps,
                                                                base))
        finally:
            os.close(fd)
            view.release()
            host_buf.close()
        rows = runner.finish()
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return rows


def _aligned_pinned(size: int) -> np.ndarray:
    """A pinned uint8 buffer whose start is ALIGN-aligned, as O_DIRECT requires."""
    buf = cuda.pinned_array(size + ALIGN, dtype=np.uint8)
    skip = (-buf.ctypes.data) % ALIGN
    return buf[skip:skip + size]


def _disk_to_gpu(fd: int, file_size: int, chunk: int, total: int, reps: int, base: dict) -> list[dict]:
    """Serial and double-buffered read -> pinned -> device copies of ``total`` bytes in ``chunk`` pieces."""
    n_chunks = max(2, min(total, file_size) // chunk)
    pinned = [_aligned_pinned(chunk) for _ in range(2)]
    views = [memoryview(p).cast("B") for p in pinned]
    dev = cuda.device_array(chunk, dtype=np.uint8)
    stream = cuda.stream()
    extra = {**base, "chunks_per_sample": n_chunks, "simulated": SIMULATED}
    rows = []
    try:
        for variant in ("serial", "pipelined"):
            samples = []
            for r in range(reps):
                start = (r * n_chunks * chunk) % max(ALIGN, file_size - n_chunks * chunk + 1) // ALIGN * ALIGN
                t = time.perf_counter()
                if variant == "serial":
                    for j in range(n_chunks):
                        _read_exact(fd, views[0], start + j * chunk)
                        dev.copy_to_device(pinned[0], stream=stream)
                        stream.synchronize()
                else:
                    _read_exact(fd, views[0], start)
                    for j in range(n_chunks):
                        dev.copy_to_device(pinned[j % 2], stream=stream)  # async from pinned memory
                        if j + 1 < n_chunks:
                            _read_exact(fd, views[(j + 1) % 2], start + (j + 1) * chunk)
                        stream.synchronize()
                samples.append((time.perf_counter() - t) / n_chunks)
            if not np.array_equal(dev.copy_to_host()[:64], pinned[(n_chunks - 1) % 2 if variant == "pipelined"
                                                                   else 0][:64]):
                raise AssertionError("device copy does not hold the bytes read")
            rows.append(make_row(PART_NAME, f"disk_to_gpu_{variant}", samples, x=chunk, nbytes=chunk,
                                 extra=extra))
    finally:
        for v in views:
            v.release()
        synchronize()
    return rows


PART = Part(
    name=PART_NAME,
    description="O_DIRECT disk reads vs request size (seq/random) and disk->pinned->GPU chunked copies",
    requires=("numba.cuda",),
    coords="x=request or chunk bytes (median_s per request/chunk), y=-, z=-",
    run=run,
)
