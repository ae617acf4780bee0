"""Side by side with Vidur 0.0.26: the same trace, model, GPU and comparable schedulers on both simulators.

Reproduce (Vidur installs itself into $VIDUR_VENV on first use; its first run trains random-forest
predictors for ~25 min on 2 cores and caches them in $VIDUR_CACHE, later runs start in seconds):

    export VIDUR_VENV=~/.cache/vidur-0.0.26-venv VIDUR_CACHE=~/.cache/vidur-0.0.26-predictors
    python benchmarks/vidur_compare.py --qps 0.5                # vllm/fcfs and sarathi/chunked-prefill
    python benchmarks/vidur_compare.py --qps 0.6                # sarathi; Vidur's vllm fails here (below)
    python benchmarks/vidur_compare.py --qps 0.5 --skip-vidur   # reuse the saved Vidur outputs
    python benchmarks/vidur_compare.py --qps 0.6 --schedulers sarathi --tiersim-only   # tiersim's side only
    python benchmarks/vidur_compare.py --qps 0.6 --schedulers sarathi --variants vidur-predictions --alternate 3
                                                                # + 3 alternated whole-process rounds

Needs ``VIDUR_PEER_DIR`` (default ``/work/shared/peers/vidur``): ``run.sh`` and ``run_vidur_offline.py``,
which run PyPI ``vidur==0.0.26`` offline, and ``data/``, Vidur's profiling CSVs (MIT). The only
configuration those profiles cover is Llama-2-70B, tensor-parallel 2, A100, and 0.0.26 fails an
assertion on its first preemption (``Request.restart`` does not reset the stage counter), so the load
must stay below that: on the Azure conv trace ``sarathi`` completes at 0.6 QPS, ``vllm`` does not (a
failed Vidur run is recorded, and tiersim's runs still report their preemptions) but completes at 0.5.

What runs:
- Vidur: ``run.sh TRACE QPS {vllm|sarathi} WORK/vidur-<sched>-qps<QPS>``: the trace's arrivals scaled by
  ``N / span / QPS`` (burstiness kept), requests trimmed to prompt + output <= 4,096 tokens.
- tiersim, the same requests (``traces.transform.vidur_trim``) at the same scale (``trace.rate_scale =
  QPS * span / N``), with every knob that has a counterpart set to Vidur's defaults: 128 sequences
  (``batch_size_cap``), 4,096 tokens per prefill step (vllm's ``max_tokens_in_batch``) or a 512-token
  budget (sarathi's ``chunk_size``, with ``admission = "prompt"``: a request is admitted only when
  blocks for its whole prompt are free, as Sarathi's scheduler does), 16-token blocks, 3,328 KV blocks
  (Vidur's memory planner: 80 GiB
  x 0.9 minus its weight count, in whole 4,096-token request slots), a 1 % watermark, recompute
  preemption, no prefix caching, CUDA graphs with no CPU overhead. Three cost tables, built into WORK
  by ``calibration.vidur_import``:
  - ``vidur-predictions``: the predictions Vidur's run cached in $VIDUR_CACHE, with its lookup rules;
    tiersim then prices every step as Vidur does, so what is left is simulation semantics;
  - ``vidur-conventions``: Vidur's profiles, interpolated by tiersim, summed by Vidur's rules;
  - ``shipped``: ``calibration/tables/a100-80gb-vidur`` (the profiles as they are), the roofline for
    the ops Vidur does not profile, default CUDA-graph launch and sync costs.

Timing: every simulator process is pinned to one CPU core with one thread for NumPy/Numba/BLAS
(Vidur too, once its predictors are cached: a training run is not timed against tiersim). Vidur's
phases come from its ``VIDUR_SUMMARY`` line (``t_init_s`` holds predictor loading or training,
``t_run_plus_write_s`` the event loop plus writing its outputs); tiersim's from the child process (the
run loop, building the results, writing them). Ratios: Vidur's run+write over tiersim's run+write
("simulation"), and the two whole processes from their first line of Python ("process").

Latencies are computed the same way from each simulator's per-request outputs: TTFT = first token -
arrival (Vidur ``prefill_e2e_time``), E2E = last token - arrival (``request_e2e_time``), TPOT = (E2E -
TTFT) / (output tokens - 1) (Vidur's own ``decode_time_execution_plus_preemption_normalized`` divides
by the output tokens, not one less; it is reported beside). The JSON also holds per-request paired
ratios and a step-cost check: a few batch shapes priced by Vidur's cached predictions (its own lookup
rules) and by tiersim's tables, in total and per op.

Output: a table on stdout and ``benchmarks/results/vidur-compare-<date>.json``. Not run in CI.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()    # a child's "whole process" starts here, as Vidur's shim starts its clock

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(os.environ.get("VIDUR_PEER_DIR", "/work/shared/peers/vidur"))
SCHEDULERS = {"vllm": "fcfs", "sarathi": "chunked-prefill"}
VARIANTS = ("vidur-predictions", "vidur-conventions", "shipped")
SHORT = {"vidur-predictions": "tiersim/vpred", "vidur-conventions": "tiersim/vconv", "shipped": "tiersim/ship"}
THREAD_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}
# Vidur 0.0.26 defaults (vidur/config/config.py) and run.sh's settings, for the knobs tiersim matches
VIDUR = {"batch_size_cap": 128, "vllm_max_tokens_in_batch": 4096, "sarathi_chunk_size": 512,
         "block_size": 16, "watermark_blocks_fraction": 0.01, "memory_margin_fraction": 0.1,
         "total_memory_gb": 80, "max_tokens": 4096, "kv_cache_prediction_granularity": 64,
         "prediction_max_batch_size": 128}
QUANTILES = (50, 90, 99)


# ------------------------------------------------------------------------------------------ knobs
def vidur_num_blocks(tp: int = 2) -> int:
    """KV blocks Vidur 0.0.26 gives a Llama-2-70B replica (``BaseReplicaScheduler`` + ``MemoryPlanner``):
    80 GiB x (1 - margin) minus its weight count (QKV, O and MLP only, 2 bytes each), in 2-byte K+V
    tokens, rounded down to whole ``max_tokens`` request slots."""
    from sim.specs import load_model

    m = load_model("llama-2-70b")
    d, qh, kvh = m.head_dim, m.num_heads // tp, math.ceil(m.num_kv_heads / tp)
    per_layer = m.hidden_size * d * (qh + 2 * kvh) + m.hidden_size * d * qh + 3 * m.hidden_size * m.ffn_size // tp
    weights = 2 * per_layer * m.num_layers
    avail = VIDUR["total_memory_gb"] * 1024**3 * (1 - VIDUR["memory_margin_fraction"])
    tokens = int((avail - weights) // (2 * 2 * d * kvh * m.num_layers))
    slots = tokens // VIDUR["max_tokens"]
    return (VIDUR["max_tokens"] // VIDUR["block_size"]) * slots


def tiersim_overrides(sched: str, table: str, fallback: str, rate_scale: float, out: Path) -> list[str]:
    """``--set`` overrides that put tiersim on Vidur's defaults (see the module docstring)."""
    blocks = vidur_num_blocks()
    budget = VIDUR["vllm_max_tokens_in_batch"] if sched == "fcfs" else VIDUR["sarathi_chunk_size"]
    return [
        "model.name=llama-2-70b", "hardware.gpu=a100-80gb", "replica.tensor_parallel_size=2",
        f"replica.block_size_tokens={VIDUR['block_size']}", f"replica.num_hbm_blocks={blocks}",
        # room for those blocks: tiersim also counts embedding and LM-head weights (+0.5 GB per GPU)
        "replica.gpu_memory_utilization=0.95", "replica.activation_reserve_bytes=0",
        "replica.prefix_caching=false", 'replica.preemption_mode="recompute"',
        f"policies.scheduling.name={json.dumps(sched)}",
        f"policies.scheduling.max_num_seqs={VIDUR['batch_size_cap']}",
        f"policies.scheduling.max_num_batched_tokens={budget}",
        f"policies.scheduling.watermark={VIDUR['watermark_blocks_fraction']}",
        # Sarathi admits a request only when its whole prompt fits (see chunked_prefill.admission)
        *(['policies.scheduling.admission="prompt"'] if sched == "chunked-prefill" else []),
        'policies.execution.name="cuda-graph"', "policies.execution.cpu_overhead_s=0.0",
        f"costs.table={json.dumps(table)}", f"costs.fallback={json.dumps(fallback)}",
        # the bundled Azure conv trace (byte-identical to the CSV Vidur replays), trimmed as Vidur trims it
        f"trace.max_total_tokens={VIDUR['max_tokens']}", f"trace.rate_scale={rate_scale!r}",
        f"output.dir={json.dumps(str(out))}",
    ]


