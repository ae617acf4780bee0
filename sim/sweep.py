"""Parameter sweeps: a grid and random samples over config keys, traces and plugins, run in parallel
(local processes, or a Dask cluster), crash-safe and resumable, with the results as one Parquet dataset.

    from sim.sweep import SweepSpec, run_sweep
    spec = SweepSpec(base=SimConfig(), grid={"policies.scheduling.name": ["fcfs", "chunked-prefill"],
                                             "trace.rate_scale": [1, 4]})
    table = run_sweep(spec, "sweeps/sched", jobs=2)    # a DataFrame: one row per run, params + metrics

A sweep directory holds::

    sweep.toml                 the sweep (base config, axes); a different sweep is refused there
    index.jsonl                one line per run that finished or failed (error and traceback)
    summary.parquet, .csv      one row per run: parameter columns, run, config_hash, status, metrics
    runs/<col>=<value>/...     one complete results directory per run (tiersim report/compare/plot take it)
    requests/<col>=<value>/.../config_hash=<h>/part-0.parquet   the per-request rows of every run, and
    steps/...                  the per-step rows: hive-partitioned datasets (pandas, pyarrow, DuckDB)

Axes are dotted config keys, ``trace`` (a bundled trace name or a file) and ``plugin`` (a plugin file or
module loaded for that run). Parameter columns are named after the key without a leading
``policies.``, dots turned into underscores (``policies.scheduling.name`` -> ``scheduling_name``,
``trace.rate_scale`` -> ``trace_rate_scale``). A value in a directory name is its TOML text without
quotes (``4.0``, ``true``, ``chunked-prefill``), percent-encoded (RFC 3986: everything but letters,
digits and ``-._~``, so ``a/b`` is ``a%2Fb``); pyarrow and DuckDB decode it. An axis that a variant does
not set (an explicit point without it) is ``unset``. Random samples are drawn
once (seeded) and crossed with the grid, so every grid point sees the same draws.

Each run writes its directory in a staging folder (``.tmp/``) with temp-and-rename files and a
``DONE`` marker last (``sim.results_io``), then renames it into place: a run is done when its marker
verifies, and anything partial is redone on resume. A worker that dies (killed, out of memory) breaks
the pool, and every run in the pool with it. The driver cannot tell from the pool which run killed its
worker, so the runs that had started (each marks ``.tmp/run-HASH`` while it runs) are rerun one at a
time, each alone in a fresh one-worker pool: a run that takes its worker down there is the culprit,
and is retried alone up to ``MAX_ATTEMPTS`` times before it is recorded as failed; the runs that had
not started go back to the parallel pool. A run that kills its worker never fails the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sim import results_io
from sim.config import SimConfig, _dump_toml, from_dict, from_file_data, parse_override, with_overrides
from sim.errors import ConfigError, TiersimError

MAX_ATTEMPTS = 3
UNSET = "unset"    # an axis a variant does not set (Hive's null partition would break pyarrow's dictionary
                   # unification of the partition column, so a word is used)
SPECIAL_AXES = ("trace", "plugin")
METRIC_SECTIONS = ("ttft_s", "itl_s", "tpot_s", "e2e_s", "queueing_s")
STATS = ("mean", "p50", "p90", "p99", "max")


class SweepError(TiersimError):
    pass


# ====================================================================== the sweep
def column_name(key: str) -> str:
    """The parameter column of an axis: ``policies.scheduling.name`` -> ``scheduling_name``."""
    return key.removeprefix("policies.").replace(".", "_")


def hive_value(v: Any) -> str:
    """A value as a directory-name segment: its TOML text, unquoted, percent-encoded."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, float):
        text = repr(v)
    elif isinstance(v, (list, tuple)):
        text = ",".join(str(x) for x in v)
    else:
        text = str(v)
    if text == "":
        return "%00"
    return urllib.parse.quote(text, safe="")


_DIST = re.compile(r"^(uniform|loguniform|int|choice)\((.*)\)$")


def parse_distribution(text: str) -> dict:
    """``uniform(1,8)``, ``loguniform(0.5,8)``, ``int(256,4096)`` or ``choice(a,b,c)`` (TOML values)."""
    m = _DIST.match(text.strip())
    if not m:
        raise ConfigError(f"--sample {text!r}: expected uniform(lo,hi), loguniform(lo,hi), int(lo,hi) or "
                          "choice(v1,v2,...)")
    kind, args = m.group(1), [parse_override(f"x={a.strip()}")[1] for a in m.group(2).split(",")]
    return _check_dist({kind: args}, text)


