"""Parts ``allreduce`` and ``tp_steps``: tensor parallelism on several GPUs of one host, one process per GPU.

    PYTHONUNBUFFERED=1 python3 -m calibration.gpu16.tp --out $OUT/tp --budget-s 420

(on ``nvidia-h200-x2``, ``-x4`` or ``-x8``; it uses every GPU it sees, ``--gpus N`` fewer). The command
starts one worker process per GPU (``torch.distributed`` over NCCL, rendezvous on localhost), with NVLink
multicast kept off in each (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``, as the device notes require), and writes, like the single-GPU command,
``DIR/rows.parquet``, ``DIR/meta.json`` and ``DIR/log.txt`` (rank 0 writes; every rank's output goes into
the log).

- ``allreduce``: for every TP size in (2, 4, 8) that fits the GPUs, on ranks 0..tp-1, an in-place bf16
  all-reduce of 4 KiB .. 512 MiB: eager (CUDA events around back-to-back calls on rank 0) and as a
  replayed CUDA graph of several calls (how a CUDA-graph engine runs them). Rows: part ``allreduce``,
  variant ``nccl`` | ``nccl-graph``, op ``allreduce``, key ``tp=N``, x = bytes: the format the table
  backend reads (``sim.costs.table``: a measured ``allreduce`` entry prices the ``attn_allreduce`` and
  ``ffn_allreduce`` ops of a TP model; ``calibration.fit`` prefers the graph rows). Extra: algorithm and
  bus bandwidth (``2 (n-1)/n`` bytes per byte reduced), the NCCL version.
- ``tp_steps``: the fused reference decoder sharded over ``tp`` = 2 ranks (heads, KV heads, FFN and LM head
  split; an all-reduce after o_proj and after down_proj, as ``sim.costs.model.TransformerOps`` lists
  them), prefill and decode steps of ``plan.step_points("tp_steps")``, eager and CUDA graph, with fixed
  repetitions (every rank must run the same collectives). Rows as the single-GPU step parts, extra
  ``tp``.

Every decision that could differ between ranks (whether the budget allows another point) is made on
rank 0 and broadcast. ``--quick`` runs two CPU processes over gloo with tiny sizes (the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from calibration.gpu16.plan import (
    ALLREDUCE_BYTES,
    QUICK_ALLREDUCE_BYTES,
    TP_SIZES,
    allreduce_point_id,
    step_points,
)
from calibration.raw import make_row

REPO_ROOT = Path(__file__).resolve().parents[2]
REPS = 10
GRAPH_CALLS = 8
STEP_REPS = 8
TAG = "@@tp@@ "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ worker side
class Rank:
    """This process's place in the job and the collective decisions."""

    def __init__(self, quick: bool) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.cuda = torch.cuda.is_available() and not quick
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)))
        bind = {"device_id": torch.device("cuda", torch.cuda.current_device())} if self.cuda else {}
        dist.init_process_group("nccl" if self.cuda else "gloo", rank=self.rank, world_size=self.world, **bind)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def agree(self, go: bool) -> bool:
        """Rank 0's ``go``, on every rank."""
        t = self.torch.tensor([1 if go else 0], device=self.device, dtype=self.torch.int32)
        self.dist.broadcast(t, 0)
        return bool(int(t.item()))

    def say(self, msg: str) -> None:
        print(f"{TAG}[rank {self.rank}] {msg}", flush=True)


def _events_time(r: Rank, fn, reps: int, inner: int, group=None) -> list[float]:
    """Seconds per call of ``fn`` on this rank, the ranks of ``group`` lined up by a barrier first."""
    torch = r.torch
    if not r.cuda:
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
        return out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        r.dist.barrier(group=group)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / inner)
    return out


