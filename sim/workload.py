"""The requests a config asks for: its ``[trace]`` section turned into a validated :class:`traces.Trace`.

    from sim.workload import load_trace_for
    trace = load_trace_for(config)     # file or bundled trace, or a synthetic spec; window, cap, trim,
                                       # rate scale and repeats applied in that order

Every error names the ``[trace]`` key that caused it (or the file and its row and field), so a user
can fix it from the command line: the readers' options are the keys ``columns``, ``time_unit``,
``time_format`` and ``hash_block_tokens``, and values the simulator cannot represent (spans past
``traces.schema.MAX_ARRIVAL_S``, more than :data:`MAX_REQUESTS` requests) are refused here, before a run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

import traces
from sim.config import SimConfig, TraceConfig
from sim.errors import ConfigError
from traces.schema import MAX_ARRIVAL_S, Trace, TraceError

MAX_REQUESTS = 10**8
"""Most requests in one run: the simulator keeps about 1 KB of state per request (a million requests
peak under 1 GB), so more is an accident (e.g. a huge trace.repeat), not a workload this machine holds."""

_GENERIC = ("csv", "parquet")
_READER_KEYS = ("columns", "time_unit", "time_format")
_LIMIT = f"{MAX_ARRIVAL_S:.0e}".replace("e+0", "e")


def load_trace_for(config: SimConfig) -> Trace:
    """The trace a config names, with its window, request cap, rate scale and repeats applied."""
    tc = config.trace
    if tc.synthetic:
        set_keys = [k for k in (*_READER_KEYS, "hash_block_tokens") if getattr(tc, k)]
        if set_keys:
            raise ConfigError(f"trace.{set_keys[0]}: not used with trace.synthetic (it configures a trace file)")
        trace = synthetic_trace(tc.synthetic, config.seed)
        label = "the synthetic trace"
    else:
        trace, label = _read(tc)
    return _transform(trace, tc, label)


def _read(tc: TraceConfig) -> tuple[Trace, str]:
    """Read the file or bundled trace with the reader options the config sets; (trace, its file name)."""
    if tc.path and Path(tc.path).is_file():
        path = Path(tc.path)
        fmt = tc.format or _implied_format(tc, path)
    elif tc.path and tc.path not in traces.BUNDLED:
        traces.load_trace(tc.path)   # raises: no such file, or a directory
        raise AssertionError("unreachable: load_trace accepted a path that is not a file")
    else:   # a bundled trace, named by trace.bundled or given as trace.path (tiersim run --trace azure-code)
        key, name = ("trace.path", tc.path) if tc.path else ("trace.bundled", tc.bundled)
        entry = traces.BUNDLED.get(name)
        if entry is None:
            raise ConfigError(f"{key}: unknown bundled trace {name!r} (known: {', '.join(traces.BUNDLED)}); "
                              "or set trace.path to a file")
        if entry.format == "lengths":
            raise ConfigError(f"{key}: {name!r} is a length distribution with no arrival times; use it in a "
                              f'synthetic trace: trace.synthetic = "poisson rate=5 n=1000 lengths=empirical:{name}"')
        path = traces.bundled_path(name)
        fmt = tc.format or entry.format
    trace = traces.load_trace(path, format=fmt, **_options(tc, fmt, path))
    refuse_empty(trace, path)
    return trace, path.name


def refuse_empty(trace: Trace, path: Any) -> None:
    """A file that holds no requests (only a header, or every row dropped) is an error naming the file."""
    if len(trace) == 0:
        dropped = trace.dropped_rows
        why = (" (all rows were dropped: " + ", ".join(f"{v:,} {k}" for k, v in dropped.items()) + ")"
               if dropped else "")
        raise TraceError(f"the file holds no requests{why}", path=path)


def _implied_format(tc: TraceConfig, path: Path) -> str:
    """The format of a file the config does not name one for: detected, except that a column mapping
    means the generic reader (parquet for a Parquet file, csv for anything else). trace.time_unit or
    trace.time_format without a mapping means it only for a file of no detected format: an Azure file
    stays azure, so the key is refused by name rather than by the generic reader's missing columns."""
    if tc.columns or tc.time_unit or tc.time_format:
        with open(path, "rb") as fh:
            head = fh.read(4)
        generic = "parquet" if head == b"PAR1" or path.suffix.lower() in (".parquet", ".pq") else "csv"
        if tc.columns:
            return generic
        try:
            return traces.detect_format(path)
        except TraceError:
            return generic
    return traces.detect_format(path)