# ------------------------------------------------------------------------------------------ tiersim
def child(spec: dict) -> dict:
    """One tiersim run in this (pinned) process; returns its timings."""
    import resource

    os.sched_setaffinity(0, {spec["cpu"]})
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    config = with_overrides(SimConfig(), spec["overrides"])
    t_import = time.perf_counter()
    sim = Simulation(config)
    t_built = time.perf_counter()
    res = sim.run()
    t_run = time.perf_counter()
    out = Path(config.output.dir)
    res.write(out)
    (out / "config.toml").write_text(config.to_toml())
    t_end = time.perf_counter()
    s, timing = res.summary, res.timing
    return {
        "out": str(out), "requests": s["requests"]["total"], "finished": s["requests"]["finished"],
        "rejected": s["requests"]["rejected"], "preemptions": s["engine"]["preemptions"],
        "steps": s["engine"]["steps"], "events": timing["events"], "simulated_s": s["time"]["makespan_s"],
        "wall_import_s": t_import - T0, "wall_build_s": t_built - t_import,
        "wall_loop_s": timing["wall_s"], "wall_results_s": t_run - t_built - timing["wall_s"],
        "wall_write_s": t_end - t_run,
        "wall_run_plus_write_s": t_end - t_built,
        "wall_process_s": t_end - T0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "extrapolated_lookups": s.get("costs", {}).get("extrapolated_lookups", {}),
        "hbm_blocks": s["kv"]["hbm_blocks_per_replica"],
    }


