"""Crash-safe results directories: atomic files, a final ``DONE`` marker, verification, and reaping what
a killed process left behind.

A results directory is complete only when its ``DONE`` marker (JSON, written last, by temp-and-rename)
lists every result file with its size and sha256 and every listed file matches. Every file is written
to a temporary name in the same directory and renamed into place, so a reader sees a file whole or
not at all; a kill leaves at most ``.NAME.tmp-PID`` files, which :func:`clear_partial` removes.

    with atomic_path(out / "requests.parquet") as tmp:   # write tmp; renamed on success
        pq.write_table(table, tmp)
    write_text_atomic(out / "summary.json", text)
    write_marker(out, ["requests.parquet", "summary.json"], config_hash=h)   # last
    verify(out)          # -> None when complete, else the reason it is not

Files whose bytes change from run to run (``timing.json``: wall-clock figures) are listed as
``volatile``, checked for presence only, so for the same config and seed the marker is byte-identical
too.

Spill directories (``tiersim-steps-PID-*`` in the temp folder) are removed when the process exits
normally or by a signal it can catch; one killed with SIGKILL leaves its directory, and
:func:`reap_spill_dirs` (called when a simulation or a sweep starts) removes those of dead processes.

``TIERSIM_KILL_AT=POINT:FLAGFILE`` makes the process SIGKILL itself at the named write point the first
time it gets there (the flag file records that it did): the crash-safety tests use it to kill at
``parquet`` (half-way through writing steps.parquet), ``between`` (after summary.json, before the rest),
``marker`` (half-way through the marker) and ``publish`` (a sweep run renamed into place, not yet
indexed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MARKER = "DONE"
MARKER_FORMAT = 1
SPILL_PREFIX = "tiersim-steps-"
_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


# ------------------------------------------------------------------ test hook
def kill_point(name: str, group: bool = False) -> None:
    """SIGKILL this process at write point ``name`` if ``TIERSIM_KILL_AT`` asks for it (once); with
    ``group``, its whole process group (a sweep driver with its workers)."""
    spec = os.environ.get("TIERSIM_KILL_AT")
    if not spec:
        return
    point, _, flag = spec.partition(":")
    if point != name or not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{name} {os.getpid()}\n".encode())
    os.close(fd)
    if group:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ atomic files
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block ends without an error, removed
    when it raises."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ the marker
def marker_text(out: Path, files: Iterable[str], volatile: Iterable[str] = (), **extra) -> str:
    entries = {}
    for name in sorted(set(files)):
        p = out / name
        entries[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return json.dumps({"format": MARKER_FORMAT, "files": entries, "volatile": sorted(set(volatile)), **extra},
                      indent=1, sort_keys=True) + "\n"


def write_marker(out: str | Path, files: Iterable[str], volatile: Iterable[str] = (), **extra) -> None:
    """Write ``DONE`` last: the listed files' sizes and checksums, the ``volatile`` files' names (checked
    for presence), and ``extra`` (e.g. the config hash)."""
    out = Path(out)
    data = marker_text(out, files, volatile, **extra).encode()
    with atomic_path(out / MARKER) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            kill_point("marker")
            fh.write(data[len(data) // 2:])


def remove_marker(out: str | Path) -> None:
    """Before a directory is rewritten: it is not complete until the new marker is written."""
    with contextlib.suppress(FileNotFoundError):
        (Path(out) / MARKER).unlink()


def read_marker(out: str | Path) -> dict | None:
    try:
        data = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps")


def _probe_writable(folder: Path, path: Path, option: str) -> None:
    """Create and remove a temporary file in ``folder`` (what ``tiersim run`` does with its --out): a
    read-only or full file system fails here, before any work, not when the result is written."""
    from sim.errors import TiersimError

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise TiersimError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                           f"choose another {option}") from None


def check_output_file(path: str | Path, option: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """``path`` as a file a command may write (before it does any work), or a TiersimError naming
    ``option``: its folder must exist and be writable, it must not be a directory, and its suffix must be
    one of ``suffixes`` when given."""
    from sim.errors import TiersimError

    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise TiersimError(f"{option} {path}: cannot write a {path.suffix or 'suffix-less'} file; "
                           f"use {', '.join(suffixes)}")
    if path.is_dir():
        raise TiersimError(f"{option} {path}: is a directory; name a file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise TiersimError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not parent.is_dir():
        raise TiersimError(f"{option} {path}: folder {parent} does not exist; create it or choose another path")
    _probe_writable(parent, path, option)
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """``path`` as a folder a command may create or write into (before it does any work), or a
    TiersimError naming ``option``: it and its existing parents must be folders, and the deepest
    existing one writable. Creates nothing."""
    from sim.errors import TiersimError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TiersimError(f"{option} {path}: is a file; name a folder (it is created if missing)")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise TiersimError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    _probe_writable(existing, path, option)
    return path


def verify(out: str | Path, *, checksums: bool = True) -> str | None:
    """None when ``out`` holds a complete results directory, else why not (one line)."""
    out = Path(out)
    if not out.is_dir():
        return "a file, not a directory" if out.exists() else "no such directory"
    marker = read_marker(out)
    if marker is None:
        return f"no {MARKER} marker" if not (out / MARKER).exists() else f"unreadable {MARKER} marker"
    if marker.get("format") != MARKER_FORMAT:    # its files may lack or rename what this version reads
        return (f"written by an incompatible tiersim (results format {marker.get('format', 'unknown')}; this "
                f"version reads {MARKER_FORMAT})")
    for name, want in marker["files"].items():
        p = out / name
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, the marker says {want.get('bytes')}"
        if checksums and sha256_file(p) != want.get("sha256"):
            return f"{name} does not match its checksum"
    for name in marker.get("volatile") or []:
        if not (out / name).is_file():
            return f"{name} is missing"
    return None


def clear_partial(out: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer left in ``out``; returns them."""
    out = Path(out)
    gone = []
    if out.is_dir():
        for p in out.iterdir():
            if _TMP.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    gone.append(p)
    return gone


# ------------------------------------------------------------------ spill directories
def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed process whose parent died too stays a zombie until init reaps it, which a container's
    # init may do late: its spill directory is as dead as it is
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    return True


def new_spill_dir() -> Path:
    """A fresh ``tiersim-steps-PID-*`` directory in the temp folder, removed at exit (see
    :func:`reap_spill_dirs` for a process that was killed)."""
    d = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
    _cleanup.add(d)
    return d


def release_spill_dir(d: str | Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
    _cleanup.discard(Path(d))


def reap_spill_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove spill directories whose process is gone (killed before it could clean up)."""
    root = Path(root or tempfile.gettempdir())
    gone = []
    with contextlib.suppress(OSError):
        for p in root.glob(f"{SPILL_PREFIX}*"):
            m = re.match(rf"^{SPILL_PREFIX}(\d+)-", p.name)
            if m and not pid_alive(int(m.group(1))) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


class _Cleanup:
    """Spill directories of this process, removed at interpreter exit and on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self.dirs: set[Path] = set()
        self.installed = False

    def add(self, d: Path) -> None:
        self.dirs.add(d)
        if not self.installed:
            import atexit

            atexit.register(self.run)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ValueError, OSError):   # not the main thread: atexit only
                    if signal.getsignal(sig) in (signal.SIG_DFL, None):
                        signal.signal(sig, self._on_signal)
            self.installed = True

    def discard(self, d: Path) -> None:
        self.dirs.discard(d)

    def run(self) -> None:
        for d in list(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()

    def _on_signal(self, signum, frame) -> None:
        self.run()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_cleanup = _Cleanup()
