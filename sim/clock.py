"""Exact event times: SimPy schedules at ``now + delay``, and the engine needs that sum to land on
the step end it computed, bit for bit (steps priced in bulk and one by one must agree)."""
from __future__ import annotations

import math

import numpy as np


def woken_or_at(env, wake, t: float):
    """Wait (a SimPy process body fragment, ``yield from``) until ``wake`` fires or, when ``t`` is
    finite, until time ``t``, whichever comes first."""
    if t < math.inf:
        yield env.any_of([wake, env.timeout(exact_delay(env.now, t))])
    else:
        yield wake


def on_time(now: float, t: float) -> bool:
    """Whether SimPy's clock ``now`` is the planned time ``t`` up to its rounding: within a few ulps,
    where no delay ``d`` made ``now + d`` land on ``t`` exactly."""
    return abs(now - t) <= 4.0 * math.ulp(t)


def exact_time(now: float, t: float) -> float:
    """The planned time ``t`` where SimPy's clock ``now`` sits on it up to rounding, else ``now``: so
    that step arithmetic, and paths that reached ``t`` by different delays, never depend on how SimPy
    rounded."""
    return t if on_time(now, t) else now


def exact_delay(now: float, target: float) -> float:
    """A delay ``d`` with ``now + d == target`` in floating point (SimPy schedules at now + delay)."""
    d = target - now
    for _ in range(4):
        got = now + d
        if got == target:
            return d
        d = np.nextafter(d, math.inf if got < target else -math.inf)
    return max(d, 0.0)
