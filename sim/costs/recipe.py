"""Engine recipes: which kernels an engine launches for each op, as data (``sim/costs/recipes/*.toml``).

A recipe maps ops of ``sim.costs.model.TransformerOps`` to kernels: how many, what each reads and
writes, and which measured primitive prices it. ``fused`` is what the reference decoder runs (every
op one table lookup at the model's shape, with the table's measured kernel count); ``torch-unfused``
is a stock-PyTorch decoder (``calibration/torch_unfused.py``). ``sim/costs/recipes/README.md`` says
how to write one; ``tiersim calibrate import-profile`` writes one from a profiler trace.

Format::

    name = "my-engine"
    description = "..."
    [ops.rms_norm]                  # an op name (attn_norm, qkv_proj, ...) or a table op (all its ops)
    scale = 1.0                     # optional: multiplies the op's time (a measured correction); or
                                    # [[rows, factor], ...]: interpolated in log rows, flat beyond
    [[ops.rms_norm.kernels]]
    name = "to_fp32"                # free text, for reports
    price = "bytes"                 # "table" | "bytes" | "gemm"
    count = 1                       # launches of this kernel per op call ("table": the table's count)
    elements = "hidden"             # bytes: elements per row (an extent, below)
    read = 2                        # bytes: bytes read per element
    write = 4                       # bytes: bytes written per element

``price``: ``table`` is the op's own table entry at the model's shape (measured, or generalised from
this GPU's other shapes); ``bytes`` a memory-bound kernel priced from the bytes it moves on the GPU's
measured elementwise curve (``sim.costs.generalise.BytesModel``); ``gemm`` a GEMM with ``n`` and ``k``
given as extents (measured at that exact shape, else the GPU's fitted GEMM model), ``M`` = the op's
rows. Extents are per-GPU (tensor-parallel shard) sizes of one row: ``hidden``, ``ffn``, ``q``
(= query heads × head dim), ``kv`` (KV heads × head dim), ``qkv``, ``head_dim``, ``vocab`` (the LM
head's shard), ``row`` (1); optionally times an integer, ``"2*ffn"``. Rows are the op's own (tokens of
the step, or sampled rows for the LM head, final norm and sampling). Extra kernels of an attention op
are priced with its per-step time, at the step's query tokens.

An op that a recipe does not name runs as in ``fused``.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sim.costs.model import TABLE_OPS, OpDef, TransformerOps
from sim.errors import ConfigError

PRICES = ("table", "bytes", "gemm")
EXTENTS = ("hidden", "ffn", "q", "kv", "qkv", "head_dim", "vocab", "row")
RECIPE_DIR = Path(__file__).parent / "recipes"
_EXTENT = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?([a-z_]+)\s*$")


def extent(ops: TransformerOps, expr: str, op: OpDef | None = None) -> int:
    """Per-GPU size of an extent expression (``"q"``, ``"2*ffn"``) for ``ops``."""
    m = _EXTENT.match(str(expr))
    if not m or m.group(2) not in EXTENTS:
        raise ConfigError(f"unknown extent {expr!r} (known: {', '.join(EXTENTS)}, optionally 'N*name')")
    mult = int(m.group(1) or 1)
    model = ops.model
    d = model.head_dim
    size = {"hidden": model.hidden_size, "ffn": ops.ffn, "q": ops.q_heads * d, "kv": ops.kv_heads * d,
            "qkv": (ops.q_heads + 2 * ops.kv_heads) * d, "head_dim": d, "row": 1,
            "vocab": ops.ops[ops.index["lm_head"]].n}[m.group(2)]
    return mult * size


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One kernel of an op (see the module docstring). ``count`` -1 means "as the table measured"."""

    name: str
    price: str
    count: int = 1
    elements: str = "row"
    read: float = 0.0
    write: float = 0.0
    n: str = ""
    k: str = ""

    def bytes_per_row(self, ops: TransformerOps) -> float:
        return float(extent(ops, self.elements)) * (self.read + self.write)


@dataclass(frozen=True, slots=True)
class OpRecipe:
    """An op's kernels and its time correction: a factor, or factors at row counts (``((rows, factor),
    ...)``, increasing rows) interpolated in log rows and held flat beyond the first and last."""

    kernels: tuple[KernelSpec, ...]
    scale: float | tuple[tuple[float, float], ...] = 1.0

    def scale_at(self, rows):
        """The correction factor(s) at ``rows`` (a number or an array)."""
        import numpy as np

        if isinstance(self.scale, tuple):
            xs = np.log([max(x, 1e-9) for x, _ in self.scale])
            fs = [f for _, f in self.scale]
            return np.interp(np.log(np.maximum(np.asarray(rows, float), 1e-9)), xs, fs)
        return np.full(np.shape(rows), float(self.scale)) if np.ndim(rows) else float(self.scale)

    @property
    def is_table(self) -> bool:
        """Exactly the table's op (what ``fused`` does): one table kernel, measured count, no scale."""
        return (len(self.kernels) == 1 and self.kernels[0].price == "table" and self.kernels[0].count == -1
                and self.scale == 1.0)


TABLE_ONLY = OpRecipe((KernelSpec("table", "table", -1),))


@dataclass(frozen=True, slots=True)
class Recipe:
    """A named recipe: per op name or table op, its kernels. Invariant: validated on construction."""

    name: str
    description: str = ""
    ops: dict[str, OpRecipe] = field(default_factory=dict)
    source: str = ""

    def for_op(self, op: OpDef) -> OpRecipe:
        """The recipe of one op: its own entry, else its table op's, else the table's (fused)."""
        return self.ops.get(op.name) or self.ops.get(op.table_op) or TABLE_ONLY

    def identity(self) -> dict:
        return {"name": self.name, "source": self.source}


