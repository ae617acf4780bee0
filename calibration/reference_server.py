"""A reference continuous-batching server: tiersim's schedulers driving the real reference decoder.

Step-level validation (``tiersim validate``) says whether one step is priced right; this server gives
the end-to-end ground truth for ``tiersim validate --e2e RUN_DIR``: a trace slice is served in real
time by a small engine, and its TTFT, ITL and E2E are compared with tiersim's replay of the same slice.

How it works:

- **Requests** come from the trace slice that tiersim replays (the config keys ``trace.bundled``,
  ``trace.start_s``, ``trace.end_s``, ``trace.rate_scale``, ``trace.max_requests``), fed into a
  waiting queue at their arrival times.
- **Scheduling** is tiersim's own: the registered ``fcfs`` or ``chunked-prefill`` policy with the same
  parameters, applied by ``calibration.serving_engine.Engine`` exactly as ``sim.replica`` applies a
  plan (admission, ``max_num_seqs``, token budget, watermark, preemption of the most recently admitted
  request by recompute when the ``num_blocks`` × ``block_size`` KV capacity runs out).
- **Steps** run on ``calibration.serving_model`` (the reference decoder's weights and ops, over a
  token arena with ragged per-sequence contexts: one mixed forward pass per step, as tiersim prices
  it); decode-only steps replay CUDA graphs captured at vLLM's batch sizes.
- **Time**: each step is measured on the host clock, from the moment the engine takes in arrivals
  and starts scheduling it to the moment its sampled tokens are back on the host (``host_s`` of
  scheduling and input preparation, then ``forward_s``), so that host work is inside the step, as in
  a real engine; committing the tokens afterwards (``post_s``) is the gap before the next step.
  With ``fast_forward`` (the default for the GPU cases) an idle engine jumps its clock to the next
  arrival instead of sleeping; busy time is always real, so the timeline equals a real-time run's
  except for the sleep-to-wake latency a real-time run adds after idle gaps (``--realtime`` runs it
  that way).
- **Records**: per request arrival, first scheduled, first token, finish, preemptions and the steps
  that emitted its tokens (so ITL is computed exactly as tiersim does: gaps between consecutive steps
  that emitted a token); per step start, duration, host and forward time, prefill chunks, decodes,
  KV blocks used, whether a CUDA graph replayed. ``RUN_DIR`` holds ``requests.parquet``,
  ``steps.parquet``, ``tokens.parquet`` (each with a ``case`` column) and ``meta.json``.

Executors: ``torch`` runs the model (CPU for tests, CUDA for the cases); ``priced`` prices each step
with tiersim's cost model on a virtual clock instead — a dry run that must reproduce tiersim's replay
step for step (a test checks it), and that estimates the device time of the cases.

Commands::

    python -m calibration.reference_server --model llama-3.2-1b --trace azure-conv --start-s 600 \\
        --end-s 630 --rate-scale 0.5 --scheduler fcfs --num-blocks 8192 --out RUN_DIR --device cuda
    python -m calibration.reference_server --cases --device cuda --out $OUT/e2e      # every case
    python -m calibration.reference_server --cases --executor priced --out /tmp/dry  # CPU dry run

``--cases`` runs ``calibration.e2e_cases.CASES`` in one process (one model build per model), rewrites
``RUN_DIR`` after every case (temporary files renamed into place, so a killed run keeps every
finished case), records a failed case and carries on, and skips cases ``RUN_DIR`` already holds.
It prints its plan and wall-time estimate first; a case that would not fit what is left of
``--budget-s`` (300 s) is skipped and recorded as such.

The GPU run (one H200; the device machine's ``python3`` has PyTorch with CUDA; the command runs in
the repository root; four files come back, plus the log)::

    set -o pipefail; PYTHONUNBUFFERED=1 python3 -m calibration.reference_server --cases --device cuda \\
        --out $OUT/e2e 2>&1 | tee $OUT/e2e-log.txt

Estimated wall time: about 240 s (``python -m calibration.e2e_cases`` prints the breakdown: 179 s of
tiersim-predicted busy time, 0.4 ms of host work per step, 40 s of model builds, probes, warm-ups and
graph captures). Afterwards, here: copy ``e2e/`` into ``calibration/tables/h200/e2e/runN/`` (the raw
records stay in the repo, about 1 MB) and run ``tiersim validate --e2e calibration/tables/h200/e2e/runN``.
A second lease repeats the same command into ``run2`` (repeatability).

This module must not import simpy or ``sim.engine`` (device machines have no simpy).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.serving_engine import Engine, Step, StepTiming
from sim.config import SimConfig, with_overrides
from sim.metrics import REJECT_REASONS
from sim.request import Request

RUN_FORMAT = "tiersim-e2e-run/1"
RUN_FILES = ("requests.parquet", "steps.parquet", "tokens.parquet", "meta.json")
GPU_PRESETS = (("H200", "h200"), ("H100", "h100-sxm-80gb"), ("A100", "a100-80gb"))
PROGRESS_EVERY_S = 5.0


# ============================================================================ configuration
def case_config(*, model: str, trace: str = "azure-conv", start_s: float = 0.0, end_s: float = 0.0,
                rate_scale: float = 1.0, max_requests: int = 0, scheduler: str = "fcfs",
                params: dict | None = None, num_blocks: int, block_size: int = 16, gpu: str = "h200",
                seed: int = 0) -> SimConfig:
    """The tiersim config of a served slice: what the server schedules against and what
    ``validate --e2e`` replays. ``trace`` is a bundled trace name or a trace file."""
    is_file = Path(trace).suffix != "" and Path(trace).exists()
    over = {
        "seed": seed, "model.name": model, "hardware.gpu": gpu, "costs.table": gpu,
        ("trace.path" if is_file else "trace.bundled"): trace,
        "trace.start_s": float(start_s), "trace.end_s": float(end_s), "trace.rate_scale": float(rate_scale),
        "trace.max_requests": int(max_requests),
        "replica.num_hbm_blocks": int(num_blocks), "replica.block_size_tokens": int(block_size),
        "replica.prefix_caching": False, "replica.preemption_mode": "recompute", "replica.dram_kv_bytes": 0,
        "policies.scheduling.name": scheduler, "policies.execution.name": "cuda-graph",
    }
    for k, v in (params or {}).items():
        over[f"policies.scheduling.{k}"] = v
    return with_overrides(SimConfig(), over)


def load_slice(config: SimConfig):
    """The trace slice ``config`` names: the same steps, in the same order, as
    ``sim.engine.load_trace_for`` (window, request cap, length trim, rate scale, repeats). A copy,
    because ``sim.engine`` imports simpy and this runs on device machines without it; a test checks
    that the two agree."""
    import traces
    from sim.errors import ConfigError

    tc = config.trace
    if tc.synthetic:
        raise ConfigError("trace.synthetic: the reference server replays recorded traces only")
    trace = traces.load_trace(tc.path or traces.bundled_path(tc.bundled), format=tc.format or None)
    if tc.start_s > 0 or tc.end_s > 0:
        end = tc.end_s if tc.end_s > 0 else float(trace.arrival_s[-1]) + 1.0
        trace = traces.time_window(trace, tc.start_s, end)
    if tc.max_requests:
        trace = traces.head(trace, tc.max_requests)
    if tc.max_total_tokens:
        from traces.transform import vidur_trim

        trace = vidur_trim(trace, tc.max_total_tokens)
    if tc.rate_scale != 1.0:
        trace = traces.scale_rate(trace, tc.rate_scale)
    if tc.repeat > 1:
        trace = traces.repeat(trace, tc.repeat)
    if len(trace) == 0:
        raise ConfigError("trace: no requests left after the window and request cap")
    return trace


def build_engine(config: SimConfig, on_release=None) -> Engine:
    from calibration.serving_engine import build_policies
    from sim.errors import ConfigError

    rc = config.replica
    if not rc.num_hbm_blocks:
        raise ConfigError("replica.num_hbm_blocks: the reference server needs a fixed KV capacity")
    model = load_model_spec(config.model.name)
    max_len = rc.max_model_len or model.max_context_tokens
    return Engine(policies=build_policies(config), num_blocks=rc.num_hbm_blocks, block_size=rc.block_size_tokens,
                  max_model_len=max_len, on_release=on_release)


def load_model_spec(name: str):
    """A model preset, a TOML path, or ``tiny-llama`` (``calibration.reference_model.TINY_SPEC``)."""
    from calibration.reference_model import TINY_SPEC
    from sim.specs import load_model

    return TINY_SPEC if name == TINY_SPEC.name else load_model(name)


def gpu_preset(device_name: str) -> str | None:
    """The tiersim GPU preset of a CUDA device name ("NVIDIA H200" -> "h200"), or None."""
    for key, preset in GPU_PRESETS:
        if key in device_name.upper():
            return preset
    return None


# ============================================================================ clocks
class VirtualClock:
    """Time that moves only by priced step durations and idle jumps (the ``priced`` executor)."""

    fast_forward = True

    def __init__(self) -> None:
        self.t = 0.0
        self.skipped_s = 0.0

    def start(self) -> None:
        self.t, self.skipped_s = 0.0, 0.0

    def now(self) -> float:
        return self.t

    def idle_until(self, t: float) -> None:
        if t > self.t:
            self.skipped_s += t - self.t
            self.t = t

    def end_step(self, start: float, timing: StepTiming) -> float:
        self.t = start + timing.duration_s
        return self.t


class WallClock:
    """The host's monotonic clock, from 0 at the start of a case.

    With ``fast_forward`` an idle engine jumps to the next arrival (the jump is added to an offset
    and counted in ``skipped_s``) instead of sleeping; otherwise it sleeps until then (the last
    millisecond spinning, so it wakes on time).
    """

    def __init__(self, fast_forward: bool = True) -> None:
        self.fast_forward = fast_forward
        self.start()

    def start(self) -> None:
        """Time 0 is now: the trace's clock starts when the serving loop does."""
        self.t0 = time.perf_counter()
        self.offset = 0.0
        self.skipped_s = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0 + self.offset

    def idle_until(self, t: float) -> None:
        d = t - self.now()
        if d <= 0:
            return
        if self.fast_forward:
            self.offset += d
            self.skipped_s += d
            return
        if d > 2e-3:
            time.sleep(d - 1e-3)
        while self.now() < t:
            pass

    def end_step(self, start: float, timing: StepTiming) -> float:
        return self.now()


