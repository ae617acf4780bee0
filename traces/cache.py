"""A compact on-disk cache of parsed traces, so a run does not parse the same CSV or JSON again.

Parsing the bundled Azure CSV with pandas costs more than importing everything else a run needs, and
the result never changes. After a file is read, its canonical arrays are stored as one ``.npz``
(NumPy only; no pandas or pyarrow to load it) under the user cache directory, keyed by the file's
resolved path, size and modification time, the reader's options and this cache's format version. A
later read of the same unchanged file loads the arrays and rebuilds the :class:`Trace` (which
validates them again). A missing, stale or damaged entry is simply parsed again; a cache directory
that cannot be written is skipped. ``TIERSIM_CACHE_DIR`` moves the cache; ``TIERSIM_CACHE_DIR=off``
turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from traces.schema import Trace

FORMAT_VERSION = 3     # 2: the acceptance_rate column; 3: meta["out_of_order_rows"] (older entries are parsed again)
_ARRAYS = ("arrival_s", "prompt_tokens", "output_tokens", "request_id", "hash_offsets", "hash_values",
           "session_id", "priority", "tenant", "acceptance_rate")


def cache_dir() -> Path | None:
    """Where cached traces live, or None when caching is off."""
    env = os.environ.get("TIERSIM_CACHE_DIR")
    if env is not None:
        return None if env.lower() in ("", "0", "off", "none") else Path(env) / "traces"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tiersim" / "traces"


def _key(path: Path, format: str, options: dict[str, Any]) -> str | None:
    try:
        st = path.stat()
        resolved = str(path.resolve())
    except OSError:
        return None
    try:
        opts = json.dumps(options, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return None
    blob = json.dumps([FORMAT_VERSION, resolved, st.st_size, st.st_mtime_ns, format, opts])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(path: Path, format: str, options: dict[str, Any]) -> Trace | None:
    """The cached trace of ``path`` read as ``format`` with ``options``, or None."""
    root = cache_dir()
    key = _key(path, format, options)
    if root is None or key is None:
        return None
    f = root / f"{key}.npz"
    try:
        with np.load(f, allow_pickle=False) as z:
            info = json.loads(bytes(z["__info__"]).decode())
            arrays = {k: (z[k] if k in z.files else None) for k in _ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    for k in ("session_id", "tenant"):
        if arrays[k] is not None:
            arrays[k] = arrays[k].astype(object)
    try:
        return Trace(**arrays, hash_block_tokens=info["hash_block_tokens"], name=info["name"], source=info["source"],
                     meta=info["meta"])
    except Exception:   # noqa: BLE001 - a damaged entry is parsed again, never trusted
        return None


def store(path: Path, format: str, options: dict[str, Any], trace: Trace) -> None:
    """Keep ``trace`` for the next read of ``path`` (best effort: any failure just skips it)."""
    root = cache_dir()
    key = _key(path, format, options)
    if root is None or key is None:
        return
    arrays = {}
    for k in _ARRAYS:
        a = getattr(trace, k)
        if a is None:
            continue
        if a.dtype == object:
            a = a.astype(str)
        arrays[k] = a
    try:
        info = json.dumps({"hash_block_tokens": trace.hash_block_tokens, "name": trace.name,
                           "source": trace.source, "meta": trace.meta})
    except (TypeError, ValueError):
        return
    arrays["__info__"] = np.frombuffer(info.encode(), dtype=np.uint8)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, root / f"{key}.npz")
    except OSError:
        return
