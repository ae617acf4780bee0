"""tiersim: a trace-driven discrete-event simulator for LLM-inference scheduling research."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tiersim")
except _metadata.PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0.0.0+unknown"
