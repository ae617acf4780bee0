"""Results as DataFrames, for notebooks and the compare/report commands.

    from sim.results_data import load_run, load_sweep
    run = load_run("tiersim-results")       # .summary (dict), .config, .requests, .steps, .transfers,
                                            # .itl_cdf() (token-level inter-token latency)
    sw = load_sweep("sweeps/budget")        # .summary: one row per run (params, config_hash, metrics)
    sw.requests                             # every run's requests, with the parameter columns
    best = sw.run(scheduling_max_num_batched_tokens=512)   # one run, picked by its parameters

A run directory is one ``tiersim run`` wrote, or ``SWEEP/runs/...``; it is read only when its
``DONE`` marker is there (a run still being written, or killed, is refused with the reason) and was
written in this version's results format. Each file is checked against the marker's checksum when it is
first read, and a Parquet file against the columns tiersim reads from it (:data:`COLUMNS`).
"""
from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sim import results_io
from sim.errors import TiersimError

# the columns the compare, plot and report commands read, per results file: a file without one is
# refused naming the file and the column, not a KeyError where a figure first needs it
COLUMNS = {
    "requests.parquet": ("status", "arrival_s", "first_scheduled_s", "finish_s", "ttft_s", "tpot_s", "e2e_s",
                         "prompt_tokens", "prefix_hit_tokens"),
    "steps.parquet": ("replica", "start_s", "num_seqs", "hbm_active_bytes", "hbm_cached_bytes", "dram_used_bytes",
                      "nvme_used_bytes"),
    "transfers.parquet": ("replica", "link", "start_s", "end_s"),
    "itl_hist.parquet": ("lo_s", "hi_s", "count"),
}


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / "sweep.toml").is_file()


@dataclasses.dataclass
class Run:
    path: Path
    label: str = ""
    marker: dict | None = None    # the DONE marker load_run verified: what file() checks checksums against

    def file(self, name: str) -> Path:
        """``path/name``, refused when its bytes do not match the marker's checksum (damaged since the run
        wrote it: one line here, not a Parquet or JSON traceback). Checked when a file is read, so a
        sweep's report hashes only the files it reads."""
        p = self.path / name
        want = (self.marker or {}).get("files", {}).get(name)
        if want and results_io.sha256_file(p) != want.get("sha256"):
            raise TiersimError(f"{p}: cannot be read: it does not match its checksum in {results_io.MARKER} "
                               "(damaged since the run wrote it); rerun the run")
        return p

    def read(self, name: str, columns: list[str] | None = None):
        """The results Parquet file ``name`` as a DataFrame (only ``columns``, when given), once it matches
        its checksum and has the columns tiersim reads from it."""
        import pandas as pd
        import pyarrow.parquet as pq

        p = self.file(name)
        have = set(pq.read_schema(p).names)
        missing = [c for c in dict.fromkeys([*COLUMNS.get(name, ()), *(columns or ())]) if c not in have]
        if missing:
            raise TiersimError(f"{p}: no column {', '.join(missing)} (not written by this version of tiersim); "
                               "rerun the run")
        return pd.read_parquet(p, columns=columns)

    @cached_property
    def summary(self) -> dict:
        return json.loads(self.file("summary.json").read_text())

    @property
    def config(self) -> dict:
        return self.summary.get("config", {})

    @property
    def config_hash(self) -> str:
        return self.summary.get("config_hash", "")

    @cached_property
    def requests(self):
        return self.read("requests.parquet")

    @cached_property
    def steps(self):
        return self.read("steps.parquet")

    @cached_property
    def transfers(self):
        return self.read("transfers.parquet") if (self.path / "transfers.parquet").exists() else None

    @cached_property
    def itl_hist(self):
        """The token-level ITL histogram (lo_s, hi_s, count): every gap between two tokens of a request."""
        import pandas as pd

        if (self.path / "itl_hist.parquet").exists():
            return self.read("itl_hist.parquet")
        return pd.DataFrame({"lo_s": [], "hi_s": [], "count": []})

    def itl_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, fraction of token gaps <= seconds) at the histogram's bin edges (0.2 % wide): the
        distribution whose percentiles the summary's ITL row reports."""
        h = self.itl_hist
        counts = h["count"].to_numpy(dtype=float)
        if counts.sum() == 0:
            return np.empty(0), np.empty(0)
        hi, lo = h["hi_s"].to_numpy(), h["lo_s"].to_numpy()
        x = np.where(np.isfinite(hi), hi, lo)
        return x, np.cumsum(counts) / counts.sum()

    def finished(self):
        r = self.requests
        return r[r["status"] == "finished"]