def _check_dist(d: Any, where: str) -> dict:
    if not isinstance(d, Mapping) or len(d) != 1:
        raise ConfigError(f"{where}: a distribution is one of {{uniform = [lo, hi]}}, {{loguniform = [lo, hi]}}, "
                          "{int = [lo, hi]}, {choice = [...]}")
    (kind, args), = d.items()
    if kind not in ("uniform", "loguniform", "int", "choice"):
        raise ConfigError(f"{where}: unknown distribution {kind!r} (known: uniform, loguniform, int, choice)")
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: {kind} needs a list of values")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                or not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} needs [lo, hi] with lo < hi (got {list(args)})")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs lo > 0 (got {args[0]})")
        if kind == "int" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: int needs integer bounds (got {list(args)})")
    return {kind: list(args)}


@dataclasses.dataclass
class SweepSpec:
    """A base config, grid axes (key -> values) and random axes (key -> distribution) drawn
    ``samples`` times with ``sample_seed``; ``plugins`` load for every run."""

    base: SimConfig = dataclasses.field(default_factory=SimConfig)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    random: dict[str, dict] = dataclasses.field(default_factory=dict)
    samples: int = 0
    sample_seed: int = 0
    plugins: list[str] = dataclasses.field(default_factory=list)
    points: list[dict] = dataclasses.field(default_factory=list)   # explicit variants, crossed with the grid

    def __post_init__(self) -> None:
        self.grid = {k: list(v) for k, v in self.grid.items()}
        self.points = [dict(p) for p in self.points]
        for k, v in self.grid.items():
            if not v:
                raise ConfigError(f"grid.{k}: no values")
            dup = next((x for i, x in enumerate(v) if x in v[:i]), None)
            if dup is not None:
                raise ConfigError(f"grid.{k}: the value {dup!r} is given twice (1 and 1.0 are one value); "
                                  "each value runs once")
        self.random = {k: _check_dist(v, f"random.{k}") for k, v in self.random.items()}
        if self.random and self.samples < 1:
            raise ConfigError("random: set samples = N (>= 1) to draw random axes")
        both = (set(self.grid) | self._point_keys()) & set(self.random) or set(self.grid) & self._point_keys()
        if both:
            raise ConfigError(f"{sorted(both)[0]}: on two axes (grid, points, random)")
        cols = [column_name(k) for k in self.axes]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ConfigError(f"axes {', '.join(k for k in self.axes if column_name(k) == dup[0])}: "
                              f"share the column name {dup[0]!r}")

    def _point_keys(self) -> set[str]:
        return {k for p in self.points for k in p}

    @property
    def axes(self) -> list[str]:
        pk: list[str] = []
        for p in self.points:
            pk += [k for k in p if k not in pk]
        return [*self.grid, *pk, *self.random]

    def draws(self) -> list[dict]:
        import numpy as np

        if not self.random:
            return [{}]
        rng = np.random.default_rng(self.sample_seed)
        out = []
        for _ in range(self.samples):
            d = {}
            for key, dist in self.random.items():
                (kind, a), = dist.items()
                if kind == "uniform":
                    d[key] = float(f"{rng.uniform(a[0], a[1]):.6g}")
                elif kind == "loguniform":
                    d[key] = float(f"{math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))):.6g}")
                elif kind == "int":
                    d[key] = int(rng.integers(a[0], a[1] + 1))
                else:
                    d[key] = a[int(rng.integers(len(a)))]
            out.append(d)
        return out

    def variants(self) -> list[dict]:
        """Every run's axis values, grid-major, duplicates (repeated random draws) dropped."""
        keys = list(self.grid)
        seen, out = set(), []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            for point, draw in itertools.product(self.points or [{}], self.draws()):
                v = {**dict(zip(keys, values)), **point, **draw}
                tag = json.dumps(v, sort_keys=True, default=str)
                if tag not in seen:
                    seen.add(tag)
                    out.append(v)
        return out

    def config_for(self, values: Mapping[str, Any]) -> SimConfig:
        """The base config with one variant's values applied (``trace`` and ``plugin`` axes included)."""
        overrides: dict[str, Any] = {}
        plugins = list(self.base.plugins) + [p for p in self.plugins if p not in self.base.plugins]
        for key, v in values.items():
            if key == "trace":
                import traces

                if isinstance(v, str) and v in traces.BUNDLED and not Path(v).is_file():
                    overrides.update({"trace.bundled": v, "trace.path": ""})
                else:
                    overrides.update({"trace.path": str(v)})
            elif key == "plugin":
                plugins += [p for p in ([v] if isinstance(v, str) else list(v)) if p not in plugins]
            else:
                overrides[key] = v
        if plugins:
            overrides["plugins"] = plugins
        return with_overrides(self.base, overrides)

    def run_path(self, values: Mapping[str, Any]) -> str:
        """``runs/``-relative directory of a variant: ``col=value/col=value`` in axis order."""
        parts = [f"{column_name(k)}={hive_value(values[k]) if k in values else UNSET}" for k in self.axes]
        for p in parts:
            if len(p.encode()) > 255:
                raise ConfigError(f"{p[:40]}...: a parameter value too long for a directory name (255 bytes)")
        return "/".join(parts) or "all"

    def to_dict(self) -> dict:
        return {"plugins": list(self.plugins), "samples": self.samples, "sample_seed": self.sample_seed,
                "grid": self.grid, "random": self.random, "points": self.points, "base": self.base.to_dict()}

    def to_toml(self) -> str:
        d = self.to_dict()
        base = d.pop("base")
        base.pop("output", None)   # where the base would write does not change the sweep
        lines = ["# tiersim sweep (written by tiersim sweep; rerun with: tiersim sweep THIS_FILE --out DIR)"]
        lines.append(_dump_toml({k: v for k, v in d.items() if k in ("plugins", "samples", "sample_seed")}))
        for section in ("grid", "random"):
            if d[section]:
                lines.append(f"\n[{section}]")
                for k, v in d[section].items():
                    lines.append(f"{json.dumps(k)} = {_toml_inline(v)}")
        for p in d["points"]:
            lines.append("\n[[points]]")
            lines += [f"{json.dumps(k)} = {_toml_inline(v)}" for k, v in p.items()]
        lines.append("\n" + _dump_toml({"base": base}))
        return "\n".join(lines) + "\n"


