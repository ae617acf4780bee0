"""One lease of issue 16 on one H200, in one command, within a time budget.

    PYTHONUNBUFFERED=1 python3 -m calibration.gpu16 --out $OUT/gpu16 --budget-s 270 --lease 1

The parts of :data:`calibration.gpu16.plan.LEASE_PARTS` run in order of value, each in its own Python
process (a sticky CUDA error, a hang or an out-of-memory in one part cannot take the others down) with a
soft budget it plans its grid by and a hard timeout. A part hands its rows over as it goes
(:class:`Sink`), so a part killed at its timeout still keeps what it finished; after every part the
command rewrites its three outputs:

    DIR/rows.parquet   every raw row (calibration.raw.RAW_COLUMNS; the ``part`` column says whose)
    DIR/meta.json      plan, per-part status and timing, device, libraries, capabilities found
                       (fp8, green contexts, fp8-KV attention), CUDA kernel counts, clocks before/after
    DIR/log.txt        everything printed

The plan (each part's estimate) is printed first and a summary table last; with the committed
predictions in the repository (``calibration/tables/h200/validation/gpu16/``) the summary also shows
the steps' median error against them. ``--quick`` runs tiny grids (the CPU, ``NUMBA_ENABLE_CUDASIM=1``,
tests); ``--parts`` a subset; ``--in-process`` no child processes (tests).

Unpack the returned files with ``python -m calibration.gpu16.ingest FILES_AT/gpu16 --name lease1``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from calibration.gpu16 import plan as lease_plan
from calibration.raw import RAW_COLUMNS, PartContext

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_RESERVE_S = 6.0        # kept back at the end: packing, the summary, nvidia-smi
STARTUP_S = 7.0             # a part process's start: Python, torch import, CUDA context
MIN_PART_S = 12.0           # a part with less than this left is skipped
MAX_SCALE = 1.3             # a part may get at most this much more than its estimate
TIMEOUT_SLACK = 1.5         # hard timeout = soft budget x this + TIMEOUT_EXTRA_S (capped by what is left)
TIMEOUT_EXTRA_S = 15.0
TAG = "@@gpu16@@ "
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_rows(rows: list[dict], path: Path) -> int:
    """Rows (the raw schema) to Parquet, atomically; returns the count."""
    from calibration.raw import rows_to_frame
    from calibration.suite import _valid_rows

    good, _ = _valid_rows(rows)
    _atomic_write(path, lambda p: rows_to_frame(good).to_parquet(p, index=False))
    return len(good)


def write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n"))


class Sink:
    """What a part has produced so far: raw rows and its metadata (capabilities, counts, notes).

    ``flush`` writes both atomically, so the parent finds the last flushed state even when it had to kill
    the part. Invariant: every row has the raw schema's columns; rows without a finite positive median
    (failure rows) are kept in ``meta["failures"]`` as text, not written.
    """

    def __init__(self, rows_path: Path | None = None, meta_path: Path | None = None) -> None:
        self.rows: list[dict] = []
        self.meta: dict = {"failures": []}
        self.rows_path, self.meta_path = rows_path, meta_path

    def add(self, *rows: dict) -> None:
        for row in rows:
            missing = [c for c in RAW_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"row of {row.get('part')} lacks {missing}")
            med = float(row["median_s"])
            if math.isfinite(med) and med > 0:
                self.rows.append(row)
            else:
                extra = json.loads(row.get("extra") or "{}")
                self.meta["failures"].append(f"{row['part']}/{row['variant']} {row['op']} {row['key']} "
                                             f"x={row['x']:g} y={row['y']:g} z={row['z']:g}: "
                                             f"{extra.get('error', 'no timing')}"[:400])

    def flush(self) -> None:
        if self.rows_path is not None:
            write_rows(self.rows, self.rows_path)
        if self.meta_path is not None:
            write_json(self.meta_path, self.meta)


def part_runner(name: str):
    """The ``run(part, ctx, sink)`` function of a part."""
    module = importlib.import_module(f"calibration.gpu16.{lease_plan.part_plan(name).module}")
    return module.run


def _simulating() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def run_part_here(name: str, quick: bool, budget_s: float, sink: Sink, progress) -> dict:
    """Run one part in this process; returns its status entry (the rows and notes are in ``sink``)."""
    t0 = time.monotonic()

    def say(msg: str) -> None:
        progress(f"[{name} {time.monotonic() - t0:6.1f}s] {msg}")

    ctx = PartContext(quick=quick, simulate=_simulating(), progress=say, budget_s=budget_s,
                      scratch_dir=Path(tempfile.gettempdir()))
    try:
        part_runner(name)(name, ctx, sink)
        entry = {"status": "done"}
    except Exception as exc:  # noqa: BLE001 - a part's failure is recorded, the lease goes on
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:600]}",
                 "traceback": traceback.format_exc(limit=8)[-3000:]}
        say(f"FAILED: {entry['error']}")
    finally:
        try:
            sink.flush()
        except Exception as exc:  # noqa: BLE001
            entry = {"status": "failed", "error": f"flush: {type(exc).__name__}: {exc}"}
    entry["elapsed_s"] = round(time.monotonic() - t0, 2)
    return entry


def child_main(spec_path: str) -> int:
    """A part's own process: read the spec, run the part, flush its sink, write its status."""
    spec = json.loads(Path(spec_path).read_text())
    sink = Sink(Path(spec["rows_path"]), Path(spec["meta_path"]))
    entry = run_part_here(spec["part"], bool(spec["quick"]), float(spec["budget_s"]), sink,
                          lambda m: print(TAG + m, flush=True))
    Path(spec["result_path"]).write_text(json.dumps(entry))
    return 0


