"""Launch-overhead part (``torch_launch``): what eager PyTorch and CUDA graphs cost per kernel.

Rows (part ``torch_launch``; times in seconds):

- ``eager_dispatch`` — host time per launch of a tiny in-place op (``x.add_(1)``, 256 floats) in a
  long loop; the GPU is not the bottleneck (``sync_tail_s`` in extra says how long the queue took to
  drain afterwards; ``gpu_bound`` flags rounds where that was more than a fifth of the loop).
- ``eager_launch_gpu`` — device time per kernel of the same op queued back to back (primed queue).
- ``eager_call_host`` — host time per call of each ``calibration.torch_ops`` function at tiny sizes
  (framework dispatch dominates eager steps); x = tokens (attention: x = q, y = c). ``op`` stays
  empty so these rows never mix with the GPU-time rows that price ops; ``extra.table_op`` names the
  op, ``extra.kernels`` the launches per call (graph node count).
- ``graph_replay`` / ``graph_replay_host`` — one replay of a graph of x = N tiny kernels: device
  time (events, replays back to back) and host time (replay + synchronize, one at a time);
  ``graph_fit`` / ``graph_fit_host``: the least-squares slope over N (median_s = seconds per
  kernel; the intercept, the fixed cost per replay, in extra).
- ``sync`` — ``torch.cuda.synchronize()`` on an idle GPU; ``launch_sync`` — one tiny launch
  followed by a synchronize (the round trip an engine pays per step).
- ``graph_chain_same`` / ``graph_chain_mixed`` — per-call device time of small layer ops (hidden 4096,
  one token) in a graph, each call after itself vs after a different kernel; the difference
  (``extra.switch_s`` of the mixed row) is the kernel-switch cost isolated op timings do not see.
- ``engine_host_step`` — host seconds per eager step of the reference decoder at tiny shapes,
  x = layers (1, 4, 16, 32): the engine's fixed and per-layer host cost.
"""
from __future__ import annotations

import time

from calibration.raw import ModelShape, Part, PartContext, make_row

GRAPH_SIZES = (1, 4, 16, 64, 256, 1024)
# device-side graph timings carry the plain names that calibration.fit reads
VARIANT = {"graph_replay_gpu": "graph_replay", "graph_replay_host": "graph_replay_host",
           "graph_fit_gpu": "graph_fit", "graph_fit_host": "graph_fit_host"}
TINY = ModelShape(name="launch-tiny", hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                  ffn_size=1024, vocab_size=4096, gemms=())