def _kernel(raw: dict, where: str) -> KernelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table of kernel fields")
    known = {"name", "price", "count", "elements", "read", "write", "n", "k"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    price = raw.get("price", "table")
    if price not in PRICES:
        raise ConfigError(f"{where}.price: must be one of {', '.join(PRICES)} (got {price!r})")
    count = raw.get("count", "table" if price == "table" else 1)
    if count == "table":
        if price != "table":
            raise ConfigError(f"{where}.count: 'table' is only for price = \"table\" (got price {price!r})")
        count = -1
    elif not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"{where}.count: must be an integer >= 1 or 'table' (got {count!r})")
    spec = KernelSpec(name=str(raw.get("name", price)), price=price, count=int(count),
                      elements=str(raw.get("elements", "row")), read=float(raw.get("read", 0.0)),
                      write=float(raw.get("write", 0.0)), n=str(raw.get("n", "")), k=str(raw.get("k", "")))
    if price == "bytes":
        if spec.read < 0 or spec.write < 0 or spec.read + spec.write <= 0:
            raise ConfigError(f"{where}: a bytes kernel needs read and/or write > 0 bytes per element")
        _check_extent(spec.elements, f"{where}.elements")
    if price == "gemm":
        for part in ("n", "k"):
            if not raw.get(part):
                raise ConfigError(f"{where}.{part}: a gemm kernel needs {part} (an extent, e.g. \"q\")")
            _check_extent(raw[part], f"{where}.{part}")
    return spec


def _scale(raw, where: str):
    def num(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and v > 0

    if num(raw):
        return float(raw)
    if isinstance(raw, list) and raw and all(isinstance(p, list) and len(p) == 2 and num(p[0]) and num(p[1])
                                             for p in raw):
        pts = tuple((float(x), float(f)) for x, f in raw)
        if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
            raise ConfigError(f"{where}: the rows of [[rows, factor], ...] must increase (got {raw!r})")
        return pts
    raise ConfigError(f"{where}: must be a number > 0 or [[rows, factor], ...] with both > 0 (got {raw!r})")


def _check_extent(expr: str, where: str) -> None:
    m = _EXTENT.match(str(expr))
    if not m or m.group(2) not in EXTENTS:
        raise ConfigError(f"{where}: unknown extent {expr!r} (known: {', '.join(EXTENTS)}, optionally 'N*name')")


def parse_recipe(data: dict, source: str) -> Recipe:
    """A recipe from its TOML data; errors name the key."""
    unknown = sorted(set(data) - {"name", "description", "ops"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (known: description, name, ops)")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: a recipe needs a name")
    from sim.specs import load_model  # the op names of a Llama-style model at TP 2 (every op exists)

    ops: dict[str, OpRecipe] = {}
    valid = {op.name for op in TransformerOps(load_model("llama-3.2-1b"), 2).ops} | set(TABLE_OPS)
    for op_name, entry in (data.get("ops") or {}).items():
        where = f"{source}: ops.{op_name}"
        if op_name not in valid:
            raise ConfigError(f"{where}: unknown op (known: {', '.join(sorted(valid))})")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        extra = sorted(set(entry) - {"kernels", "scale"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (known: kernels, scale)")
        scale = _scale(entry.get("scale", 1.0), f"{where}.scale")
        raw = entry.get("kernels", [{"price": "table"}])
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.kernels: must be a non-empty list of kernels")
        kernels = tuple(_kernel(k, f"{where}.kernels[{i}]") for i, k in enumerate(raw))
        if op_name.startswith("attn_") and op_name not in ("attn_norm", "attn_residual", "attn_allreduce") \
                and any(k.price == "gemm" for k in kernels):
            raise ConfigError(f"{where}.kernels: attention ops take table and bytes kernels only")
        if op_name.startswith("attn_") and op_name in ("attn_prefill", "attn_decode") \
                and sum(k.price == "table" for k in kernels) != 1:
            raise ConfigError(f"{where}.kernels: an attention op needs exactly one table kernel")
        ops[op_name] = OpRecipe(kernels, scale)
    return Recipe(name=name, description=str(data.get("description", "")), ops=ops, source=source)


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (``fused``, ``torch-unfused``) or a TOML file."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.exists()):
        path = RECIPE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"costs.recipe: unknown recipe {name_or_path!r} (shipped: "
                              f"{', '.join(shipped_recipes())}; or a path to a recipe .toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_recipe(data, str(path) if path.parent != RECIPE_DIR else path.stem)


def _toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def format_recipe(recipe: Recipe, header: str = "") -> str:
    """TOML text of a recipe (what ``load_recipe`` reads back)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines += [f"name = {_toml_value(recipe.name)}", f"description = {_toml_value(recipe.description)}", ""]
    for op_name, r in recipe.ops.items():
        lines.append(f"[ops.{op_name}]")
        if isinstance(r.scale, tuple):
            lines.append("scale = [" + ", ".join(f"[{_toml_value(x)}, {_toml_value(f)}]" for x, f in r.scale) + "]")
        elif r.scale != 1.0:
            lines.append(f"scale = {_toml_value(float(r.scale))}")
        for k in r.kernels:
            fields = {"name": k.name, "price": k.price, "count": "table" if k.count == -1 else k.count}
            if k.price == "bytes":
                fields.update(elements=k.elements, read=k.read, write=k.write)
            if k.price == "gemm":
                fields.update(n=k.n, k=k.k)
            lines.append(f"[[ops.{op_name}.kernels]]")
            lines += [f"{key} = {_toml_value(v)}" for key, v in fields.items()]
        lines.append("")
    return "\n".join(lines)


__all__ = ["Recipe", "OpRecipe", "KernelSpec", "load_recipe", "parse_recipe", "shipped_recipes", "format_recipe",
           "extent"]
