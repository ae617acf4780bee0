"""Workload traces for tiersim: one canonical schema, readers for public formats, synthetic generators,
transformations and summary statistics.

    >>> import traces
    >>> t = traces.load_trace("azure-conv")          # a bundled trace, or any file path
    >>> traces.format_description(traces.describe(t))
    >>> s = traces.synthesize(rate_per_s=5.0, num_requests=1000, prompt="lognormal:1024:0.8",
    ...                       output="fixed:128", seed=1)

Bundled files (``traces.BUNDLED``) and their licenses are listed in the top-level NOTICE.
"""
from traces.bundled import BUNDLED, BundledFile, bundled_path
from traces.describe import PrefixReuse, describe, format_description, prefix_reuse
from traces.io import FORMATS, detect_format, load_trace
from traces.schema import CANONICAL_COLUMNS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, Trace, TraceError
from traces.synth import EmpiricalLength, FixedLength, LognormalLength, UniformLength, parse_length, synthesize
from traces.transform import head, repeat, scale_rate, time_window

__all__ = [
    "BUNDLED", "BundledFile", "bundled_path",
    "PrefixReuse", "describe", "format_description", "prefix_reuse",
    "FORMATS", "detect_format", "load_trace",
    "CANONICAL_COLUMNS", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "Trace", "TraceError",
    "EmpiricalLength", "FixedLength", "LognormalLength", "UniformLength", "parse_length", "synthesize",
    "head", "repeat", "scale_rate", "time_window",
]
