"""calibration.vidur_import: Vidur's profile CSVs → a tiersim cost table. Small synthetic CSVs in Vidur's
layout (CI has no copy of the real ones) check the op mapping, units (ms → s, all-reduce bytes), keys,
the decode-context offset, row selection, and that a step priced with --vidur-conventions equals
Vidur 0.0.26's own sum."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibration import vidur_import
from policies.execution.cuda_graph import CudaGraph
from sim.costs.model import TransformerOps
from sim.costs.roofline import RooflineBackend
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend
from sim.errors import CostTableError
from sim.specs import load_gpu, load_model

# per-call milliseconds of each profiled op in the synthetic data (TP 2 rows); TP 1 rows get 100x
MLP_MS = {"emb": 0.004, "input_layernorm": 0.006, "attn_pre_proj": 0.05, "attn_rope": 0.003,
          "attn_post_proj": 0.04, "post_attention_layernorm": 0.010, "mlp_up_proj": 0.3, "mlp_act": 0.012,
          "mlp_down_proj": 0.15, "add": 0.008}
DECODE_MS, PREFILL_MS, ALLREDUCE_MS = 0.02, 0.2, 0.03
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]


def _stats(prefix: str, ms) -> dict:
    ms = np.asarray(ms, float)
    return {f"time_stats.{prefix}.min": ms * 0.9, f"time_stats.{prefix}.max": ms * 1.2,
            f"time_stats.{prefix}.mean": ms, f"time_stats.{prefix}.median": ms,
            f"time_stats.{prefix}.std": ms * 0.05}


def write_profiles(root, *, dup_decode_ms: float | None = None) -> None:
    """Vidur's layout: compute/mlp.csv.xz, compute/attention.csv.xz, network/all_reduce.csv.xz."""
    (root / "compute").mkdir(parents=True)
    (root / "network").mkdir()
    mlp = []
    for tp, scale in ((1, 100.0), (2, 1.0)):
        n = len(TOKENS)
        cols = {}
        for op, ms in MLP_MS.items():
            cols.update(_stats(op, [ms * scale] * n))
        cols.update(n_head=64, n_kv_head=8, n_embd=8192, n_expanded_embd=28672, vocab_size=32768,
                    use_gated_mlp=True, num_tokens=TOKENS, num_tensor_parallel_workers=tp)
        mlp.append(pd.DataFrame(cols))
    pd.concat(mlp).to_csv(root / "compute" / "mlp.csv.xz", index=False)

    rows = []
    for kv in (0, 64, 512, 2048):                  # prefill: chunk on top of kv cached tokens
        for chunk in (64, 256, 1024):
            rows.append(dict(batch_size=1, prefill_chunk_size=chunk, kv_cache_size=kv, is_prefill=True,
                             **{k: v for k, v in _stats("attn_prefill", PREFILL_MS).items()},
                             **{k: np.nan for k in _stats("attn_decode", 0)}))
    for b in (1, 2, 4, 8):                           # decode: batch of one-token queries
        for kv in (32, 64, 512, 2048):
            rows.append(dict(batch_size=b, prefill_chunk_size=0, kv_cache_size=kv, is_prefill=False,
                             **{k: np.nan for k in _stats("attn_prefill", 0)},
                             **{k: v for k, v in _stats("attn_decode", DECODE_MS).items()}))
    if dup_decode_ms is not None:                    # a repeated profile point: merged by its median
        rows.append(dict(rows[-1], **{k: v for k, v in _stats("attn_decode", dup_decode_ms).items()}))
        rows.append(dict(rows[-1]))
    att = pd.DataFrame(rows)
    att = att.assign(**{k: 0.0 for k in _stats("attn_input_reshape", 0)},
                     **{k: 0.001 for k in _stats("attn_output_reshape", 0)},
                     n_embd=8192, n_q_head=64, n_kv_head=8, block_size=16, num_tensor_parallel_workers=2,
                     max_model_len=4096, attention_backend="AttentionBackend.FLASH_ATTENTION",
                     profile_method="ProfileMethod.KINETO")
    other_tp = att.assign(num_tensor_parallel_workers=4, **_stats("attn_decode", [9.0] * len(att)))
    pd.concat([att, other_tp]).to_csv(root / "compute" / "attention.csv.xz", index=False)

    sizes = [2048, 16384, 131072, 1048576, 67108864]
    ar = []
    for workers, dpn, ms in ((2, 2, ALLREDUCE_MS), (2, 1, 5.0), (4, 4, 7.0)):
        ar.append(pd.DataFrame({**_stats("all_reduce", [ms] * len(sizes)), "rank": 0, "num_workers": workers,
                                "size": sizes, "collective": "all_reduce", "devices_per_node": dpn,
                                "max_devices_per_node": 8}))
    pd.concat(ar).reset_index(drop=True).to_csv(root / "network" / "all_reduce.csv.xz")


