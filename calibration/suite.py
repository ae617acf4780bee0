"""The calibration suite: runs the parts in order and writes raw measurements plus metadata.

Layout of ``out_dir``::

    raw/<part>.parquet   rows of one part (calibration.raw.RAW_COLUMNS), written atomically when it ends
    metadata.json        device, libraries, code version, command line, and per part: status
                         (done / skipped with reason / failed with error), rows, elapsed seconds
    logs/<part>.log      full output of a part run in its own process

Each part is isolated: an exception is recorded as that part's failure and the suite goes on. On a real
GPU each part runs in its own process by default, so that a sticky CUDA error or a crash in one part
cannot take the others down, and a hard timeout bounds it. Resuming (the default) skips parts whose raw
file exists and refuses a directory measured on another device (fingerprint) or with other settings.

Parts (``PARTS``, loaded on first use): the Numba-CUDA parts of ``calibration.kernels`` and every module
of ``calibration.vendor`` that exposes ``PART`` (its ``PART_MODULES`` order first); an absent package is
fine, and a module that fails to import is recorded in ``PART_IMPORT_ERRORS`` and reported when selected.
This module must not import simpy or ``sim.engine`` (it runs on device machines without them).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from calibration import device_info
from calibration.raw import RAW_COLUMNS, Part, PartContext, model_shape, rows_to_frame
from sim.errors import ConfigError

NUMBA_PART_MODULES = ("launch", "hbm_stream", "sm_fma", "pcie", "kv_gather", "decode_attention", "topk",
                      "persistent", "storage")
DEFAULT_MODELS = ("llama-3.1-8b", "llama-3.2-1b")
FULL_BUDGET_S = 40.0          # soft per-part budget in full mode (parts stop their grid early)
# Parts whose full grids need longer than the default budget get this many times it.
BUDGET_SCALE = {"validation": 4.5, "attention": 2.0, "gemm": 2.0, "ops": 1.5}
SCHEMA_VERSION = 1
PROGRESS_TAG = "@@tiersim-progress@@ "


# ---------------------------------------------------------------------------------------------- registry
def _load_parts() -> tuple[dict[str, Part], dict[str, str]]:
    """name → Part in suite order, and module → why it could not be loaded."""
    parts: dict[str, Part] = {}
    problems: dict[str, str] = {}

    def add(modname: str, label: str, helper_ok: bool = False) -> None:
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            problems[label] = f"import of {modname} failed: {type(exc).__name__}: {exc}"
            return
        part = getattr(module, "PART", None)
        if part is None and helper_ok:
            return  # a shared helper module of the package, not a part
        if not isinstance(part, Part):
            problems[label] = f"{modname} has no PART (a calibration.raw.Part)"
        elif part.name in parts:
            problems[label] = f"{modname}: duplicate part name {part.name!r}"
        else:
            parts[part.name] = part

    for name in NUMBA_PART_MODULES:
        add(f"calibration.kernels.{name}", name)
    try:
        vendor = importlib.import_module("calibration.vendor")
    except ModuleNotFoundError:
        vendor = None  # no vendor parts in this checkout
    except Exception as exc:
        problems["vendor"] = f"import of calibration.vendor failed: {type(exc).__name__}: {exc}"
        vendor = None
    if vendor is not None and hasattr(vendor, "__path__"):
        # the package's own order first (PART_MODULES), then any other module that has a PART
        listed = [str(m) for m in getattr(vendor, "PART_MODULES", ())]
        others = sorted(f"calibration.vendor.{info.name}" for info in pkgutil.iter_modules(vendor.__path__)
                        if not info.name.startswith("_"))
        for modname in listed + [m for m in others if m not in listed]:
            add(modname, modname.rsplit(".", 1)[-1], helper_ok=modname not in listed)
    return parts, problems


def _registry() -> tuple[dict[str, Part], dict[str, str]]:
    """``PARTS`` and ``PART_IMPORT_ERRORS``, loaded on first use (or as a test has replaced them)."""
    g = globals()
    if "PARTS" not in g or "PART_IMPORT_ERRORS" not in g:
        parts, problems = _load_parts()
        g.setdefault("PARTS", parts)
        g.setdefault("PART_IMPORT_ERRORS", problems)
    return g["PARTS"], g["PART_IMPORT_ERRORS"]


def __getattr__(name: str):
    """Module attributes ``PARTS`` (name → Part, in suite order) and ``PART_IMPORT_ERRORS``, lazily."""
    if name == "PARTS":
        return _registry()[0]
    if name == "PART_IMPORT_ERRORS":
        return _registry()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_part_names() -> list[str]:
    """Registered parts, then modules that failed to load (they are reported when selected)."""
    parts, problems = _registry()
    return list(parts) + [name for name in problems if name not in parts]


def resolve_parts(parts: Iterable[str] | str | None) -> list[str]:
    """Part names in suite order; unknown names raise ConfigError listing the known ones."""
    known = known_part_names()
    if parts is None:
        return known
    wanted = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise ConfigError(f"unknown calibration part{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(u) for u in unknown)}; known parts: {', '.join(known)}")
    if not wanted:
        raise ConfigError(f"no calibration parts selected; known parts: {', '.join(known)}")
    return [p for p in known if p in wanted]


def missing_requirements(part: Part) -> str:
    """Why ``part`` cannot run here ('' if it can): the first required module that does not import."""
    for module in part.requires:
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"requires {module}, which is not importable ({type(exc).__name__}: {exc})"
    return ""


# ---------------------------------------------------------------------------------------------- helpers
def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def code_version() -> str:
    """``git describe --always --dirty`` where the checkout has git; otherwise (the device machines get
    a copy of the working tree without .git) the package version plus a hash of the sources that
    decide what is measured and how: ``calibration/`` and ``sim/costs/``."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted([*root.glob("calibration/**/*.py"), *root.glob("sim/costs/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        from importlib.metadata import version

        pkg = version("tiersim")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a copied tree)
        pkg = "0.1.0"
    return f"tiersim-{pkg}+src.{digest.hexdigest()[:12]}"


