"""Exact event times: SimPy schedules at ``now + delay``, and the engine needs that sum to land on
the step end it computed, bit for bit (steps priced in bulk and one by one must agree)."""
from __future__ import annotations

import math

import numpy as np


def exact_delay(now: float, target: float) -> float:
    """A delay ``d`` with ``now + d == target`` in floating point (SimPy schedules at now + delay)."""
    d = target - now
    for _ in range(4):
        got = now + d
        if got == target:
            return d
        d = np.nextafter(d, math.inf if got < target else -math.inf)
    return max(d, 0.0)
