"""The end-to-end validation cases: which trace slices the reference server runs on the GPU, and why.

Eight cases: the Azure LLM inference 2023 conversation trace (decode-heavy: 1,155 prompt and 211
output tokens on average) and code trace (bursty, prefill-heavy: 2,048 prompt and 28 output tokens,
inter-arrival CV 13), each at a light load and near saturation, on Llama-3.2-1B and Llama-3.1-8B.
Conversation slices run ``fcfs`` (vLLM without chunked prefill; whole prompts stall decodes, the
behaviour tiersim's ITL tail must reproduce) with a 16,384-token step budget (above the trace's
longest prompt, 14,050); code slices run ``chunked-prefill`` (2,048-token budget, vLLM admission),
where long prompts are cut into chunks mixed with decodes.

How each load was chosen. Load is the engine's busy fraction (``summary["engine"]["utilization"]``:
time with a step running over the span from first arrival to last finish): light ≈ 30 %, near
saturation ≈ 90 %. For each case the replay span is fixed (``SPAN_S``; it sizes the GPU time) and
the rate scale is searched (bisection in log scale) until tiersim, replaying the slice on the
shipped ``h200`` table with the case's exact config, predicts the target utilization. That
prediction — utilization, busy time, steps — is recorded in :data:`CASES` *before* any measurement,
so the measurement is compared with a prediction made ahead of it. Rerun the search with
``python -m calibration.e2e_cases --plan`` (CPU, about a minute per case); it prints the table rows.

GPU time: the cases together are sized to finish in about five minutes on one H200, including
model builds, warm-up and graph capture (``describe_plan`` prints the estimate before the run;
``predicted_wall_s`` adds the server's host work per step, ``HOST_S_PER_STEP``, to tiersim's busy
time, which has none).

Every slice starts 20 minutes into its trace (``START_S``), away from the trace's first minutes.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field, replace

START_S = 1200.0
# replay span (s) of each (model, trace, load): sized so that the whole run fits about five minutes of
# GPU time while each case keeps as many requests as that allows (an 8B conversation costs ~1.2 s of
# decode, so its slices are the longest and still hold the fewest requests)
SPAN_S = {
    ("llama-3.2-1b", "azure-conv", "light"): 60.0, ("llama-3.2-1b", "azure-conv", "near-saturation"): 30.0,
    ("llama-3.2-1b", "azure-code", "light"): 60.0, ("llama-3.2-1b", "azure-code", "near-saturation"): 30.0,
    ("llama-3.1-8b", "azure-conv", "light"): 90.0, ("llama-3.1-8b", "azure-conv", "near-saturation"): 40.0,
    ("llama-3.1-8b", "azure-code", "light"): 60.0, ("llama-3.1-8b", "azure-code", "near-saturation"): 25.0,
}
TARGET_UTILIZATION = {"light": 0.30, "near-saturation": 0.90}
NUM_BLOCKS = 16384                     # 262,144 tokens of KV at 16 tokens a block
HOST_S_PER_STEP = 4e-4                 # the server's Python work per step (scheduling, inputs, records)
SETUP_S = {"llama-3.2-1b": 15.0, "llama-3.1-8b": 25.0}   # build, probe, warm-up, capture (estimate)
SKIP_MARGIN = 1.0                      # a case starts only if its estimate fits what is left of --budget-s
TIMEOUT_FACTOR = 3.0                   # a case is abandoned after this many times its estimate
SCHEDULERS = {
    "azure-conv": ("fcfs", {"max_num_batched_tokens": 16384}),
    "azure-code": ("chunked-prefill", {"max_num_batched_tokens": 2048}),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One slice and its config, with tiersim's prediction on the ``h200`` table (made before the run)."""

    name: str
    model: str
    trace: str
    load: str
    rate_scale: float
    start_s: float = START_S
    end_s: float
    scheduler: str
    params: dict = field(default_factory=dict)
    num_blocks: int = NUM_BLOCKS
    block_size: int = 16
    # tiersim's prediction (h200 table, cuda-graph), recorded by --plan
    predicted_utilization: float = math.nan
    predicted_busy_s: float = math.nan
    predicted_steps: int = 0
    predicted_requests: int = 0
    predicted_span_s: float = math.nan
    predicted_preemptions: int = 0
    predicted_kv_peak: float = math.nan   # peak share of the KV blocks in use

    def config(self, gpu: str = "h200"):
        from calibration.reference_server import case_config

        return case_config(model=self.model, trace=self.trace, start_s=self.start_s, end_s=self.end_s,
                           rate_scale=self.rate_scale, scheduler=self.scheduler, params=dict(self.params),
                           num_blocks=self.num_blocks, block_size=self.block_size, gpu=gpu)

    def predicted_wall_s(self) -> float:
        """Wall seconds the torch server should need: tiersim's busy time plus host work per step."""
        if not math.isfinite(self.predicted_busy_s):
            return 60.0
        return self.predicted_busy_s + HOST_S_PER_STEP * self.predicted_steps

    def describe(self) -> str:
        return (f"{self.model}, {self.trace} [{self.start_s:g}, {self.end_s:g}) s at rate x{self.rate_scale:g} "
                f"({self.predicted_requests} requests), {self.scheduler} {self.params}, {self.num_blocks} blocks; "
                f"tiersim predicts {100 * self.predicted_utilization:.0f} % busy, {self.predicted_busy_s:.1f} s, "
                f"{self.predicted_steps:,} steps")

    def as_dict(self) -> dict:
        return asdict(self)