@pytest.fixture
def profiles(tmp_path):
    root = tmp_path / "vidur-data"
    write_profiles(root, dup_decode_ms=0.05)
    return root


def test_mapping_units_and_keys(profiles, tmp_path):
    out = vidur_import.build_table(profiles, tmp_path / "t")
    f = pd.read_parquet(out / "ops.parquet")
    meta = json.loads((out / "table.json").read_text())
    assert meta["format"] == "tiersim-cost-table/1" and meta["gpu"]["preset"] == "a100-80gb"
    ops = TransformerOps(load_model("llama-2-70b"), tp=2)
    key = {op.name: (op.table_op, op.key) for op in ops.ops}
    required = set(ops.required_table_entries())
    have = set(map(tuple, f[["op", "key"]].drop_duplicates().to_numpy()))
    # every profiled op lands on a key the simulator asks for; the rest are named as missing
    assert have <= required
    assert required - have == {key["kv_write"], key["lm_head"], key["sample"]}
    notes = " ".join(meta["fit_notes"])
    assert "kv_write" in notes and "lm_head" in notes and "sample" in notes

    def times(name):
        op, k = key[name]
        return f[(f.op == op) & (f.key == k)]

    # milliseconds → seconds, TP 2 rows only, num_tokens as x
    for vop, name in vidur_import.MLP_OPS.items():
        g = times(name)
        assert sorted(g.x) == TOKENS and (g.y == 0).all()
        assert np.allclose(g.time_s, MLP_MS[vop] * 1e-3), vop
        assert np.allclose(g.min_s, MLP_MS[vop] * 0.9e-3) and g.p10_s.isna().all()
    assert key["qkv_proj"] == ("gemm", "dtype=bf16,k=8192,n=5120")
    assert key["gate_up_proj"] == ("gemm", "dtype=bf16,k=8192,n=28672")
    # both per-layer norms share one rms_norm key: their mean keeps the per-layer sum
    assert np.allclose(times("attn_norm").time_s, 0.008e-3)
    # attention: prefill x = chunk, y = cached; decode x = batch, y = cached + the new token
    p = times("attn_prefill")
    assert set(p.x) == {64, 256, 1024} and set(p.y) == {0, 64, 512, 2048} and (p.z == 1).all()
    d = times("attn_decode")
    assert set(d.x) == {1, 2, 4, 8} and set(d.y) == {33, 65, 513, 2049}
    assert len(d) == 16                                           # TP 4 rows dropped, duplicate merged
    dup = d[(d.x == 8) & (d.y == 2049)].time_s.iloc[0]
    assert dup == pytest.approx(0.05e-3)                          # median of 0.02, 0.05, 0.05 ms
    assert np.allclose(d[~((d.x == 8) & (d.y == 2049))].time_s, DECODE_MS * 1e-3)
    # all-reduce: x in bytes, only 2 workers on one node
    a = times("attn_allreduce")
    assert sorted(a.x) == [2048, 16384, 131072, 1048576, 67108864]
    assert np.allclose(a.time_s, ALLREDUCE_MS * 1e-3)


def test_table_lacks_entries_that_generalisation_or_the_fallback_price(profiles, tmp_path):
    out = vidur_import.build_table(profiles, tmp_path / "t")
    ops = TransformerOps(load_model("llama-2-70b"), tp=2)
    gpu = load_gpu("a100-80gb")
    table = CostTable(out)
    with pytest.raises(CostTableError, match="no entry for kv_write"):
        TableBackend(ops, gpu, table, generalise=False)
    backend = TableBackend(ops, gpu, table, fallback=RooflineBackend(ops, gpu))
    assert backend.identity["roofline_fallback_for"] == [
        "gemm dtype=bf16,k=8192,n=16000", "kv_write d=128,kvh=4", "sample v=32000"]
    assert backend.lookup_report()["roofline_priced"] == ["kv_write", "lm_head", "sample"]
    # by default the GPU's other measurements price them: the LM head from the GEMM model fitted on the
    # four Vidur GEMMs, the KV write and argmax from their bytes on the measured residual add
    gen = TableBackend(ops, gpu, table).lookup_report()
    assert gen["ops"]["lm_head"]["source"] == "generalised" and "GEMM model" in gen["ops"]["lm_head"]["from"]
    assert gen["ops"]["kv_write"]["source"] == gen["ops"]["sample"]["source"] == "modelled"
    assert "add h=8192" in gen["ops"]["kv_write"]["from"]
    assert gen["classes"] == {"generalised": 1, "measured": 16, "modelled": 2}
    with pytest.raises(CostTableError, match="measured on a100-80gb"):
        TableBackend(ops, load_gpu("h100-sxm-80gb"), table, fallback=RooflineBackend(ops, gpu))


