"""Whole-process before/after: ``python -m sim.cli run`` in two checkouts, alternated, same machine.

    python benchmarks/ab_process.py --before /work/wt-base --repeats 5                 # default run
    python benchmarks/ab_process.py --before /work/wt-base --repeats 5 --case mooncake
    python benchmarks/ab_process.py --before /work/wt-base --repeats 1 --case million --only after

Each round runs the case once in ``--before`` and once in ``--after`` (default: this checkout), the
order alternating from round to round, so that a machine whose speed drifts (other jobs, thermal)
affects both alike. Every run is a fresh process from the shell's ``python`` to its exit: imports,
trace loading, the loop, writing the results directory. Measured by the parent with ``os.wait4``:
wall time, CPU time (user + system) and peak RSS. One warm-up run per checkout first (Numba's
on-disk cache and the trace cache are then warm, as they are for a user's second run); it is not
counted. Reported: the median and the range of each figure; the JSON goes to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "default": [],
    "mooncake": ["--trace", "mooncake-conversation", "--format", "mooncake"],
    # the conv trace concatenated 52 times, each copy shifted after the last: 1,007,032 requests
    "million": ["--set", "trace.repeat=52"],
}


def run_once(tree: Path, args: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sim.cli", "run", *args, "--out", str(out), "--quiet", "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024}


def describe(runs: list[dict]) -> dict:
    out = {}
    for k in ("wall_s", "cpu_s", "peak_rss_mb"):
        v = [r[k] for r in runs]
        out[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    return out


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="checkout of the baseline")
    p.add_argument("--after", default=str(ROOT), help="checkout of the change (default: this one)")
    p.add_argument("--case", choices=sorted(CASES), default="default")
    p.add_argument("--repeats", type=int, default=5, help="rounds (one run of each checkout per round)")
    p.add_argument("--only", choices=["before", "after"], help="run one checkout only (no ratio)")
    p.add_argument("--no-warmup", action="store_true", help="skip the uncounted first run of each checkout")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON")
    args = p.parse_args(argv)
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    if args.only:
        trees = {args.only: trees[args.only]}
    extra = CASES[args.case]
    scratch = Path(tempfile.mkdtemp(prefix="tiersim-ab-"))
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    load = []
    try:
        for name, tree in trees.items():          # warm-up: Numba cache, trace cache
            if not args.no_warmup:
                run_once(tree, extra, scratch / f"warm-{name}")
        for i in range(args.repeats):
            order = [n for n in (("before", "after") if i % 2 == 0 else ("after", "before")) if n in trees]
            for name in order:
                load.append(loadavg())
                r = run_once(trees[name], extra, scratch / f"{name}-{i}")
                r["round"] = i
                runs[name].append(r)
                print(f"round {i} {name:6s} wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                      f"rss {r['peak_rss_mb']:5.0f} MB  load {load[-1][:1]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def rev(tree: Path) -> str:
        got = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return got.stdout.strip() + ("+dirty" if dirty else "")

    result = {"date_utc": datetime.now(UTC).isoformat(timespec="seconds"), "case": args.case,
              "command": f"python -m sim.cli run {' '.join(extra)} --quiet --no-progress".replace("  ", " "),
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "python": sys.version.split()[0], "loadavg_before_each_run": load,
              "trees": {k: {"path": str(v), "commit": rev(v)} for k, v in trees.items()},
              "runs": runs, "summary": {k: describe(v) for k, v in runs.items()}}
    print(f"\n{args.case}: median (min-max) over {args.repeats} alternated rounds")
    for k in ("wall_s", "cpu_s", "peak_rss_mb"):
        print(f"  {k:12s} " + "   ".join(f"{n} {d[k]['median']:7.2f} ({d[k]['min']:.2f}-{d[k]['max']:.2f})"
                                        for n, d in result["summary"].items()))
    if len(trees) == 2:
        b, a = result["summary"]["before"], result["summary"]["after"]
        result["ratio_before_over_after"] = {k: b[k]["median"] / a[k]["median"] for k in ("wall_s", "cpu_s")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"ab-{args.case}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