def _run_child(name: str, quick: bool, budget_s: float, timeout_s: float, work: Path, say) -> tuple[dict, list, dict]:
    """One part in a child process; returns (status entry, rows, part meta)."""
    spec = {"part": name, "quick": quick, "budget_s": budget_s, "rows_path": str(work / f"{name}.parquet"),
            "meta_path": str(work / f"{name}.json"), "result_path": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **SAFE_ENV)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "import sys; from calibration.gpu16.run import child_main; "
           "sys.exit(child_main(sys.argv[1]))", str(spec_path)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            cwd=str(REPO_ROOT), start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(TAG):
                say(line[len(TAG):])
            elif line.strip():
                say(f"[{name}] | {line}")
                tail.append(line)
                del tail[:-8]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)   # the child's own process group (start_new_session): only what we started
        proc.wait()
    reader.join(timeout=5)
    result_path = Path(spec["result_path"])
    if result_path.exists():
        entry = json.loads(result_path.read_text())
    elif timed_out:
        entry = {"status": "timeout", "error": f"killed after {timeout_s:.0f} s; rows flushed before that are kept"}
    else:
        entry = {"status": "failed", "error": f"exited {proc.returncode} without a result: {' | '.join(tail[-3:])}"}
    entry["elapsed_s"] = round(time.monotonic() - t0, 2)
    rows: list = []
    if Path(spec["rows_path"]).exists():
        import pandas as pd

        rows = pd.read_parquet(spec["rows_path"]).to_dict("records")
    meta = json.loads(Path(spec["meta_path"]).read_text()) if Path(spec["meta_path"]).exists() else {}
    return entry, rows, meta