def command_line() -> str:
    """How this process was started, as a shell line (``python -m calibration ...`` spelled so)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("calibration", "__main__.py")):
        argv = [Path(sys.executable).name, "-m", "calibration"] + argv[1:]
    return shlex.join(argv)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _valid_rows(rows: list) -> tuple[list[dict], int]:
    """Rows with every raw column and a finite positive median; the count of rows dropped."""
    good = []
    for row in rows:
        try:
            ok = (isinstance(row, dict) and all(c in row for c in RAW_COLUMNS)
                  and math.isfinite(float(row["median_s"])) and float(row["median_s"]) > 0)
        except (TypeError, ValueError):
            ok = False
        if ok:
            good.append(row)
    return good, len(rows) - len(good)


def write_rows(rows: list[dict], path: Path) -> int:
    """Write rows as Parquet through a temporary file and a rename (never a half-written file)."""
    frame = rows_to_frame(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return len(frame)


def _parquet_rows(path: Path) -> int | None:
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:
        return None


def _simulating() -> bool:
    from calibration.kernels.runtime import simulating

    return simulating()


# ---------------------------------------------------------------------------------------------- running
def _run_in_process(part: Part, ctx: PartContext, raw_path: Path) -> dict:
    try:
        rows = part.run(ctx)
        rows, dropped = _valid_rows(list(rows))
        entry = {"status": "done", "rows": write_rows(rows, raw_path)}
        if dropped:
            entry["dropped_invalid_rows"] = dropped
        return entry
    except Exception as exc:
        return {"status": "failed", "error_type": type(exc).__name__, "error": str(exc)[:2000],
                "traceback": traceback.format_exc(limit=8)[-4000:]}
    finally:
        _release_device_memory()


def _release_device_memory() -> None:
    """Free what the part left allocated before the next part runs (in-process runs share a context)."""
    runtime = sys.modules.get("calibration.kernels.runtime")
    if runtime is not None:
        runtime.release_memory()


def _run_isolated(name: str, ctx: PartContext, models: tuple[str, ...], raw_path: Path, logs: Path,
                  timeout_s: float | None) -> dict:
    """Run one part in a child Python process; its output goes to logs/<name>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    tmp_rows = raw_path.with_name(f".{raw_path.name}.child-{os.getpid()}")
    result_path = logs / f"{name}.result.json"
    spec_path = logs / f"{name}.spec.json"
    result_path.unlink(missing_ok=True)
    spec = {"part": name, "quick": ctx.quick, "models": list(models), "scratch_dir": str(ctx.scratch_dir),
            "budget_s": ctx.budget_s if math.isfinite(ctx.budget_s) else None,
            "rows_path": str(tmp_rows), "result_path": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c",
           "import sys; from calibration.suite import child_main; sys.exit(child_main(sys.argv[1]))",
           str(spec_path)]
    log_path = logs / f"{name}.log"
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                if line.startswith(PROGRESS_TAG):
                    ctx.progress(line[len(PROGRESS_TAG):])
                else:
                    tail.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # our child's own process group (start_new_session)
            proc.wait()
        reader.join(timeout=10)
    entry: dict = {"log": str(log_path.relative_to(logs.parent))}
    if timed_out:
        entry.update(status="failed", error_type="Timeout",
                     error=f"part process killed after {timeout_s:g} s")
    elif result_path.exists():
        entry.update(json.loads(result_path.read_text()))
        if entry.get("status") == "done":
            os.replace(tmp_rows, raw_path)
    else:
        entry.update(status="failed", error_type="ChildExit",
                     error=f"part process exited with status {proc.returncode} without a result; "
                           f"last output: {' | '.join(list(tail)[-5:])}")
    tmp_rows.unlink(missing_ok=True)
    for p in (spec_path, result_path):
        p.unlink(missing_ok=True)
    return entry