def _case(model: str, trace: str, load: str, rate_scale: float, **pred) -> Case:
    short = {"llama-3.2-1b": "1b", "llama-3.1-8b": "8b"}[model]
    sched, params = SCHEDULERS[trace]
    window = SPAN_S[(model, trace, load)] * rate_scale
    return Case(name=f"{short}-{trace.split('-')[1]}-{'light' if load == 'light' else 'sat'}", model=model,
                trace=trace, load=load, rate_scale=rate_scale, end_s=round(START_S + window, 3), scheduler=sched,
                params=params, **pred)


# The cases, with tiersim's prediction on the shipped h200 table (python -m calibration.e2e_cases --plan,
# on this commit's code and table; a prediction is the bisection's closest point, within 2 points of
# its target). Cheapest model first: a run that runs out of time loses 8B cases, not all of them.
CASES: tuple[Case, ...] = (
    _case('llama-3.2-1b', 'azure-conv', 'light', 0.1869, predicted_utilization=0.2859, predicted_busy_s=16.61,
          predicted_steps=10225, predicted_requests=62, predicted_span_s=58.08, predicted_preemptions=0,
          predicted_kv_peak=0.0165),
    _case('llama-3.2-1b', 'azure-conv', 'near-saturation', 1.3755, predicted_utilization=0.9105,
          predicted_busy_s=27.66, predicted_steps=15937, predicted_requests=230, predicted_span_s=30.38,
          predicted_preemptions=0, predicted_kv_peak=0.0562),
    _case('llama-3.2-1b', 'azure-code', 'light', 0.7071, predicted_utilization=0.2857, predicted_busy_s=4.67,
          predicted_steps=1993, predicted_requests=116, predicted_span_s=16.35, predicted_preemptions=0,
          predicted_kv_peak=0.1042),
    _case('llama-3.2-1b', 'azure-code', 'near-saturation', 19.6967, predicted_utilization=0.8880,
          predicted_busy_s=28.90, predicted_steps=3275, predicted_requests=2112, predicted_span_s=32.54,
          predicted_preemptions=0, predicted_kv_peak=0.3721),
    _case('llama-3.1-8b', 'azure-conv', 'light', 0.0494, predicted_utilization=0.2987, predicted_busy_s=24.41,
          predicted_steps=4279, predicted_requests=28, predicted_span_s=81.72, predicted_preemptions=0,
          predicted_kv_peak=0.0162),
    _case('llama-3.1-8b', 'azure-conv', 'near-saturation', 0.4744, predicted_utilization=0.8969,
          predicted_busy_s=36.82, predicted_steps=5981, predicted_requests=92, predicted_span_s=41.05,
          predicted_preemptions=0, predicted_kv_peak=0.0441),
    _case('llama-3.1-8b', 'azure-code', 'light', 0.2031, predicted_utilization=0.3006, predicted_busy_s=11.53,
          predicted_steps=1116, predicted_requests=92, predicted_span_s=38.36, predicted_preemptions=0,
          predicted_kv_peak=0.0848),
    _case('llama-3.1-8b', 'azure-code', 'near-saturation', 6.3551, predicted_utilization=0.8849,
          predicted_busy_s=28.73, predicted_steps=1147, predicted_requests=349, predicted_span_s=32.46,
          predicted_preemptions=0, predicted_kv_peak=0.2589),
)


