"""User-facing error types. Each message is one line that names the file, row and field, or the parameter.

The CLI prints ``tiersim: error: <message>`` for these and exits with status 2, without a traceback
(set ``TIERSIM_DEBUG=1`` to see one). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class TiersimError(Exception):
    """Base class for errors caused by user input (configs, traces, tables, policy names)."""


class ConfigError(TiersimError, ValueError):
    """An invalid configuration key or value, or an impossible configuration."""


class PolicyError(ConfigError):
    """An unknown policy name, a duplicate registration, or bad policy parameters."""


class PolicyAnswerError(TiersimError, RuntimeError):
    """A policy (often a ``--plugin``) answered something impossible: a replica that does not exist, a
    request it may not schedule, a tree of width 0, a block that is not evictable. The message names the
    policy and its answer; ``TIERSIM_DEBUG=1`` shows where it was asked."""


class CostTableError(TiersimError, ValueError):
    """A missing or malformed calibration table, or a lookup the table cannot serve."""


def did_you_mean(name: str, known) -> str:
    """ ``"; did you mean 'x'?"`` for the closest of ``known`` to a misspelt ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""
