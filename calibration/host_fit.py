"""Per-step host time of a serving engine, fitted to the reference server's measured steps.

    python -m calibration.host_fit [RUN_DIR ...]     (default: calibration/tables/h200/e2e/run1 run2)

Each step row of a reference-server run (``calibration.reference_server``: ``steps.parquet``) has the
host's scheduling and input preparation before the forward pass (``host_s``) and the commit of the
sampled tokens after it (``post_s``). Their sum, least squares on::

    host_s + post_s = host_step_s + host_per_seq_s * num_seqs + host_per_token_s * tokens

(``tokens``: prefill chunk tokens plus decodes) gives the coefficients of the execution policies'
``host = "reference-h200"`` profile (``policies.execution.host.HOST_PROFILES``); the test
``tests/unit/test_execution_modes.py`` refits them from the shipped runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REFERENCE_RUNS = tuple(Path(__file__).resolve().parent / "tables" / "h200" / "e2e" / r for r in ("run1", "run2"))


def fit_host(run_dirs=REFERENCE_RUNS) -> dict:
    """Coefficients (seconds), the steps used and the median absolute residual, over ``run_dirs``."""
    import pandas as pd

    d = pd.concat([pd.read_parquet(Path(r) / "steps.parquet") for r in run_dirs], ignore_index=True)
    y = (d["host_s"] + d["post_s"]).to_numpy(float)
    x = np.c_[np.ones(len(d)), d["num_seqs"].to_numpy(float),
              (d["prefill_tokens"] + d["decode_seqs"]).to_numpy(float)]
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"host_step_s": float(coef[0]), "host_per_seq_s": float(coef[1]), "host_per_token_s": float(coef[2]),
            "steps": int(len(d)), "median_abs_residual_s": float(np.median(np.abs(y - x @ coef)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="reference-server run directories (with steps.parquet)")
    args = p.parse_args(argv)
    got = fit_host(args.runs or REFERENCE_RUNS)
    print(f"{got['steps']:,} steps: host_step_s {got['host_step_s'] * 1e6:.1f} us, host_per_seq_s "
          f"{got['host_per_seq_s'] * 1e6:.2f} us, host_per_token_s {got['host_per_token_s'] * 1e6:.4f} us "
          f"(median |residual| {got['median_abs_residual_s'] * 1e6:.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
