"""Nexus-style prefill/decode lanes (``replica.prefill_sm_fraction``): a mixed step's prefill chunks run on
one share of the SMs while its decodes run on the rest, concurrently, and the step ends when both end."""
from __future__ import annotations

import numpy as np
import pytest

from sim.config import ConfigError
from tests.conftest import make_trace, run_checked, small_config


def _cost(cfg):
    from sim.engine import Simulation

    sim = Simulation(cfg)
    return sim, sim.cost_model(sim.model.name, sim.build_policy("execution", -1))


def test_a_mixed_step_takes_the_longer_lane_each_priced_on_its_share():
    cfg = small_config(**{"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.prefill_sm_fraction": 0.6})
    _, cost = _cost(cfg)
    pq, pc = np.array([1024], np.int64), np.array([0], np.int64)
    pre, dec = cost.for_share(0.6), cost.for_share(0.4)
    d, launches, syncs = cost.lanes_step(pre, dec, pq, pc, 32, 32 * 900, 33)
    dp, lp, _ = pre.step(pq, pc, 0, 0, 1)
    dd, ld, _ = dec.step(np.empty(0, np.int64), np.empty(0, np.int64), 32, 32 * 900, 32)
    assert d == max(dp, dd) and launches == lp + ld
    # the compute-bound prefill slows on 60 % of the SMs; one stream runs both phases one after the other
    full, _, _ = cost.step(pq, pc, 32, 32 * 900, 33)
    assert dp > cost.step(pq, pc, 0, 0, 1)[0] * 1.3
    assert d != full


def test_lanes_change_mixed_steps_only_and_every_request_still_finishes():
    n = 60
    tr = make_trace(np.linspace(0, 3.0, n), np.full(n, 700), np.full(n, 50))
    base = {"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.num_hbm_blocks": 4000,
            "policies.scheduling.name": "chunked-prefill", "metrics.step_log": True}
    one = run_checked(small_config(**base), tr)[1]
    two = run_checked(small_config(**base, **{"replica.prefill_sm_fraction": 0.7}), tr)[1]
    assert two.summary["requests"]["finished"] == one.summary["requests"]["finished"] == n
    s1, s2 = one.steps.reset_index(drop=True), two.steps.reset_index(drop=True)
    m = min(len(s1), len(s2))
    differ = np.flatnonzero(s1.duration_s.to_numpy()[:m] != s2.duration_s.to_numpy()[:m])
    assert differ.size
    first = int(differ[0])
    # identical history up to the first step whose time differs, and that step is a mixed one
    assert (s1.loc[:first, ["prefill_tokens", "decode_seqs"]].to_numpy()
            == s2.loc[:first, ["prefill_tokens", "decode_seqs"]].to_numpy()).all()
    assert s1.prefill_seqs[first] > 0 and s1.decode_seqs[first] > 0
    # every pure step (one phase only) of the lanes run costs what the same shape costs in one stream
    pure = s2[(s2.prefill_seqs == 0) | (s2.decode_seqs == 0)]
    assert len(pure) > len(s2) // 3
    assert one.summary["ttft_s"] != two.summary["ttft_s"] and one.summary["itl_s"] != two.summary["itl_s"]


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_the_fraction_is_validated_with_the_key_named(bad):
    with pytest.raises(ConfigError, match="replica.prefill_sm_fraction"):
        small_config(**{"replica.prefill_sm_fraction": bad})


def test_bulk_advance_under_lanes_equals_single_stepping():
    from tests.property.test_bulk_equivalence import assert_equivalent

    n = 80
    rng = np.random.default_rng(3)
    tr = make_trace(np.sort(rng.uniform(0, 4.0, n)), rng.integers(50, 3000, n), rng.integers(1, 120, n))
    runs = assert_equivalent({"model.name": "llama-3.1-8b", "costs.backend": "table", "replica.num_hbm_blocks": 3000,
                              "policies.scheduling.name": "chunked-prefill",
                              "policies.scheduling.max_num_batched_tokens": 512,
                              "replica.prefill_sm_fraction": 0.75}, tr)
    assert runs > 0