# ============================================================================ executors
def step_builder(sim, replica: int = 0, execution=None):
    """The ``sim.replica.step.StepBuilder`` that ``sim.cluster.Cluster`` gives ``replica`` of ``sim``
    (a ``sim.engine.Simulation``), optionally under another execution policy instance."""
    from sim.hardware.gpu import GPUGroup
    from sim.replica.step import StepBuilder

    execution = execution if execution is not None else sim.build_policy("execution", replica)
    share = GPUGroup(sim.gpu, sim.config.replica.tensor_parallel_size,
                     reserved_sms=execution.reserved_sms(sim.gpu.sm_count)).sm_share
    return StepBuilder(cost=sim.cost_model(sim.model.name, execution), sparsity=sim.build_policy("sparsity", replica),
                       sm_share=share, drafter_cost=lambda name, ex=execution: sim.cost_model(name, ex))


class PricedExecutor:
    """Prices each step with tiersim's own step builder for ``config`` (the one a replica of
    ``sim.engine.Simulation`` gets: backend, table, recipe, execution policy, SM share) instead of
    running it. Run on a ``VirtualClock`` it reproduces tiersim's replay; used for dry runs and
    run-time estimates, on the CPU (it imports the simulator, hence simpy)."""

    name = "priced"

    def __init__(self, config: SimConfig, trace=None) -> None:
        from sim.engine import Simulation

        sim = Simulation(config, trace=trace if trace is not None else load_slice(config))
        self.builder = step_builder(sim)
        self.identity = dict(sim.backend.identity)

    def start_case(self, trace) -> None:
        pass

    def release(self, req: Request) -> None:
        pass

    def describe(self) -> dict:
        return {"device": "none: steps priced by tiersim", "cost_table": self.identity}

    def recover(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, step: Step) -> StepTiming:
        from sim.replica.step import Step as SimStep

        priced = self.builder.price(SimStep(prefill=[(r, n) for r, n, _ in step.prefill],
                                            decode=[r for r, _ in step.decode], drafts=None,
                                            preempted=step.preempted))
        return StepTiming(duration_s=priced.duration_s)


