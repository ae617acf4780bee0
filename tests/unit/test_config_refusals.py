"""Settings that would be silently unused are refused, `tiersim config` refuses what `run` would, and a
table given for a whole section changes only its keys."""
import pytest

from sim.config import SimConfig, with_overrides
from sim.engine import Simulation
from sim.errors import ConfigError
from tests.unit.test_cli import run_cli


@pytest.mark.parametrize("overrides, key", [
    ({"cluster.handoff_bandwidth_bytes_per_s": 1e9}, "cluster.handoff_bandwidth_bytes_per_s"),
    ({"cluster.decode_routing": "round-robin"}, "cluster.decode_routing"),
    ({"metrics.slo_itl_stat": "max"}, "metrics.slo_itl_stat"),
    ({"replica.prefill_sm_fraction": 0.3, "replica.lanes_itl_slo_s": 0.01}, "replica.lanes_itl_slo_s"),
])
def test_a_setting_that_would_be_unused_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        with_overrides(SimConfig(), overrides)


def test_the_same_settings_are_accepted_where_they_act():
    with_overrides(SimConfig(), {"cluster.num_replicas": 2, "cluster.prefill_replicas": 1,
                                 "cluster.handoff_bandwidth_bytes_per_s": 1e9, "cluster.decode_routing": "round-robin"})
    with_overrides(SimConfig(), {"metrics.slo_itl_s": 0.1, "metrics.slo_itl_stat": "max"})


def test_a_residency_policy_with_no_tier_below_hbm_is_refused():
    c = with_overrides(SimConfig(), {"policies.residency.name": "tiered", "replica.dram_kv_bytes": 0})
    with pytest.raises(ConfigError, match="no lower tier is sized"):
        Simulation(c)


def test_a_table_for_a_section_sets_its_keys_and_keeps_the_rest():
    c = with_overrides(SimConfig(), ["replica.tensor_parallel_size=2", "replica={block_size_tokens=32}",
                                     "policies.scheduling.name=chunked-prefill",
                                     "policies.scheduling={max_num_seqs=8}"])
    assert c.replica.tensor_parallel_size == 2 and c.replica.block_size_tokens == 32
    assert c.policies.scheduling.name == "chunked-prefill" and c.policies.scheduling.params["max_num_seqs"] == 8
    # a key whose value is a table is replaced, not merged
    c = with_overrides(SimConfig(), ['trace.columns={arrival_s="t"}', 'trace.columns={prompt_tokens="p"}'])
    assert dict(c.trace.columns) == {"prompt_tokens": "p"}


def test_config_refuses_what_run_would_and_defaults_take_no_overrides(capsys):
    rc, _, err = run_cli(capsys, "config", "--set", "policies.scheduling.bogus=1")
    assert rc == 2 and "policies.scheduling.bogus: unknown parameter" in err
    rc, _, err = run_cli(capsys, "config", "--set", "policies.speculation.name=fixed-k", "--set",
                         "policies.speculation.k=0")
    assert rc == 2 and "k must be >= 1" in err
    rc, _, err = run_cli(capsys, "config", "--defaults", "--set", "replica.block_size_tokens=32")
    assert rc == 2 and "no effect with --defaults" in err


@pytest.mark.parametrize("args, message", [
    (["--phase", "mixed", "--tokens", "100", "--context", "-50"], "--context must be >= 0"),
    (["--phase", "mixed", "--tokens", "100", "--chunk-context", "-5"], "--chunk-context must be >= 0"),
    (["--phase", "prefill", "--tokens", "100", "--context", "5"], "a prefill step's prompts"),
    (["--phase", "decode", "--chunk-context", "5"], "--chunk-context is for --phase mixed"),
])
def test_predict_step_refuses_shapes_it_would_ignore_or_cannot_price(capsys, args, message):
    rc, _, err = run_cli(capsys, "predict-step", *args)
    assert rc == 2 and message in err