def _options(tc: TraceConfig, fmt: str | None, path: Any) -> dict[str, Any]:
    """Reader keyword arguments from the ``[trace]`` reader keys, refusing keys the format does not read."""
    opts: dict[str, Any] = {}
    for key in _READER_KEYS:
        value = getattr(tc, key)
        if not value:
            continue
        if fmt not in _GENERIC and key == "columns":
            raise ConfigError(f"trace.{key}: only the csv and parquet formats read it, and {Path(path).name} is "
                              f"read as {fmt}; set trace.format = \"csv\" (or \"parquet\") to use the column mapping")
        if fmt not in _GENERIC:     # time_unit, time_format: how the generic readers read the arrival column
            raise ConfigError(f"trace.{key}: only the csv and parquet formats read it (how their arrival column is "
                              f"read), and {Path(path).name} is read as {fmt}, whose reader converts its own "
                              f"timestamps; remove trace.{key}" + ("" if fmt == "mooncake" else
                              ' (or read the file as a generic table: trace.format = "csv" with trace.columns)'))
        opts[key] = value
    if tc.hash_block_tokens:
        if fmt == "mooncake":
            opts["block_tokens"] = tc.hash_block_tokens
        elif fmt == "parquet":
            opts["hash_block_tokens"] = tc.hash_block_tokens
        else:
            raise ConfigError(f"trace.hash_block_tokens: only mooncake and parquet traces carry block hashes, and "
                              f"{Path(path).name} is read as {fmt}")
    return opts


def _transform(trace: Trace, tc: TraceConfig, label: str) -> Trace:
    """Window, cap, trim, rate scale and repeats, each checked first so its error names its key."""
    last = float(trace.arrival_s[-1]) if len(trace) else 0.0
    if tc.start_s > 0 or tc.end_s > 0:
        end = tc.end_s if tc.end_s > 0 else last + 1.0
        if tc.start_s >= end:
            raise ConfigError(f"trace.start_s: {tc.start_s:g} s is after the last request of {label} "
                              f"(at {last:.6g} s)")
        trace = traces.time_window(trace, tc.start_s, end)
        if len(trace) == 0:
            keys = "trace.start_s" + (" and trace.end_s" if tc.end_s > 0 else "")
            raise ConfigError(f"{keys}: no request of {label} arrives in [{tc.start_s:g}, {end:g}) s "
                              f"(its arrivals span 0 to {last:.6g} s)")
    if tc.max_requests:
        trace = traces.head(trace, tc.max_requests)
    if tc.max_total_tokens:
        from traces.transform import vidur_trim

        too_long = np.flatnonzero(trace.output_tokens >= tc.max_total_tokens)
        if too_long.size:
            i = int(too_long[0])
            raise ConfigError(f"trace.max_total_tokens: {tc.max_total_tokens} leaves no room for a prompt beside "
                              f"request {int(trace.request_id[i])} of {label}, whose output has "
                              f"{int(trace.output_tokens[i]):,} tokens; set it above the longest output "
                              f"({int(trace.output_tokens.max()):,}) or to 0 (off)")
        trace = vidur_trim(trace, tc.max_total_tokens)
    if tc.rate_scale != 1.0:
        last = float(trace.arrival_s[-1]) if len(trace) else 0.0
        if last / tc.rate_scale > MAX_ARRIVAL_S:
            raise ConfigError(f"trace.rate_scale: {tc.rate_scale:g} stretches the {last:.4g} s of {label} to "
                              f"{last / tc.rate_scale:.3g} s, beyond the {_LIMIT} s a trace may span (past it "
                              f"float64 time loses the resolution of an engine step); use trace.rate_scale >= "
                              f"{last / MAX_ARRIVAL_S:.2g} or a shorter window (trace.end_s)")
        trace = traces.scale_rate(trace, tc.rate_scale)
    if tc.repeat > 1:
        n = len(trace)
        if n < 2:
            raise ConfigError(f"trace.repeat: needs at least 2 requests to space the copies, and {label} has {n} "
                              "after the window and trace.max_requests")
        if n * tc.repeat > MAX_REQUESTS:
            raise ConfigError(f"trace.repeat: {tc.repeat:,} copies of {n:,} requests make {n * tc.repeat:,}, more "
                              f"than the {MAX_REQUESTS:,} one run can hold; lower trace.repeat or set "
                              "trace.max_requests")
        span = trace.span_s
        total = (span + span / (n - 1)) * (tc.repeat - 1) + span
        if total > MAX_ARRIVAL_S:
            raise ConfigError(f"trace.repeat: {tc.repeat:,} copies span {total:.3g} s, beyond the {_LIMIT} s a "
                              "trace may span; lower trace.repeat")
        trace = traces.repeat(trace, tc.repeat)
    if len(trace) == 0:   # cannot happen after the checks above; kept as the last line of defence
        raise ConfigError(f"trace: no requests left of {label}")
    return trace