def _toml_inline(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_inline(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def load_sweep_file(path: str | Path, samples: int | None = None) -> SweepSpec:
    """A sweep TOML file: ``config`` (a base config file, relative to this file) or a ``[base]`` table,
    ``[set]`` overrides of the base, ``[grid]`` key = [values], ``[random]`` key = {uniform = [lo, hi]},
    ``samples``, ``sample_seed`` and ``plugins`` (relative to this file). ``samples`` (``--samples``)
    replaces the file's."""
    import tomllib

    from sim.config import load_config

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    known = {"config", "base", "set", "grid", "random", "points", "samples", "sample_seed", "plugins"}
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"{path}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
    here = path.parent

    def rel(p: str) -> str:
        q = Path(p)
        return str((here / q).resolve()) if not q.is_absolute() and (here / q).exists() else p

    if "config" in data and "base" in data:
        raise ConfigError(f"{path}: give config = FILE or a [base] table, not both")
    _check_types(path, data)
    base = load_config(rel(data["config"])) if "config" in data else \
        from_file_data(data.get("base", {}), f"{path}: base")
    if data.get("set"):
        base = with_overrides(base, dict(_flatten(data["set"])))
    grid = {}
    for k, v in data.get("grid", {}).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k}: expected a list of values (got {v!r})")
        grid[k] = [rel(x) if k in SPECIAL_AXES and isinstance(x, str) else x for x in v]
    points = [{k: rel(x) if k in SPECIAL_AXES and isinstance(x, str) else x for k, x in p.items()}
              for p in data.get("points", [])]
    plugins = [rel(p) for p in data.get("plugins", [])]
    for i, p in enumerate(plugins):
        if p.endswith(".py") and not Path(p).is_file():
            raise ConfigError(f"{path}: plugins[{i}] = {p!r}: no such file (a relative path is read against the "
                              f"sweep file's folder, {here.resolve()}, then the current directory)")
    if samples is None:
        samples = int(data.get("samples", 0))
    if data.get("random") and samples < 1:
        raise ConfigError(f"{path}: [random] axes need draws: add samples = N (>= 1) to the file or give --samples N")
    return SweepSpec(base=base, grid=grid, random=dict(data.get("random", {})), samples=samples,
                     points=points, sample_seed=int(data.get("sample_seed", 0)), plugins=plugins)


def _check_types(path: Path, data: Mapping) -> None:
    """Each top-level key of a sweep file has the type its example in the docs has."""
    def want(key: str, ok: bool, what: str) -> None:
        if key in data and not ok:
            raise ConfigError(f"{path}: {key}: expected {what} (got {data[key]!r})")

    want("config", isinstance(data.get("config"), str), "a file name, config = \"base.toml\"")
    for section in ("base", "set", "grid", "random"):
        want(section, isinstance(data.get(section), Mapping), f"a table, [{section}]")
    want("points", isinstance(data.get("points"), list) and all(isinstance(x, Mapping) for x in data["points"]),
         "tables, [[points]]")
    want("plugins", isinstance(data.get("plugins"), list) and all(isinstance(x, str) for x in data["plugins"]),
         'a list of files or modules, plugins = ["my_policy.py"]')
    for key in ("samples", "sample_seed"):
        v = data.get(key)
        want(key, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0")


def _flatten(d: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and "." not in k and key.split(".")[0] in ("trace", "model", "hardware", "cluster",
                                                                               "replica", "costs", "policies",
                                                                               "metrics", "output") \
                and not key.endswith("columns"):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,v3`` -> (key, [v1, v2, v3]) with TOML-literal values; commas inside brackets, braces
    or quotes belong to their value (``capture_sizes=[1,2,4],[8,16]`` is two values)."""
    key, _, values = text.partition("=")
    if not values:
        raise ConfigError(f"--grid {text!r}: expected key=value1,value2,...")
    parts = _split_top_level(values)
    if parts is None:
        raise ConfigError(f"--grid {text!r}: unbalanced brackets or quotes in the values")
    return key, [parse_override(f"{key}={v}")[1] for v in parts]


def _split_top_level(text: str) -> list[str] | None:
    """``text`` split at the commas outside brackets, braces and quotes; None if they do not balance."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        return None
    return parts + [text[start:]]


def grid(axes: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of dotted-key axes, as override dicts (in axis order)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


# ====================================================================== one run (in a worker)
_QUEUE = None


def _init_worker(queue, driver: int | None = None) -> None:
    global _QUEUE
    _QUEUE = queue
    if driver is not None:
        _exit_with_driver(driver)


def _exit_with_driver(driver: int, poll_s: float = 1.0) -> None:
    """A pool worker ends when its driver does (a killed driver's workers would otherwise wait on their
    call queue forever). What it was running is partial, and a resumed sweep redoes it. ``driver`` is
    the driver's pid, passed in: a worker still starting when the driver died is already re-parented."""
    import threading

    def watch():
        while True:
            if os.getppid() != driver:
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watch, daemon=True, name="tiersim-parent-watch").start()


def _in_flight_marker(sweep_dir: Path, config_hash: str) -> Path:
    """The directory a run holds while it runs (``_run_pool`` reads which runs had started when a
    worker died); under ``.tmp/``, so a resumed sweep reaps any a kill left."""
    return sweep_dir / ".tmp" / f"run-{config_hash[:16]}"


def execute(task: dict) -> dict:
    """Run one variant in this process and publish its results directory; returns its index row.
    A simulation that raises is a ``failed`` row; this process dying is the driver's business."""
    from sim.engine import Simulation

    t0 = time.perf_counter()
    sweep_dir, rel = Path(task["sweep_dir"]), task["run"]
    row = {"run": rel, "config_hash": task["config_hash"], "params": task["params"]}
    started = _in_flight_marker(sweep_dir, task["config_hash"])
    started.mkdir(parents=True, exist_ok=True)
    try:
        cfg = from_dict(task["config"], "sweep")
        cb = None
        if _QUEUE is not None:
            def cb(p, _q=_QUEUE, _key=rel):
                with contextlib.suppress(Exception):
                    _q.put_nowait((_key, p.finished, p.total, p.sim_time_s, p.trace_span_s))
        res = Simulation(cfg, progress=cb).run()
        staging = sweep_dir / ".tmp" / f"{task['config_hash'][:16]}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        res.write(staging, {"config.toml": cfg.to_toml()})
        publish(staging, sweep_dir, rel, task["config_hash"])
        row.update(status="done", error="", wall_s=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one failed run must not cost the others
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=8)[-3000:], wall_s=time.perf_counter() - t0)
    finally:
        with contextlib.suppress(OSError):
            started.rmdir()
    return row


def publish(staging: Path, sweep_dir: Path, rel: str, config_hash: str) -> Path:
    """Move a complete staging directory to ``runs/REL`` (replacing anything partial there), then link its
    tables into the datasets."""
    final = sweep_dir / "runs" / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if results_io.verify(final) is None:     # another attempt finished it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
            link_tables(sweep_dir, rel, config_hash)
            return final
        shutil.rmtree(final)
    os.rename(staging, final)
    results_io.kill_point("publish")
    link_tables(sweep_dir, rel, config_hash)
    return final


DATASETS = ("requests", "steps")


def dataset_part(sweep_dir: Path, table: str, rel: str, config_hash: str) -> Path:
    return sweep_dir / table / rel / f"config_hash={config_hash[:16]}" / "part-0.parquet"


def link_tables(sweep_dir: Path, rel: str, config_hash: str) -> None:
    """Hard-link (else copy) a run's requests and steps files into the hive datasets, atomically."""
    run = sweep_dir / "runs" / rel
    for table in DATASETS:
        src = run / f"{table}.parquet"
        dst = dataset_part(sweep_dir, table, rel, config_hash)
        if dst.exists() and dst.stat().st_size == src.stat().st_size and os.path.samefile(src, dst):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        with results_io.atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)


# ====================================================================== the driver
def _reap_staging(sweep_dir: Path) -> None:
    tmp = sweep_dir / ".tmp"
    if not tmp.is_dir():
        return
    for p in tmp.iterdir():
        m = re.match(r"^[0-9a-f]{16}-(\d+)$", p.name)
        if not m or not results_io.pid_alive(int(m.group(1))) or int(m.group(1)) == os.getpid():
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        tmp.rmdir()


def _reap_dataset_tmp(sweep_dir: Path) -> None:
    for table in DATASETS:
        root = sweep_dir / table
        if root.is_dir():
            for p in root.rglob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    p.unlink()


def read_index(sweep_dir: str | Path) -> list[dict]:
    """The index's rows; a line cut short by a kill is skipped."""
    p = Path(sweep_dir) / "index.jsonl"
    rows = []
    if p.exists():
        for line in p.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def _append_index(sweep_dir: Path, row: dict) -> None:
    p = sweep_dir / "index.jsonl"
    data = (json.dumps(row, default=str, sort_keys=True) + "\n").encode()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if os.fstat(fd).st_size:
            with open(p, "rb") as fh:       # a line cut short by a kill: end it first
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)


