"""Hypothesis against the config: any value for any key (``--set`` and files), any ``--set`` text, any
bytes as a config file or a preset, any parameter of the policies the CLI reaches.

Oracle: a ConfigError whose message is one line naming the key (or the file), or a config whose every
float is finite and that passed its section's validation. No other exception, ever.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import registry
from sim.config import SECTIONS, SimConfig, load_config, with_overrides
from sim.errors import ConfigError, PolicyError
from sim.specs import PRESET_DIR, load_gpu, load_model, load_server
from tests.conftest import examples

FUZZ = settings(max_examples=examples(100), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEYS = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)] + ["seed"]
SCALAR = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 3), st.floats(allow_nan=True),
                   st.floats(-1e3, 1e3), st.booleans(), st.text(max_size=8), st.sampled_from(["", "ms", "csv"]))
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.text(max_size=6), SCALAR, max_size=3),
                  st.dictionaries(st.sampled_from(["arrival_s", "prompt_tokens", "block_hashes"]), SCALAR,
                              max_size=3))


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="tiersim-fuzz-") as d:
        yield Path(d)


def floats_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(floats_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(floats_finite(v) for v in obj)
    return True


def one_line(msg: str, path: Path | None = None) -> None:
    """One line, and short past the name of the file it is about (a path the user chose)."""
    assert "\n" not in msg and len(msg.removeprefix(f"{path}: ") if path else msg) <= 400, msg


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUE)
def test_any_value_for_any_key(key, value):
    try:
        config = with_overrides(SimConfig(), {key: value})
    except ConfigError as exc:
        one_line(str(exc))
        assert str(exc).startswith(key), str(exc)   # "trace.rate_scale: ..." or "trace.columns.x: ..."
        return
    assert floats_finite(config.to_dict())
    section, _, name = key.partition(".")
    got = getattr(config, section) if not name else getattr(getattr(config, section), name)
    assert got == value or (isinstance(value, int) and got == float(value)), (got, value)


def _bmp_only(value) -> bool:
    return re.search(r"\\ud[89ab]", json.dumps(value)) is None   # json escapes beyond-BMP as surrogates


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUE.filter(_bmp_only))
def test_a_written_config_reads_back_the_same(workdir, key, value):
    try:
        config = with_overrides(SimConfig(), {key: value})
    except ConfigError:
        return
    path = workdir / "c.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_a_written_config_with_an_emoji_or_a_control_character_reads_back(workdir):
    # JSON escapes a character beyond the BMP as a surrogate pair, which TOML rejects, and leaves DEL raw,
    # which TOML forbids: config files write \UXXXXXXXX and \u007f instead
    for name in ("runs/\U0001f680.csv", "a\x7fb\u00e9\U0001d11e\n.csv"):
        config = with_overrides(SimConfig(), {"trace.path": name})
        path = workdir / "c.toml"
        path.write_text(config.to_toml(), encoding="utf-8")
        assert load_config(path) == config
        assert path.read_text(encoding="utf-8").isascii()


@FUZZ
@given(text=st.text(max_size=40), key=st.sampled_from(KEYS))
def test_any_set_text(text, key):
    for arg in (text, f"{key}={text}"):
        try:
            with_overrides(SimConfig(), [arg])
        except ConfigError as exc:
            one_line(str(exc))
            assert str(exc).startswith(("--set", key, arg.split("=", 1)[0].strip())), str(exc)


GOOD = (b'seed = 1\n[trace]\nmax_requests = 20\nrate_scale = 2.0\n[replica]\nblock_size_tokens = 32\n'
        b'[policies.scheduling]\nname = "fcfs"\nmax_num_seqs = 8\n')


@FUZZ
@given(data=st.data())
def test_any_bytes_as_a_config_file(workdir, data):
    how = data.draw(st.sampled_from(["random", "flip", "cut", "insert"]))
    if how == "random":
        content = data.draw(st.binary(max_size=200))
    elif how == "flip":
        b = bytearray(GOOD)
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        content = bytes(b)
    elif how == "cut":
        content = GOOD[:data.draw(st.integers(0, len(GOOD)))]
    else:
        at = data.draw(st.integers(0, len(GOOD)))
        content = GOOD[:at] + data.draw(st.binary(max_size=12)) + GOOD[at:]
    path = workdir / "c.toml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as exc:
        msg = str(exc)
        one_line(msg, path)
        assert msg.startswith(f"{path}: "), msg       # every error of a config file names the file first
        return
    assert floats_finite(config.to_dict())


PRESETS = [("models", "llama-3.2-1b", load_model), ("gpus", "h100-sxm-80gb", load_gpu),
           ("servers", "dgx-h100", load_server)]
TOML_LITERAL = st.one_of(st.sampled_from(["nan", "inf", "-inf", "true", '"16"', "16.5", "0", "-1", "[]", "{}",
                                          "1e308", '""']), st.integers(-2**63, 2**63 - 1).map(str))


@pytest.mark.parametrize("kind, name, loader", PRESETS, ids=[p[0] for p in PRESETS])
@FUZZ
@given(data=st.data())
def test_preset_with_one_bad_value(workdir, kind, name, loader, data):
    lines = (PRESET_DIR / kind / f"{name}.toml").read_text().splitlines()
    assignments = [i for i, ln in enumerate(lines) if "=" in ln and not ln.lstrip().startswith("#")]
    i = data.draw(st.sampled_from(assignments))
    key = lines[i].split("=", 1)[0].strip()
    lines[i] = f"{key} = {data.draw(TOML_LITERAL)}"
    path = workdir / f"p-{kind}.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        spec = loader(str(path))
    except ConfigError as exc:
        msg = str(exc)
        one_line(msg)
        assert key in msg or str(path) in msg, msg
        return
    assert floats_finite(dataclasses.asdict(spec))


POLICIES = [("execution", "host-launched"), ("execution", "cuda-graph"), ("scheduling", "fcfs"),
            ("scheduling", "chunked-prefill")]


@pytest.mark.parametrize("kind, name", POLICIES, ids=[f"{k}-{n}" for k, n in POLICIES])
@FUZZ
@given(data=st.data())
def test_policy_parameters(kind, name, data):
    params = getattr(registry.lookup(kind, name), "Params", None)
    keys = [f.name for f in dataclasses.fields(params)] if params else ["x"]
    key = data.draw(st.sampled_from(keys))
    value = data.draw(SCALAR)
    try:
        config = with_overrides(SimConfig(), {f"policies.{kind}.name": name, f"policies.{kind}.{key}": value})
        registry.build(kind, name, getattr(config.policies, kind).params)
    except (ConfigError, PolicyError) as exc:
        one_line(str(exc))
        assert f"policies.{kind}" in str(exc) and key in str(exc), str(exc)
        return
    assert not (isinstance(value, float) and not math.isfinite(value))
