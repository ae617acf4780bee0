"""The example plugins in ``configs/plugins`` (written against the README alone) load by path and do
what they are for: least-loaded routing balances, prefix-affinity routing keeps prefixes together, and
the tenant-fair scheduler protects a light tenant from a flooding one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policies import registry
from tests.conftest import make_trace, run_checked, small_config
from traces import Trace

PLUGINS = Path(__file__).resolve().parents[2] / "configs" / "plugins"


@pytest.fixture(autouse=True, scope="module")
def _plugins():
    for name in ("least_loaded", "prefix_affinity", "tenant_fair"):
        registry.load_plugin(str(PLUGINS / f"{name}.py"))
    yield
    for kind, name in (("routing", "least-loaded"), ("routing", "prefix-affinity"), ("scheduling", "tenant-fair")):
        registry.unregister(kind, name)


def test_least_loaded_routing_balances_what_round_robin_piles_up():
    # long and short prompts alternate: round-robin sends every long one to replica 0
    n = 40
    tr = make_trace(np.arange(n) * 0.05, [3000 if i % 2 == 0 else 50 for i in range(n)], [20] * n)
    base = {"cluster.num_replicas": 2, "replica.num_hbm_blocks": 1000, "model.name": "llama-3.1-8b"}
    _, rr = run_checked(small_config(**base), tr)
    _, ll = run_checked(small_config(**base, **{"policies.routing.name": "least-loaded"}), tr)
    per_rr = rr.requests.groupby("replica")["prompt_tokens"].sum()
    per_ll = ll.requests.groupby("replica")["prompt_tokens"].sum()
    assert per_rr.max() / per_rr.min() > 10 and per_ll.max() / per_ll.min() < 2
    assert ll.summary["ttft_s"]["p90"] < rr.summary["ttft_s"]["p90"]


def test_prefix_affinity_routing_finds_more_cached_prefix_than_round_robin():
    base = {"trace.bundled": "mooncake-conversation", "trace.max_requests": 400, "cluster.num_replicas": 4,
            "model.name": "llama-3.2-1b", "replica.num_hbm_blocks": 0, "costs.backend": "roofline"}
    import traces
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    tr = traces.head(traces.load_trace("mooncake-conversation"), 400)
    rates = {}
    for router in ("round-robin", "prefix-affinity"):
        cfg = with_overrides(SimConfig(), {**base, "policies.routing.name": router})
        rates[router] = Simulation(cfg, trace=tr).run().summary["kv"]["hbm_prefix_hit_rate"]
    assert rates["prefix-affinity"] > rates["round-robin"] + 0.05


def test_tenant_fair_scheduling_protects_a_light_tenant_from_a_flood():
    # tenant "flood" sends 60 requests at once, tenant "light" 6 a moment later; 4 sequences at a time
    n_flood, n_light = 60, 6
    arrival = np.concatenate([np.zeros(n_flood), np.full(n_light, 0.01)])
    tenant = np.array(["flood"] * n_flood + ["light"] * n_light, dtype=object)
    tr = Trace(arrival_s=arrival, prompt_tokens=np.full(n_flood + n_light, 200),
               output_tokens=np.full(n_flood + n_light, 30), tenant=tenant, name="tenants", source="test")
    base = {"replica.num_hbm_blocks": 600, "policies.scheduling.max_num_seqs": 4}
    ttft = {}
    for sched in ("fcfs", "tenant-fair"):
        _, res = run_checked(small_config(**base, **{"policies.scheduling.name": sched}), tr)
        light = res.requests.iloc[n_flood:]
        assert (light["status"] == "finished").all()
        ttft[sched] = float(light["ttft_s"].mean())
    assert ttft["tenant-fair"] < 0.3 * ttft["fcfs"]


def test_a_second_plugin_with_a_registered_name_is_refused_and_an_unknown_name_lists_the_known(tmp_path):
    from sim.config import with_overrides
    from sim.engine import Simulation
    from sim.errors import PolicyError

    copy = tmp_path / "prefix_affinity_copy.py"
    copy.write_text((PLUGINS / "prefix_affinity.py").read_text())
    first = registry.lookup("routing", "prefix-affinity")
    with pytest.raises(PolicyError, match="'prefix-affinity' is already registered by"):
        registry.load_plugin(str(copy))
    assert registry.lookup("routing", "prefix-affinity") is first
    with pytest.raises(PolicyError, match="no_such_plugin_module: cannot import"):
        registry.load_plugin("no_such_plugin_module")
    with pytest.raises(PolicyError, match="least-loaded") as err:
        Simulation(with_overrides(small_config(), {"policies.routing.name": "least-lodaed"}))
    assert "prefix-affinity" in str(err.value)


def test_a_plugin_that_answers_the_impossible_gets_one_line_naming_it(tmp_path, capsys):
    from tests.unit.test_cli import run_cli

    plugin = tmp_path / "bad_route.py"
    plugin.write_text("from policies.base import RoutingPolicy\nfrom policies.registry import register\n\n\n"
                      "@register('routing', 'bad-route')\nclass BadRoute(RoutingPolicy):\n"
                      "    def route(self, request, replicas, now):\n        return 99\n")
    try:
        rc, _, err = run_cli(capsys, "run", "--plugin", str(plugin), "--set", "policies.routing.name=bad-route",
                             "--set", "cluster.num_replicas=2", "--set", "trace.max_requests=5", "--set",
                             "model.name=llama-3.2-1b", "--set", "costs.backend=roofline", "--quiet",
                             "--no-progress", "--out", str(tmp_path / "out"))
    finally:
        registry.unregister("routing", "bad-route")
    assert rc == 2 and "Traceback" not in err
    assert "routing policy 'bad-route' chose replica 99 of 2 (replicas are 0 to 1)" in err
