"""Scenario presets: shipped config files, one experiment each, that users run and copy.

    tiersim run --preset speculative_decode            # the preset as the base config
    tiersim run --preset forced_rejection --set policies.speculation.reject_stride=2
    tiersim list presets

A preset is a config TOML (``sim/presets/scenarios/<name>.toml``, or any path) with one extra table,
``[preset]``, whose ``measures`` says in a sentence what the run measures; the CLI prints it above
the summary. Everything else is an ordinary config (``sim.config``); ``--set`` overrides it.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from sim.config import SimConfig, from_file_data
from sim.errors import ConfigError
from sim.specs import PRESET_DIR

SCENARIO_DIR = PRESET_DIR / "scenarios"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    measures: str
    path: Path
    config: SimConfig


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped preset by name, or a preset file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = SCENARIO_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"--preset {name_or_path}: unknown preset (shipped: {', '.join(available_scenarios())}; "
                              f"or a path to a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    meta = data.pop("preset", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("measures"), str) or not meta["measures"]:
        raise ConfigError(f"{path}: a preset needs [preset] measures = \"what the run measures\"")
    unknown = sorted(set(meta) - {"measures"})
    if unknown:
        raise ConfigError(f"{path}: preset.{unknown[0]}: unknown key (known: measures)")
    return Scenario(path.stem, meta["measures"], path, from_file_data(data, path))