def run_tiersim(overrides: list[str], cpu: int, repeats: int) -> dict:
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(ROOT)}
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"overrides": overrides, "cpu": cpu})],
                             env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"tiersim run failed:\n{out.stderr[-3000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        got["wall_parent_s"] = wall
        if best is None or got["wall_run_plus_write_s"] < best["wall_run_plus_write_s"]:
            best = got
    best["repeats"] = repeats
    return best


# ------------------------------------------------------------------------------------------ vidur
def cache_state(cache: Path) -> dict:
    return {"predictors": len(list(cache.glob("predictors/*/*.pkl"))),
            "predictions": len(list(cache.glob("predictions/*/*.csv.xz")))}


def run_vidur(trace: Path, qps: float, sched: str, work: Path, venv: Path, cache: Path, cpu: int) -> dict:
    """``run.sh`` once; its VIDUR_SUMMARY plus the parent's wall clock, saved in ``work/run.json``."""
    before = cache_state(cache)
    warm = before["predictors"] > 0 and before["predictions"] > 0
    env = {**os.environ, "VIDUR_VENV": str(venv), "VIDUR_CACHE": str(cache)}
    if warm:
        env.update(THREAD_ENV)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "vidur.log"
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["bash", str(PEER / "run.sh"), str(trace), repr(qps), sched, str(work)], env=env,
                              stdout=fh, stderr=subprocess.STDOUT,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if warm else None)
    wall = time.perf_counter() - t
    text = log.read_text(errors="replace")
    summary = parse_vidur_summary(text)
    got = {"summary": summary, "wall_parent_s": wall, "cache_before": before, "cache_after": cache_state(cache),
           "trained_predictors": not warm, "pinned_cpu": cpu if warm else None, "log": str(log)}
    if proc.returncode != 0 or summary is None:
        # 0.0.26 fails an assertion on its first preemption (Request.restart() keeps the stage counter)
        got.update(failed=True, returncode=proc.returncode, error="\n".join(text.splitlines()[-8:]))
        print(f"Vidur ({sched}) failed with status {proc.returncode}; see {log}", flush=True)
    (work / "run.json").write_text(json.dumps(got, indent=2) + "\n")
    return got


def parse_vidur_summary(text: str) -> dict | None:
    lines = [ln for ln in text.splitlines() if ln.startswith("VIDUR_SUMMARY ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else None


def vidur_requests(output_dir: str | Path):
    """Vidur's request_metrics.csv → arrival-relative times per request, in trace order."""
    import numpy as np
    import pandas as pd

    f = pd.read_csv(Path(output_dir) / "request_metrics.csv")
    idc = next(c for c in f.columns if c.lower().replace(" ", "_") == "request_id")
    f = f.sort_values(idc)
    n_out = f["request_num_decode_tokens"].to_numpy(float)
    ttft, e2e = f["prefill_e2e_time"].to_numpy(float), f["request_e2e_time"].to_numpy(float)
    return pd.DataFrame({
        "request": f[idc].to_numpy(np.int64), "ttft_s": ttft, "e2e_s": e2e, "output_tokens": n_out,
        "prompt_tokens": f["request_num_prefill_tokens"].to_numpy(float),
        "tpot_s": np.where(n_out > 1, (e2e - ttft) / np.maximum(n_out - 1, 1), np.nan),
        "vidur_decode_normalized_s": f["decode_time_execution_plus_preemption_normalized"].to_numpy(float),
        "restarts": f["request_num_restarts"].to_numpy(float) if "request_num_restarts" in f else 0.0,
    })


def tiersim_requests(out_dir: str | Path):
    import numpy as np
    import pandas as pd

    f = pd.read_parquet(Path(out_dir) / "requests.parquet")
    f = f[f["status"] == "finished"].sort_values("request_id")
    n_out = f["output_tokens"].to_numpy(float)
    ttft = (f["first_token_s"] - f["arrival_s"]).to_numpy(float)
    e2e = (f["finish_s"] - f["arrival_s"]).to_numpy(float)
    return pd.DataFrame({"request": f["request_id"].to_numpy(np.int64), "ttft_s": ttft, "e2e_s": e2e,
                         "output_tokens": n_out, "prompt_tokens": f["prompt_tokens"].to_numpy(float),
                         "tpot_s": np.where(n_out > 1, (e2e - ttft) / np.maximum(n_out - 1, 1), np.nan)})


def latency_summary(df) -> dict:
    import numpy as np

    out = {"requests": int(len(df))}
    for col in ("ttft_s", "tpot_s", "e2e_s"):
        v = df[col].to_numpy(float)
        v = v[np.isfinite(v)]
        out[col] = {"mean": float(v.mean()), **{f"p{q}": float(np.percentile(v, q)) for q in QUANTILES},
                    "max": float(v.max())}
    return out


def paired(tier, vid) -> dict:
    """Per-request ratios tiersim / Vidur (requests matched by trace position)."""
    import numpy as np

    m = tier.merge(vid, on="request", suffixes=("_t", "_v"))
    out = {"matched": int(len(m)),
           "same_lengths": bool((m["prompt_tokens_t"] == m["prompt_tokens_v"]).all()
                                and (m["output_tokens_t"] == m["output_tokens_v"]).all())}
    for col in ("ttft_s", "tpot_s", "e2e_s"):
        a, b = m[f"{col}_t"].to_numpy(float), m[f"{col}_v"].to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
        r = a[ok] / b[ok]
        out[col] = {"ratio_p10": float(np.percentile(r, 10)), "ratio_p50": float(np.percentile(r, 50)),
                    "ratio_p90": float(np.percentile(r, 90)), "within_5pct": float(np.mean(np.abs(r - 1) <= 0.05))}
    return out


# ------------------------------------------------------------------------------------------ step check
def load_vidur_predictions(cache: Path) -> dict | None:
    """Vidur's cached predictions ({op: {key tuple: ms}}) from the newest predictions/<hash>/ dirs."""
    import pandas as pd

    files: dict[str, Path] = {}
    for p in sorted(cache.glob("predictions/*/*.csv.xz"), key=lambda p: p.stat().st_mtime):
        files[p.name.split(".")[0]] = p
    need = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "attn_rope",
            "input_layernorm", "post_attention_layernorm", "add", "all_reduce", "attn_prefill", "attn_decode"}
    if not need <= set(files):
        return None
    preds = {}
    for name in need:
        f = pd.read_csv(files[name])
        y = f.pop("prediction").to_numpy(float)
        preds[name] = {tuple(int(v) for v in row): t for row, t in zip(f.to_numpy(), y)}
    return preds


VIDUR_PER_TOKEN_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "attn_rope",
                       "input_layernorm", "post_attention_layernorm", "add")
