"""Hardware and model specifications: frozen dataclasses loaded from TOML presets.

A spec is pure data with units in its field names. Presets live in ``sim/presets/{gpus,models,servers}``
and cite their sources; users may pass a path to their own TOML file wherever a preset name is accepted.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class _OutOfRange(ConfigError):
    """A spec value out of its range, ``owner.detail``; a spec read from a user's own file names the file
    instead (see :func:`_build`), since ``owner`` is the ``name`` inside it, which may be a preset's."""

    def __init__(self, owner: str, detail: str) -> None:
        self.detail = detail
        super().__init__(f"{owner}.{detail}")

    def __reduce__(self):  # to another process (a sweep's worker) as the plain ConfigError it reads as
        return ConfigError, self.args


def _positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise _OutOfRange(owner, f"{key} must be > 0 (got {value!r})")


def _non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise _OutOfRange(owner, f"{key} must be >= 0 (got {value!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class PCIeSpec:
    """One GPU's PCIe link to host memory; each direction is an independent channel."""

    h2d_bandwidth_bytes_per_s: float
    d2h_bandwidth_bytes_per_s: float
    latency_s: float = 10e-6

    def __post_init__(self) -> None:
        _positive("gpu.pcie", h2d_bandwidth_bytes_per_s=self.h2d_bandwidth_bytes_per_s,
                  d2h_bandwidth_bytes_per_s=self.d2h_bandwidth_bytes_per_s)
        _non_negative("gpu.pcie", latency_s=self.latency_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class GPUSpec:
    """A GPU: streaming multiprocessors, HBM capacity and bandwidth, peak dense tensor rates."""

    name: str
    display_name: str = ""
    sm_count: int
    hbm_bytes: int
    hbm_bandwidth_bytes_per_s: float
    l2_bytes: int = 0
    peak_bf16_flops: float
    peak_fp8_flops: float = 0.0
    nvlink_bandwidth_bytes_per_s: float = 0.0
    pcie: PCIeSpec

    def __post_init__(self) -> None:
        _positive(f"gpu[{self.name}]", sm_count=self.sm_count, hbm_bytes=self.hbm_bytes,
                  hbm_bandwidth_bytes_per_s=self.hbm_bandwidth_bytes_per_s,
                  peak_bf16_flops=self.peak_bf16_flops)


@dataclass(frozen=True, slots=True, kw_only=True)
class NVMeSpec:
    read_bandwidth_bytes_per_s: float
    write_bandwidth_bytes_per_s: float
    latency_s: float
    capacity_bytes: int

    def __post_init__(self) -> None:
        _positive("server.nvme", read_bandwidth_bytes_per_s=self.read_bandwidth_bytes_per_s,
                  write_bandwidth_bytes_per_s=self.write_bandwidth_bytes_per_s)
        _non_negative("server.nvme", latency_s=self.latency_s, capacity_bytes=self.capacity_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSpec:
    """Host side of one replica: DRAM (capacity, bandwidth) and one NVMe drive."""

    name: str
    dram_bytes: int
    dram_bandwidth_bytes_per_s: float
    nvme: NVMeSpec

    def __post_init__(self) -> None:
        _non_negative(f"server[{self.name}]", dram_bytes=self.dram_bytes)
        _positive(f"server[{self.name}]", dram_bandwidth_bytes_per_s=self.dram_bandwidth_bytes_per_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A decoder-only transformer with grouped-query attention and a gated (SwiGLU) MLP."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    max_context_tokens: int
    bytes_per_weight: int = 2
    bytes_per_kv: float = 2         # bytes per KV element (0.625: int4 with per-group scales)
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        owner = f"model[{self.name}]"
        _positive(owner, num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                  ffn_size=self.ffn_size, vocab_size=self.vocab_size,
                  max_context_tokens=self.max_context_tokens, bytes_per_weight=self.bytes_per_weight,
                  bytes_per_kv=self.bytes_per_kv)
        if self.num_heads % self.num_kv_heads:
            raise _OutOfRange(owner, f"num_heads ({self.num_heads}) must be a multiple of "
                                     f"num_kv_heads ({self.num_kv_heads})")

    @property
    def param_count(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        mlp = 3 * h * self.ffn_size
        norms = 2 * h
        embed = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + h

    @property
    def weight_bytes(self) -> int:
        return self.param_count * self.bytes_per_weight

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, for one token, across all tensor-parallel shards."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_kv


def _build(cls, data: Mapping[str, Any], source: str, preset: bool = False):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)} for {cls.__name__}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        _check_type(source, key, types[key], value)
    try:
        return cls(**data)
    except TypeError as exc:  # a type the checks above do not know
        raise ConfigError(f"{source}: {exc}") from None
    except _OutOfRange as exc:  # a preset is known by its name; a user's file by its path
        if preset:
            raise
        raise ConfigError(f"{source}: {exc.detail}") from None


def _check_type(source: str, key: str, ftype: str, value: Any) -> None:
    """A preset value against its field's type: an int is no float's problem, but a bool is not a number,
    a float is not an int, and nan or inf is not a hardware figure."""
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(ftype)
    if expected is None:
        return
    if (isinstance(value, bool) and ftype != "bool") or not isinstance(value, expected):
        got = "a boolean" if isinstance(value, bool) else type(value).__name__
        raise ConfigError(f"{source}: {key}: expected {ftype}, got {got} ({value!r})")
    if ftype == "float" and not math.isfinite(value):
        raise ConfigError(f"{source}: {key}: must be a finite number (got {value!r})")


def _read_toml(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _is_preset(kind: str, path: Path) -> bool:
    return path.resolve().parent == (PRESET_DIR / kind).resolve()


def available_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.toml"))


def _resolve(kind: str, name_or_path: str) -> Path:
    if not isinstance(name_or_path, str):
        raise ConfigError(f"expected a {kind.rstrip('s')} preset name or a path to a .toml file "
                          f"(got {name_or_path!r})")
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    key = name_or_path.lower()
    candidate = PRESET_DIR / kind / f"{key}.toml"
    if candidate.exists():
        return candidate
    aliases = {"h100": "h100-sxm-80gb", "a100": "a100-80gb", "h200-sxm": "h200"}
    if kind == "gpus" and key in aliases:
        return PRESET_DIR / kind / f"{aliases[key]}.toml"
    singular = kind.rstrip("s")
    raise ConfigError(f"unknown {singular} {name_or_path!r}; known {kind}: "
                      f"{', '.join(available_presets(kind))} (or a path to a .toml file)")


def load_gpu(name_or_path: str) -> GPUSpec:
    path = _resolve("gpus", name_or_path)
    data, preset = _read_toml(path), _is_preset("gpus", path)
    pcie = _build(PCIeSpec, data.pop("pcie", {}), f"{path} [pcie]", preset)
    return _build(GPUSpec, {**data, "pcie": pcie}, str(path), preset)


def load_model(name_or_path: str) -> ModelSpec:
    path = _resolve("models", name_or_path)
    return _build(ModelSpec, _read_toml(path), str(path), _is_preset("models", path))


def load_server(name_or_path: str) -> ServerSpec:
    path = _resolve("servers", name_or_path)
    data, preset = _read_toml(path), _is_preset("servers", path)
    nvme = _build(NVMeSpec, data.pop("nvme", {}), f"{path} [nvme]", preset)
    return _build(ServerSpec, {**data, "nvme": nvme}, str(path), preset)


def spec_to_dict(spec) -> dict:
    return dataclasses.asdict(spec)


__all__ = ["GPUSpec", "PCIeSpec", "ModelSpec", "ServerSpec", "NVMeSpec", "load_gpu", "load_model",
           "load_server", "available_presets", "spec_to_dict"]