def test_vidur_conventions_price_a_step_as_vidur_sums_it(profiles, tmp_path):
    out = vidur_import.build_table(profiles, tmp_path / "v", vidur_conventions=True)
    meta = json.loads((out / "table.json").read_text())
    assert meta["launch"] == {"dispatch_s": 0.0, "graph_launch_s": 0.0, "graph_kernel_s": 0.0, "sync_s": 0.0,
                              "switch_s": 0.0}
    ops = TransformerOps(load_model("llama-2-70b"), tp=2)
    gpu = load_gpu("a100-80gb")
    backend = TableBackend(ops, gpu, CostTable(out))                  # complete: no fallback needed
    cost = StepCostModel(ops, backend, CudaGraph())
    m = MLP_MS
    ar = ALLREDUCE_MS + vidur_import.NCCL_CPU_LAUNCH_OVERHEAD_MS
    # Vidur 0.0.26 (vidur/entities/execution_time.py): per layer pre + post + rope + attention + norms
    # + up + down + act + one add + two all-reduces; times the layers; nothing per step
    layer = (m["attn_pre_proj"] + m["attn_post_proj"] + m["attn_rope"] + m["input_layernorm"]
             + m["post_attention_layernorm"] + m["mlp_up_proj"] + m["mlp_down_proj"] + m["mlp_act"] + m["add"]
             + 2 * ar)
    final_norm = (m["input_layernorm"] + m["post_attention_layernorm"]) / 2    # the one op left priced
    # decode of 4 sequences at 512 cached tokens each (attending 513): attention x 1.1 (GQA, batch > 1)
    dur, _, _ = cost.step(np.empty(0, np.int64), np.empty(0, np.int64), 4, 4 * 513, 4)
    want = 80 * (layer + DECODE_MS * 1.1) + final_norm
    assert dur * 1e3 == pytest.approx(want, abs=1e-6)   # + 83 x 1 ps (not-counted ops)
    # one sequence: no batching overhead
    dur1, _, _ = cost.step(np.empty(0, np.int64), np.empty(0, np.int64), 1, 513, 1)
    assert dur1 * 1e3 == pytest.approx(80 * (layer + DECODE_MS) + final_norm, abs=1e-6)
    # a prefill chunk of 256 tokens on 64 cached
    durp, _, _ = cost.step(np.array([256]), np.array([64]), 0, 0, 1)
    assert durp * 1e3 == pytest.approx(80 * (layer + PREFILL_MS) + final_norm, abs=1e-6)
    notes = " ".join(meta["fit_notes"])
    assert "random forest" in notes and "ceil64(cached + chunk)" in notes


def test_cli(profiles, tmp_path, capsys):
    assert vidur_import.main(["--data", str(profiles), "--out", str(tmp_path / "c")]) == 0
    assert "grid points" in capsys.readouterr().out
    assert (tmp_path / "c" / "ops.parquet").exists()
    assert vidur_import.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    assert "missing" in capsys.readouterr().err
    assert vidur_import.main(["--data", str(profiles), "--out", str(tmp_path / "e"), "--tp", "8"]) == 2
    assert "tensor-parallel 8" in capsys.readouterr().err


