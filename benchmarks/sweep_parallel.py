"""The 16-run conv sweep (configs/sweeps/conv16.toml) serially, with --jobs 2, and on a Dask
LocalCluster of 2 workers; wall time of each and whether the three give byte-identical per-run results.

    python benchmarks/sweep_parallel.py [--out DIR] [--skip-dask]

Writes benchmarks/results/sweep-parallel-<UTC time>.json. Not run in CI (minutes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("requests.parquet", "steps.parquet", "transfers.parquet", "itl_hist.parquet", "summary.json", "config.toml",
         "DONE")


def digest(sweep: Path) -> dict[str, str]:
    out = {}
    for run in sorted(p for p in (sweep / "runs").rglob("DONE")):
        h = hashlib.sha256()
        for f in FILES:
            p = run.parent / f
            if p.exists():
                h.update(f.encode() + p.read_bytes())
        out[str(run.parent.relative_to(sweep / "runs"))] = h.hexdigest()
    return out


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sim.cli", "sweep", str(ROOT / "configs/sweeps/conv16.toml"), *args,
                    "--quiet"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tiersim-sweep-bench")
    ap.add_argument("--skip-dask", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    result = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    modes = [("serial", ["--jobs", "1"]), ("jobs2", ["--jobs", "2"])]
    if not a.skip_dask:
        modes.append(("dask_local2", ["--jobs", "2", "--scheduler", "local"]))
    digests = {}
    for name, extra in modes:
        d = out / name
        result[f"{name}_wall_s"] = timed(["--out", str(d), *extra])
        result[f"{name}_load_after"] = os.getloadavg()
        digests[name] = digest(d)
        print(name, f"{result[f'{name}_wall_s']:.1f} s", flush=True)
    ref = digests["serial"]
    result["runs"] = len(ref)
    result["byte_identical"] = {k: v == ref for k, v in digests.items()}
    result["speedup_jobs2"] = result["serial_wall_s"] / result["jobs2_wall_s"]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = ROOT / "benchmarks" / "results" / f"sweep-parallel-{stamp}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
