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


def exact_delay(now: float, target: float) -> float:
    """A delay ``d`` with ``now + d == target`` in floating point (SimPy schedules at now + delay)."""
    d = target - now
    for _ in range(4):
        got = now + d
        if got == target:
            return d
        d = np.nextafter(d, math.inf if got < target else -math.inf)
    return max(d, 0.0)