def metrics_row(summary: dict) -> dict:
    """The summary's headline figures as flat columns (``ttft_p99_s``, ``goodput_fraction``, ...)."""
    row: dict[str, Any] = {}
    for sec in METRIC_SECTIONS:
        base = sec.removesuffix("_s")
        for st in STATS:
            row[f"{base}_{st}_s"] = (summary.get(sec) or {}).get(st)
    th, gp = summary.get("throughput", {}), summary.get("goodput", {})
    rq, en, kv = summary.get("requests", {}), summary.get("engine", {}), summary.get("kv", {})
    row.update({
        "requests_per_s": th.get("requests_per_s"), "throughput_tok_s": th.get("output_tokens_per_s"),
        "total_tok_s": th.get("total_tokens_per_s"), "goodput_req_s": gp.get("requests_per_s"),
        "goodput_fraction": gp.get("fraction"), "finished": rq.get("finished"), "rejected": rq.get("rejected"),
        "preemptions": en.get("preemptions"), "steps": en.get("steps"), "mean_batch_seqs": en.get("mean_batch_seqs"),
        "hbm_peak_active_bytes": kv.get("hbm_peak_active_bytes"), "prefix_hit_rate": kv.get("hbm_prefix_hit_rate"),
        "makespan_s": (summary.get("time") or {}).get("makespan_s"),
    })
    return row


