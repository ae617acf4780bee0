"""Policy registry: short names → classes, one namespace per policy kind, filled by decorators.

    @register("scheduling", "fcfs")
    class FCFS(SchedulingPolicy): ...

``KINDS`` is the one list of policy kinds (the config, the registry and the engine all use it) and
``DEFAULTS`` the policy each kind gets when the config names none. A policy subclasses its kind's base
class in ``policies.base`` (where its capabilities are declared, with defaults). A duplicate name is an
error; an unknown name gets an error that lists the known ones. User policies register the same way
from their own module (``import mymodule`` before building the simulation, or ``tiersim run --plugin
mymodule``) or through the ``tiersim.policies`` entry-point group.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from policies.base import BASES
from sim.errors import PolicyError, did_you_mean

KINDS = ("scheduling", "eviction", "residency", "speculation", "execution", "routing", "sparsity")
DEFAULTS = {"scheduling": "fcfs", "eviction": "lru", "residency": "config", "speculation": "none",
            "execution": "cuda-graph", "routing": "round-robin", "sparsity": "dense"}
assert set(KINDS) == set(BASES) == set(DEFAULTS)
_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}
_BUILTINS_LOADED = False
_ENTRY_POINTS_LOADED = False

_BUILTIN_MODULES = (
    "policies.scheduling.fcfs", "policies.scheduling.chunked_prefill",
    "policies.eviction.lru", "policies.eviction.lfu", "policies.eviction.fifo", "policies.eviction.arc",
    "policies.eviction.twoq", "policies.eviction.ttl", "policies.eviction.cost", "policies.eviction.belady",
    "policies.residency.config",
    "policies.speculation.none", "policies.speculation.fixed_k", "policies.speculation.adaptive_k",
    "policies.speculation.tree",
    "policies.execution.host_launched", "policies.execution.cuda_graph", "policies.execution.persistent",
    "policies.routing.round_robin", "policies.routing.most_free_kv",
    "policies.sparsity.dense",
)


def register(kind: str, name: str):
    """Class decorator: make a policy available under ``name`` for ``kind``."""
    if kind not in _REGISTRY:
        raise PolicyError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")

    def deco(cls: type) -> type:
        base = BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PolicyError(f"{kind} policy {name!r}: {getattr(cls, '__qualname__', cls)!r} must subclass "
                              f"policies.base.{base.__name__}")
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls:
            raise PolicyError(f"{kind} policy {name!r} is already registered by "
                              f"{existing.__module__}.{existing.__qualname__}")
        cls.name = name
        cls.kind = kind
        _REGISTRY[kind][name] = cls
        return cls

    return deco


def unregister(kind: str, name: str) -> None:
    """Forget a registered policy (a notebook redefining one, a test cleaning up after itself)."""
    _REGISTRY[kind].pop(name, None)


@contextlib.contextmanager
def registered(*entries: tuple[str, str, type]):
    """Register ``(kind, name, cls)`` entries for the duration of a ``with`` block."""
    done = []
    try:
        for kind, name, cls in entries:
            register(kind, name)(cls)
            done.append((kind, name))
        yield
    finally:
        for kind, name in done:
            unregister(kind, name)


def _load_builtins() -> None:
    global _BUILTINS_LOADED, _ENTRY_POINTS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in metadata.entry_points(group="tiersim.policies"):
            ep.load()


_LOADED_PLUGINS: dict[str, set[tuple[str, str]]] = {}   # plugin -> the (kind, name) entries it registered


def _entries() -> set[tuple[str, str]]:
    return {(k, n) for k, names in _REGISTRY.items() for n in names}


def load_plugin(module: str) -> None:
    """Import a user module whose decorators register policies: a dotted module name (importable
    from the current directory or the environment) or the path of a ``.py`` file. Loading the same
    file or module again in a process does nothing (a sweep worker loads each run's plugins)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(module)
    key = str(path.resolve()) if (module.endswith(".py") or path.is_file()) else module
    if key in _LOADED_PLUGINS and _LOADED_PLUGINS[key] <= _entries():
        return
    _load_builtins()
    before = _entries()
    if module.endswith(".py") or path.is_file():
        if not path.is_file():
            raise PolicyError(f"--plugin {module}: no such file")
        name = f"tiersim_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod      # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(mod)
        except PolicyError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's error, said in one line
            raise PolicyError(f"--plugin {module}: {type(exc).__name__}: {exc}") from None
        finally:
            sys.modules.pop(name, None)
        _LOADED_PLUGINS[key] = _entries() - before
        return
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise PolicyError(f"--plugin {module}: cannot import ({exc}); give a module importable from the current "
                          "directory or the environment, or the path of a .py file") from None
    _LOADED_PLUGINS[key] = _entries() - before


def known(kind: str) -> list[str]:
    _load_builtins()
    if kind not in _REGISTRY:
        raise PolicyError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    return sorted(_REGISTRY[kind])


def lookup(kind: str, name: str) -> type:
    _load_builtins()
    table = _REGISTRY.get(kind)
    if table is None:
        raise PolicyError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        return table[name]
    except KeyError:
        raise PolicyError(f"policies.{kind}.name: unknown {kind} policy {name!r}{did_you_mean(name, table)} "
                          f"(known: {', '.join(sorted(table))})") from None


def build(kind: str, name: str, params: Mapping[str, Any] | None = None):
    """Instantiate policy ``name`` of ``kind`` with its parameters from the config section.

    A policy declares its parameters as a frozen dataclass ``Params`` nested in its class; unknown keys
    and bad values are errors that name the key.
    """
    cls = lookup(kind, name)
    params = dict(params or {})
    param_cls = getattr(cls, "Params", None)
    if param_cls is None:
        if params:
            raise PolicyError(f"policies.{kind}: {kind} policy {name!r} takes no parameters "
                              f"(got {', '.join(sorted(params))})")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(param_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PolicyError(f"policies.{kind}.{unknown[0]}: unknown parameter of {kind} policy {name!r}"
                          f"{did_you_mean(unknown[0], fields)} (known: {', '.join(sorted(fields)) or 'none'})")
    for key, value in params.items():
        ftype = str(fields[key].type).replace("Optional[", "").rstrip("]")
        ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str)}.get(ftype.split(" ")[0])
        if ok is not None and not ok(value):
            raise PolicyError(f"policies.{kind}.{key}: expected {ftype}, got {value!r}")
    try:
        p = param_cls(**params)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policies.{kind} ({name}): {exc}") from None
    return cls(p)


def all_policies() -> dict[str, list[str]]:
    _load_builtins()
    return {kind: sorted(table) for kind, table in _REGISTRY.items()}


def describe(kind: str, name: str) -> str:
    cls = lookup(kind, name)
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    return doc
