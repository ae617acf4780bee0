"""What a first run compiles, and what one decode-run segment costs to price.

    python benchmarks/first_run.py compile          # a cold `tiersim run`: compile time per Numba function
    python benchmarks/first_run.py segment          # pricing one dense decode-run segment, two ways

``compile`` runs the default ``tiersim run`` in a child process with an empty ``NUMBA_CACHE_DIR`` (as
after ``pip install``) and charges each Numba compilation its own time, less that of the compilations
nested in it (a caller compiles its callees), so the figures add up to the compile total.
``segment`` builds the default simulation, runs 300 requests, and times
``StepCostModel.dense_decode_run`` (one compiled pass where the execution policy's step is linear)
against the general way it replaces (``decode_run`` on the context totals), for 11 sequences of 600
tokens over 20 steps, after checking that both give the same floats.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(out: str) -> None:
    from numba.core import dispatcher

    compile_ = dispatcher.Dispatcher.compile
    own: collections.Counter = collections.Counter()
    stack: list[list] = []

    def timed(self, sig):
        name = f"{self.py_func.__module__}.{self.py_func.__qualname__}"
        stack.append([name, 0.0])
        t = time.perf_counter()
        try:
            return compile_(self, sig)
        finally:
            spent = time.perf_counter() - t
            name, nested = stack.pop()
            own[name] += spent - nested
            if stack:
                stack[-1][1] += spent

    dispatcher.Dispatcher.compile = timed
    from sim.cli import main

    t = time.perf_counter()
    main(["run", "--quiet", "--no-progress", "--out", out])
    print(json.dumps({"wall_s": time.perf_counter() - t, "compile_s": dict(own)}))


def compile_profile() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba"), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "out")], env=env, cwd=ROOT,
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    own = got["compile_s"]
    print(f"cold default run: {got['wall_s']:.1f} s in the run, {sum(own.values()):.1f} s of it compiling "
          f"({len(own)} functions)")
    for name, s in sorted(own.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{s:7.2f} s  {name}")


def segment() -> None:
    import numpy as np

    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(with_overrides(SimConfig(), ["trace.max_requests=300", f"output.dir={json.dumps(tmp)}"]))
        sim.run()
    cost = sim.replicas[0].builder.cost
    batch, per_seq, k = 11, 600, 20
    ctx0 = batch * per_seq
    fast = lambda: cost.dense_decode_run(batch, ctx0, k)                     # noqa: E731
    general = lambda: cost.decode_run(batch, np.arange(ctx0, ctx0 + batch * k, batch, dtype=np.float64))  # noqa: E731
    if fast()[0].tobytes() != general()[0].tobytes():
        raise SystemExit("the one-pass and the general decode-run pricing differ")
    n = 20000
    for name, f in (("one compiled pass (dense_decode_run)", fast), ("general way (decode_run)", general)):
        best = min(timeit.repeat(f, number=n, repeat=3)) / n
        print(f"{best * 1e6:6.1f} us per segment  {name}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] in ("compile", "segment"):
        compile_profile() if sys.argv[1] == "compile" else segment()
    else:
        raise SystemExit(__doc__)
