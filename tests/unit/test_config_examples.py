"""The worked examples in ``configs/`` load (configs and sweep files), and their plugins resolve."""
from pathlib import Path

import pytest

from sim.config import load_config, with_overrides
from sim.sweep import load_sweep_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_example_config_loads_and_builds(path):
    from sim.engine import Simulation

    cfg = with_overrides(load_config(path), {"trace.max_requests": 20, "costs.backend": "roofline"})
    for plugin in cfg.plugins:
        assert Path(plugin).is_file(), plugin
    Simulation(cfg)          # policies (plugins included) and parameters validate


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_example_sweep_loads(path):
    spec = load_sweep_file(path)
    variants = spec.variants()
    assert variants and all(spec.config_for(v) for v in variants[:4])
    assert all(Path(p).is_file() for p in spec.plugins)