# ============================================================================ serving
STEP_COLUMNS = ("step", "start_s", "duration_s", "host_s", "forward_s", "post_s", "num_seqs", "prefill_seqs",
                "prefill_tokens", "decode_seqs", "decode_ctx_sum", "decode_ctx_max", "sampled", "kv_blocks",
                "graph", "graph_batch", "preemptions", "prefill_q", "prefill_c")


class CaseTimeout(RuntimeError):
    pass


@dataclass
class CaseRecord:
    """One served slice: its metadata and the three tables (pandas DataFrames, ``case`` column first)."""

    meta: dict
    requests: object = None
    steps: object = None
    tokens: object = None


@dataclass
class _Progress:
    label: str
    total: int
    every_s: float = PROGRESS_EVERY_S
    printer: Callable[[str], None] = field(default=lambda m: print(m, flush=True))
    last: float = field(default_factory=time.perf_counter)

    def __call__(self, clock, done: int, steps: int, busy_s: float, force: bool = False) -> None:
        t = time.perf_counter()
        if not force and t - self.last < self.every_s:
            return
        self.last = t
        self.printer(f"  {self.label}: {done}/{self.total} requests done, {steps:,} steps, clock "
                     f"{clock.now():.1f} s (busy {busy_s:.1f} s, idle skipped {clock.skipped_s:.1f} s)")