def nvidia_smi() -> str:
    """The GPU's clocks, power and temperature as found (read only; '' where there is no nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,"
                              "power.draw,temperature.gpu,utilization.gpu,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _code_version() -> str:
    from calibration.suite import code_version

    return code_version()


def budgets(estimates: list[float], left_s: float) -> tuple[float, float]:
    """(soft budget, hard timeout) of the first of ``estimates`` with ``left_s`` seconds left: its
    estimate scaled by what is left over what all remaining parts plan (at most :data:`MAX_SCALE`)."""
    usable = left_s - PACK_RESERVE_S
    scale = min(MAX_SCALE, usable / max(sum(estimates), 1e-9))
    soft = estimates[0] * scale
    return soft, min(usable, soft * TIMEOUT_SLACK + TIMEOUT_EXTRA_S)


def run_lease(out: Path, budget_s: float = 270.0, quick: bool = False, parts: list[str] | None = None,
              lease: str = "1", isolate: bool = True, echo=print) -> dict:
    """Run the lease's parts into ``out`` (rows.parquet, meta.json, log.txt); returns the meta."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a", encoding="utf-8")

    def say(msg: str) -> None:
        echo(msg)
        log.write(msg + "\n")
        log.flush()

    t_start = time.monotonic()
    deadline = t_start + budget_s
    chosen = [p for p in lease_plan.LEASE_PARTS if parts is None or p.name in parts]
    from calibration.device_info import host_info, library_versions

    meta: dict = {"issue": 16, "lease": lease, "started_utc": utc_now(), "budget_s": budget_s, "quick": quick,
                  "command_line": shlex.join([Path(sys.executable).name, "-m", "calibration.gpu16", *sys.argv[1:]]),
                  "code_version": _code_version(), "simulated": _simulating(), "host": host_info(),
                  "libraries": library_versions(), "nvidia_smi_before": nvidia_smi(),
                  "plan": [{"part": p.name, "estimate_s": p.quick_estimate_s if quick else p.estimate_s,
                            "what": p.what} for p in chosen],
                  "parts": {}}
    say(f"tiersim issue 16, lease {lease}: {len(chosen)} parts in {budget_s:.0f} s "
        f"({'quick' if quick else 'full'} grids{', simulated' if meta['simulated'] else ''}); out {out}")
    say(f"{'#':>2}  {'part':16}{'est s':>6}  what")
    for i, p in enumerate(meta["plan"], 1):
        say(f"{i:>2}  {p['part']:16}{p['estimate_s']:>6.0f}  {p['what']}")
    say(f"    {'total':16}{sum(p['estimate_s'] for p in meta['plan']):>6.0f}  (+ {PACK_RESERVE_S:.0f} s packing)")
    all_rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="gpu16-"))   # the children's files stay outside $OUT
    try:
        for i, p in enumerate(meta["plan"]):
            name = p["part"]
            left = deadline - time.monotonic()
            soft, hard = budgets([q["estimate_s"] for q in meta["plan"][i:]], left)
            if soft < MIN_PART_S and not quick:
                meta["parts"][name] = {"status": "skipped", "reason": f"{left:.0f} s left of the budget"}
                say(f"== {name}: skipped, {left:.0f} s left")
                continue
            part_budget = max(soft - (STARTUP_S if isolate else 0.0), 5.0)
            say(f"== {name}: budget {soft:.0f} s (timeout {hard:.0f} s), {left:.0f} s left")
            if isolate:
                entry, rows, part_meta = _run_child(name, quick, part_budget, hard, work, say)
            else:
                sink = Sink()
                entry = run_part_here(name, quick, part_budget, sink, say)
                rows, part_meta = sink.rows, sink.meta
            entry.update(planned_s=p["estimate_s"], budget_s=round(soft, 1), timeout_s=round(hard, 1),
                         rows=len(rows), **part_meta)
            meta["parts"][name] = entry
            all_rows.extend(rows)
            meta["rows"] = write_rows(all_rows, out / "rows.parquet")
            meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
            write_json(out / "meta.json", meta)
            say(f"== {name}: {entry['status']}, {len(rows)} rows in {entry['elapsed_s']:.1f} s"
                + (f": {entry.get('error')}" if entry.get("error") else ""))
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        meta["nvidia_smi_after"] = nvidia_smi()
        meta["finished_utc"] = utc_now()
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        meta["rows"] = write_rows(all_rows, out / "rows.parquet")
        write_json(out / "meta.json", meta)
        for line in summary_lines(meta, out):
            say(line)
        log.close()
    return meta