def allreduce_sweep(r: Rank, sink, sizes, deadline: float) -> None:
    from sim.costs.model import make_key

    torch, dist = r.torch, r.dist
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if r.cuda else "gloo"
    for tp in [t for t in TP_SIZES if t <= r.world]:
        group = dist.new_group(list(range(tp)))         # every rank takes part in creating it
        member = r.rank < tp
        for nbytes in sizes:
            if not r.agree(time.time() < deadline):
                r.say(f"all-reduce tp={tp}: budget spent at {nbytes} bytes")
                break
            if member:
                x = torch.randn(max(nbytes // 2, 1), device=r.device, dtype=r.dtype)
                for _ in range(3):
                    dist.all_reduce(x, group=group)
                inner = max(1, min(64, int(2e-3 / max(5e-6 + nbytes / 100e9, 1e-7))))
                def call(x=x, group=group):
                    return dist.all_reduce(x, group=group)

                samples = _events_time(r, call, REPS, inner, group)
                rows = [("nccl" if r.cuda else "gloo", samples)]
                if r.cuda:
                    try:
                        rows.append(("nccl-graph", _graph_time(r, call, group)))
                    except Exception as exc:  # noqa: BLE001 - eager rows stand alone
                        sink.meta.setdefault("notes", []).append(f"tp={tp} {nbytes} B graph: {type(exc).__name__}: "
                                                                 f"{str(exc)[:200]}")
                if r.rank == 0:
                    for variant, s in rows:
                        t = sorted(s)[len(s) // 2]
                        algbw = nbytes / t
                        sink.add(make_row("allreduce", variant, s, op="allreduce", key=make_key(tp=tp), x=nbytes,
                                          nbytes=nbytes, extra={"point": allreduce_point_id(tp, nbytes, variant),
                                                                "world": r.world, "nccl": nccl, "dtype": str(r.dtype),
                                                                "algbw_bytes_per_s": algbw,
                                                                "busbw_bytes_per_s": algbw * 2 * (tp - 1) / tp}))
                del x
            dist.barrier()
        if r.rank == 0:
            sink.flush()
            r.say(f"all-reduce tp={tp}: {sum(1 for row in sink.rows if row['key'] == make_key(tp=tp))} rows")


def _graph_time(r: Rank, fn, group) -> list[float]:
    """Per-call seconds of ``GRAPH_CALLS`` calls captured in one CUDA graph, replayed."""
    torch = r.torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    out = [s / GRAPH_CALLS for s in _events_time(r, graph.replay, REPS, 1, group)]
    del graph
    return out


def shard_spec(name: str, tp: int):
    """A rank's shapes of ``name`` under ``tp``: heads, KV heads and FFN split, vocabulary whole (the
    embedding is replicated; the LM head's rows are split separately)."""
    import dataclasses

    from calibration.reference_model import resolve_spec

    spec = resolve_spec(name)
    return dataclasses.replace(spec, name=f"{spec.name}-tp{tp}-shard", num_heads=spec.num_heads // tp,
                               num_kv_heads=max(1, spec.num_kv_heads // tp), ffn_size=spec.ffn_size // tp), spec


def tp_steps(r: Rank, sink, quick: bool, deadline: float) -> None:
    from calibration.reference_model import ReferenceModel, _median, step_flops_bytes

    torch, dist = r.torch, r.dist
    points = [p for p in step_points("tp_steps", quick) if p.tp <= r.world]
    if not points:
        return
    tp = points[0].tp
    group = dist.new_group(list(range(tp)))
    member = r.rank < tp
    spec, full = shard_spec(points[0].model, tp)
    cap = max(p.cache_tokens for p in points)
    model = None
    if member:
        vocab = full.vocab_size // tp if full.vocab_size % tp == 0 else full.vocab_size
        model = ReferenceModel(spec, device=r.device, dtype=r.dtype, kv_capacity_tokens=cap, lm_head_rows=vocab,
                               reduce=lambda y: dist.all_reduce(y, group=group))
    base = {"model": full.name, "tp": tp, "world": r.world, "torch": torch.__version__, "dtype": str(r.dtype)}
    for p in points:
        if not r.agree(time.time() < deadline):
            r.say("tp steps: budget spent")
            break
        if member:
            step = model.make_step(p.phase, p.batch, p.tokens)
            for _ in range(2):
                step()
            if r.cuda:
                torch.cuda.synchronize()
            host = []
            for _ in range(STEP_REPS):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                step()
                if r.cuda:
                    torch.cuda.synchronize()
                host.append(time.perf_counter() - t0)
            results = [("eager", host, {})]
            if r.cuda:
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    step()
                ghost, gdev = [], []
                for _ in range(STEP_REPS):
                    dist.barrier(group=group)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0 = time.perf_counter()
                    start.record()
                    graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    ghost.append(time.perf_counter() - t0)
                    gdev.append(start.elapsed_time(end) / 1e3)
                results.append(("graph", ghost, {"gpu_median_s": _median(gdev)}))
                del graph
            if r.rank == 0:
                flops, nbytes = step_flops_bytes(full, p.phase, p.batch, p.tokens)
                for mode, s, more in results:
                    sink.add(make_row("tp_steps", mode, s, op=p.phase, key=full.name, x=p.batch, y=p.tokens,
                                      nbytes=nbytes / tp, flops=flops / tp,
                                      extra={**base, **more, "recipe": "fused", "cached": 0, "point": p.id}))
            del step
        dist.barrier()
    if r.rank == 0:
        sink.flush()


def worker_main(spec_path: str) -> int:
    from calibration.gpu16.run import Sink

    spec = json.loads(Path(spec_path).read_text())
    r = Rank(bool(spec["quick"]))
    sink = Sink(Path(spec["rows_path"]) if r.rank == 0 else None, Path(spec["meta_path"]) if r.rank == 0 else None)
    sizes = QUICK_ALLREDUCE_BYTES if spec["quick"] else ALLREDUCE_BYTES
    deadline = float(spec["deadline_epoch"])
    if r.rank == 0 and r.cuda:
        p = r.torch.cuda.get_device_properties(0)
        sink.meta["device"] = {"device": p.name, "gpus": r.world, "torch": r.torch.__version__,
                               "nccl": ".".join(map(str, r.torch.cuda.nccl.version()))}
    try:
        if "allreduce" in spec["parts"]:
            allreduce_sweep(r, sink, sizes, deadline - 0.45 * (deadline - time.time()) if "tp_steps" in spec["parts"]
                            else deadline)
        if "tp_steps" in spec["parts"]:
            tp_steps(r, sink, bool(spec["quick"]), deadline)
    finally:
        if r.rank == 0:
            sink.flush()
        r.dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------ launcher
def run_tp(out: Path, budget_s: float, gpus: int | None, quick: bool, parts: list[str], echo=print) -> dict:
    """Start one worker per GPU, wait (at most the budget), pack rows.parquet, meta.json, log.txt."""
    from calibration.gpu16.run import SAFE_ENV, nvidia_smi, utc_now, write_json, write_rows

    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a", encoding="utf-8")

    def say(msg: str) -> None:
        echo(msg)
        log.write(msg + "\n")
        log.flush()

    if quick:
        world = gpus or 2
    else:
        import torch

        world = gpus or torch.cuda.device_count()
    meta = {"issue": 16, "parts": parts, "world": world, "quick": quick, "budget_s": budget_s,
            "started_utc": utc_now(), "nvidia_smi_before": nvidia_smi()}
    say(f"tiersim issue 16, tensor parallelism: {world} processes ({'gloo, CPU' if quick else 'NCCL'}), parts "
        f"{', '.join(parts)}, budget {budget_s:.0f} s")
    if world < 2:
        meta["status"] = "skipped: fewer than 2 GPUs"
        say(meta["status"])
        write_json(out / "meta.json", meta)
        log.close()
        return meta
    work = Path(tempfile.mkdtemp(prefix="gpu16-tp-"))
    spec = {"quick": quick, "parts": parts, "rows_path": str(work / "rows.parquet"),
            "meta_path": str(work / "meta.json"), "deadline_epoch": time.time() + budget_s - 20.0}
    (work / "spec.json").write_text(json.dumps(spec))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONUNBUFFERED="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **SAFE_ENV)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from calibration.gpu16.tp import "
                                       "worker_main; sys.exit(worker_main(sys.argv[1]))", str(work / "spec.json")],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                      cwd=str(REPO_ROOT), start_new_session=True))

    def pump(p, rank):
        for line in p.stdout:
            line = line.rstrip("\n")
            if line.strip():
                say(line[len(TAG):] if line.startswith(TAG) else f"[rank {rank}] | {line}")

    threads = [threading.Thread(target=pump, args=(p, i), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    status = "done"
    for p in procs:
        try:
            p.wait(timeout=max(budget_s - (time.monotonic() - t0), 1.0))
        except subprocess.TimeoutExpired:
            status = "timeout"
            break
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)   # our own workers' process groups
            p.wait()
        elif p.returncode != 0 and status == "done":
            status = f"failed (exit {p.returncode})"
    for t in threads:
        t.join(timeout=5)
    import pandas as pd

    rows = pd.read_parquet(spec["rows_path"]).to_dict("records") if Path(spec["rows_path"]).exists() else []
    part_meta = json.loads(Path(spec["meta_path"]).read_text()) if Path(spec["meta_path"]).exists() else {}
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    meta.update(status=status, rows=write_rows(rows, out / "rows.parquet"), finished_utc=utc_now(),
                elapsed_s=round(time.monotonic() - t0, 1), nvidia_smi_after=nvidia_smi(), **part_meta)
    write_json(out / "meta.json", meta)
    say(f"tensor parallelism: {status}, {meta['rows']} rows in {meta['elapsed_s']:.0f} s; {out}")
    for line in _curve_lines(rows):
        say(line)
    log.close()
    return meta


def _curve_lines(rows: list[dict]) -> list[str]:
    """The all-reduce curve, printed last: bytes, microseconds and bus bandwidth per TP size."""
    lines = []
    ar = [r for r in rows if r["part"] == "allreduce"]
    for key in sorted({r["key"] for r in ar}):
        mine = sorted((r for r in ar if r["key"] == key), key=lambda r: (r["variant"], r["x"]))
        lines.append(f"all-reduce {key}: bytes  us  bus GB/s")
        for r in mine:
            bus = json.loads(r["extra"]).get("busbw_bytes_per_s", 0) / 1e9
            lines.append(f"  {r['variant']:11}{int(r['x']):>11}{r['median_s'] * 1e6:>10.1f}{bus:>8.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.gpu16.tp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    ap.add_argument("--parts", default="allreduce,tp_steps")
    ap.add_argument("--quick", action="store_true", help="CPU processes over gloo (--gpus of them, default 2), "
                    "tiny sizes (tests)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    meta = run_tp(Path(args.out), args.budget_s, args.gpus, args.quick, parts)
    return 0 if meta.get("status") in ("done", "skipped: fewer than 2 GPUs") else 1


if __name__ == "__main__":
    sys.exit(main())