def serve(config: SimConfig, executor, clock, *, trace=None, deadline_s: float = math.inf,
          progress: Callable[[str], None] | None = None, check: bool = False, label: str = "") -> CaseRecord:
    """Serve ``config``'s trace slice with ``executor`` on ``clock``; returns the records.

    ``deadline_s``: wall seconds after which the case is abandoned (``CaseTimeout``). ``check`` runs
    the engine's invariant checks after every step (tests).
    """
    import pandas as pd

    trace = load_slice(config) if trace is None else trace
    engine = build_engine(config, on_release=executor.release)
    executor.start_case(trace)
    arr = trace.arrival_s
    n = len(trace)
    prompt, output, rid = trace.prompt_tokens, trace.output_tokens, trace.request_id
    prio = trace.priority
    rows: list[tuple] = []
    busy = 0.0
    wall0 = time.perf_counter()
    report = _Progress(label or config.model.name, n, printer=progress) if progress else None
    i = 0
    was_gc = gc.isenabled()
    gc.collect()
    gc.disable()            # a collection inside a step would be charged to that step
    clock.start()
    try:
        while True:
            t = clock.now()             # a step starts here: intake of arrivals, then scheduling
            t_perf = time.perf_counter()
            while i < n and arr[i] <= t:
                engine.submit(Request(idx=i, req_id=int(rid[i]), arrival_s=float(arr[i]),
                                      prompt_tokens=int(prompt[i]), output_tokens=int(output[i]),
                                      priority=int(prio[i]) if prio is not None else 0), float(arr[i]))
                i += 1
            if not engine.has_work():
                if i >= n:
                    break
                clock.idle_until(float(arr[i]))
                continue
            start = t
            plan = engine.plan(start)
            step = engine.apply(plan, start)
            if not (step.prefill or step.decode):
                if plan.is_empty() or not (plan.prefill or plan.decode):
                    engine.unblock(start)
                continue
            kv_blocks = engine.kv.hbm.num_active
            timing = executor.run(step)
            end = clock.end_step(start, timing)
            k = len(rows)
            ctx = [c for _, c in step.decode]
            dur = timing.duration_s if timing.duration_s == timing.duration_s else end - start  # priced: exact
            row = [k, start, dur, timing.launch_perf - t_perf, timing.done_perf - timing.launch_perf, 0.0,
                   len(step.prefill) + len(step.decode), len(step.prefill), step.prefill_tokens, len(step.decode),
                   sum(ctx) + len(ctx), max(ctx) + 1 if ctx else 0, step.num_sampled(), kv_blocks, timing.graph,
                   timing.graph_batch, step.num_preempted, [n_ for _, n_, _ in step.prefill],
                   [c for _, _, c in step.prefill]]
            busy += dur
            finished = engine.commit(step, k, end)
            engine.observe(step, start, end, finished)
            row[5] = time.perf_counter() - timing.done_perf        # post_s: committing the step's tokens
            rows.append(row)
            if check:
                engine.check()
            if report is not None:
                report(clock, len(engine.done), len(rows), busy)
            if time.perf_counter() - wall0 > deadline_s:
                raise CaseTimeout(f"abandoned after {deadline_s:.0f} s of wall time ({len(engine.done)} of {n} "
                                  f"requests done)")
    finally:
        if was_gc:
            gc.enable()
    if report is not None:
        report(clock, len(engine.done), len(rows), busy, force=True)
    wall = time.perf_counter() - wall0
    steps = pd.DataFrame.from_records([tuple(r) for r in rows], columns=list(STEP_COLUMNS))
    requests, tokens = _request_tables(engine, trace)
    finish = requests["finish_s"].max() if len(requests) else 0.0
    span = max(float(finish) - float(arr[0]), 1e-12)
    meta = {
        "requests": n, "finished": int((requests["status"] == "finished").sum()),
        "rejected": int((requests["status"] == "rejected").sum()), "steps": len(rows),
        "busy_s": busy, "utilization": busy / span, "wall_s": wall, "idle_skipped_s": clock.skipped_s,
        "fast_forward": bool(clock.fast_forward), "preemptions": int(requests["preemptions"].sum()),
    }
    return CaseRecord(meta=meta, requests=requests, steps=steps, tokens=tokens)