def run_sweep(spec: SweepSpec | SimConfig, variants: list[Mapping[str, Any]] | None = None,
              out_dir: str | Path = "sweep", *, jobs: int | None = None, scheduler: str | None = None,
              progress: Any = None, force: bool = False):
    """Run every variant not already done; returns the summary table (a DataFrame, one row per run).

    ``jobs``: local worker processes (default: the CPU count; 1 runs in this process).
    ``scheduler``: a Dask scheduler address, or ``"local"`` for a ``LocalCluster`` of ``jobs`` workers.
    ``progress``: a :class:`sim.progress.SweepProgress` (or None). ``force``: start over in ``out_dir``.
    The old form ``run_sweep(base_config, [overrides, ...], out_dir)`` runs a list of override dicts.
    """
    if isinstance(spec, SimConfig):     # run_sweep(base, variants, out): each override dict is a point
        spec, variants = _spec_from_variants(spec, variants or [{}])
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1 (1 runs in this process; leave it out for one per CPU)")
    out = Path(out_dir)
    variants = spec.variants() if variants is None else variants
    built = []          # (values, run path, config, error): each variant's config, built once
    for values in variants:
        try:
            cfg = spec.config_for(values)
            _check_inputs_exist(cfg, check_policies=not spec.plugins)
            built.append((values, spec.run_path(values), cfg, None))
        except Exception as exc:  # noqa: BLE001 - a bad variant is recorded, not fatal
            built.append((values, None, None, f"{type(exc).__name__}: {exc}"))
    bad = [error for *_, error in built if error is not None]
    seen: dict[str, str] = {}
    for _, rel, cfg, error in built:
        if error is None:
            first = seen.setdefault(cfg.hash(), rel)
            if first != rel:
                raise ConfigError(f"runs {first} and {rel} have the same config (their axis values resolve to "
                                  "one setting); drop one of the values")
    if built and len(bad) == len(built):      # nothing to run: say why once, write nothing
        raise ConfigError(f"every point of the sweep is invalid ({len(bad)} of {len(built)}); the first: {bad[0]}")
    _prepare(out, spec, force)
    _check_inputs(out, [cfg for _, _, cfg, error in built if error is None], spec.plugins, force)
    rows: dict[str, dict] = {}
    order: list[str] = []
    tasks: list[dict] = []
    indexed_done = {(r.get("run"), r.get("config_hash")) for r in read_index(out) if r.get("status") == "done"}
    for values, rel, cfg, error in built:
        params = {column_name(k): v for k, v in values.items()}
        if error is not None:
            rel = spec.run_path(values) if values else "all"
            row = {"run": rel, "config_hash": "", "params": params, "status": "invalid", "error": error}
            _append_index(out, row)
            rows[rel] = row
            order.append(rel)
            continue
        h = cfg.hash()
        order.append(rel)
        run_dir = out / "runs" / rel
        if results_io.verify(run_dir) is None and (results_io.read_marker(run_dir) or {}).get("config_hash") == h:
            link_tables(out, rel, h)       # repairs a dataset link a kill left out
            row = {"run": rel, "config_hash": h, "params": params, "status": "done (resumed)", "error": ""}
            if (rel, h) not in indexed_done:   # finished, but the driver died before it wrote the line
                _append_index(out, {**row, "status": "done"})
            rows[rel] = row
            continue
        tasks.append({"sweep_dir": str(out.resolve()), "run": rel, "config_hash": h, "params": params,
                      "config": cfg.to_dict()})
    if progress is not None:
        n_invalid = sum(1 for r in rows.values() if r["status"] == "invalid")
        progress.start(len(order), len(order) - len(tasks) - n_invalid)
        for rel, r in rows.items():
            if r["status"] == "invalid":
                progress.note(f"{rel}: invalid, not run ({r['error']})")

    def record(row: dict) -> None:
        row = {k: v for k, v in row.items()}
        _append_index(out, row)
        if row["status"] == "done":
            results_io.kill_point("indexed", group=True)     # crash tests: driver and workers die here
        rows[row["run"]] = row
        if progress is not None:
            progress.run_finished(row["run"], row["status"] + (f" ({row['error']})" if row.get("error") else ""),
                                  row.get("wall_s"))

    try:
        if tasks:
            if scheduler:
                _run_dask(tasks, scheduler, jobs, record)
            elif (jobs or os.cpu_count() or 1) <= 1 or len(tasks) == 1:
                _run_serial(tasks, record, progress)
            else:
                _run_pool(tasks, jobs or os.cpu_count() or 1, record, progress)
    finally:
        if progress is not None:
            progress.stop()
    _reap_staging(out)
    return write_summary(out, [rows[r] for r in order])