_SYNTH_KEYS = ("rate", "n", "duration", "cv", "prompt", "output", "lengths", "seed")


def synthetic_trace(spec: str, seed: int) -> Trace:
    """``"poisson rate=5 n=1000 prompt=lognormal:1024:0.8 output=fixed:128"`` (or ``gamma ... cv=3``,
    ``duration=600`` instead of ``n``, ``lengths=empirical:NAME`` for paired lengths)."""
    words = spec.split()
    if not words or words[0] not in ("poisson", "gamma"):
        raise ConfigError(f"trace.synthetic: {spec!r} must start with 'poisson' or 'gamma'")
    opts: dict[str, str] = {}
    for w in words[1:]:
        if "=" not in w:
            raise ConfigError(f"trace.synthetic: {w!r} is not key=value (keys: {', '.join(_SYNTH_KEYS)})")
        k, v = w.split("=", 1)
        if k in opts:
            raise ConfigError(f"trace.synthetic: {k} is given twice")
        opts[k] = v
    bad = sorted(set(opts) - set(_SYNTH_KEYS))
    if bad:
        raise ConfigError(f"trace.synthetic: unknown key {bad[0]!r} (known: {', '.join(sorted(_SYNTH_KEYS))})")
    if "rate" not in opts:
        raise ConfigError(f"trace.synthetic: {spec!r} needs rate=<requests per second>")
    if ("n" in opts) == ("duration" in opts):
        raise ConfigError("trace.synthetic: give either n=<requests> or duration=<seconds>"
                          + (", not both" if "n" in opts else ""))
    rate = _number(opts, "rate", above=0.0)
    n = _number(opts, "n", whole=True, at_least=1, at_most=MAX_REQUESTS) if "n" in opts else None
    duration = _number(opts, "duration", above=0.0, at_most=MAX_ARRIVAL_S) if "duration" in opts else None
    if duration is not None and rate * duration > MAX_REQUESTS:
        raise ConfigError(f"trace.synthetic: rate={opts['rate']} for duration={opts['duration']} s is "
                          f"{rate * duration:.3g} requests, more than the {MAX_REQUESTS:,} one run can hold")
    if n is not None and n > 1 and n / rate > MAX_ARRIVAL_S:
        raise ConfigError(f"trace.synthetic: {n:,} requests at rate={opts['rate']} span about {n / rate:.3g} s, "
                          f"beyond the {_LIMIT} s a trace may span")
    arrival = words[0]
    cv = _number(opts, "cv", above=0.0, at_least=1e-3, at_most=1e3) if "cv" in opts else 1.0
    if arrival == "poisson" and cv != 1.0:
        raise ConfigError(f"trace.synthetic: cv={opts['cv']} needs 'gamma' (a Poisson process has cv 1)")
    run_seed = _number(opts, "seed", whole=True, at_least=0, at_most=2**63 - 1) if "seed" in opts else seed
    lengths: dict[str, Any]
    if "lengths" in opts:
        if "prompt" in opts or "output" in opts:
            raise ConfigError("trace.synthetic: give lengths= (paired) or prompt= and output=, not both")
        lengths = {"lengths": opts["lengths"]}
    else:
        lengths = {"prompt": opts.get("prompt", "lognormal:1024:0.8"),
                   "output": opts.get("output", "lognormal:128:0.8")}
    try:
        return traces.synthesize(rate_per_s=rate, num_requests=n, duration_s=duration, arrival=arrival, cv=cv,
                                 seed=run_seed, **lengths)
    except TraceError as exc:   # a bad length spec or a drawn length out of range: the spec names it
        raise ConfigError(f"trace.synthetic: {exc if exc.path else exc.detail}") from None   # a file: where in it


def _number(opts: dict[str, str], key: str, *, whole: bool = False, above: float | None = None,
            at_least: float | None = None, at_most: float | None = None) -> Any:
    """One numeric option of a synthetic spec, checked; errors name the option as written."""
    raw = opts[key]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"trace.synthetic: {key}={raw!r} is not a number") from None
    kind = "a whole number" if whole else "a number"
    if not math.isfinite(value) or (whole and not value.is_integer()):
        raise ConfigError(f"trace.synthetic: {key}={raw} must be {'finite and ' if not whole else ''}{kind}")
    if above is not None and not value > above:
        raise ConfigError(f"trace.synthetic: {key}={raw} must be > {above:g}")
    if at_least is not None and value < at_least:
        raise ConfigError(f"trace.synthetic: {key}={raw} must be >= {at_least:g}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"trace.synthetic: {key}={raw} must be <= {at_most:g}")
    return int(value) if whole else value
