"""Seeded synthetic traces: an arrival process crossed with prompt and output length distributions.

Arrivals: ``poisson`` (exponential gaps at ``rate_per_s``) or ``gamma`` (a renewal process whose gaps
have mean 1/rate_per_s and coefficient of variation ``cv``; cv = 1 is Poisson, cv > 1 burstier). The
first request arrives at 0.0 s.

Lengths, as objects or spec strings (for config files and the CLI)::

    fixed:512                      every request 512 tokens
    uniform:128:2048               whole numbers in [128, 2048], equally likely
    lognormal:1024:0.8[:MIN:MAX]   median 1024, sigma 0.8 (of the log), rounded, clipped to [MIN, MAX]
    empirical:sharegpt-lengths     resampled from a bundled name or a path: a length file with
                                   num_prefill_tokens/num_decode_tokens, or any loadable trace

Prompt and output are drawn independently, or, with ``lengths="empirical:..."``, as (prompt, output)
pairs from the same source row. Determinism: the seed feeds a ``numpy.random.SeedSequence`` whose
children drive separate ``Generator(PCG64(...))`` streams for arrivals, prompts and outputs, so equal
arguments give byte-identical arrays and changing one distribution leaves the other draws unchanged.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from traces.bundled import BUNDLED, bundled_path
from traces.schema import MAX_TOKENS, Trace, TraceError

Role = Literal["prompt", "output"]
PROMPT_COLUMN = "num_prefill_tokens"
OUTPUT_COLUMN = "num_decode_tokens"
ARRIVALS = ("poisson", "gamma")


def _fmt(x: float) -> str:
    """Shortest text for a number in a spec string (integers without a decimal point)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _whole(spec: str, label: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= MAX_TOKENS:
        raise TraceError(f"bad length spec {spec!r}: {label} must be a whole number in [{minimum}, "
                         f"{MAX_TOKENS:,}] (got {value!r})", label="synth")
    return int(value)


@dataclass(frozen=True, slots=True)
class FixedLength:
    """Every request gets ``tokens`` tokens."""

    tokens: int

    def __post_init__(self) -> None:
        _whole(self.spec, "tokens", self.tokens)

    @property
    def spec(self) -> str:
        return f"fixed:{self.tokens}"

    def sample(self, rng: np.random.Generator, n: int, role: Role) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class UniformLength:
    """Whole numbers of tokens uniform on [lo, hi], both inclusive."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        _whole(self.spec, "lo", self.lo)
        _whole(self.spec, "hi", self.hi, minimum=self.lo)

    @property
    def spec(self) -> str:
        return f"uniform:{self.lo}:{self.hi}"

    def sample(self, rng: np.random.Generator, n: int, role: Role) -> np.ndarray:
        return rng.integers(self.lo, self.hi, size=n, endpoint=True, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class LognormalLength:
    """exp(N(log median, sigma²)) tokens, rounded to whole tokens and clipped to [min_tokens, max_tokens]
    (and to ``MAX_TOKENS``, the most a request may have)."""

    median: float
    sigma: float
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median) and self.median > 0):
            raise TraceError(f"bad length spec {self.spec!r}: median must be > 0", label="synth")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise TraceError(f"bad length spec {self.spec!r}: sigma must be >= 0", label="synth")
        _whole(self.spec, "min", self.min_tokens)
        if self.max_tokens is not None:
            _whole(self.spec, "max", self.max_tokens, minimum=self.min_tokens)

    @property
    def spec(self) -> str:
        tail = "" if (self.min_tokens, self.max_tokens) == (1, None) else (
            f":{self.min_tokens}:{'inf' if self.max_tokens is None else self.max_tokens}")
        return f"lognormal:{_fmt(self.median)}:{_fmt(self.sigma)}{tail}"

    def sample(self, rng: np.random.Generator, n: int, role: Role) -> np.ndarray:
        draws = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        hi = np.inf if self.max_tokens is None else self.max_tokens
        # clip before the cast: a huge sigma can draw values past the int64 range
        return np.clip(draws, self.min_tokens, min(hi, MAX_TOKENS)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class EmpiricalLength:
    """Lengths resampled (with replacement) from real requests.

    ``source`` is a bundled name or a path: either a length file with ``num_prefill_tokens`` and
    ``num_decode_tokens`` columns (Vidur/Sarathi-Serve layout), or any trace ``load_trace`` can read,
    whose prompt/output tokens are used. As a prompt spec it draws the prompt column, as an output spec
    the output column; :meth:`sample_pairs` keeps each row's two lengths together.
    """

    source: str

    @property
    def spec(self) -> str:
        return f"empirical:{self.source}"

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, output) token arrays of the source (read once per file version, then cached)."""
        path = bundled_path(self.source) if self.source in BUNDLED else Path(self.source)
        try:
            stat = path.stat()
        except OSError:
            raise TraceError(f"bad length spec {self.spec!r}: no such file or bundled name "
                             f"(bundled: {', '.join(BUNDLED)})", label="synth") from None
        return _read_lengths(str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def sample(self, rng: np.random.Generator, n: int, role: Role) -> np.ndarray:
        prompt, output = self.columns()
        pool = prompt if role == "prompt" else output
        return pool[rng.integers(0, len(pool), size=n)]

    def sample_pairs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompt, output = self.columns()
        rows = rng.integers(0, len(prompt), size=n)
        return prompt[rows], output[rows]


LengthSpec = FixedLength | UniformLength | LognormalLength | EmpiricalLength


@functools.lru_cache(maxsize=8)
def _read_lengths(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (prompt, output) arrays of a length file or trace; the stat values key the cache."""
    from traces.io import load_trace
    from traces.readers.columns import SourceColumns, csv_header, csv_line_of_row, read_csv_columns

    p = Path(path)
    try:
        header = csv_header(p)
    except (UnicodeDecodeError, OSError):
        header = []
    if {PROMPT_COLUMN, OUTPUT_COLUMN} <= set(header):
        frame = read_csv_columns(p, (PROMPT_COLUMN, OUTPUT_COLUMN))
        cols = SourceColumns(p, csv_line_of_row)
        prompt = cols.tokens(frame[PROMPT_COLUMN], PROMPT_COLUMN)
        output = cols.tokens(frame[OUTPUT_COLUMN], OUTPUT_COLUMN)
        cols.raise_problems()
    else:
        trace = load_trace(p)
        prompt, output = trace.prompt_tokens.copy(), trace.output_tokens.copy()
    if len(prompt) == 0:
        raise TraceError("no rows to sample lengths from", path=p)
    prompt.flags.writeable = output.flags.writeable = False
    return prompt, output


def parse_length(spec: str | LengthSpec) -> LengthSpec:
    """A length distribution from its spec string (see the module docstring); objects pass through."""
    if isinstance(spec, (FixedLength, UniformLength, LognormalLength, EmpiricalLength)):
        return spec
    if not isinstance(spec, str):
        raise TraceError(f"bad length spec {spec!r}: expected a string such as 'fixed:512'", label="synth")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "empirical":
        if not rest:
            raise TraceError(f"bad length spec {spec!r}: empirical needs a bundled name or a path "
                             f"(bundled: {', '.join(BUNDLED)})", label="synth")
        return EmpiricalLength(rest)
    shapes = {"fixed": ("TOKENS",), "uniform": ("LO", "HI"), "lognormal": ("MEDIAN", "SIGMA")}
    if kind not in shapes:
        raise TraceError(f"bad length spec {spec!r}: unknown kind {kind!r} "
                         "(known: fixed, uniform, lognormal, empirical)", label="synth")
    parts = rest.split(":") if rest else []
    usage = ":".join((kind, *shapes[kind])) + ("[:MIN:MAX]" if kind == "lognormal" else "")
    allowed = (2, 4) if kind == "lognormal" else (len(shapes[kind]),)
    if len(parts) not in allowed:
        raise TraceError(f"bad length spec {spec!r}: expected {usage}", label="synth")
    try:
        if kind == "fixed":
            return FixedLength(_int_text(parts[0]))
        if kind == "uniform":
            return UniformLength(_int_text(parts[0]), _int_text(parts[1]))
        low = _int_text(parts[2]) if len(parts) == 4 else 1
        high = None if len(parts) < 4 or parts[3].lower() in ("inf", "") else _int_text(parts[3])
        return LognormalLength(float(parts[0]), float(parts[1]), low, high)
    except ValueError as exc:
        if isinstance(exc, TraceError):
            raise
        raise TraceError(f"bad length spec {spec!r}: expected {usage} with numbers", label="synth") from None


def _int_text(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def arrival_times(rng: np.random.Generator, *, rate_per_s: float, arrival: str = "poisson",
                  cv: float = 1.0, num_requests: int | None = None,
                  duration_s: float | None = None) -> np.ndarray:
    """Arrival times (s) of a renewal process starting at 0.0: ``num_requests`` of them, or all in
    [0, duration_s). Gamma gaps have shape 1/cv² and scale cv²/rate, so mean 1/rate and CV cv."""
    def gaps(size: int) -> np.ndarray:
        if arrival == "poisson":
            return rng.exponential(1.0 / rate_per_s, size=size)
        shape = 1.0 / cv**2
        return rng.gamma(shape, 1.0 / (rate_per_s * shape), size=size)

    if num_requests is not None:
        return np.concatenate(([0.0], np.cumsum(gaps(num_requests - 1))))
    expected = rate_per_s * duration_s
    chunks: list[np.ndarray] = []
    end = 0.0
    while end < duration_s:  # draw in chunks a little past the expected count; rarely loops twice
        chunk = gaps(int(expected + 4.0 * cv * math.sqrt(expected) + 16))
        chunks.append(chunk)
        end += float(chunk.sum())
    times = np.concatenate(([0.0], np.cumsum(np.concatenate(chunks))))
    return times[times < duration_s]


def synthesize(*, rate_per_s: float, num_requests: int | None = None, duration_s: float | None = None,
               arrival: str = "poisson", cv: float = 1.0, prompt: str | LengthSpec | None = None,
               output: str | LengthSpec | None = None, lengths: str | EmpiricalLength | None = None,
               seed: int = 0, name: str | None = None) -> Trace:
    """A synthetic trace: ``num_requests`` requests, or all arrivals in [0, ``duration_s``).

    Give ``prompt`` and ``output`` (independent draws), or ``lengths`` (an empirical source sampled as
    pairs); with none of them the default is ``lengths="empirical:sharegpt-lengths"``. ``source`` is a
    canonical spec string of every parameter; ``meta["params"]`` holds the same as a dict.
    """
    def bad(detail: str) -> TraceError:
        return TraceError(detail, label="synth")

    if (num_requests is None) == (duration_s is None):
        raise bad("give exactly one of num_requests and duration_s")
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer))
                                     or num_requests < 1):
        raise bad(f"num_requests must be a whole number >= 1 (got {num_requests!r})")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise bad(f"duration_s must be finite and > 0 (got {duration_s!r})")
    if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
        raise bad(f"rate_per_s must be finite and > 0 (got {rate_per_s!r})")
    if arrival not in ARRIVALS:
        raise bad(f"unknown arrival process {arrival!r} (known: {', '.join(ARRIVALS)})")
    if not (math.isfinite(cv) and cv > 0):
        raise bad(f"cv must be finite and > 0 (got {cv!r})")
    if arrival == "poisson" and cv != 1.0:
        raise bad(f"cv={cv!r} needs arrival='gamma' (a Poisson process has cv 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise bad(f"seed must be a whole number >= 0 (got {seed!r})")
    if lengths is not None and (prompt is not None or output is not None):
        raise bad("give either lengths (paired) or prompt and output, not both")
    if lengths is None and (prompt is None) != (output is None):
        raise bad(f"{'output' if output is None else 'prompt'} length spec is missing")
    if lengths is None and prompt is None:
        lengths = "empirical:sharegpt-lengths"

    arrival_seq, prompt_seq, output_seq = np.random.SeedSequence(int(seed)).spawn(3)
    times = arrival_times(np.random.Generator(np.random.PCG64(arrival_seq)), rate_per_s=float(rate_per_s),
                          arrival=arrival, cv=float(cv), num_requests=num_requests,
                          duration_s=None if duration_s is None else float(duration_s))
    n = len(times)
    params: dict = {"arrival": arrival, "rate_per_s": float(rate_per_s)}
    if arrival == "gamma":
        params["cv"] = float(cv)
    params.update({"num_requests": int(num_requests)} if num_requests is not None
                  else {"duration_s": float(duration_s)})
    if lengths is not None:
        pairs = parse_length(lengths)
        if not isinstance(pairs, EmpiricalLength):
            raise bad(f"paired lengths need an empirical spec (got {pairs.spec!r}); "
                      "use prompt= and output= for independent draws")
        prompt_tokens, output_tokens = pairs.sample_pairs(np.random.Generator(np.random.PCG64(prompt_seq)), n)
        params["lengths"] = pairs.spec
    else:
        p, o = parse_length(prompt), parse_length(output)
        prompt_tokens = p.sample(np.random.Generator(np.random.PCG64(prompt_seq)), n, "prompt")
        output_tokens = o.sample(np.random.Generator(np.random.PCG64(output_seq)), n, "output")
        params.update(prompt=p.spec, output=o.spec)
    params["seed"] = int(seed)
    source = "synth:" + ",".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in params.items())
    return Trace(arrival_s=times, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                 name=name or f"synth-{arrival}", source=source,
                 meta={"format": "synthetic", "params": params, "clock_origin_s": 0.0})