def _spec_from_variants(base: SimConfig, variants: list[Mapping[str, Any]]) -> tuple[SweepSpec, list[dict]]:
    spec = SweepSpec(base=base, points=[dict(v) for v in variants])
    return spec, spec.variants()


def _prepare(out: Path, spec: SweepSpec, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: exists and is not a directory")
    stored = out / "sweep.toml"
    text = spec.to_toml()
    if stored.exists() and not force:
        if stored.read_text() != text:
            raise SweepError(f"{out}: holds a different sweep (its sweep.toml differs); use another --out, or "
                             "--force to start over there")
    elif out.exists() and not stored.exists() and any(out.iterdir()):
        # never cleared, even with --force: it may hold anything (a thesis, a repository, a home directory)
        raise SweepError(f"{out}: exists, is not empty and is not a sweep directory (no sweep.toml); "
                         "use a new or empty --out")
    if force and out.exists():
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    results_io.reap_spill_dirs()
    _reap_staging(out)
    _reap_dataset_tmp(out)
    results_io.write_text_atomic(stored, text)


def _check_inputs_exist(cfg: SimConfig, check_policies: bool) -> None:
    """What a run would fail on at once, found before any run starts: a trace file that does not exist,
    and (when no plugin could register more) an unknown policy or policy parameter."""
    import traces
    from policies import registry

    tc = cfg.trace
    if tc.path and not tc.synthetic and not Path(tc.path).is_file() and tc.path not in traces.BUNDLED:
        traces.load_trace(tc.path)      # raises: no such file (with its hint), or a directory
    if check_policies:
        for kind in registry.KINDS:
            pc = getattr(cfg.policies, kind)
            registry.build(kind, pc.name, pc.params)


# config fields that may name a file (or a calibrate directory) whose contents a run depends on
_INPUT_FIELDS = (("trace", "path"), ("model", "name"), ("hardware", "gpu"), ("hardware", "server"),
                 ("costs", "table"), ("costs", "recipe"))


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_inputs(out: Path, configs: list[SimConfig], plugins: list[str], force: bool) -> None:
    """The sweep's input files (traces, model/GPU files, calibrate tables, plugin files) by sha256 in
    ``inputs.json``: a config hash covers a file's path, not its contents, so a resumed sweep whose
    trace was edited in between would otherwise mix runs of two traces."""
    paths = set()
    for cfg in configs:
        for section, key in _INPUT_FIELDS:
            v = getattr(getattr(cfg, section), key)
            if isinstance(v, str) and v and Path(v).exists():
                paths.add(str(Path(v).resolve()))
    paths.update(str(Path(p).resolve()) for p in plugins if Path(p).is_file())
    now = {p: _digest(Path(p)) for p in sorted(paths)}
    stored = out / "inputs.json"
    if stored.exists() and not force:
        try:
            before = json.loads(stored.read_text())
        except ValueError:
            before = {}
        changed = [p for p in now if p in before and before[p] != now[p]]
        if changed:
            raise SweepError(f"{changed[0]}: changed since this sweep's finished runs were made (its sha256 "
                             f"differs from {stored}); resuming would mix runs of two versions of it. Restore "
                             f"the file, use another --out, or --force to start over")
        now = {**before, **now}
    results_io.write_text_atomic(stored, json.dumps(now, indent=1, sort_keys=True) + "\n")


def _run_serial(tasks: list[dict], record: Callable[[dict], None], progress) -> None:
    global _QUEUE
    for t in tasks:
        if progress is not None and progress.live:
            class _Q:
                def put_nowait(self, item):
                    progress.run_update(*item)
            _QUEUE = _Q()
        try:
            record(execute(t))
        finally:
            _QUEUE = None


def _run_pool(tasks: list[dict], jobs: int, record: Callable[[dict], None], progress) -> None:
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue() if progress is not None and progress.live else None
    stop = threading.Event()
    if queue is not None:
        def pump():
            import queue as q

            while not stop.is_set():
                try:
                    item = queue.get(timeout=0.2)
                except q.Empty:
                    continue
                except Exception:  # noqa: BLE001 - a worker killed mid-message: no more live updates
                    return
                progress.run_update(*item)
        threading.Thread(target=pump, daemon=True).start()
    attempts: dict[str, int] = {}
    pending = list(tasks)
    alone: list[dict] = []      # runs in flight when a worker died: rerun one at a time to find the culprit

    def pool_round(batch: list[dict], workers: int) -> tuple[list[dict], list[dict]]:
        """Run ``batch``; returns (runs that had started when a worker died, runs that had not)."""
        sweep_dir = Path(batch[0]["sweep_dir"])
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, os.getpid()))
        futs = {ex.submit(execute, t): t for t in batch}
        done_runs: set[str] = set()
        started, waiting = [], []
        try:
            for f in as_completed(futs):
                row = f.result()
                done_runs.add(futs[f]["run"])
                record(row)
        except BrokenProcessPool:
            for f, t in futs.items():
                if t["run"] in done_runs:
                    continue
                if f.done() and not f.cancelled() and f.exception() is None:
                    record(f.result())
                    continue
                marker = _in_flight_marker(sweep_dir, t["config_hash"])
                (started if marker.is_dir() else waiting).append(t)
                with contextlib.suppress(OSError):
                    marker.rmdir()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        _reap_staging(sweep_dir)
        results_io.reap_spill_dirs()
        return started, waiting

    try:
        while pending or alone:
            if alone:       # one suspect alone in its own pool: if the worker dies now, this run killed it
                t = alone.pop(0)
                died, _ = pool_round([t], 1)
                if died:
                    attempts[t["run"]] = attempts.get(t["run"], 0) + 1
                    if attempts[t["run"]] >= MAX_ATTEMPTS:
                        record({"run": t["run"], "config_hash": t["config_hash"], "params": t["params"],
                                "status": "failed", "error": f"the worker process died {MAX_ATTEMPTS} times "
                                                             "running it alone (killed, or out of memory?)"})
                    else:
                        alone.insert(0, t)
                continue
            started, waiting = pool_round(pending, min(jobs, len(pending)))
            alone += started
            pending = waiting
    finally:
        stop.set()


