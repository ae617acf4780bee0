"""Execution modes change runs as they say: the persistent kernel (SMs reserved, no launches or syncs,
fused stages, doorbell, per-item dispatch, queue depth, polling), CUDA-graph capture buckets (padding
in the step log, eager fallback), and the engine's host work per step (serial or overlapped, the
profile fitted to the reference server). Each test compares two runs that differ in one parameter."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_trace, run_checked, small_config

TABLE = {"costs.backend": "table", "replica.num_hbm_blocks": 2000}


def _ex(name: str, **params) -> dict:
    return {"policies.execution.name": name, **{f"policies.execution.{k}": v for k, v in params.items()}}


def _decode_steps(res) -> pd.DataFrame:
    st = res.steps
    return st[(st["decode_seqs"] > 0) & (st["prefill_seqs"] == 0)]


def _prefill_steps(res) -> pd.DataFrame:
    st = res.steps
    return st[st["prefill_seqs"] > 0]


def _batch_trace(n: int, prompt: int = 64, output: int = 40):
    return make_trace([0.0] * n, [prompt] * n, [output] * n)


# ------------------------------------------------------------------------------------------ persistent
def test_persistent_runs_without_launches_or_syncs_and_beats_graphs_on_batch_one_decode():
    tr = make_trace([0.0], [64], [200])
    got = {}
    for mode in ("host-launched", "cuda-graph", "persistent"):
        _, res = run_checked(small_config(**TABLE, **_ex(mode)), tr)
        got[mode] = (float(_decode_steps(res)["duration_s"].median()), res)
    pers = got["persistent"][1]
    assert int(pers.steps["launches"].sum()) == 0 and int(pers.steps["syncs"].sum()) == 0
    assert pers.summary["execution"]["launches_per_token"] == 0.0
    assert got["cuda-graph"][1].summary["execution"]["syncs_per_token"] > 0
    assert got["persistent"][0] < got["cuda-graph"][0] < got["host-launched"][0]
    assert pers.summary["engine"]["sm_share"] == (132 - 8) / 132      # 8 SMs for the scheduler by default


def test_reserving_sms_lengthens_compute_bound_steps_and_barely_memory_bound_decode():
    base = {**TABLE, "model.name": "llama-3.1-8b"}
    prefill = make_trace([0.0], [4096], [1])
    decode = make_trace([0.0], [64], [300])
    t = {}
    for sms in (0, 16, 66):
        cfg = small_config(**base, **_ex("persistent", scheduler_sms=sms))
        _, p = run_checked(cfg, prefill)
        _, d = run_checked(cfg, decode)
        t[sms] = (float(_prefill_steps(p)["duration_s"].iloc[0]), float(_decode_steps(d)["duration_s"].mean()))
        assert p.summary["execution"]["reserved_sms"] == sms
    assert t[0][0] < t[16][0] < t[66][0] and t[66][0] > 1.5 * t[0][0]     # compute-bound: much slower
    assert t[0][1] < t[66][1] < 1.10 * t[0][1]                            # memory-bound: almost unchanged


def test_stage_fusion_removes_the_measured_gap_per_kernel():
    tr = make_trace([0.0], [64], [50])
    _, fused = run_checked(small_config(**TABLE, **_ex("persistent")), tr)
    _, unfused = run_checked(small_config(**TABLE, **_ex("persistent", fuse_stages=False)), tr)
    from sim.costs.table import in_model_graph_gap, resolve_table_dir

    gap, _ = in_model_graph_gap(resolve_table_dir("h100-sxm-80gb"))
    assert gap > 0
    diff = _decode_steps(unfused)["duration_s"].to_numpy() - _decode_steps(fused)["duration_s"].to_numpy()
    kernels = diff / gap                     # the same whole number of kernels on every decode step
    assert np.allclose(kernels, np.round(kernels[0]), atol=1e-6) and kernels[0] > 100
    assert fused.summary["execution"]["graph_gap_s"] == gap
    assert "in_model.json" in fused.summary["execution"]["graph_gap_source"]


def test_doorbell_polling_dispatch_and_queue_depth_each_price_what_they_say():
    from sim.costs.table import CostTable, resolve_table_dir

    launch = CostTable(resolve_table_dir("h100-sxm-80gb")).meta["launch"]
    door, item = launch["doorbell_s"], launch["persistent_item_s"]
    tr = _batch_trace(4)

    def run(**params):
        _, res = run_checked(small_config(**TABLE, **_ex("persistent", **params)), tr)
        return res

    base = run()
    pre0, dec0 = _prefill_steps(base)["duration_s"].to_numpy(), _decode_steps(base)["duration_s"].to_numpy()
    # polling: a host-fed (prefill) step waits half an interval more on average; decode steps do not
    polled = run(poll_interval_s=1e-4)
    assert np.allclose(_prefill_steps(polled)["duration_s"].to_numpy() - pre0, 0.5e-4, rtol=1e-9, atol=1e-12)
    assert np.array_equal(_decode_steps(polled)["duration_s"].to_numpy(), dec0)
    # one work item per step instead of one per sequence: 3 items fewer on a 4-decode step
    one = run(dispatch="per-step")
    assert np.allclose(dec0 - _decode_steps(one)["duration_s"].to_numpy(), 3 * item, rtol=1e-9, atol=1e-12)
    # a queue of 1 item: the host refills it three times per 4-decode step, a doorbell each
    shallow = run(queue_depth=1)
    assert np.allclose(_decode_steps(shallow)["duration_s"].to_numpy() - dec0, 3 * door, rtol=1e-9, atol=1e-12)
    assert door > 1e-6 and item > 1e-6


def test_persistent_params_are_validated_with_the_key_named():
    for key, bad in (("scheduler_sms", -1), ("queue_depth", 0), ("poll_interval_s", -1.0), ("dispatch", "x")):
        with pytest.raises(Exception, match=key):
            run_checked(small_config(**_ex("persistent", **{key: bad})), _batch_trace(1, output=2))


# --------------------------------------------------------------------------------- capture buckets
def test_padding_to_a_capture_bucket_shows_in_the_step_log_and_costs_time():
    # the roofline backend: smooth in the token count (the H100 table's measured residual add at 3
    # tokens is an outlier, 15.6 us against 1.2 us at 2 and 4, which would make 3 rows dearer than 4)
    tr = _batch_trace(3, output=30)
    _, ideal = run_checked(small_config(**_ex("cuda-graph")), tr)
    _, vllm = run_checked(small_config(**_ex("cuda-graph", capture_sizes="vllm")), tr)
    _, big = run_checked(small_config(**_ex("cuda-graph", capture_sizes=[8])), tr)
    d_ideal, d_vllm, d_big = (_decode_steps(r) for r in (ideal, vllm, big))
    full = d_vllm["decode_seqs"] == 3
    assert full.any()
    assert (d_vllm.loc[full, "padded_tokens"] == 1).all()         # 3 decodes run in the graph of 4
    assert (d_big.loc[d_big["decode_seqs"] == 3, "padded_tokens"] == 5).all()
    assert (d_vllm.loc[d_vllm["decode_seqs"] == 2, "padded_tokens"] == 0).all()   # 2 is a bucket
    assert (ideal.steps["padded_tokens"] == 0).all()
    assert vllm.summary["execution"]["padded_tokens"] == int(vllm.steps["padded_tokens"].sum()) > 0
    a, b, c = (d.loc[d["decode_seqs"] == 3, "duration_s"].to_numpy() for d in (d_ideal, d_vllm, d_big))
    assert (b > a).all() and (c > b).all()
    # prefill steps replay no graph with buckets (eager: one launch per kernel) and are not padded
    assert (_prefill_steps(vllm)["launches"] > 1).all() and (_prefill_steps(ideal)["launches"] == 1).all()
    assert (_prefill_steps(vllm)["padded_tokens"] == 0).all()
    _, pg = run_checked(small_config(**_ex("cuda-graph", capture_sizes="vllm", prefill_graphs="always")), tr)
    assert (_prefill_steps(pg)["launches"] == 1).all()
    _, never = run_checked(small_config(**_ex("cuda-graph", prefill_graphs="never")), tr)
    assert (_prefill_steps(never)["launches"] > 1).all() and (_decode_steps(never)["launches"] == 1).all()


def test_a_batch_above_the_largest_bucket_runs_eagerly():
    tr = _batch_trace(5, output=20)
    _, res = run_checked(small_config(**TABLE, **_ex("cuda-graph", capture_sizes=[1, 2, 4])), tr)
    d = _decode_steps(res)
    assert (d.loc[d["decode_seqs"] == 5, "launches"] > 1).all()
    assert (d.loc[d["decode_seqs"] == 5, "padded_tokens"] == 0).all()
    assert (d.loc[d["decode_seqs"] == 4, "launches"] == 1).all()


def test_vllm_and_sglang_capture_lists():
    from policies.execution.cuda_graph import SGLANG_CAPTURE_SIZES, VLLM_CAPTURE_SIZES, CudaGraph, CudaGraphParams

    assert VLLM_CAPTURE_SIZES[:5] == (1, 2, 4, 8, 16) and VLLM_CAPTURE_SIZES[-1] == 512
    assert SGLANG_CAPTURE_SIZES[-1] == 160
    g = CudaGraph(CudaGraphParams(capture_sizes="vllm"))
    assert [g.padded_batch(b, False) for b in (1, 3, 9, 255, 257, 513)] == [1, 4, 16, 256, 272, 513]
    assert g.padded_batch(3, True) == 3
    with pytest.raises(ValueError, match="capture_sizes"):
        CudaGraphParams(capture_sizes="tensorrt")


# --------------------------------------------------------------------------------- host overhead
def test_serial_host_work_adds_to_every_step_and_overlapped_hides_behind_longer_steps():
    tr = _batch_trace(2, output=30)
    host = {"host_step_s": 1e-4, "host_per_seq_s": 1e-5, "host_per_token_s": 1e-6}
    _, none = run_checked(small_config(**TABLE, **_ex("cuda-graph")), tr)
    _, serial = run_checked(small_config(**TABLE, **_ex("cuda-graph", **host)), tr)
    _, over = run_checked(small_config(**TABLE, **_ex("cuda-graph", host_overlap=True, **host)), tr)
    d0, ds, do = (_decode_steps(r)["duration_s"].to_numpy() for r in (none, serial, over))
    n = _decode_steps(none)["decode_seqs"].to_numpy()
    want = 1e-4 + 1e-5 * n + 1e-6 * n
    assert np.allclose(ds - d0, want, rtol=1e-9, atol=1e-12)
    assert np.array_equal(do, d0)                                # host work shorter than the GPU step: hidden
    # host work longer than the GPU step: the step takes the host's time plus the graph launch
    slow = {"host_step_s": 5e-3}
    _, over_slow = run_checked(small_config(**TABLE, **_ex("cuda-graph", host_overlap=True, **slow)), tr)
    from sim.costs.table import CostTable, resolve_table_dir

    gl = CostTable(resolve_table_dir("h100-sxm-80gb")).meta["launch"]["graph_launch_s"]
    assert np.allclose(_decode_steps(over_slow)["duration_s"].to_numpy(), 5e-3 + gl, rtol=1e-12)


def test_the_reference_h200_host_profile_is_the_fit_to_the_shipped_e2e_runs():
    from calibration.host_fit import fit_host
    from policies.execution.host import HOST_PROFILES

    got = fit_host()
    assert got["steps"] > 70_000
    want = HOST_PROFILES["reference-h200"]
    for k, w in zip(("host_step_s", "host_per_seq_s", "host_per_token_s"), want):
        assert math.isclose(got[k], w, rel_tol=5e-3), k
    tr = _batch_trace(2, output=20)
    _, none = run_checked(small_config(**TABLE, **_ex("host-launched")), tr)
    _, prof = run_checked(small_config(**TABLE, **_ex("host-launched", host="reference-h200")), tr)
    assert prof.summary["e2e_s"]["mean"] > none.summary["e2e_s"]["mean"]
    with pytest.raises(Exception, match="host"):
        run_checked(small_config(**_ex("cuda-graph", host="nope")), tr)


def test_persistent_overlapped_host_work_hides_behind_its_steps():
    tr = _batch_trace(2, output=30)
    host = {"host_step_s": 1e-4}
    _, none = run_checked(small_config(**TABLE, **_ex("persistent")), tr)
    _, over = run_checked(small_config(**TABLE, **_ex("persistent", host_overlap=True, **host)), tr)
    _, serial = run_checked(small_config(**TABLE, **_ex("persistent", **host)), tr)
    d0, do, ds = (_decode_steps(r)["duration_s"].to_numpy() for r in (none, over, serial))
    assert np.array_equal(do, d0) and np.allclose(ds - d0, 1e-4, rtol=1e-9)


# --------------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_results_in_every_mode():
    tr = make_trace([0.0, 0.001, 0.002, 0.01, 0.02], [300, 40, 120, 64, 500], [30, 60, 20, 40, 10])
    for ex in (_ex("persistent", scheduler_sms=16, poll_interval_s=2e-5),
               _ex("cuda-graph", capture_sizes="vllm", host="reference-h200", host_overlap=True),
               _ex("host-launched", host="reference-h200")):
        cfg = small_config(**TABLE, **ex)
        _, a = run_checked(cfg, tr)
        _, b = run_checked(cfg, tr)
        pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
        assert a.summary["execution"] == b.summary["execution"]


# --------------------------------------------------------------------------------- presets
def test_serial_decode_and_mega_kernel_sim_presets_run_and_name_what_they_measure(capsys, tmp_path):
    from sim.cli import main

    got = {}
    for preset in ("serial_decode", "mega_kernel_sim"):
        rc = main(["run", "--preset", preset, "--set", "trace.max_requests=5", "--out", str(tmp_path / preset),
                   "--no-progress", "--json"])
        assert rc == 0
        got[preset] = __import__("json").loads(capsys.readouterr().out)
        rc = main(["run", "--preset", preset, "--set", "trace.max_requests=5", "--out", str(tmp_path / preset),
                   "--no-progress", "--force"])
        out = capsys.readouterr().out
        assert rc == 0 and out.startswith(f"preset {preset}: measures ")
        assert "launches" in out.splitlines()[0] and "per output token" in out and "ITL (ms)" in out
    serial, mega = got["serial_decode"], got["mega_kernel_sim"]
    assert serial["execution"]["mode"] == "host-launched" and serial["execution"]["syncs_per_token"] == 1.0
    assert serial["engine"]["mean_batch_seqs"] == 1.0
    assert mega["execution"]["launches_per_token"] == 0.0 and mega["execution"]["reserved_sms"] == 8
    assert mega["itl_s"]["mean"] < serial["itl_s"]["mean"]


def test_kv_pressure_preset_preempts_evicts_and_prints_the_kv_it_measures(capsys, tmp_path):
    from sim.cli import main

    rc = main(["run", "--preset", "kv_pressure", "--set", "trace.max_requests=150", "--set", "costs.backend=roofline",
               "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("preset kv_pressure: measures ")
    assert "prefix hit rate" in out and "locked by the running batch" in out and "fragmentation" in out
    import json

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["engine"]["preemptions"] > 0 and s["kv"]["hbm_evicted_blocks"] > 0
    assert s["kv"]["hbm_peak_locked_bytes"] <= s["kv"]["hbm_kv_bytes_per_gpu"]


def test_predict_step_prices_the_persistent_kernel_on_the_sms_it_leaves(capsys):
    from sim.cli import main

    args = ["predict-step", "--gpu", "h100-sxm-80gb", "--model", "llama-3.1-8b", "--phase", "prefill", "--tokens",
            "4096"]
    assert main(args + ["--mode", "cuda-graph"]) == 0
    graph = capsys.readouterr().out
    assert main(args + ["--mode", "persistent"]) == 0
    pers = capsys.readouterr().out
    assert "0 launch(es), 0 sync(s)" in pers and "1 launch(es), 1 sync(s)" in graph

    def step_ms(out):
        return float(next(line for line in out.splitlines() if line.startswith("step ")).split()[1])

    assert step_ms(pers) > step_ms(graph)        # compute-bound prefill on 124 of 132 SMs
