"""The calibration suite end to end under numba's CUDA simulator, in subprocesses.

``python -m calibration --quick`` must produce one well-formed Parquet file per Numba part and a
metadata.json; a second run resumes (measures nothing again); a failing part is recorded while the
others land; parts run in their own processes when asked (with a hard timeout); unknown part names and a
directory of another device are refused with a one-line error.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from calibration.raw import RAW_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
NUMBA_PARTS = ["launch", "hbm_stream", "sm_fma", "pcie", "kv_gather", "decode_attention", "topk",
               "persistent", "storage"]


def sim_env() -> dict:
    return dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration", *args], cwd=ROOT, env=sim_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "out"
    first = run_cli("--quick", "--out", str(out), "--no-fit")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "raw").glob("*.parquet")}
    t0 = time.monotonic()
    second = run_cli("--quick", "--out", str(out), "--no-fit")
    return {"out": out, "first": first, "second": second, "mtimes": mtimes,
            "second_s": time.monotonic() - t0}


def test_quick_run_writes_raw_files_and_metadata(e2e):
    first, out = e2e["first"], e2e["out"]
    assert first.returncode == 0, first.stdout + first.stderr
    for name in NUMBA_PARTS:
        assert (out / "raw" / f"{name}.parquet").exists(), name
    assert not list((out / "raw").glob(".*")), "temporary files left behind"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["quick"] is True and meta["simulated"] is True
    assert meta["fingerprint"].startswith("simulated:")
    assert meta["models"] == ["llama-3.1-8b", "llama-3.2-1b"]
    assert meta["command_line"].endswith(f"-m calibration --quick --out {out} --no-fit")
    assert meta["code_version"] and meta["created_utc"].endswith("+00:00")
    assert {"numba", "numpy", "pandas", "pyarrow"} <= set(meta["device"]["libraries"])
    assert meta["device"]["host"]["logical_cores"] >= 1
    for name in NUMBA_PARTS:
        entry = meta["parts"][name]
        assert entry["status"] == "done" and entry["rows"] > 0 and entry["elapsed_s"] >= 0, (name, entry)
    for name, entry in meta["parts"].items():  # vendor parts may be skipped here (no torch), never failed
        assert entry["status"] in ("done", "skipped"), (name, entry)
    assert "[1/" in first.stdout and "launch: done" in first.stdout


def test_every_part_returns_well_formed_rows(e2e):
    for name in NUMBA_PARTS:
        frame = pd.read_parquet(e2e["out"] / "raw" / f"{name}.parquet")
        assert list(frame.columns) == list(RAW_COLUMNS), name
        assert len(frame) > 0 and (frame["part"] == name).all(), name
        for col in ("median_s", "p10_s", "p90_s", "min_s", "max_s"):
            assert frame[col].map(math.isfinite).all() and (frame[col] > 0).all(), (name, col)
        assert (frame["min_s"] <= frame["median_s"]).all() and (frame["median_s"] <= frame["max_s"]).all()
        assert (frame["reps"] >= 1).all() and (frame["bytes"] >= 0).all() and (frame["flops"] >= 0).all()
        extras = [json.loads(e) for e in frame["extra"]]
        assert all(isinstance(e, dict) for e in extras)
        if name != "storage":  # disk reads are real host measurements even under the simulator
            assert all(e.get("simulated") is True for e in extras), name
    decode = pd.read_parquet(e2e["out"] / "raw" / "decode_attention.parquet")
    assert (decode["op"] == "attn_decode").all() and decode["key"].str.contains("qh=").all()
    assert (decode["bytes"] > 0).all() and (decode["flops"] > 0).all()
    extra = json.loads(decode["extra"].iloc[0])
    assert extra["verify_rel_err"] < 1e-5


def test_second_run_resumes_without_measuring(e2e):
    second, out = e2e["second"], e2e["out"]
    assert second.returncode == 0, second.stdout + second.stderr
    for name in NUMBA_PARTS:
        assert f"{name}: already measured" in second.stdout, name
    assert {p.name: p.stat().st_mtime_ns for p in (out / "raw").glob("*.parquet")} == e2e["mtimes"]
    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta["runs"]) == 2 and all(meta["parts"][n].get("resumed") for n in NUMBA_PARTS)
    assert "started" not in second.stdout


SUITE_CHECKS = textwrap.dedent(r'''
    import json, math, sys, time, types
    from pathlib import Path
    from calibration import cli, suite
    from calibration.raw import Part, PartContext
    from sim.errors import ConfigError
    out = Path(sys.argv[1])
    report = {}

    def boom(ctx):
        raise RuntimeError("injected failure")

    suite.PARTS = {"boom": Part(name="boom", description="always fails", requires=(), coords="-", run=boom),
                   **suite.PARTS}
    messages = []
    s = suite.run_suite(out / "a", parts=["boom", "sm_fma"], quick=True, isolate=False,
                        progress=messages.append)
    meta = json.loads((out / "a" / "metadata.json").read_text())
    report["in_process"] = {"failed": s["failed"], "done": s["done"], "ok": s["ok"],
                            "boom": meta["parts"]["boom"], "sm_fma": meta["parts"]["sm_fma"]["status"],
                            "raw": sorted(p.name for p in (out / "a" / "raw").iterdir()),
                            "progress_failed": any("boom: FAILED" in m for m in messages)}

    # same directory again: the failed part is retried, the finished one is not
    s2 = suite.run_suite(out / "a", parts=["boom", "sm_fma"], quick=True, isolate=False,
                         progress=messages.append)
    report["retry"] = {"failed": s2["failed"], "resumed": s2["resumed"]}

    missing = Part(name="needs_nothing_here", description="-", requires=("no_such_module_xyz",),
                   coords="-", run=boom)
    suite.PARTS["needs_nothing_here"] = missing
    s3 = suite.run_suite(out / "b", parts=["needs_nothing_here"], quick=True, isolate=False,
                         progress=messages.append)
    report["missing_module"] = s3["parts"]["needs_nothing_here"]

    # own processes: a part the child does not know fails there, a real one lands, logs are kept
    s4 = suite.run_suite(out / "c", parts=["boom", "launch"], quick=True, isolate=True,
                         progress=messages.append)
    report["isolated"] = {"failed": s4["failed"], "done": s4["done"],
                          "log": (out / "c" / "logs" / "launch.log").exists(),
                          "error": s4["parts"]["boom"]["error"]}

    ctx = PartContext(quick=True, simulate=True, scratch_dir=out / "d" / "scratch")
    (out / "d" / "raw").mkdir(parents=True)
    t0 = time.monotonic()
    entry = suite._run_isolated("hbm_stream", ctx, ("llama-3.2-1b",),
                                out / "d" / "raw" / "hbm_stream.parquet", out / "d" / "logs", 0.3)
    report["timeout"] = {"entry": entry, "seconds": time.monotonic() - t0,
                         "raw": sorted(p.name for p in (out / "d" / "raw").iterdir())}

    # a directory measured elsewhere, or in full mode, is refused
    meta_path = out / "a" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    errors = {}
    for what, change in (("fingerprint", {"fingerprint": "0" * 64}), ("quick", {"quick": False}),
                         ("models", {"models": ["llama-3.2-1b"]})):
        meta_path.write_text(json.dumps({**meta, **change}))
        try:
            suite.run_suite(out / "a", parts=["sm_fma"], quick=True, isolate=False, progress=messages.append)
            errors[what] = None
        except ConfigError as exc:
            errors[what] = str(exc)
    report["refused"] = errors
    # --no-resume over another device's directory sets its raw files aside and measures afresh
    meta_path.write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    s5 = suite.run_suite(out / "a", parts=["sm_fma"], quick=True, resume=False, isolate=False,
                         progress=messages.append)
    stale_dirs = list((out / "a" / "raw").glob("stale-*"))
    report["no_resume"] = {"done": s5["done"],
                           "stale": sorted(p.name for d in stale_dirs for p in d.iterdir()),
                           "parts": sorted(json.loads(meta_path.read_text())["parts"])}

    try:
        suite.resolve_parts("launch,nope")
        report["unknown"] = None
    except ConfigError as exc:
        report["unknown"] = str(exc)

    # the fit hook: called when calibration.fit provides fit_table
    import importlib.machinery
    calls = []
    fake = types.ModuleType("calibration.fit")
    fake.__spec__ = importlib.machinery.ModuleSpec("calibration.fit", None)
    fake.fit_table = lambda d: calls.append(d) or Path(d) / "t.json"
    sys.modules["calibration.fit"] = fake
    report["fit"] = {"status": cli._fit(str(out / "a")), "calls": calls}
    print("@@REPORT@@" + json.dumps(report, default=str))
''')


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run([sys.executable, "-c", SUITE_CHECKS, str(out)], cwd=ROOT, env=sim_env(),
                          capture_output=True, text=True, timeout=240)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@REPORT@@")]
    assert marker, f"suite checks did not report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(marker[-1][len("@@REPORT@@"):])


def test_a_failing_part_is_recorded_and_the_others_land(checks):
    r = checks["in_process"]
    assert r["failed"] == ["boom"] and r["done"] == ["sm_fma"] and r["ok"] is False
    assert r["boom"]["status"] == "failed" and r["boom"]["error_type"] == "RuntimeError"
    assert r["boom"]["error"] == "injected failure" and "elapsed_s" in r["boom"]
    assert r["sm_fma"] == "done" and r["raw"] == ["sm_fma.parquet"] and r["progress_failed"]
    assert checks["retry"] == {"failed": ["boom"], "resumed": ["sm_fma"]}


def test_a_part_whose_module_is_missing_is_skipped_with_the_reason(checks):
    entry = checks["missing_module"]
    assert entry["status"] == "skipped" and "no_such_module_xyz" in entry["reason"]


def test_parts_in_their_own_processes(checks):
    r = checks["isolated"]
    assert r["failed"] == ["boom"] and r["done"] == ["launch"] and r["log"]
    assert "not registered in the child process" in r["error"]
    t = checks["timeout"]
    assert t["entry"]["status"] == "failed" and t["entry"]["error_type"] == "Timeout"
    assert t["seconds"] < 30 and t["raw"] == []


def test_resume_is_refused_across_devices_modes_and_models(checks):
    refused = checks["refused"]
    assert "another device" in refused["fingerprint"] and "--no-resume" in refused["fingerprint"]
    assert "full calibration" in refused["quick"]
    assert "models" in refused["models"]
    r = checks["no_resume"]
    assert r["done"] == ["sm_fma"] and r["stale"] == ["sm_fma.parquet"] and r["parts"] == ["sm_fma"]


def test_fit_hook_is_called_when_present(checks):
    assert checks["fit"]["status"] == 0 and len(checks["fit"]["calls"]) == 1


def test_unknown_part_names_give_a_one_line_error(checks, tmp_path):
    assert "'nope'" in checks["unknown"] and "known parts: boom, launch, hbm_stream" in checks["unknown"]
    proc = run_cli("--out", str(tmp_path / "x"), "--parts", "launch,nope", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibrate: error: unknown calibration part 'nope'")
    assert "known parts: launch, hbm_stream, sm_fma" in lines[0]
    assert not (tmp_path / "x").exists()


def test_runs_without_simpy_and_skips_numba_parts_without_numba_cuda(tmp_path):
    # the device machine may lack simpy; a machine without numba-cuda skips the Numba parts, saying why
    code = textwrap.dedent('''
        import sys
        sys.modules["simpy"] = None
        sys.modules["sim.engine"] = None
        sys.modules["numba.cuda"] = None
        from calibration.__main__ import main
        sys.exit(main(["--quick", "--no-fit", "--parts", "launch,topk", "--out", sys.argv[1]]))
    ''')
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=ROOT, env=sim_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    for name in ("launch", "topk"):
        assert meta["parts"][name]["status"] == "skipped"
        assert "numba.cuda" in meta["parts"][name]["reason"]
    assert meta["device"]["gpu"]["available"] is False and meta["fingerprint"] == "no-gpu"