def _host_loop(torch, fn, n: int, rounds: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Per-call host seconds of ``n`` back-to-back calls, ``rounds`` times; and the drain tails."""
    samples, tails = [], []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        samples.append((t1 - t0) / n)
        tails.append(t2 - t1)
    return samples, tails


def _tiny_calls(torch, device, dtype) -> list[tuple[str, str, int, int, object]]:
    """(function, table op, x, y, zero-arg call) of every torch_ops function at tiny sizes."""
    from calibration import torch_ops

    s = TINY
    h, qh, kvh, d, f, v = (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.ffn_size,
                           s.vocab_size)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    x, w_norm, w = randn(1, h), 1.0 + 0.1 * randn(h), randn(h, h) * 0.02
    qkv = randn(1, (qh + 2 * kvh) * d)
    q, k = qkv[:, :qh * d].view(1, qh, d), qkv[:, qh * d:(qh + kvh) * d].view(1, kvh, d)
    vv = qkv[:, (qh + kvh) * d:].view(1, kvh, d)
    cos, sin = randn(1, 1, d), randn(1, 1, d)
    kc, vc = randn(1, kvh, 64, d), randn(1, kvh, 64, d)
    gate_up, table, logits = randn(1, 2 * f), randn(v, h) * 0.02, randn(1, v)
    ids = torch.randint(0, v, (1,), device=device)
    pq = randn(16, qh, d).view(1, 16, qh, d).transpose(1, 2)
    pk, pv = randn(1, kvh, 32, d), randn(1, kvh, 32, d)
    dq = randn(1, qh, d).view(1, 1, qh, d).transpose(1, 2)
    return [
        ("rms_norm", "rms_norm", 1, 0, lambda: torch_ops.rms_norm(x, w_norm)),
        ("linear", "gemm", 1, 0, lambda: torch_ops.linear(x, w)),
        ("rope", "rope", 1, 0, lambda: torch_ops.rope(q, k, cos, sin)),
        ("kv_write", "kv_write", 1, 0, lambda: torch_ops.kv_write(kc, vc, k, vv, 10)),
        ("act", "act", 1, 0, lambda: torch_ops.act(gate_up)),
        ("add", "add", 1, 0, lambda: torch_ops.add(x, x)),
        ("embed", "embed", 1, 0, lambda: torch_ops.embed(ids, table)),
        ("sample", "sample", 1, 0, lambda: torch_ops.sample(logits)),
        ("attention_prefill", "attn_prefill", 16, 0,
         lambda: torch_ops.attention_prefill(pq, pk[:, :, :16], pv[:, :, :16])),
        ("attention_prefill", "attn_prefill", 16, 16, lambda: torch_ops.attention_prefill(pq, pk, pv)),
        ("attention_decode", "attn_decode", 1, 64, lambda: torch_ops.attention_decode(dq, kc, vc, 64)),
    ]


def _graph_launches(torch, fn) -> float | None:
    """Launches of one call, read off a captured graph (None if capture or counting fails)."""
    from calibration.vendor.kernel_count import finish_graph, new_graph, per_call

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph, keep = new_graph(torch)
        with torch.cuda.graph(graph):
            fn()
        counts = per_call(finish_graph(graph, keep), 1)
        del graph
        return None if counts is None else counts["kernels"]
    except Exception:  # noqa: BLE001 - the count is optional
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def run(ctx: PartContext) -> list[dict]:
    import numpy as np

    from calibration.vendor.timing import describe_error, failure_row, prime_queue, torch_env

    env = torch_env(ctx.quick)
    torch = env.torch
    cuda = env.cuda
    base = env.base_extra()
    part = "torch_launch"
    rows: list[dict] = []
    n_loop = 200 if ctx.quick else 20000
    n_call = 20 if ctx.quick else 2000
    rounds = 3 if ctx.quick else 7

    # 1. eager launch: host side and device side
    try:
        x = torch.randn(256, device=env.device, dtype=torch.float32)
        for _ in range(100):
            x.add_(1)
        samples, tails = _host_loop(torch, lambda: x.add_(1), n_loop, rounds, cuda)
        gpu_bound = [t > 0.2 * s * n_loop for s, t in zip(samples, tails)]
        rows.append(make_row(part, "eager_dispatch", samples, extra={
            **base, "op": "x.add_(1), 256 fp32", "calls_per_round": n_loop,
            "sync_tail_s": float(np.median(tails)), "gpu_bound": any(gpu_bound)}))
        if cuda:
            per = []
            for _ in range(rounds):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                prime_queue(torch, 0.02)
                start.record()
                for _ in range(1000):
                    x.add_(1)
                end.record()
                end.synchronize()
                per.append(start.elapsed_time(end) / 1e3 / 1000)
            rows.append(make_row(part, "eager_launch_gpu", per, extra={
                **base, "op": "x.add_(1), 256 fp32", "kernels_per_sample": 1000}))
    except Exception as exc:  # noqa: BLE001
        rows.append(failure_row(part, "eager_dispatch", describe_error(exc), extra=base,
                                progress=ctx.progress))

    # 2. per-call host time of every torch_ops function at tiny sizes
    try:
        calls = _tiny_calls(torch, env.device, env.dtype)
    except Exception as exc:  # noqa: BLE001
        calls = []
        rows.append(failure_row(part, "eager_call_host", describe_error(exc), extra=base,
                                progress=ctx.progress))
    for name, op, xx, yy, fn in calls:
        extra = {**base, "fn": name, "table_op": op,
                 "shape": "launch-tiny h=512 qh=8 kvh=2 d=64 f=1024 v=4096"}
        try:
            for _ in range(5):
                fn()
            samples, tails = _host_loop(torch, fn, n_call, rounds, cuda)
            extra["sync_tail_s"] = float(np.median(tails))
            extra["gpu_bound"] = any(t > 0.2 * s * n_call for s, t in zip(samples, tails))
            if op.startswith("attn"):
                from calibration import torch_ops

                extra["attention_backend"] = torch_ops.sdpa_backend(op.removeprefix("attn_"))
            if cuda:
                launches = _graph_launches(torch, fn)
                if launches is not None:
                    extra["kernels"] = launches
                    extra["kernels_source"] = "graph"
            rows.append(make_row(part, "eager_call_host", samples, x=xx, y=yy, extra=extra))
        except Exception as exc:  # noqa: BLE001
            rows.append(failure_row(part, "eager_call_host", describe_error(exc), x=xx, y=yy,
                                    extra=extra, progress=ctx.progress))

    if not cuda:
        return rows

    # 3. CUDA graph replay of N tiny kernels
    fits: dict[str, tuple[list[float], list[float]]] = {"gpu": ([], []), "host": ([], [])}
    from calibration.vendor.kernel_count import finish_graph, new_graph

    y = torch.randn(256, device=env.device, dtype=torch.float32)
    for n in GRAPH_SIZES:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                y.add_(1)
            torch.cuda.current_stream().wait_stream(side)
            graph, keep = new_graph(torch)
            with torch.cuda.graph(graph):
                for _ in range(n):
                    y.add_(1)
            finish_graph(graph, keep)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            reps = 10 if ctx.quick else 50
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for r in range(reps):  # back to back: device time of each replay
                starts[r].record()
                graph.replay()
                ends[r].record()
            torch.cuda.synchronize()
            gpu = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
            host = []
            for _ in range(reps):  # one at a time: what a step pays from the host
                t0 = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize()
                host.append(time.perf_counter() - t0)
            del graph
            for kind, samples in (("gpu", gpu), ("host", host)):
                med = float(np.median(samples))
                rows.append(make_row(part, VARIANT[f"graph_replay_{kind}"], samples, x=n, extra={
                    **base, "op": "y.add_(1), 256 fp32", "per_kernel_s": med / n}))
                fits[kind][0].append(float(n))
                fits[kind][1].append(med)
        except Exception as exc:  # noqa: BLE001
            rows.append(failure_row(part, "graph_replay", describe_error(exc), x=n, extra=base,
                                    progress=ctx.progress))
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
    for kind, (ns, meds) in fits.items():
        if len(ns) >= 2:
            slope, intercept = _fit(ns, meds)
            rows.append(make_row(part, VARIANT[f"graph_fit_{kind}"], [slope], extra={
                **base, "intercept_s": intercept, "sizes": ns, "medians_s": meds,
                "meaning": "median_s = seconds per kernel in a graph replay (slope over N)"}))

    # 5. kernel switching inside a graph: a chain of different small kernels vs chains of one kernel
    rows += _graph_chains(torch, env, base, ctx)

    # 6. the reference engine's own host cost (tiny shapes: every step is host-bound)
    rows += _engine_host(torch, env, base, ctx)

    # 4. synchronize round trips
    try:
        z = torch.randn(256, device=env.device, dtype=torch.float32)
        torch.cuda.synchronize()
        n_sync = 200 if ctx.quick else 2000
        idle = []
        for _ in range(n_sync):
            t0 = time.perf_counter()
            torch.cuda.synchronize()
            idle.append(time.perf_counter() - t0)
        rows.append(make_row(part, "sync", idle, extra={**base, "meaning": "synchronize, idle GPU"}))
        trip = []
        for _ in range(n_sync):
            t0 = time.perf_counter()
            z.add_(1)
            torch.cuda.synchronize()
            trip.append(time.perf_counter() - t0)
        rows.append(make_row(part, "launch_sync", trip, extra={**base, "op": "z.add_(1), 256 fp32"}))
    except Exception as exc:  # noqa: BLE001
        rows.append(failure_row(part, "sync", describe_error(exc), extra=base, progress=ctx.progress))
    return rows


def _chain_ops(torch, device):
    """Small ops of a decoder layer at one token (hidden 4096), each a zero-arg call."""
    from calibration import torch_ops

    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, device=device, dtype=torch.bfloat16)
    gu = torch.randn(1, 2 * 14336, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, 32, 128, device=device, dtype=torch.bfloat16)
    return [("rms_norm", lambda: torch_ops.rms_norm(x, w)), ("add", lambda: torch_ops.add(x, x)),
            ("neg", lambda: torch.neg(q)), ("silu", lambda: torch.nn.functional.silu(gu)),
            ("mul", lambda: q * q), ("cat", lambda: torch.cat((q, q), dim=-1))]


def _graph_chain_time(torch, calls, repeats: int, reps: int) -> tuple[list[float], int]:
    """Device seconds per replay of a graph that runs ``calls`` in order ``repeats`` times, and the
    number of kernel calls in it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for fn in calls:
                fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        graph.replay()
        ends[r].record()
    torch.cuda.synchronize()
    del graph
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], repeats * len(calls)