def _request_tables(engine: Engine, trace):
    import pandas as pd

    n = len(trace)
    done = {r.idx: r for r in engine.done}
    if len(done) != n:
        raise RuntimeError(f"{n - len(done)} requests never finished")
    reqs = [done[i] for i in range(n)]
    status = ["rejected" if r.idx in engine.reject_reasons else "finished" for r in reqs]
    requests = pd.DataFrame({
        "idx": np.arange(n, dtype=np.int64), "request_id": trace.request_id.astype(np.int64),
        "arrival_s": trace.arrival_s.astype(np.float64),
        "first_scheduled_s": [r.first_scheduled_s if r.first_scheduled_s >= 0 else math.nan for r in reqs],
        "first_token_s": [r.first_token_s if r.first_token_s >= 0 else math.nan for r in reqs],
        "finish_s": [r.finish_s for r in reqs],
        "prompt_tokens": trace.prompt_tokens.astype(np.int64), "output_tokens": trace.output_tokens.astype(np.int64),
        "generated_tokens": [r.num_generated for r in reqs], "preemptions": [r.num_preemptions for r in reqs],
        "status": status,
        "reject_reason": [REJECT_REASONS[engine.reject_reasons.get(r.idx, 0)] for r in reqs],
    })
    seg = [(r.idx, a, b) for r in reqs for a, b in zip(r.seg_start, r.seg_end)]
    tokens = pd.DataFrame.from_records(seg, columns=["idx", "seg_first", "seg_last"])
    return requests, tokens.astype(np.int64)