def load_run(path: str | Path, label: str = "") -> Run:
    path = Path(path)
    why = results_io.verify(path, checksums=False)     # sizes only: Run.file checks a file's checksum on read
    if why is not None:
        if path.is_file():
            raise TiersimError(f"{path}: is a file, not a results directory; name the directory tiersim run "
                               "wrote (its --out)")
        if why.startswith("written by an incompatible"):
            raise TiersimError(f"{path}: {why}; rerun it")
        if not (path / "summary.json").exists():
            raise TiersimError(f"{path}: not a tiersim results directory ({why})")
        if why == f"no {results_io.MARKER} marker":
            raise TiersimError(f"{path}: not a finished run (no {results_io.MARKER} marker: it was interrupted, or "
                               "is still being written); rerun it (tiersim run --config "
                               f"{path / 'config.toml'} --out NEW)")
        raise TiersimError(f"{path}: an incomplete results directory ({why}); rerun it")
    return Run(path=path, label=label or path.name, marker=results_io.read_marker(path))


@dataclasses.dataclass
class Sweep:
    path: Path

    @cached_property
    def summary(self):
        """One row per run: the parameter columns, ``run``, ``config_hash``, ``status``, metrics."""
        import pandas as pd

        return pd.read_parquet(self.path / "summary.parquet")

    @property
    def params(self) -> list[str]:
        cols = list(self.summary.columns)
        return cols[: cols.index("run")]

    @cached_property
    def requests(self):
        """Every finished run's requests with the parameter and ``config_hash`` columns (hive dataset)."""
        import pandas as pd

        return pd.read_parquet(self.path / "requests")

    def steps(self, **params: Any):
        import pandas as pd

        filters = [(k, "==", v) for k, v in params.items()] or None
        return pd.read_parquet(self.path / "steps", filters=filters)

    def runs(self) -> list[Run]:
        done = self.summary[self.summary["status"].str.startswith("done")]
        return [load_run(self.path / "runs" / r, label=_label(row, self.params))
                for r, (_, row) in zip(done["run"], done.iterrows())]

    def run(self, **params: Any) -> Run:
        """The one run with these parameter values (an error names the choices when none or several match)."""
        s = self.summary
        mask = s["status"].str.startswith("done")
        for k, v in params.items():
            if k not in s.columns:
                raise TiersimError(f"{k}: not a parameter of this sweep (parameters: {', '.join(self.params)})")
            mask &= s[k] == v
        hits = s[mask]
        if len(hits) != 1:
            raise TiersimError(f"{params}: {len(hits)} finished runs match (runs: "
                               + "; ".join(_label(r, self.params) for _, r in s.iterrows()) + ")")
        row = hits.iloc[0]
        return load_run(self.path / "runs" / row["run"], label=_label(row, self.params))


def _label(row, params: list[str]) -> str:
    return ", ".join(f"{p}={row[p]}" for p in params if row[p] is not None and row[p] == row[p]) or "run"


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not is_sweep(path):
        raise TiersimError(f"{path}: not a sweep directory (no sweep.toml)")
    if not (path / "summary.parquet").exists():
        raise TiersimError(f"{path}: the sweep has not finished a pass yet (no summary.parquet); rerun it")
    return Sweep(path=path)


def load(path: str | Path) -> Run | Sweep:
    return load_sweep(path) if is_sweep(path) else load_run(path)