# ============================================================================ planning
def predict(case: Case, gpu: str = "h200") -> dict:
    """tiersim's replay of the case's slice: utilization, busy time, steps, requests, span, latencies."""
    from sim.engine import Simulation

    s = Simulation(case.config(gpu)).run().summary
    return {"predicted_utilization": float(s["engine"]["utilization"] or 0.0),
            "predicted_busy_s": float(s["engine"]["busy_s"]), "predicted_steps": int(s["engine"]["steps"]),
            "predicted_requests": int(s["requests"]["total"]), "predicted_span_s": float(s["time"]["makespan_s"]),
            "predicted_preemptions": int(s["engine"]["preemptions"]),
            "predicted_kv_peak": s["kv"]["hbm_peak_active_bytes"] / (s["kv"]["hbm_blocks_per_replica"]
                                                                    * s["kv"]["hbm_bytes_per_block"]),
            "ttft_p99_s": s["ttft_s"]["p99"], "itl_p99_s": s["itl_s"]["p99"]}


def plan_case(model: str, trace: str, load: str, *, tol: float = 0.02, max_iter: int = 14,
              progress=print) -> Case:
    """Search the rate scale at which tiersim predicts the load's target utilization over the case's
    replay span (``SPAN_S``; bisection on log rate; utilization grows with the rate)."""
    target = TARGET_UTILIZATION[load]
    lo, hi = math.log(0.01), math.log(50.0)
    best = None
    for _ in range(max_iter):
        r = round(math.exp((lo + hi) / 2), 4)
        case = _case(model, trace, load, r)
        try:
            p = predict(case)
        except Exception as exc:  # noqa: BLE001 - e.g. an empty window at a tiny rate: go higher
            progress(f"  rate x{r:g}: {type(exc).__name__}: {exc}")
            lo = math.log(r)
            continue
        u = p["predicted_utilization"]
        progress(f"  rate x{r:g}: {p['predicted_requests']} requests, utilization {100 * u:.1f} %, busy "
                 f"{p['predicted_busy_s']:.1f} s, {p['predicted_steps']:,} steps")
        if best is None or abs(u - target) < abs(best[1] - target):
            best = (case, u, p)
        if abs(u - target) <= tol:
            break
        if u < target:
            lo = math.log(r)
        else:
            hi = math.log(r)
    case, _, p = best
    return replace(case, **{k: v for k, v in p.items() if k.startswith("predicted_")})


def describe_plan(cases, gpu: str = "h200") -> str:
    """The run's plan and its wall-time estimate (printed before the cases start)."""
    models = dict.fromkeys(c.model for c in cases)
    total = sum(c.predicted_wall_s() for c in cases) + sum(SETUP_S.get(m, 20.0) for m in models)
    lines = [f"{len(cases)} cases on {gpu}; estimated wall time {total:.0f} s (tiersim's predicted busy time "
             f"plus {HOST_S_PER_STEP * 1e3:.1f} ms of host work per step, plus model setup)"]
    for c in cases:
        lines.append(f"  {c.name:14} ~{c.predicted_wall_s():5.0f} s  {c.describe()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.e2e_cases",
                                description="Print the cases, or search their rate scales (--plan).")
    p.add_argument("--plan", action="store_true", help="search each case's rate scale with tiersim (CPU)")
    p.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--traces", default="azure-conv,azure-code")
    p.add_argument("--loads", default="light,near-saturation")
    args = p.parse_args(argv)
    if not args.plan:
        print(describe_plan(CASES))
        return 0
    rows = []
    for model in args.models.split(","):
        for trace in args.traces.split(","):
            for load in args.loads.split(","):
                print(f"{model} {trace} {load}:", flush=True)
                c = plan_case(model, trace, load)
                rows.append(f"    _case({c.model!r}, {c.trace!r}, {c.load!r}, {c.rate_scale!r}, "
                            f"predicted_utilization={c.predicted_utilization:.4f}, "
                            f"predicted_busy_s={c.predicted_busy_s:.2f}, predicted_steps={c.predicted_steps}, "
                            f"predicted_requests={c.predicted_requests}, "
                            f"predicted_span_s={c.predicted_span_s:.2f}, "
                            f"predicted_preemptions={c.predicted_preemptions}, "
                            f"predicted_kv_peak={c.predicted_kv_peak:.4f}),")
                print(rows[-1], flush=True)
    print("CASES: tuple[Case, ...] = (\n" + "\n".join(rows) + "\n)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