def summary_lines(meta: dict, out: Path) -> list[str]:
    lines = ["", f"{'part':16}{'status':>9}{'rows':>6}{'time s':>8}{'plan s':>8}  note"]
    for p in meta["plan"]:
        e = meta["parts"].get(p["part"], {"status": "not run"})
        note = e.get("error") or e.get("reason") or e.get("headline", "")
        if e.get("failures"):
            note = (note + "; " if note else "") + f"{len(e['failures'])} points failed"
        lines.append(f"{p['part']:16}{e['status']:>9}{e.get('rows', 0):>6}{e.get('elapsed_s', 0):>8.1f}"
                     f"{p['estimate_s']:>8.0f}  {str(note)[:90]}")
    lines += _prediction_lines(out / "rows.parquet")
    lines.append(f"rows: {meta.get('rows', 0)} in {out / 'rows.parquet'}; meta: {out / 'meta.json'}; log: "
                 f"{out / 'log.txt'}; {meta.get('elapsed_s', 0):.0f} s of {meta['budget_s']:.0f}")
    return lines


def _prediction_lines(rows_path: Path) -> list[str]:
    """Median |error| of the measured steps against the committed predictions, per group and mode."""
    try:
        from calibration.gpu16.predict import latest_predictions
        from calibration.validate import STEP_PARTS, load_measurements, point_group, with_committed

        pred_path = latest_predictions()
        if pred_path is None or not rows_path.exists():
            return []
        import pandas as pd

        m = load_measurements([rows_path], parts=STEP_PARTS)
        pts = with_committed(m, pd.read_parquet(pred_path))
        if pts.empty:
            return [f"(no measured step has a prediction in {pred_path.name})"]
        pts["group"] = [point_group(r) for r in pts.itertuples(index=False)]
        lines = ["", f"steps vs {pred_path.name}: median / p95 |error|"]
        for (group, mode), g in pts.groupby(["group", "mode"]):
            e = g["abs_error"]
            lines.append(f"  {group:28}{mode:6}{len(g):>4} points {100 * e.median():6.1f} % "
                         f"{100 * e.quantile(0.95):6.1f} %")
        return lines
    except Exception as exc:  # noqa: BLE001 - the summary is informational
        return [f"(comparison with the predictions failed: {type(exc).__name__}: {exc})"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.gpu16", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output directory (rows.parquet, meta.json, log.txt); required")
    ap.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget of the whole command")
    ap.add_argument("--lease", default="1", help="label of this lease in the metadata (1, 2, ...)")
    ap.add_argument("--quick", action="store_true", help="tiny grids: CPU, NUMBA_ENABLE_CUDASIM=1, tests")
    ap.add_argument("--parts", default=None, help="comma-separated subset of: "
                    + ", ".join(p.name for p in lease_plan.LEASE_PARTS))
    ap.add_argument("--in-process", action="store_true", help="run the parts in this process (tests)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in lease_plan.LEASE_PARTS:
            print(f"{p.name:16}{p.estimate_s:>6.0f} s  {p.what}")
        return 0
    if not args.out:
        ap.error("--out DIR is required")
    parts = [s.strip() for s in args.parts.split(",")] if args.parts else None
    for name in parts or []:
        try:
            if lease_plan.part_plan(name) not in lease_plan.LEASE_PARTS:
                raise ValueError(f"{name!r} runs on several GPUs: python -m calibration.gpu16.tp")
        except ValueError as exc:
            print(f"python -m calibration.gpu16: error: {exc}", file=sys.stderr)
            return 2
    meta = run_lease(Path(args.out), args.budget_s, args.quick, parts, args.lease, not args.in_process)
    failed = [n for n, e in meta["parts"].items() if e["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
