"""``python -m calibration --out DIR [--quick] [--parts a,b] ...``: run the calibration suite.

The same options as ``tiersim calibrate``; this entry point needs only numpy, pandas, pyarrow and
numba-cuda (no simpy), so it runs on device machines with a minimal environment.
"""
from __future__ import annotations

import argparse
import sys

from calibration.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration",
                                     description="Measure the per-operation costs of this GPU (raw rows "
                                                 "and metadata), then fit a cost table if calibration.fit "
                                                 "is present.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
