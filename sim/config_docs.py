"""``tiersim config --defaults``: the full config as TOML, each key with its meaning.

The meanings are the comments beside the fields in ``sim/config.py`` and in each policy's ``Params``
dataclass: one place to document a key, read here with ``tokenize`` (a key without a comment gets
the class docstring's first line, and the test suite requires a comment for every key).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any

from sim.config import SECTIONS, SimConfig, _toml_value


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the trailing comments (and comment-only continuation lines) of a
    dataclass's field definitions, its base classes' included (the nearest definition wins)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_comments(base))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    current, leading = None, ""
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        row, col = tok.start
        only_comment = tok.type == tokenize.COMMENT and not lines[row - 1][:col].strip()
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text.startswith("noqa"):
                continue
            if only_comment and col == 4:          # a comment above a field: the next field's
                leading = (leading + " " + text).strip()
            elif current:                         # beside a field, or continued below it
                out[current] = (out.get(current, "") + " " + text).strip()
        elif tok.type == tokenize.NAME and col == 4 and not lines[row - 1][:col].strip():
            current = tok.string if tok.string in names else None
            if current and leading:
                out[current] = (leading + " " + out.get(current, "")).strip()
            leading = ""
    return out


def _lines(key_values: dict[str, Any], comments: dict[str, str]) -> list[str]:
    rows = []
    for k, v in key_values.items():
        if isinstance(v, dict):
            text = "{" + ", ".join(f"{a} = {_toml_value(b)}" for a, b in v.items()) + "}"
        else:
            text = _toml_value(v)
        line = f"{k} = {text}"
        c = comments.get(k, "")
        rows.append(f"{line:<44}# {c}" if c else line)
    return rows


def _hidden(shown: dict, every: dict, comments: dict[str, str]) -> list[str]:
    """The keys ``SimConfig.to_dict`` leaves out while they hold their defaults (``plugins``, the
    decoupled-lanes keys), commented out: writing them would change the config's hash."""
    rest = {k: (list(v) if isinstance(v, tuple) else v) for k, v in every.items() if k not in shown}
    return ["# " + line for line in _lines(rest, comments)]


def documented_toml(config: SimConfig | None = None) -> str:
    """The config (default: the defaults) as a commented TOML file that ``tiersim run --config`` reads."""
    from policies import registry

    config = config or SimConfig()
    d = config.to_dict()
    out = ["# tiersim configuration: every key with its default and meaning (tiersim config --defaults).",
           "# Every key is optional; a file needs only the keys it changes.", ""]
    top = {"seed": d["seed"], **({"plugins": d["plugins"]} if "plugins" in d else {})}
    out += _lines(top, field_comments(SimConfig))
    out += _hidden(top, {"plugins": list(config.plugins)}, field_comments(SimConfig))
    for name, cls in SECTIONS.items():
        if name == "output":
            continue
        out += ["", f"[{name}]"]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [f"# {line}" for line in textwrap.wrap(" ".join(doc.split()), 100)]
        out += _lines(d[name], field_comments(cls))
        section = getattr(config, name)
        out += _hidden(d[name], {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)},
                       field_comments(cls))
    for kind in registry.KINDS:
        pc = d["policies"][kind]
        params_cls = getattr(registry.lookup(kind, pc["name"]), "Params", None)
        comments = field_comments(params_cls) if dataclasses.is_dataclass(params_cls) else {}
        unset = {}
        if dataclasses.is_dataclass(params_cls):   # the policy's own defaults, commented out: setting a
            for f in dataclasses.fields(params_cls):   # parameter to its default would change the hash
                if f.name not in pc and f.default is not dataclasses.MISSING:
                    unset[f.name] = f.default
        known = ", ".join(registry.known(kind))
        out += ["", f"[policies.{kind}]", f"# {registry.describe(kind, pc['name'])}"]
        out += _lines(pc, {"name": f"{kind} policy: {known} (tiersim list policies)", **comments})
        out += ["# " + line for line in _lines(unset, comments)]
    out += ["", "[output]"] + _lines(d["output"], field_comments(SECTIONS["output"]))
    return "\n".join(out) + "\n"


def undocumented_keys() -> list[str]:
    """Keys of the default config (and of every registered policy's parameters) with no comment."""
    from policies import registry

    missing = [f"{k}" for k in ("seed", "plugins") if k not in field_comments(SimConfig)]
    for name, cls in SECTIONS.items():
        doc = field_comments(cls)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if f.name not in doc]
    for kind, names in registry.all_policies().items():
        for n in names:
            params = getattr(registry.lookup(kind, n), "Params", None)
            if dataclasses.is_dataclass(params):
                doc = field_comments(params)
                missing += [f"policies.{kind}({n}).{f.name}" for f in dataclasses.fields(params) if f.name not in doc]
    return missing
