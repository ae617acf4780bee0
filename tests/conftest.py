"""Shared helpers: small traces and configs that run in milliseconds."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from sim.config import SimConfig, with_overrides
from traces import Trace

# parsed traces are cached in a directory of the test session's own, never the user's
os.environ.setdefault("TIERSIM_CACHE_DIR", tempfile.mkdtemp(prefix="tiersim-test-cache-"))

# Hypothesis profiles: "ci" (the default: what CI can afford) and "thorough" (20x the examples, for a
# fuzz campaign): ``pytest --hypothesis-profile=thorough``. Tests size their example counts with
# :func:`examples`, relative to the ci profile.
_CI_EXAMPLES = 100
settings.register_profile("ci", max_examples=_CI_EXAMPLES, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=20 * _CI_EXAMPLES, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


def examples(n: int) -> int:
    """``n`` examples under the ci profile, scaled by the profile that is loaded."""
    return max(1, round(n * settings().max_examples / _CI_EXAMPLES))


SMALL = {
    "model.name": "llama-3.2-1b",
    "costs.backend": "roofline",
    "replica.num_hbm_blocks": 64,
    "replica.block_size_tokens": 16,
    "replica.dram_kv_bytes": 64 * 1024**2,
}


def small_config(**overrides) -> SimConfig:
    return with_overrides(SimConfig(), {**SMALL, **overrides})


def make_trace(arrival, prompt, output, hashes=None, hash_block_tokens=None, name="test") -> Trace:
    kwargs = {}
    if hashes is not None:
        offsets = np.zeros(len(hashes) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(h) for h in hashes])
        kwargs = dict(hash_offsets=offsets,
                      hash_values=np.concatenate([np.asarray(h, np.int64) for h in hashes]) if offsets[-1]
                      else np.empty(0, np.int64),
                      hash_block_tokens=hash_block_tokens)
    return Trace(arrival_s=np.asarray(arrival, float), prompt_tokens=np.asarray(prompt, np.int64),
                 output_tokens=np.asarray(output, np.int64), name=name, source="test", **kwargs)


def run_checked(config: SimConfig, trace: Trace, guarded: bool = True):
    """Run with per-step invariant checks on and, by default, every policy shown guarded views (any
    write to what a view shows raises); returns (simulation, results)."""
    from sim.engine import Simulation

    sim = Simulation(config, trace=trace, guarded=guarded, check_invariants=True)
    res = sim.run()
    return sim, res


@pytest.fixture
def tiny_trace():
    return make_trace([0.0, 0.01, 0.02, 0.5], [100, 40, 300, 17], [5, 20, 3, 40])
