"""Crash safety (issue 13, item 5): a sweep killed with SIGKILL at every write point - half-way through
a Parquet file, between result files (after summary.json, before the rest), half-way through the DONE
marker, and after a run is renamed into place but before the driver indexed it - resumes and loses
nothing: every run finishes exactly once, its files equal an uninterrupted sweep's byte for byte, and
no temporary file, staging directory or spill directory is left. The parallel path is killed both ways:
a worker (the driver starts a new pool and resubmits) and the driver with its workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sim import results_io
from sim.sweep import load_sweep_file, read_index, run_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """[set]
"model.name" = "llama-3.2-1b"
"costs.backend" = "roofline"
"replica.num_hbm_blocks" = 64
"trace.max_requests" = 40
"trace.rate_scale" = 4.0
[grid]
"policies.scheduling.name" = ["fcfs", "chunked-prefill"]
"replica.block_size_tokens" = [8, 16]
"""
RESULT_FILES = ("requests.parquet", "steps.parquet", "transfers.parquet", "itl_hist.parquet", "summary.json",
                "config.toml", "DONE")


def _sweep(tmp_path: Path, out: Path, jobs: int, kill_at: str | None = None, flag: Path | None = None):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(ROOT)}
    env.pop("TIERSIM_KILL_AT", None)
    if kill_at:
        env["TIERSIM_KILL_AT"] = f"{kill_at}:{flag}"
    cmd = [sys.executable, "-m", "sim.cli", "sweep", str(tmp_path / "sweep.toml"), "--out", str(out),
           "--jobs", str(jobs), "--quiet"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    _, err = p.communicate(timeout=300)
    return p.returncode, err.decode()


def _files(run_dir: Path) -> dict[str, bytes]:
    return {f: (run_dir / f).read_bytes() for f in RESULT_FILES if (run_dir / f).exists()}


@pytest.fixture
def reference(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "sweep.toml").write_text(SWEEP)
    ref = tmp_path / "ref"
    table = run_sweep(load_sweep_file(tmp_path / "sweep.toml"), out_dir=ref, jobs=1)
    assert (table["status"] == "done").all()
    return {r: _files(ref / "runs" / r) for r in table["run"]}


def _check_resumed(tmp_path: Path, out: Path, reference: dict) -> None:
    index = read_index(out)
    done = [r["run"] for r in index if r["status"] == "done"]
    assert sorted(done) == sorted(reference), "every run is indexed done exactly once"
    for rel, want in reference.items():
        got = _files(out / "runs" / rel)
        assert got == want, f"{rel}: results differ from an uninterrupted sweep"
        assert results_io.verify(out / "runs" / rel) is None
    left = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files left: {left}"
    assert not list((tmp_path / "tmp").glob("tiersim-steps-*")), "spill directories left"
    summary = json.loads((out / "runs" / next(iter(reference)) / "summary.json").read_text())
    assert summary["requests"]["finished"] + summary["requests"]["rejected"] == 40


@pytest.mark.slow
def test_serial_sweep_killed_at_every_write_point_resumes_and_loses_nothing(tmp_path, reference):
    out = tmp_path / "killed"
    for point in ("parquet", "between", "marker", "publish"):
        rc, err = _sweep(tmp_path, out, jobs=1, kill_at=point, flag=tmp_path / f"{point}.flag")
        assert rc == -signal.SIGKILL, f"{point}: {rc} {err}"
        assert (tmp_path / f"{point}.flag").exists()
    # what the kills left: a half-written file, a directory without config.toml, a half marker ...
    rc, err = _sweep(tmp_path, out, jobs=1)
    assert rc == 0, err
    _check_resumed(tmp_path, out, reference)


@pytest.mark.slow
def test_parallel_sweep_survives_a_killed_worker_and_a_killed_driver(tmp_path, reference):
    out = tmp_path / "killed"
    # a worker dies half-way through writing a run's marker: the driver resubmits, the sweep completes
    rc, err = _sweep(tmp_path, out, jobs=2, kill_at="marker", flag=tmp_path / "marker.flag")
    assert rc == 0, err
    assert (tmp_path / "marker.flag").exists()
    _check_resumed(tmp_path, out, reference)
    # the driver and its workers are killed once the first run is indexed (a kill point, not a poll
    # that small runs can outpace); the rerun finishes the rest
    out2 = tmp_path / "killed2"
    rc, err = _sweep(tmp_path, out2, jobs=2, kill_at="indexed", flag=tmp_path / "indexed.flag")
    assert rc == -signal.SIGKILL, f"{rc} {err}"
    assert (tmp_path / "indexed.flag").exists()
    assert len([r for r in read_index(out2) if r["status"] == "done"]) == 1
    rc, err = _sweep(tmp_path, out2, jobs=2)
    assert rc == 0, err
    _check_resumed(tmp_path, out2, reference)


KILLER = '''
import multiprocessing, os, signal
from policies import registry
from policies.scheduling.fcfs import FCFS


@registry.register("scheduling", "test-killer")
class Killer(FCFS):
    """Takes down the worker process that runs it, every time (a run that is OOM-killed)."""
    def schedule(self, *a, **k):
        if multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().schedule(*a, **k)
'''


@pytest.mark.slow
def test_a_run_that_kills_its_worker_every_time_fails_alone_after_three_attempts(tmp_path):
    # the pool breaks with every run in it; the driver reruns the runs that had started one at a time,
    # so only the culprit is charged: it fails after MAX_ATTEMPTS, and the runs beside it finish
    from sim.sweep import MAX_ATTEMPTS

    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "sweep.toml").write_text(f'plugins = ["{tmp_path / "killer.py"}"]\n' + SWEEP.replace(
        '"policies.scheduling.name" = ["fcfs", "chunked-prefill"]',
        '"policies.scheduling.name" = ["fcfs", "test-killer", "chunked-prefill"]'))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    rc, err = _sweep(tmp_path, out, jobs=2)
    assert rc == 1, err                        # a failed run: the sweep says so in its exit status
    rows = {(r["params"]["scheduling_name"], r["params"]["replica_block_size_tokens"]): r for r in read_index(out)}
    assert len(rows) == 6
    for (sched, _), r in rows.items():
        if sched == "test-killer":
            assert r["status"] == "failed" and f"died {MAX_ATTEMPTS} times running it alone" in r["error"]
        else:
            assert r["status"] == "done", r
            assert results_io.verify(out / "runs" / r["run"]) is None
    assert not (out / ".tmp").exists()


@pytest.mark.slow
def test_the_workers_of_a_killed_driver_exit(tmp_path):
    import time

    (tmp_path / "tmp").mkdir()
    (tmp_path / "sweep.toml").write_text(SWEEP.replace('"trace.max_requests" = 40', '"trace.max_requests" = 4000'))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sim.cli", "sweep", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "o"),
           "--jobs", "2", "--quiet"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    deadline = time.monotonic() + 60
    while len(children()) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    workers = children()
    assert workers and p.poll() is None, "the sweep ended before its workers could be seen"
    p.kill()          # the driver alone, not its process group
    p.wait()
    def running(pid):          # a zombie no one reaped (PID 1 of a container may not) has exited
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if running(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their driver"