def _graph_chains(torch, env, base: dict, ctx: PartContext) -> list[dict]:
    """Per-kernel device time of small kernels in a graph when each follows a different kernel (as in
    a model) versus when it follows itself (as in an isolated op timing). Their difference, the switch
    cost, is what the isolated op tables miss for small kernels inside a model."""
    import numpy as np

    from calibration.vendor.timing import describe_error, failure_row

    part = "torch_launch"
    rows: list[dict] = []
    try:
        ops = _chain_ops(torch, env.device)
        repeats, reps = (8, 5) if ctx.quick else (64, 30)
        same = {}
        for name, fn in ops:
            samples, n = _graph_chain_time(torch, [fn], repeats * len(ops), reps)
            per = [t / n for t in samples]
            same[name] = float(np.median(per))
            rows.append(make_row(part, "graph_chain_same", per, extra={**base, "chain_op": name,
                                 "calls": n, "meaning": "seconds per call, each call after itself"}))
        samples, n = _graph_chain_time(torch, [fn for _, fn in ops], repeats, reps)
        mixed = [t / n for t in samples]
        switch = float(np.median(mixed)) - float(np.mean(list(same.values())))
        rows.append(make_row(part, "graph_chain_mixed", mixed, extra={
            **base, "calls": n, "chain": [name for name, _ in ops], "same_mean_s": float(np.mean(list(same.values()))),
            "switch_s": switch, "meaning": "seconds per call, each call after a different kernel"}))
    except Exception as exc:  # noqa: BLE001
        rows.append(failure_row(part, "graph_chain_mixed", describe_error(exc), extra=base,
                                progress=ctx.progress))
    return rows


