"""Calibration kernels under numba's CUDA simulator: numerics against numpy, helpers, the queue protocol.

numba reads NUMBA_ENABLE_CUDASIM once, at import, and other test modules may import numba first, so every
check that touches ``numba.cuda`` runs in one subprocess with the variable set; it prints a JSON report
that the tests below read. Sizes are tiny: the simulator runs each CUDA thread as a Python thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from calibration.kernels.grid import PointRunner, annotate, coarse_first
from calibration.raw import PartContext, make_row

ROOT = Path(__file__).resolve().parents[2]

SIM_CHECKS = textwrap.dedent(r'''
    import json, math, threading, time, traceback
    from pathlib import Path
    import numpy as np
    from numba import cuda
    import sys
    SCRATCH = sys.argv[1]
    report = {}

    def check(name):
        def wrap(fn):
            t0 = time.perf_counter()
            try:
                report[name] = {"ok": True, "value": fn()}
            except Exception as exc:
                report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()}
            report[name]["seconds"] = round(time.perf_counter() - t0, 2)
        return wrap

    @check("simulated")
    def _():
        from calibration.kernels import runtime
        return [runtime.SIMULATED, runtime.properties()["simulated"]]

    @check("decode_attention_gqa")
    def _():
        from calibration.kernels.decode_attention import check_against_numpy
        # two query heads share one kv head; 30 keys in one split
        return check_against_numpy(batch=1, q_heads=2, kv_heads=1, head_dim=16, block_size=8,
                                   ctx_lens=[30], min_chunk=32, sms=1, seed=3)

    @check("decode_attention_splits")
    def _():
        from calibration.kernels.decode_attention import check_against_numpy, plan_splits
        # 2 splits of 15 keys; the second sequence (5 keys) leaves its second split empty
        assert plan_splits(2, 1, 30, 1, min_chunk=15) == (2, 15)
        return check_against_numpy(batch=2, q_heads=1, kv_heads=1, head_dim=16, block_size=4,
                                   ctx_lens=[30, 5], min_chunk=15, sms=1, seed=4)

    @check("decode_reference_sane")
    def _():
        # the numpy reference itself against a dense softmax written out longhand
        from calibration.kernels.decode_attention import reference
        from calibration.kernels.devicefns import bf16_bits_to_f32, f32_to_bf16_bits
        rng = np.random.default_rng(1)
        k = f32_to_bf16_bits(rng.standard_normal((4, 4, 1, 8)).astype(np.float32))
        v = f32_to_bf16_bits(rng.standard_normal((4, 4, 1, 8)).astype(np.float32))
        table = np.array([[2, 0, 3]], dtype=np.int32)
        q = rng.standard_normal((1, 2, 8)).astype(np.float32)
        out = reference(q, k, v, table, np.array([10]))
        keys = bf16_bits_to_f32(k[[2, 2, 2, 2, 0, 0, 0, 0, 3, 3], [0, 1, 2, 3] * 2 + [0, 1], 0]).astype(float)
        vals = bf16_bits_to_f32(v[[2, 2, 2, 2, 0, 0, 0, 0, 3, 3], [0, 1, 2, 3] * 2 + [0, 1], 0]).astype(float)
        errs = []
        for h in range(2):
            s = keys @ q[0, h] / math.sqrt(8)
            p = np.exp(s - s.max()); p /= p.sum()
            errs.append(float(np.abs(p @ vals - out[0, h]).max()))
        return max(errs)

    @check("kv_gather_scatter")
    def _():
        from calibration.kernels.kv_gather import gather, scatter
        rng = np.random.default_rng(5)
        nb, bs, kvh, d = 12, 4, 2, 8
        pool_h = rng.integers(1, 2**16, size=(nb, bs, kvh, d), dtype=np.uint16)
        wpb = bs * kvh * d // 4
        table_h = rng.permutation(nb)[:5].astype(np.int32)
        pool = cuda.to_device(pool_h.reshape(-1).view(np.int64))
        dst = cuda.to_device(np.full(5 * wpb, -1, dtype=np.int64))
        table = cuda.to_device(table_h)
        gather(dst, pool, table, wpb, threads=4)   # 4 threads x 4 words cover one 16-word block
        got = dst.copy_to_host().view(np.uint16).reshape(5, bs, kvh, d)
        gather_ok = bool(np.array_equal(got, pool_h[table_h]))
        src_h = rng.integers(1, 2**16, size=(5, bs, kvh, d), dtype=np.uint16)
        scatter(pool, cuda.to_device(src_h.reshape(-1).view(np.int64)), table, wpb, threads=3)
        want = pool_h.copy()
        want[table_h] = src_h
        scatter_ok = bool(np.array_equal(pool.copy_to_host().view(np.uint16).reshape(want.shape), want))
        return [gather_ok, scatter_ok]

    @check("topk")
    def _():
        from calibration.kernels.topk import check_rows, topk
        rng = np.random.default_rng(9)
        results = []
        for n, k in ((50, 7), (64, 64), (33, 1)):
            host = rng.standard_normal((2, n)).astype(np.float32)
            host[0, ::5] = host[0, 3]          # ties, possibly straddling the threshold
            host[1, :4] = [-0.0, 0.0, -1e-30, 1e-30]
            out = cuda.to_device(np.full((2, k), -1, dtype=np.int32))
            topk(cuda.to_device(host), k, out, threads=16)
            check_rows(host, out.copy_to_host(), k)
            results.append([n, k])
        return results

    @check("stream_kernels")
    def _():
        from calibration.kernels.devicefns import fill_uniform
        from calibration.kernels.hbm_stream import _check_kernels
        bufs = [cuda.device_array(301, dtype=np.float64) for _ in range(3)]
        for i, b in enumerate(bufs):
            fill_uniform[2, 16](b, i)
        _check_kernels(bufs, (2, 8))
        values = bufs[1].copy_to_host()
        return [float(values.min()), float(values.max())]

    @check("bf16_fill")
    def _():
        from calibration.kernels.devicefns import (bf16_bits_to_f32, f32_to_bf16_bits,
                                                   fill_bf16_words)
        words = cuda.device_array(64, dtype=np.int64)
        fill_bf16_words[2, 16](words, 4)
        vals = bf16_bits_to_f32(words.copy_to_host().view(np.uint16))
        x = np.array([1.5, -2.25, 3e-3, 0.0], dtype=np.float32)
        round_trip = bf16_bits_to_f32(f32_to_bf16_bits(x))
        return [bool(np.all(np.isfinite(vals))), float(np.abs(vals).min()), float(np.abs(vals).max()),
                bool((vals < 0).any() and (vals > 0).any()),
                float(np.abs(round_trip - x).max() / 3.0)]

    @check("timing_helpers")
    def _():
        from calibration.kernels.timing import Timer, reps_for, rotation_sets
        t = Timer()
        samples = t.device(lambda i: None, reps=3, warmup=1)
        return {"samples_ok": len(samples) == 3 and all(s >= 0 and math.isfinite(s) for s in samples),
                "extra": t.base_extra(),
                "rot_small": rotation_sets(1 << 20, 50 << 20, available_bytes=1 << 30),
                "rot_big": rotation_sets(1 << 30, 50 << 20, available_bytes=1 << 32),
                "rot_mem": rotation_sets(1 << 20, 50 << 20, available_bytes=4 << 20),
                "rot_nol2": rotation_sets(1 << 20, 0, available_bytes=1 << 30),
                "reps": [reps_for(1.0), reps_for(1e-6), reps_for(0.01)]}

    @check("persistent_protocol")
    def _():
        # The real-GPU host/device protocol, with the launch made asynchronous by a thread (the
        # simulator's launches block): ready flag, doorbell round trips, queued batches, STOP.
        from calibration.kernels import persistent
        from calibration.kernels.grid import PointRunner
        from calibration.kernels.timing import Timer
        from calibration.raw import PartContext
        threads = []

        def launch(self):
            th = threading.Thread(target=lambda: persistent.persistent_kernel[1, self.threads](
                self.queue, self.done, self.status, self.data, 200_000))
            th.start()
            threads.append(th)

        def join():
            for th in threads:
                th.join(timeout=120)

        persistent._Queue.launch = launch
        persistent.synchronize = join
        ctx = PartContext(quick=True, simulate=False)
        runner = PointRunner(ctx, "persistent")
        persistent._real_run(ctx, Timer(), runner, 4)
        rows = runner.finish()
        warm, n_rtt, queued = persistent.QUICK_PLAN
        return {"variants": sorted({r["variant"] for r in rows}),
                "extra": json.loads(rows[0]["extra"]), "failures": runner.failures,
                "expected_items": warm + n_rtt + sum(n * reps for n, reps in queued),
                "queued_x": sorted(r["x"] for r in rows if r["variant"] == "queued_dispatch")}

    @check("persistent_timeout")
    def _():
        # Nothing is ever queued: the device gives up after its poll cap and says so.
        from calibration.kernels import persistent
        q = persistent._Queue(3, 4)
        t0 = time.perf_counter()
        persistent.persistent_kernel[1, 4](q.queue, q.done, q.status, q.data, 50)
        status = q.status.copy_to_host().tolist()
        return {"status": status, "seconds": time.perf_counter() - t0}

    @check("storage_fallback")
    def _():
        # a file system that refuses O_DIRECT: buffered reads, labelled so; the file is removed after
        import errno, os
        from calibration.kernels import storage
        from calibration.raw import PartContext
        real_open = os.open

        def no_direct(path, flags, *args):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        storage.os.open = no_direct
        scratch = Path(SCRATCH)
        try:
            rows = storage.run(PartContext(quick=True, simulate=True, scratch_dir=scratch))
        finally:
            storage.os.open = real_open
        return {"variants": sorted({r["variant"] for r in rows}),
                "o_direct": json.loads(rows[0]["extra"])["o_direct"],
                "fs": json.loads(rows[0]["extra"])["filesystem"],
                "left": sorted(p.name for p in scratch.iterdir())}

    print("@@REPORT@@" + json.dumps(report, default=str))
''')


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    scratch = tmp_path_factory.mktemp("scratch")
    proc = subprocess.run([sys.executable, "-c", SIM_CHECKS, str(scratch)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@REPORT@@")]
    assert marker, f"simulator checks did not report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(marker[-1][len("@@REPORT@@"):])


def value(sim: dict, name: str):
    entry = sim[name]
    assert entry["ok"], f"{name}: {entry.get('error')}\n{entry.get('traceback', '')}"
    return entry["value"]


def test_runs_under_the_simulator(sim):
    assert value(sim, "simulated") == [True, True]


def test_decode_attention_matches_numpy_with_gqa_splits_and_empty_splits(sim):
    assert value(sim, "decode_attention_gqa") < 1e-5
    assert value(sim, "decode_attention_splits") < 1e-5
    assert value(sim, "decode_reference_sane") < 1e-9


def test_kv_gather_and_scatter_match_numpy(sim):
    assert value(sim, "kv_gather_scatter") == [True, True]


def test_topk_selects_the_k_largest_with_ties(sim):
    assert value(sim, "topk") == [[50, 7], [64, 64], [33, 1]]


def test_stream_kernels_and_fills(sim):
    lo, hi = value(sim, "stream_kernels")
    assert 0.5 <= lo < hi < 1.5  # never zeros
    finite, smallest, largest, both_signs, rt_err = value(sim, "bf16_fill")
    assert finite and both_signs and smallest >= 2**-7 and largest < 2
    assert rt_err < 2**-7  # bf16 keeps 8 significant bits


def test_timing_helpers(sim):
    v = value(sim, "timing_helpers")
    assert v["samples_ok"] and v["extra"]["simulated"] is True
    assert v["rot_small"] == 64 and v["rot_big"] == 1 and v["rot_mem"] == 4 and v["rot_nol2"] == 1
    assert v["reps"] == [5, 30, 20]


def test_persistent_queue_protocol(sim):
    v = value(sim, "persistent_protocol")
    assert v["failures"] == []
    assert v["variants"] == ["doorbell_rtt", "queued_dispatch"]
    assert v["extra"]["device_exit_code"] == 1  # STOP seen
    assert v["extra"]["items_executed"] == v["expected_items"]
    assert v["queued_x"] == [1.0, 4.0]


def test_persistent_kernel_gives_up_when_nothing_arrives(sim):
    v = value(sim, "persistent_timeout")
    assert v["status"][0] == 1 and v["status"][1] == 2 and v["status"][2] == 0  # ready, timeout, none
    assert v["status"][3] == 50


def test_storage_falls_back_to_buffered_reads_and_cleans_up(sim):
    v = value(sim, "storage_fallback")
    assert v["variants"] == ["buffered_rand", "buffered_seq", "disk_to_gpu_pipelined", "disk_to_gpu_serial"]
    assert v["o_direct"].startswith("refused at open") and v["fs"] != "" and v["left"] == []


# ------------------------------------------------------------------ grid helpers (pure Python)
def _ctx(budget: float = float("inf")) -> tuple[PartContext, list[str]]:
    messages: list[str] = []
    return PartContext(quick=True, simulate=True, progress=messages.append, budget_s=budget), messages


def test_point_runner_isolates_failures_and_annotates_rows():
    ctx, messages = _ctx()
    runner = PointRunner(ctx, "demo")
    assert runner.run("a", lambda: [make_row("demo", "v", [1e-3, 2e-3], x=1)])
    assert not runner.run("b", lambda: 1 / 0)
    assert runner.run("c", lambda: [make_row("demo", "v", [1e-3], x=2)])
    rows = runner.finish(note="n")
    assert [r["x"] for r in rows] == [1.0, 2.0]
    extra = json.loads(rows[0]["extra"])
    assert extra["note"] == "n" and extra["failed_points"][0]["point"] == "b"
    assert "ZeroDivisionError" in extra["failed_points"][0]["error"]
    assert any("point b failed" in m for m in messages)


def test_point_runner_stops_after_consecutive_failures_and_raises_when_nothing_worked():
    ctx, _ = _ctx()
    runner = PointRunner(ctx, "demo", max_consecutive_failures=2)
    for label in "abcd":
        runner.run(label, lambda: 1 / 0)
    assert len(runner.failures) == 2 and runner.skipped == ["c", "d"]
    with pytest.raises(RuntimeError, match="all 2 measured points failed"):
        runner.finish()


def test_point_runner_respects_the_budget():
    ctx, messages = _ctx(budget=1e-9)
    runner = PointRunner(ctx, "demo")
    assert not runner.run("a", lambda: [make_row("demo", "v", [1.0])])
    assert runner.truncated and runner.finish() == []
    assert any("budget" in m for m in messages)


def test_coarse_first_and_annotate():
    order = coarse_first(list(range(10)))
    assert sorted(order) == list(range(10)) and order[:2] == [0, 9] and order[2:4] == [4, 8]
    rows = [make_row("p", "v", [1.0], extra={"keep": 1})]
    annotate(rows, keep=2, added=3)
    assert json.loads(rows[0]["extra"]) == {"added": 3, "keep": 1}