def _run_dask(tasks: list[dict], scheduler: str, jobs: int | None, record: Callable[[dict], None]) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise SweepError("--scheduler needs Dask: pip install 'tiersim[dask]'") from None
    cluster = None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=jobs or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, ValueError, TimeoutError) as exc:
            raise SweepError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({exc}); start one "
                             "(dask scheduler) and give its tcp://HOST:PORT, or --scheduler local. Rerunning "
                             "the same command resumes this sweep") from None
    try:
        futs = [client.submit(execute, t, pure=False, key=f"tiersim-run-{t['config_hash'][:16]}") for t in tasks]
        for f in as_completed(futs):
            record(f.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list" if all(_kind(x) == "number" for x in v) else "other"
    return "other"


def _mixed_kinds(values) -> bool:
    kinds = {_kind(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return len(kinds) > 1 or "other" in kinds


def _param_text(v: Any) -> str:
    """A parameter value as the text a summary column shows: strings as they are, the rest as JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def write_summary(out: Path, rows: list[dict]):
    """``summary.parquet`` and ``summary.csv``: one row per run, from the runs' own ``summary.json``."""
    import pandas as pd

    table = []
    for r in rows:
        row = {**(r.get("params") or {}), "run": r["run"], "config_hash": r.get("config_hash", ""),
               "status": r["status"], "error": r.get("error", "")}
        if r["status"].startswith("done"):
            with contextlib.suppress(OSError, ValueError):
                row.update(metrics_row(json.loads((out / "runs" / r["run"] / "summary.json").read_text())))
        table.append(row)
    params: list[str] = []
    for r in rows:      # parameter columns first, in axis order (a point may leave one out)
        params += [k for k in (r.get("params") or {}) if k not in params]
    df = pd.DataFrame(table)
    df = df[[*params, *(c for c in df.columns if c not in params)]]
    for c in params:
        if _mixed_kinds(df[c]):
            # Parquet holds one type per column: an axis mixing kinds ("all" and [1, 2, 4]) becomes text
            df[c] = [None if v is None or v is pd.NA else _param_text(v) for v in df[c]]
    with results_io.atomic_path(out / "summary.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with results_io.atomic_path(out / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df