# ============================================================================ RUN_DIR
def write_run(out: str | Path, cases: dict[str, CaseRecord]) -> Path:
    """Write every case into ``out`` (one file per table, a ``case`` column); each file goes to a
    temporary name first and is renamed into place, ``meta.json`` last."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("requests", "steps", "tokens"):
        frames = [getattr(rec, name).assign(case=case) for case, rec in cases.items()
                  if getattr(rec, name) is not None]
        if not frames:
            continue
        df = pd.concat(frames, ignore_index=True)
        df = df[["case"] + [c for c in df.columns if c != "case"]]
        tmp = out / f".{name}.parquet.tmp"
        df.to_parquet(tmp, index=False, compression="zstd")
        tmp.replace(out / f"{name}.parquet")
    meta = {"format": RUN_FORMAT, "cases": {case: rec.meta for case, rec in cases.items()}}
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(out / "meta.json")
    return out


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def read_run(run_dir: str | Path, with_failed: bool = False) -> dict[str, CaseRecord]:
    """The cases of a RUN_DIR (those that finished; ``with_failed`` adds the others, meta only)."""
    import pandas as pd

    from sim.errors import TiersimError

    run_dir = Path(run_dir)
    path = run_dir / "meta.json"
    if not path.exists():
        raise TiersimError(f"{run_dir}: no meta.json (not a reference-server RUN_DIR)")
    meta = json.loads(path.read_text())
    if meta.get("format") != RUN_FORMAT:
        raise TiersimError(f"{path}: format {meta.get('format')!r}, expected {RUN_FORMAT!r}")
    tables = {name: pd.read_parquet(run_dir / f"{name}.parquet") if (run_dir / f"{name}.parquet").exists()
              else None for name in ("requests", "steps", "tokens")}
    out = {}
    for case, m in meta["cases"].items():
        if m.get("status", "ok") != "ok":
            if with_failed:
                out[case] = CaseRecord(meta=m)
            continue
        parts = {}
        for name, df in tables.items():
            if df is None:
                raise TiersimError(f"{run_dir}: {name}.parquet is missing")
            parts[name] = df[df["case"] == case].drop(columns="case").reset_index(drop=True)
        out[case] = CaseRecord(meta=m, **parts)
    return out


# ============================================================================ one case
def case_meta(config: SimConfig, executor, server: dict, extra: dict | None = None) -> dict:
    """What ``validate --e2e`` needs to rebuild the run in tiersim, and what ran."""
    import platform

    from sim.specs import spec_to_dict

    meta = {
        "status": "ok", "config": config.to_dict(), "config_hash": config.hash(),
        "model": config.model.name, "model_spec": spec_to_dict(load_model_spec(config.model.name)),
        "scheduler": config.policies.scheduling.to_dict(),
        "trace_slice": {k: getattr(config.trace, k) for k in ("bundled", "path", "start_s", "end_s", "rate_scale",
                                                              "max_requests")},
        "num_blocks": config.replica.num_hbm_blocks, "block_size_tokens": config.replica.block_size_tokens,
        "executor": executor.name, "server": server, "python": platform.python_version(),
    }
    meta.update(executor.describe())
    meta.update(extra or {})
    return meta


def run_case(config: SimConfig, executor, *, fast_forward: bool = True, deadline_s: float = math.inf,
             progress=None, label: str = "", extra: dict | None = None) -> CaseRecord:
    clock = VirtualClock() if executor.name == "priced" else WallClock(fast_forward)
    rec = serve(config, executor, clock, deadline_s=deadline_s, progress=progress, label=label)
    rec.meta = {**case_meta(config, executor, {"fast_forward": bool(clock.fast_forward)}, extra), **rec.meta}
    return rec


# ============================================================================ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", action="store_true",
                   help="run every case of calibration.e2e_cases.CASES (skipping those --out holds)")
    p.add_argument("--only", metavar="A,B", help="with --cases: only these case names")
    p.add_argument("--model", default="llama-3.2-1b", help="model preset, TOML file or tiny-llama")
    p.add_argument("--trace", default="azure-conv", help="bundled trace name or trace file")
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--end-s", type=float, default=0.0)
    p.add_argument("--rate-scale", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--scheduler", choices=["fcfs", "chunked-prefill"], default="fcfs")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--admission", choices=["chunk", "prompt"], default=None, help="chunked-prefill admission")
    p.add_argument("--num-blocks", type=int, default=8192, help="KV capacity in blocks (replica.num_hbm_blocks)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (replica.block_size_tokens)")
    p.add_argument("--gpu", default=None, help="tiersim GPU preset of the run (default: from the CUDA device, "
                   "else h200)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--executor", choices=["torch", "priced"], default="torch",
                   help="torch: run the model; priced: price steps with tiersim's cost model (dry run)")
    p.add_argument("--realtime", action="store_true", help="sleep through idle gaps instead of fast-forwarding")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (every step eager)")
    p.add_argument("--graph-match", choices=["pad", "exact"], default="pad",
                   help="pad: a decode batch replays the smallest captured graph that holds it (vLLM); "
                        "exact: only batches of a captured size replay a graph")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="with --cases: wall seconds for the whole run; a case that would not fit is skipped")
    p.add_argument("--out", required=True, help="RUN_DIR")


def _params(args) -> dict:
    return {k: v for k, v in (("max_num_batched_tokens", args.max_num_batched_tokens),
                              ("max_num_seqs", args.max_num_seqs), ("admission", args.admission)) if v is not None}


def _device_gpu(args) -> str:
    if args.gpu:
        return args.gpu
    if args.device.startswith("cuda") and args.executor == "torch":
        import torch

        return gpu_preset(torch.cuda.get_device_name()) or "h200"
    return "h200"


def _make_executor(args, spec_name: str, configs: list[SimConfig]):
    if args.executor == "priced":
        return PricedExecutor(configs[0])
    from calibration.serving_model import TorchExecutor

    return TorchExecutor.for_configs(spec_name, configs, device=args.device, graphs=not args.no_graphs,
                                     graph_match=args.graph_match, progress=lambda m: print(m, flush=True))


def main_single(args) -> int:
    config = case_config(model=args.model, trace=args.trace, start_s=args.start_s, end_s=args.end_s,
                         rate_scale=args.rate_scale, max_requests=args.max_requests, scheduler=args.scheduler,
                         params=_params(args), num_blocks=args.num_blocks, block_size=args.block_size,
                         gpu=_device_gpu(args))
    executor = _make_executor(args, config.model.name, [config])
    rec = run_case(config, executor, fast_forward=not args.realtime, progress=lambda m: print(m, flush=True))
    write_run(args.out, {"single": rec})
    m = rec.meta
    print(f"served {m['requests']} requests in {m['steps']:,} steps: busy {m['busy_s']:.2f} s, wall "
          f"{m['wall_s']:.2f} s, utilization {100 * m['utilization']:.1f} % -> {args.out}")
    return 0


def main_cases(args) -> int:
    from calibration import e2e_cases

    out = Path(args.out)
    done: dict[str, CaseRecord] = {}
    if (out / "meta.json").exists():
        done = read_run(out, with_failed=True)
    wanted = [c for c in e2e_cases.CASES if not args.only or c.name in args.only.split(",")]
    todo = [c for c in wanted if c.name not in done or done[c.name].meta.get("status") != "ok"]
    skipped = [c.name for c in wanted if c not in todo]
    gpu = _device_gpu(args)
    print(e2e_cases.describe_plan(todo, gpu), flush=True)
    if skipped:
        print(f"already in {out}: {', '.join(skipped)}", flush=True)
    t0 = time.perf_counter()
    for model in dict.fromkeys(c.model for c in todo):
        mine = [c for c in todo if c.model == model]
        configs = [c.config(gpu) for c in mine]
        try:
            executor = _make_executor(args, model, configs)
        except Exception as exc:  # noqa: BLE001 - this model's cases are lost, the next model may run
            traceback.print_exc()
            for c in mine:
                done[c.name] = CaseRecord(meta={"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                                "model": model})
            write_run(out, done)
            continue
        for case, config in zip(mine, configs):
            left = args.budget_s - (time.perf_counter() - t0)
            need = case.predicted_wall_s()
            if args.executor == "torch" and need * e2e_cases.SKIP_MARGIN > left:
                print(f"{case.name}: skipped, {left:.0f} s left of the budget and about {need:.0f} s needed",
                      flush=True)
                done[case.name] = CaseRecord(meta={"status": "skipped", "model": model,
                                                   "error": f"budget: {left:.0f} s left, {need:.0f} s needed"})
                write_run(out, done)
                continue
            print(f"{case.name}: {case.describe()}", flush=True)
            try:
                limit = max(need * e2e_cases.TIMEOUT_FACTOR, 30.0) if args.executor == "torch" else math.inf
                rec = run_case(config, executor, fast_forward=not args.realtime, deadline_s=min(limit, left),
                               progress=lambda m: print(m, flush=True), label=case.name,
                               extra={"case": case.as_dict()})
                m = rec.meta
                print(f"{case.name}: done, {m['steps']:,} steps, busy {m['busy_s']:.1f} s (predicted "
                      f"{case.predicted_busy_s:.1f} s), utilization {100 * m['utilization']:.0f} % (predicted "
                      f"{100 * case.predicted_utilization:.0f} %), wall {m['wall_s']:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded; the other cases go on
                traceback.print_exc()
                rec = CaseRecord(meta={"status": "failed", "error": f"{type(exc).__name__}: {exc}", "model": model,
                                       "case": case.as_dict()})
                executor.recover()
            done[case.name] = rec
            write_run(out, done)
        executor.close()
        del executor
    ok = sum(1 for r in done.values() if r.meta.get("status") == "ok")
    print(f"cases: {ok} of {len(done)} recorded in {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0 if ok == len(done) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.reference_server", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return main_cases(args) if args.cases else main_single(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