def child_main(spec_path: str) -> int:
    """Entry point of an isolated part process (see ``_run_isolated``)."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict
    try:
        parts, problems = _registry()
        part = parts.get(spec["part"])
        if part is None:
            raise RuntimeError(f"part {spec['part']!r} is not registered in the child process "
                               f"({problems.get(spec['part'], 'unknown')})")
        budget = spec.get("budget_s")
        ctx = PartContext(quick=bool(spec["quick"]), simulate=_simulating(),
                          models=tuple(model_shape(m) for m in spec["models"]),
                          scratch_dir=Path(spec["scratch_dir"]),
                          progress=lambda msg: print(PROGRESS_TAG + msg, flush=True),
                          budget_s=math.inf if budget is None else float(budget))
        result = _run_in_process(part, ctx, Path(spec["rows_path"]))
    except BaseException as exc:  # report anything, even SystemExit from a library
        result = {"status": "failed", "error_type": type(exc).__name__, "error": str(exc)[:2000],
                  "traceback": traceback.format_exc(limit=8)[-4000:]}
    Path(spec["result_path"]).write_text(json.dumps(result))
    sys.stdout.flush()
    return 0


def run_suite(out_dir: str | Path, parts: Iterable[str] | str | None = None, quick: bool = False,
              models: Iterable[str] = DEFAULT_MODELS, resume: bool = True,
              progress: Callable[[str], None] = print, *, budget_s: float | None = None,
              isolate: bool | None = None, scratch_dir: str | Path | None = None) -> dict:
    """Run the selected parts in order; returns a summary (``ok``, ``done``, ``skipped``, ``failed``, ...).

    ``budget_s``: soft seconds per part (default 40 in full mode, none in quick mode). ``isolate``: run
    each part in its own process (default: on a real GPU yes, under the simulator no).
    Raises ConfigError for unknown parts or models, or a directory that cannot be resumed.
    """
    out = Path(out_dir)
    names = resolve_parts(parts)
    models = tuple(models)
    shapes = tuple(model_shape(m) for m in models)  # ConfigError names unknown models
    simulate = _simulating()
    if isolate is None:
        isolate = not simulate
    if budget_s is None:
        budget_s = math.inf if quick else FULL_BUDGET_S
    out.mkdir(parents=True, exist_ok=True)
    raw_dir, logs = out / "raw", out / "logs"
    raw_dir.mkdir(exist_ok=True)
    scratch = Path(scratch_dir) if scratch_dir else out / "scratch"
    meta_path = out / "metadata.json"

    device = device_info.collect()
    previous: dict = {}
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            if resume:
                raise ConfigError(f"{meta_path} is unreadable ({exc}); "
                                  f"use --no-resume or another --out") from None
    if resume and previous:
        if previous.get("fingerprint") != device["fingerprint"]:
            old = previous.get("device", {}).get("gpu", {}).get("name", "?")
            raise ConfigError(f"{out} was measured on another device ({old}, fingerprint "
                              f"{previous.get('fingerprint')}); this one is {device['gpu'].get('name', '?')} "
                              f"({device['fingerprint']}): use another --out or --no-resume")
        if bool(previous.get("quick")) != bool(quick):
            raise ConfigError(f"{out} holds a {'quick' if previous.get('quick') else 'full'} calibration; "
                              f"resuming it {'with' if quick else 'without'} --quick would mix the two: "
                              f"use another --out or --no-resume")
        if list(previous.get("models", [])) != list(models):
            raise ConfigError(f"{out} was measured for models {previous.get('models')}, not {list(models)}: "
                              f"use another --out or --no-resume")
    if not resume and previous:
        same = (previous.get("fingerprint") == device["fingerprint"] and bool(previous.get("quick")) == quick
                and list(previous.get("models", [])) == list(models))
        if not same:  # set aside raw files of another device or settings, so they never mix with these
            stale = [p for p in raw_dir.glob("*.parquet")]
            if stale:
                aside = raw_dir / f"stale-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
                aside.mkdir(exist_ok=True)
                for p in stale:
                    os.replace(p, aside / p.name)
                progress(f"moved {len(stale)} raw files of an earlier, different calibration to {aside}")
            previous = {}
    keep_previous = bool(previous)
    run_record = {"started_utc": utc_now(), "command_line": command_line(), "code_version": code_version(),
                  "parts_selected": names, "isolated": isolate}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": previous.get("created_utc", run_record["started_utc"]),
        "updated_utc": run_record["started_utc"],
        "code_version": run_record["code_version"],
        "command_line": run_record["command_line"],
        "quick": bool(quick),
        "simulated": simulate,
        "models": list(models),
        "budget_s_per_part": budget_s if math.isfinite(budget_s) else None,
        "fingerprint": device["fingerprint"],
        "device": device,
        "part_import_errors": _registry()[1],
        "parts": dict(previous.get("parts", {})) if keep_previous else {},
        "runs": (list(previous.get("runs", [])) if keep_previous else []) + [run_record],
    }
    _write_json_atomic(meta_path, meta)

    total = len(names)
    summary: dict = {"out_dir": str(out), "metadata": str(meta_path), "done": [], "skipped": [], "failed": [],
                     "resumed": [], "parts": {}}
    for i, name in enumerate(names, 1):
        prefix = f"[{i}/{total}] {name}"
        raw_path = raw_dir / f"{name}.parquet"
        if resume and raw_path.exists():
            entry = dict(meta["parts"].get(name) or {})
            if entry.get("status") != "done":
                entry = {"status": "done", "rows": _parquet_rows(raw_path)}
            entry["resumed"] = True
            meta["parts"][name] = entry
            summary["resumed"].append(name)
            summary["done"].append(name)
            summary["parts"][name] = entry
            progress(f"{prefix}: already measured ({entry.get('rows')} rows), skipping")
            continue
        t0 = time.monotonic()
        part = _registry()[0].get(name)
        if part is None:  # its module did not import
            reason = _registry()[1].get(name, "not registered")
            missing_module = "ModuleNotFoundError" in reason or "ImportError" in reason
            entry = {"status": "skipped" if missing_module else "failed", "reason": reason}
            if not missing_module:
                entry.update(error_type="ImportError", error=reason)
        elif why := missing_requirements(part):
            entry = {"status": "skipped", "reason": why}
        elif "numba.cuda" in part.requires and not device["gpu"].get("available"):
            entry = {"status": "skipped",
                     "reason": f"no CUDA device: {device['gpu'].get('reason', '')} "
                               f"(NUMBA_ENABLE_CUDASIM=1 runs the parts in numba's simulator)"}
        else:
            progress(f"{prefix}: started{' (own process)' if isolate else ''}")

            def part_progress(msg: str, prefix: str = prefix, t0: float = t0) -> None:
                progress(f"{prefix} {time.monotonic() - t0:6.1f}s | {msg}")

            part_budget = budget_s * BUDGET_SCALE.get(name, 1.0)
            ctx = PartContext(quick=quick, simulate=simulate, models=shapes, scratch_dir=scratch,
                              progress=part_progress, budget_s=part_budget)
            try:
                if isolate:
                    timeout = 3 * part_budget + 180 if math.isfinite(part_budget) else 1800.0
                    entry = _run_isolated(name, ctx, models, raw_path, logs, timeout)
                else:
                    entry = _run_in_process(part, ctx, raw_path)
            except KeyboardInterrupt:
                meta["parts"][name] = {"status": "failed", "error_type": "KeyboardInterrupt",
                                       "error": "interrupted", "elapsed_s": round(time.monotonic() - t0, 3)}
                meta["updated_utc"] = utc_now()
                _write_json_atomic(meta_path, meta)
                raise
        entry["elapsed_s"] = round(time.monotonic() - t0, 3)
        entry["finished_utc"] = utc_now()
        meta["parts"][name] = entry
        meta["updated_utc"] = entry["finished_utc"]
        _write_json_atomic(meta_path, meta)
        summary[entry["status"]].append(name)
        summary["parts"][name] = entry
        if entry["status"] == "done":
            progress(f"{prefix}: done, {entry.get('rows')} rows in {entry['elapsed_s']:.1f} s")
        elif entry["status"] == "skipped":
            progress(f"{prefix}: skipped: {entry['reason']}")
        else:
            progress(f"{prefix}: FAILED after {entry['elapsed_s']:.1f} s: {entry.get('error_type')}: "
                     f"{str(entry.get('error', ''))[:300]}")
    try:
        scratch.rmdir()  # only if the parts left it empty
    except OSError:
        pass
    summary["ok"] = not summary["failed"]
    return summary
