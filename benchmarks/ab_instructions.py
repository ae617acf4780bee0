"""Before/after by instruction count: ``python -m sim.cli run`` of two checkouts under cachegrind.

    python benchmarks/ab_instructions.py --before /work/wt-prev                     # 3,000 conv requests
    python benchmarks/ab_instructions.py --before /work/wt-prev --requests 1000 \
        --set trace.bundled=mooncake-conversation

On a shared or throttled VM the wall time of a run swings by more than a few-per-cent change moves
it (this project's 2-core VM ran the same checkout 1.6x slower within an hour). Instructions retired
do not swing: ``valgrind --tool=cachegrind --cache-sim=no`` counts them exactly and repeatably, so a
change that removes work shows as fewer instructions even where the clock cannot see it. Counts are
not time (a cache miss costs more than an add), so quote them beside interleaved wall times
(``ab_process.py``, ``bench_replay.py``), not instead of them.

Per checkout: one uncounted run of the same requests under valgrind first (Numba keys its on-disk
cache on the CPU, and the CPU valgrind presents differs from the host's: without it the count is
mostly compilation, and a shorter warm-up leaves the functions only longer runs call uncompiled), then
a run of ``--requests`` requests and one of a single request; the difference is the simulation's
own instructions (the loop and the results), the single-request run the start (imports, the trace,
the table). About a minute per run on the development VM for 3,000 requests; the JSON goes to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def count(tree: Path, requests: int, extra: list[str], work: Path) -> int:
    """Instructions of one ``tiersim run`` of ``requests`` requests in checkout ``tree``."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={work / 'cg.out'}",
           str(Path(sys.executable).resolve()), "-m", "sim.cli", "run", "--quiet", "--no-progress",
           "--set", f"trace.max_requests={requests}", *extra, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                                              "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    got = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if got is None:
        raise SystemExit(f"{tree}: no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(got.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, type=Path, help="checkout of the baseline")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout of the change (default: this one)")
    ap.add_argument("--requests", type=int, default=3000, help="requests of the counted run (trace.max_requests)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.requests < 2:
        raise SystemExit("--requests must be >= 2 (a one-request run is the baseline it is measured against)")
    extra = [a for kv in args.set for a in ("--set", kv)]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (("before", args.before), ("after", args.after)):
            work = Path(tmp) / name
            work.mkdir()
            count(tree, args.requests, extra, work)     # warms Numba's cache for valgrind's CPU, every function
            total, start = count(tree, args.requests, extra, work), count(tree, 1, extra, work)
            res[name] = {"tree": str(tree), "total": total, "start": start, "simulation": total - start}
            print(f"{name:6s} {tree}: {total:,} instructions, start {start:,}, simulation {total - start:,}")
    ratio = res["after"]["simulation"] / res["before"]["simulation"]
    print(f"simulation instructions after / before: {ratio:.4f} ({100 * (ratio - 1):+.1f} %)")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"ab-instructions-{stamp}.json"
    path.write_text(json.dumps({"date_utc": stamp, "machine": platform.machine(), "python": platform.python_version(),
                                "requests": args.requests, "set": args.set, **res, "ratio": ratio}, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