def write_predictions(cache) -> dict:
    """A Vidur predictor cache (predictions/<hash>/<op>.csv.xz, columns X_0[, X_1], prediction in ms) filled
    from simple formulas; returns the formulas."""
    d = cache / "predictions" / "0123abcd"
    d.mkdir(parents=True)
    tokens = np.arange(1, 4097)
    per_token = {op: 0.01 * (i + 1) for i, op in enumerate(vidur_import.PREDICTED_OPS[:10])}
    for op, base in per_token.items():
        pd.DataFrame({"X_0": tokens, "prediction": base + 1e-4 * tokens}).to_csv(
            d / f"{op}.csv.xz", index=False, compression="xz")
    b, kv = np.meshgrid(np.arange(1, 129), np.arange(0, 4097, 64), indexing="ij")
    pd.DataFrame({"X_0": b.ravel(), "X_1": kv.ravel(), "prediction": 0.01 + 1e-3 * b.ravel() + 1e-5 * kv.ravel()}
                 ).to_csv(d / "attn_decode.csv.xz", index=False, compression="xz")
    kv, q = np.meshgrid(np.arange(0, 4097, 64), np.arange(32, 4097, 32), indexing="ij")
    pd.DataFrame({"X_0": kv.ravel(), "X_1": q.ravel(), "prediction": 0.02 + 1e-4 * q.ravel() + 1e-5 * kv.ravel()}
                 ).to_csv(d / "attn_prefill.csv.xz", index=False, compression="xz")
    return {"tok": lambda op, n: per_token[op] + 1e-4 * n, "dec": lambda b, kv: 0.01 + 1e-3 * b + 1e-5 * kv,
            "pre": lambda kv, q: 0.02 + 1e-4 * q + 1e-5 * kv}


def test_from_predictions_reproduces_vidur_lookups(tmp_path):
    f = write_predictions(tmp_path / "cache")
    out = vidur_import.build_table(None, tmp_path / "p", predictions_cache=tmp_path / "cache")
    assert json.loads((out / "table.json").read_text())["vidur"]["source"] == "predictions"
    ops = TransformerOps(load_model("llama-2-70b"), tp=2)
    cost = StepCostModel(ops, TableBackend(ops, load_gpu("a100-80gb"), CostTable(out)), CudaGraph())
    tok = [op for op in vidur_import.PREDICTED_OPS[:10] if op != "all_reduce"]

    def vidur_ms(q_tokens, kv_tokens):
        """Vidur 0.0.26's sum, written out: tokens rounded up to 8, decode kv mean rounded up to 64 (x 1.1
        for batches above 1), prefill at (ceil64(kv), ceil32(chunk)), all-reduce x 2 + 0.02 ms each."""
        r8 = -(-sum(q_tokens) // 8) * 8
        layer = sum(f["tok"](op, r8) for op in tok) + 2 * (f["tok"]("all_reduce", r8) + 0.02)
        dec = [kv for q, kv in zip(q_tokens, kv_tokens) if q == 1]
        if dec:
            layer += f["dec"](len(dec), -(-int(np.mean(dec)) // 64) * 64) * (1.1 if len(dec) > 1 else 1.0)
        layer += sum(f["pre"](-(-kv // 64) * 64, -(-q // 32) * 32) for q, kv in zip(q_tokens, kv_tokens) if q != 1)
        return 80 * layer

    def final_norm(sampled):
        r8 = -(-sampled // 8) * 8
        return (f["tok"]("input_layernorm", r8) + f["tok"]("post_attention_layernorm", r8)) / 2

    empty = np.empty(0, np.int64)
    # 5 decodes attending 513 keys each: Vidur's batch holds kv = processed + 1 = 514 per sequence
    dur, _, _ = cost.step(empty, empty, 5, 5 * 513, 5)
    assert dur * 1e3 == pytest.approx(vidur_ms([1] * 5, [514] * 5) + final_norm(5), abs=1e-6)
    # one decode: no batching overhead
    dur, _, _ = cost.step(empty, empty, 1, 700, 1)
    assert dur * 1e3 == pytest.approx(vidur_ms([1], [701]) + final_norm(1), abs=1e-6)
    # a 100-token chunk on 128 cached tokens: Vidur looks up kv = ceil64(228) = 256, chunk 128
    dur, _, _ = cost.step(np.array([100]), np.array([128]), 0, 0, 0)
    assert dur * 1e3 == pytest.approx(vidur_ms([100], [228]), abs=1e-6)
    # two whole prompts in one step: each priced alone, summed
    dur, _, _ = cost.step(np.array([1000, 37]), np.array([0, 0]), 0, 0, 2)
    assert dur * 1e3 == pytest.approx(vidur_ms([1000, 37], [1000, 37]) + final_norm(2), abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no cached Vidur predictions"):
        vidur_import.find_predictions(tmp_path / "empty")