def _engine_host(torch, env, base: dict, ctx: PartContext) -> list[dict]:
    """Host seconds per eager step of the reference decoder at tiny shapes (GPU work negligible), for
    several layer counts: fixed + layers x per-layer host cost of the engine itself."""
    import statistics

    from calibration.reference_model import ReferenceModel, _QuietGC
    from calibration.vendor.timing import describe_error, failure_row
    from sim.specs import ModelSpec

    part = "torch_launch"
    rows: list[dict] = []
    layer_counts = (1, 4) if ctx.quick else (1, 4, 16, 32)
    reps = 30 if ctx.quick else 300
    for layers in layer_counts:
        spec = ModelSpec(name=f"tiny-{layers}", num_layers=layers, hidden_size=256, num_heads=4,
                         num_kv_heads=2, head_dim=64, ffn_size=512, vocab_size=1024, max_context_tokens=4096)
        try:
            model = ReferenceModel(spec, device=env.device, kv_capacity_tokens=1024)
            for phase, batch, length in (("decode", 1, 64), ("prefill", 1, 64)):
                step = model.make_step(phase, batch, length)
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                times = []
                with _QuietGC():
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        step()
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                rows.append(make_row(part, "engine_host_step", times, x=layers, y=batch, extra={
                    **base, "phase": phase, "length": length, "shape": "tiny h=256 qh=4 kvh=2 d=64 f=512",
                    "median_s": statistics.median(times),
                    "meaning": "host seconds per eager step incl. one synchronize; x = layers"}))
            del model
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            rows.append(failure_row(part, "engine_host_step", describe_error(exc), x=layers, extra=base,
                                    progress=ctx.progress))
    return rows


PART = Part(
    name="torch_launch",
    description="eager PyTorch host cost per launch and per torch_ops call; CUDA-graph per-kernel "
                "cost; synchronize round trips",
    requires=("torch",),
    coords="eager_*: x = tokens (attention: x = q, y = c); graph_replay_*: x = kernels in the graph; "
           "others: none",
    run=run,
)