# Vidur's op → the tiersim ops that price the same work (for the per-op step check)
OP_GROUPS = {"attn_pre_proj": ("qkv_proj",), "attn_post_proj": ("o_proj",), "mlp_up_proj": ("gate_up_proj",),
             "mlp_down_proj": ("down_proj",), "mlp_act": ("act",), "attn_rope": ("rope",),
             "input_layernorm": ("attn_norm",), "post_attention_layernorm": ("ffn_norm",),
             "add": ("attn_residual", "ffn_residual"), "all_reduce": ("attn_allreduce", "ffn_allreduce"),
             "attn_decode": ("attn_decode",), "attn_prefill": ("attn_prefill",),
             "not counted by Vidur": ("embed", "kv_write", "final_norm", "lm_head", "sample")}


def vidur_step_ops_ms(P: dict, q_tokens: list[int], kv_tokens: list[int], layers: int = 80,
                      tp: int = 2) -> dict[str, float]:
    """Vidur 0.0.26's iteration time per op (``SklearnExecutionTimePredictor`` + ``ExecutionTime``), all
    layers, from its predictions; ``q_tokens``/``kv_tokens`` as Vidur's batch holds them (kv = cached +
    this step's). Also ``attn_prefill@cached``: prefill attention looked up at the cached tokens only."""
    g = VIDUR["kv_cache_prediction_granularity"]
    total = sum(q_tokens)
    r8 = (total + 7) // 8 * 8
    out = {k: layers * P[k][(r8,)] for k in VIDUR_PER_TOKEN_OPS}
    out["all_reduce"] = layers * 2 * (P["all_reduce"][(r8,)] + 0.02) if tp > 1 else 0.0
    dec = [kv for q, kv in zip(q_tokens, kv_tokens) if q == 1]
    out["attn_decode"] = 0.0
    if dec:
        avg = (int(sum(dec) / len(dec)) + g - 1) // g * g
        out["attn_decode"] = layers * P["attn_decode"][(len(dec), avg)] * (1 + 0.1 * (len(dec) > 1))
    pre = [(q, kv) for q, kv in zip(q_tokens, kv_tokens) if q != 1]
    out["attn_prefill"] = layers * sum(P["attn_prefill"][((kv + g - 1) // g * g, (q + 31) // 32 * 32)]
                                       for q, kv in pre)
    out["attn_prefill@cached"] = layers * sum(P["attn_prefill"][((kv - q + g - 1) // g * g, (q + 31) // 32 * 32)]
                                              for q, kv in pre)
    return out


def vidur_step_ms(P: dict, q_tokens: list[int], kv_tokens: list[int], layers: int = 80, tp: int = 2) -> float:
    ops = vidur_step_ops_ms(P, q_tokens, kv_tokens, layers, tp)
    return sum(v for k, v in ops.items() if k != "attn_prefill@cached")


STEP_SHAPES = [  # (label, prefill chunks [(q, cached)], decodes [attended keys])
    ("decode 1 x 1024", [], [1024]),
    ("decode 8 x 1024", [], [1024] * 8),
    ("decode 32 x 1536", [], [1536] * 32),
    ("decode 128 x 512", [], [512] * 128),
    ("prefill 128", [(128, 0)], []),
    ("prefill 1024", [(1024, 0)], []),
    ("prefill 4000", [(4000, 0)], []),
    ("prefill 3 x 1000", [(1000, 0)] * 3, []),
    ("chunk 512 @ 2048 cached", [(512, 2048)], []),
    ("chunk 502 @ 1024 + 10 decodes x 1024", [(502, 1024)], [1024] * 10),
]


def step_check(cache: Path, tables: dict[str, tuple[str, str]]) -> list[dict] | None:
    """Each STEP_SHAPES batch priced by Vidur's predictions and by tiersim's tables (ms), in total and
    per op (Vidur's op names; tiersim's ops grouped onto them by OP_GROUPS)."""
    import numpy as np

    from policies.execution.cuda_graph import CudaGraph
    from sim.costs.model import StepShape, TransformerOps
    from sim.costs.roofline import RooflineBackend
    from sim.costs.step import StepCostModel
    from sim.costs.table import CostTable, TableBackend, resolve_table_dir
    from sim.specs import load_gpu, load_model

    P = load_vidur_predictions(cache)
    if P is None:
        return None
    ops = TransformerOps(load_model("llama-2-70b"), tp=2)
    gpu = load_gpu("a100-80gb")
    models = {}
    for name, (table, fallback) in tables.items():
        backend = TableBackend(ops, gpu, CostTable(resolve_table_dir(table)),
                               RooflineBackend(ops, gpu) if fallback == "roofline" else None)
        models[name] = StepCostModel(ops, backend, CudaGraph())
    rows = []
    for label, chunks, decodes in STEP_SHAPES:
        q = [c[0] for c in chunks] + [1] * len(decodes)
        kv = [c[0] + c[1] for c in chunks] + [a + 1 for a in decodes]   # Vidur: processed + this step's
        vops = vidur_step_ops_ms(P, q, kv)
        row = {"shape": label, "vidur_ms": vidur_step_ms(P, q, kv),
               "ops_ms": {k: {"vidur": v} for k, v in vops.items()}}
        shape = StepShape(prefill_q=np.array([c[0] for c in chunks], np.int64),
                          prefill_c=np.array([c[1] for c in chunks], np.int64), num_decode=len(decodes),
                          decode_ctx_sum=int(sum(decodes)), num_sampled=len(chunks) + len(decodes))
        for name, model in models.items():
            dur, costs, overhead, _, _ = model.breakdown(shape)
            per = {c.name: c.time_s * 1e3 for c in costs}
            row[f"tiersim_{name}_ms"] = dur * 1e3
            row[f"tiersim_{name}_over_vidur"] = dur * 1e3 / row["vidur_ms"]
            for group, names in OP_GROUPS.items():
                row["ops_ms"].setdefault(group, {})[name] = sum(per.get(n, 0.0) for n in names)
            row["ops_ms"].setdefault("launch/sync", {})[name] = overhead * 1e3
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ main
def prepare_trace(trace_file: Path, qps: float, work: Path) -> dict:
    """Facts about the trace Vidur replays, and the rate scale that matches run.sh's
    ``time_scale_factor = N / span / QPS``. tiersim replays the same file (bundled as azure-conv) with
    ``trace.max_total_tokens`` = Vidur's max_tokens, which trims requests exactly as Vidur does."""
    import traces
    from traces.transform import vidur_trim

    t = traces.load_trace(str(trace_file))
    trimmed = vidur_trim(t, VIDUR["max_tokens"])
    work.mkdir(parents=True, exist_ok=True)
    span = float(t.arrival_s[-1] - t.arrival_s[0])
    scale = len(t) / span / qps          # run.sh: multiplies arrival times by this
    return {"file": str(trace_file), "requests": len(t), "span_s": span,
            "native_qps": len(t) / span, "vidur_time_scale_factor": scale, "tiersim_rate_scale": 1.0 / scale,
            "trimmed_requests": trimmed.meta["transforms"][-1]["trimmed_requests"],
            "sha256": trimmed.identity().get("sha256")}


def fmt_row(label: str, values: list, fmt: str = "{:>14.3f}") -> str:
    return f"{label:28}" + "".join(("{:>14}".format("-") if v is None else fmt.format(v)) for v in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qps", type=float, default=0.6, help="request rate both simulators replay (default 0.6)")
    p.add_argument("--schedulers", default="vllm,sarathi",
                   help="Vidur schedulers, comma-separated: vllm (vs tiersim fcfs), sarathi (vs chunked-prefill)")
    p.add_argument("--skip-vidur", action="store_true", help="reuse the Vidur outputs saved in --work")
    p.add_argument("--tiersim-only", action="store_true",
                   help="run tiersim's side only (no Vidur: e.g. while its predictors are still training); "
                        "no ratios")
    p.add_argument("--trace", default=str(ROOT / "traces" / "data" / "AzureLLMInferenceTrace_conv.csv.gz"),
                   help="Azure-2023-format trace (default: the bundled conv trace)")
    p.add_argument("--work", default=os.environ.get("VIDUR_COMPARE_WORK",
                                                    str(Path.home() / ".cache" / "tiersim-vidur-compare")),
                   help="where both simulators' outputs go (kept for --skip-vidur)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON")
    p.add_argument("--repeats", type=int, default=1, help="tiersim runs per case; the fastest is reported")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="after the paired runs, N more rounds per scheduler of one Vidur and one tiersim "
                        "process (the first table variant), alternating which goes first; the whole-process "
                        "ratio of each round and their median are reported")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"tiersim cost tables: {', '.join(VARIANTS)}")
    p.add_argument("--vidur-training-log", default=None,
                   help="log of the run that trained Vidur's predictors (its VIDUR_SUMMARY is reported)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    scheds = [s for s in args.schedulers.split(",") if s]
    bad = [s for s in scheds if s not in SCHEDULERS]
    variants = [v for v in args.variants.split(",") if v]
    if bad or any(v not in VARIANTS for v in variants):
        p.error(f"--schedulers: {', '.join(SCHEDULERS)}; --variants: {', '.join(VARIANTS)}")
    venv = Path(os.environ.get("VIDUR_VENV", Path.home() / ".cache" / "vidur-0.0.26-venv"))
    cache = Path(os.environ.get("VIDUR_CACHE", Path.home() / ".cache" / "vidur-0.0.26-predictors"))
    work = Path(args.work)
    cpu = min(os.sched_getaffinity(0))
    trace_file = Path(args.trace)
    qtag = f"qps{args.qps:g}"

    trace = prepare_trace(trace_file, args.qps, work)
    result = {"date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "pinned_cpu": cpu, "python": sys.version.split()[0], "vidur_version": "0.0.26", "qps": args.qps,
              "trace": trace, "vidur_defaults": VIDUR, "tiersim_hbm_blocks": vidur_num_blocks(), "pairs": []}
    if args.vidur_training_log and Path(args.vidur_training_log).exists():
        text = Path(args.vidur_training_log).read_text(errors="replace")
        real = re.findall(r"^real\s+(\S+)", text, flags=re.M)
        result["vidur_training_run"] = {"log": args.vidur_training_log, "summary": parse_vidur_summary(text),
                                        "time_real": real[-1] if real else None,
                                        "failed": "Traceback" in text}

    # Vidur first: its first run trains the predictors that the vidur-predictions table is built from
    vidur = {}
    for sched in scheds:
        vwork = work / f"vidur-{sched}-{qtag}"
        if args.tiersim_only:
            vidur[sched] = {"failed": True, "skipped": True, "error": "not run (--tiersim-only)"}
        elif args.skip_vidur:
            saved = vwork / "run.json"
            if not saved.exists():
                raise SystemExit(f"--skip-vidur: no saved Vidur run in {saved}")
            vidur[sched] = json.loads(saved.read_text())
        else:
            print(f"Vidur {sched} at {args.qps:g} QPS ...", flush=True)
            vidur[sched] = run_vidur(trace_file, args.qps, sched, vwork, venv, cache, cpu)

    sys.path.insert(0, str(ROOT))
    from calibration.vidur_import import build_table

    tables = {}
    if "vidur-predictions" in variants:
        try:
            build_table(None, work / "table-vidur-predictions", predictions_cache=cache)
            tables["vidur-predictions"] = (str(work / "table-vidur-predictions"), "error")
        except FileNotFoundError as exc:
            print(f"skipping the vidur-predictions variant: {exc}", flush=True)
    if "vidur-conventions" in variants:
        build_table(PEER / "data", work / "table-vidur-conventions", vidur_conventions=True)
        tables["vidur-conventions"] = (str(work / "table-vidur-conventions"), "error")
    if "shipped" in variants:
        tables["shipped"] = ("a100-80gb-vidur", "roofline")
    result["tables"] = {k: {"table": v[0], "fallback": v[1]} for k, v in tables.items()}

    # warm Numba's on-disk cache so no timed run pays compilation
    first = next(iter(tables.values()))
    warm = tiersim_overrides("fcfs", *first, trace["tiersim_rate_scale"],
                             work / "tiersim-warmup") + ["trace.max_requests=300"]
    run_tiersim(warm, cpu, 1)

    for sched in scheds:
        vid = vidur[sched]
        pair = {"vidur_scheduler": sched, "tiersim_scheduler": SCHEDULERS[sched], "vidur": dict(vid), "tiersim": {}}
        vreq = None
        if not vid.get("failed"):
            vreq = vidur_requests(vid["summary"]["output_dir"])
            pair["vidur"].update(latency=latency_summary(vreq),
                                 vidur_decode_normalized_mean_s=float(vreq["vidur_decode_normalized_s"].mean()),
                                 restarts=float(vreq["restarts"].sum()))
        vs = vid.get("summary") or {}
        for name, (table, fallback) in tables.items():
            print(f"tiersim {SCHEDULERS[sched]} ({name}) ...", flush=True)
            out = work / f"tiersim-{SCHEDULERS[sched]}-{name}-{qtag}"
            ov = tiersim_overrides(SCHEDULERS[sched], table, fallback,
                                   trace["tiersim_rate_scale"], out)
            got = run_tiersim(ov, cpu, args.repeats)
            treq = tiersim_requests(got["out"])
            got["latency"] = latency_summary(treq)
            got["requests_per_wall_s_run"] = got["requests"] / got["wall_run_plus_write_s"]
            if vreq is not None:
                got["paired_vs_vidur"] = paired(treq, vreq)
                got["speed_ratio_simulation"] = vs["t_run_plus_write_s"] / got["wall_run_plus_write_s"]
                got["speed_ratio_process"] = vs["t_total_s"] / got["wall_process_s"]
            got["overrides"] = ov
            pair["tiersim"][name] = got
        result["pairs"].append(pair)
        print_pair(pair, args.qps)

    if args.alternate and not (args.tiersim_only or args.skip_vidur):
        name, (table, fallback) = next(iter(tables.items()))
        for pair in result["pairs"]:
            sched = pair["vidur_scheduler"]
            if pair["vidur"].get("failed"):
                continue
            pair["alternated"] = alternate(sched, args.alternate, name, table, fallback, trace, work, qtag,
                                           trace_file, args.qps, venv, cache, cpu)
            a = pair["alternated"]
            print(f"alternated ({sched} / {SCHEDULERS[sched]}, {name}, {args.alternate} rounds): whole-process "
                  f"ratio median {a['ratio_process_median']:.2f}x (range {a['ratio_process_min']:.2f}-"
                  f"{a['ratio_process_max']:.2f}); Vidur {a['vidur_process_s_median']:.1f} s, tiersim "
                  f"{a['tiersim_process_s_median']:.1f} s", flush=True)

    try:
        result["step_check"] = step_check(cache, tables)
    except Exception as exc:  # the check is a diagnostic; a cache it cannot read should not lose the run
        result["step_check"] = None
        result["step_check_error"] = repr(exc)
    if result["step_check"]:
        print_step_check(result["step_check"], list(tables))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"vidur-compare-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"results: {path}")
    return 0


def alternate(sched: str, rounds: int, name: str, table: str, fallback: str, trace: dict, work: Path, qtag: str,
              trace_file: Path, qps: float, venv: Path, cache: Path, cpu: int) -> dict:
    """``rounds`` rounds of one Vidur process and one tiersim process on the same core, the order
    alternating from round to round (Vidur first in even rounds), so that drift in the machine's speed
    (other jobs, thermal) falls on both alike. Whole process: Vidur's ``t_total_s`` (its shim's clock
    from its first line of Python) against tiersim's ``wall_process_s`` (likewise)."""
    import statistics

    out = work / f"tiersim-{SCHEDULERS[sched]}-{name}-{qtag}-alt"
    ov = tiersim_overrides(SCHEDULERS[sched], table, fallback, trace["tiersim_rate_scale"], out)
    rows = []
    for i in range(rounds):
        got = {}
        order = ("vidur", "tiersim") if i % 2 == 0 else ("tiersim", "vidur")
        for who in order:
            print(f"  round {i}: {who} {sched if who == 'vidur' else SCHEDULERS[sched]} ...", flush=True)
            if who == "vidur":
                v = run_vidur(trace_file, qps, sched, work / f"vidur-{sched}-{qtag}-alt", venv, cache, cpu)
                if v.get("failed"):
                    raise RuntimeError(f"Vidur ({sched}) failed in alternated round {i}: {v.get('error')}")
                got["vidur_process_s"] = v["summary"]["t_total_s"]
                got["vidur_run_plus_write_s"] = v["summary"]["t_run_plus_write_s"]
                got["vidur_wall_parent_s"] = v["wall_parent_s"]
            else:
                t = run_tiersim(ov, cpu, 1)
                got["tiersim_process_s"] = t["wall_process_s"]
                got["tiersim_run_plus_write_s"] = t["wall_run_plus_write_s"]
                got["tiersim_wall_parent_s"] = t["wall_parent_s"]
                got["tiersim_peak_rss_mb"] = t["peak_rss_mb"]
        got["order"] = list(order)
        got["ratio_process"] = got["vidur_process_s"] / got["tiersim_process_s"]
        got["ratio_parent_wall"] = got["vidur_wall_parent_s"] / got["tiersim_wall_parent_s"]
        rows.append(got)
    med = statistics.median
    r = [g["ratio_process"] for g in rows]
    return {"variant": name, "rounds": rows, "ratio_process_median": med(r), "ratio_process_min": min(r),
            "ratio_process_max": max(r), "ratio_parent_wall_median": med([g["ratio_parent_wall"] for g in rows]),
            "vidur_process_s_median": med([g["vidur_process_s"] for g in rows]),
            "tiersim_process_s_median": med([g["tiersim_process_s"] for g in rows])}


def print_pair(pair: dict, qps: float) -> None:
    vid = pair["vidur"]
    vs = vid.get("summary") or {}
    ok = not vid.get("failed")
    names = list(pair["tiersim"])
    ts = [pair["tiersim"][n] for n in names]
    cols = ["Vidur"] + [SHORT.get(n, n)[:13] for n in names]
    print(f"\n{pair['vidur_scheduler']} (Vidur) vs {pair['tiersim_scheduler']} (tiersim), {qps:g} QPS, "
          f"{ts[0]['requests']:,} requests")
    if vid.get("skipped"):
        print("  Vidur not run (--tiersim-only)")
    elif not ok:
        print(f"  Vidur FAILED (status {vid.get('returncode')}): {vid.get('error', '').splitlines()[-1:]}")
    print(f"{'':28}" + "".join(f"{c:>14}" for c in cols))

    def v(key):
        return vs.get(key) if ok else None

    print(fmt_row("wall: run + write (s)", [v("t_run_plus_write_s")] + [t["wall_run_plus_write_s"] for t in ts]))
    print(fmt_row("wall: loop only (s)", [None] + [t["wall_loop_s"] for t in ts]))
    print(fmt_row("wall: whole process (s)", [v("t_total_s")] + [t["wall_process_s"] for t in ts]))
    print(fmt_row("requests / wall s (run)", [v("req_per_wall_s_run")]
                  + [t["requests_per_wall_s_run"] for t in ts], "{:>14,.0f}"))
    print(fmt_row("Vidur / tiersim: run+write", [None] + [t.get("speed_ratio_simulation") for t in ts], "{:>14.1f}"))
    print(fmt_row("Vidur / tiersim: process", [None] + [t.get("speed_ratio_process") for t in ts], "{:>14.1f}"))
    print(fmt_row("steps (batches)", [v("batches")] + [t["steps"] for t in ts], "{:>14,}"))
    print(fmt_row("preemptions (restarts)", [vid.get("restarts")] + [t["preemptions"] for t in ts], "{:>14,.0f}"))
    print(fmt_row("makespan (s)", [v("simulated_time_s")] + [t["simulated_s"] for t in ts], "{:>14,.1f}"))
    for col, label, scale in (("ttft_s", "TTFT", 1.0), ("tpot_s", "TPOT (ms)", 1e3), ("e2e_s", "E2E", 1.0)):
        for q in ("p50", "p90", "p99", "mean"):
            vals = [vid["latency"][col][q] * scale if ok else None] + [t["latency"][col][q] * scale for t in ts]
            print(fmt_row(f"{label} {q}" + (" (s)" if scale == 1.0 else ""), vals))
    for n, t in zip(names, ts):
        pr = t.get("paired_vs_vidur")
        if pr:
            print(f"  {SHORT.get(n, n)} / Vidur per request (p10 / p50 / p90): " + "; ".join(
                f"{c[:-2].upper()} {pr[c]['ratio_p10']:.3f} / {pr[c]['ratio_p50']:.3f} / {pr[c]['ratio_p90']:.3f}"
                for c in ("ttft_s", "tpot_s", "e2e_s")))


def print_step_check(rows: list[dict], names: list[str]) -> None:
    print("\nstep cost check (ms per engine step; Vidur from its cached predictions)")
    print(f"{'shape':40}{'Vidur':>10}" + "".join(f"{SHORT.get(n, n):>14}{'ratio':>8}" for n in names))
    for r in rows:
        print(f"{r['shape']:40}{r['vidur_ms']:>10.2f}" + "".join(
            f"{r[f'tiersim_{n}_ms']:>14.2f}{r[f'tiersim_{n}_over_vidur']:>8.3f}" for n in names))
        if names:
            n = "vidur-conventions" if "vidur-conventions" in names else names[0]
            big = [(g, v[n] - v["vidur"]) for g, v in r["ops_ms"].items() if "vidur" in v and n in v
                   and abs(v[n] - v["vidur"]) >= 0.3]
            note = "; ".join(f"{g} {d:+.2f}" for g, d in sorted(big, key=lambda x: -abs(x[1])))
            if "attn_prefill" in dict(big):
                note += f" (Vidur at kv=cached: {r['ops_ms']['attn_prefill@cached']['vidur']:.2f} vs " \
                        f"{r['ops_ms']['attn_prefill'][n]:.2f})"
            if note:
                print(f"{'':6}{SHORT.get(n, n)} - Vidur per op (ms): {note}")


if __name__ == "__main__":
    sys.exit(main())
