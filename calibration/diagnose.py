"""Diagnostics behind the validation report, run on a GPU:

    python -m calibration.diagnose host  --out host.json    # the reference engine's host cost per layer
    python -m calibration.diagnose trace --out trace.json   # in-model kernel traces, eager and graph

``host``: the reference decoder at tiny shapes (GPU work negligible, so every step is host-bound), for
several layer counts: step time = fixed + layers x per-layer host time. This is the framework's own
host cost (Python, dispatch, views) — what an eager engine pays per layer regardless of model size.

``trace``: torch.profiler traces of one eager step and one CUDA-graph replay of the reference decoder
at a few validation points: every kernel's name, start and duration, so that predicted per-op times
can be compared with what each op costs inside the model. Run ``host`` first and ``trace`` in its
own process: profiling leaves CUPTI attached, which slows later launches in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

TRACE_POINTS = (("llama-3.1-8b", "decode", 1, 1024), ("llama-3.1-8b", "decode", 64, 1024),
                ("llama-3.1-8b", "prefill", 1, 1024), ("llama-3.2-1b", "decode", 1, 1024),
                ("llama-3.2-1b", "prefill", 2, 512))


def _tiny(layers: int):
    from sim.specs import ModelSpec

    return ModelSpec(name=f"tiny-{layers}", num_layers=layers, hidden_size=256, num_heads=4, num_kv_heads=2,
                     head_dim=64, ffn_size=512, vocab_size=1024, max_context_tokens=4096)


def host_costs(reps: int = 300) -> dict:
    import torch

    from calibration.reference_model import ReferenceModel, _QuietGC

    out = []
    for layers in (1, 4, 16, 32):
        model = ReferenceModel(_tiny(layers), device="cuda", kv_capacity_tokens=2048)
        for phase, batch, length in (("decode", 1, 64), ("decode", 8, 64), ("prefill", 1, 64)):
            step = model.make_step(phase, batch, length)
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            with _QuietGC():
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            times.sort()
            out.append({"layers": layers, "phase": phase, "batch": batch, "length": length,
                        "median_s": statistics.median(times), "p10_s": times[len(times) // 10],
                        "p90_s": times[9 * len(times) // 10], "min_s": times[0], "reps": reps})
        del model
        torch.cuda.empty_cache()
    return {"points": out}


def _kernels(prof) -> list[list]:
    from torch.autograd import DeviceType

    rows = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            rows.append([e.name[:100], float(e.time_range.start), float(e.time_range.end - e.time_range.start)])
    rows.sort(key=lambda r: r[1])
    t0 = rows[0][1] if rows else 0.0
    return [[n, round(s - t0, 3), round(d, 3)] for n, s, d in rows]


def traces() -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from calibration.reference_model import ReferenceModel

    out = []
    models: dict[str, ReferenceModel] = {}
    for name, phase, batch, length in TRACE_POINTS:
        need = batch * (length + 1)
        if name not in models or models[name].capacity < need:
            models.clear()
            torch.cuda.empty_cache()
            models[name] = ReferenceModel(name, device="cuda", kv_capacity_tokens=max(need, 70000))
        step = models[name].make_step(phase, batch, length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        eager = _kernels(prof)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        replay = _kernels(prof)
        out.append({"model": name, "phase": phase, "batch": batch, "length": length,
                    "eager": eager, "graph": replay})
        del graph
        print(f"traced {name} {phase} b={batch} n={length}: {len(eager)} eager, {len(replay)} graph kernels",
              file=sys.stderr, flush=True)
    return {"points": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.diagnose")
    p.add_argument("what", choices=["host", "trace"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    result = host_costs() if args.what == "host" else traces()
    result["gpu"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
