"""A sampling profile of one ``tiersim`` command: where the CPU time goes, without cProfile's per-call
overhead (which inflates code made of many small calls, like the engine loop).

    python benchmarks/sample_profile.py run --out /tmp/prof --force --quiet --no-progress
    python benchmarks/sample_profile.py run --trace mooncake-conversation --format mooncake --out /tmp/prof --force

Every millisecond of CPU time (``ITIMER_PROF``) the Python stack is sampled; printed are the share of
samples in which each function is on the stack (inclusive) and at its top (self). Shares, not times:
the signal is delivered between bytecodes, so time inside one long C call lands on the next sample.
"""
from __future__ import annotations

import collections
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INCLUSIVE: collections.Counter = collections.Counter()
SELF: collections.Counter = collections.Counter()


def _sample(signum, frame) -> None:
    seen = set()
    top = True
    while frame is not None:
        code = frame.f_code
        key = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        if top:
            SELF[key] += 1
            top = False
        if key not in seen:
            INCLUSIVE[key] += 1
            seen.add(key)
        frame = frame.f_back


def main() -> int:
    signal.signal(signal.SIGPROF, _sample)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    sys.argv = ["sim.cli", *sys.argv[1:]]
    try:
        runpy.run_module("sim.cli", run_name="__main__")
    except SystemExit:
        pass
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
    n = sum(SELF.values()) or 1
    print(f"samples {n}")
    for title, counts, k in (("inclusive", INCLUSIVE, 45), ("self", SELF, 30)):
        print(f"--- {title}")
        for key, c in counts.most_common(k):
            print(f"{100 * c / n:5.1f}% {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
