"""The ``tiersim`` command.

    tiersim run [--config FILE | --preset NAME] [--trace FILE --format F] [--set key=value ...] [--out DIR]
    tiersim plot DIR [--out FILE]
    tiersim trace describe FILE [--format F] [--json]
    tiersim list [policies|gpus|models|servers|traces|tables|recipes|presets]   (``list policies`` adds parameters)
    tiersim predict-step --gpu h100 --model llama-3.1-8b --phase decode --batch 64 --context 2048
    tiersim sweep [SWEEP.toml] --grid policies.scheduling.name=fcfs,chunked-prefill --grid trace.rate_scale=1,4
                  [--sample KEY=uniform(1,8) --samples N] [--jobs N | --scheduler ADDRESS|local] --out DIR
    tiersim compare RUN RUN ... [--out cdfs.pdf]
    tiersim report RUN|SWEEP [--out FILE.html] [--figures DIR --format pdf|svg|png]
    tiersim config --defaults               (every key, its default and its meaning)
    tiersim calibrate --out DIR [--quick] [--parts ...]
    tiersim calibrate import-profile TRACE [--out RECIPE]
    tiersim validate [--measurements FILE] [--out DIR]
    tiersim validate --e2e RUN_DIR          (a reference-server run against tiersim's replay of it)

User errors print one line, ``tiersim: error: ...``, and exit with status 2 (``TIERSIM_DEBUG=1``
shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sim.errors import ConfigError, TiersimError


def _fmt_s(x, scale=1.0) -> str:
    """Four significant digits or so, never wider than 10 characters."""
    if x is None:
        return "-"
    v = x * scale
    a = abs(v)
    digits = 3 if a < 10 else 2 if a < 100 else 1 if a < 10_000 else 0
    return f"{v:,.{digits}f}"


def format_summary(summary: dict, out_dir: str | None, wall_s: float | None) -> str:
    cfg = summary["config"]
    tr = summary.get("trace", {})
    pol = cfg["policies"]
    lines = []
    ct = summary.get("cost_table", {})
    costs = summary.get("costs", {})
    table = (ct.get("table") or ct.get("backend", "?")) + cost_classes(costs)
    tp = cfg['replica']['tensor_parallel_size']
    tp_label = f" TP{tp}" if tp > 1 else ""
    lines.append(f"tiersim run: {tr.get('name', '?')} ({summary['requests']['total']:,} requests) | "
                 f"{cfg['model']['name']} on {cfg['hardware']['gpu']} x{cfg['cluster']['num_replicas']}"
                 f"{tp_label}"
                 f" | {pol['scheduling']['name']}, {pol['execution']['name']} | costs: {table}")
    lines.append(f"{'':14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for label, key, scale in (("TTFT (s)", "ttft_s", 1.0), ("ITL (ms)", "itl_s", 1e3), ("TPOT (ms)", "tpot_s", 1e3),
                              ("E2E (s)", "e2e_s", 1.0), ("queueing (s)", "queueing_s", 1.0)):
        d = summary[key]
        lines.append(f"{label:14}" + "".join(f"{_fmt_s(d[q], scale):>11}"
                                             for q in ("mean", "p50", "p90", "p99", "max")))
    th, gp = summary["throughput"], summary["goodput"]
    rule = gp.get("definition") or f"TTFT <= {gp['slo_ttft_s']:g} s, TPOT <= {gp['slo_tpot_s'] * 1e3:g} ms"
    rule = rule.replace("TPOT (mean per request)", "TPOT")
    lines.append(f"throughput: {th['requests_per_s']:.2f} req/s, {th['output_tokens_per_s']:,.0f} output tok/s, "
                 f"{th['total_tokens_per_s']:,.0f} total tok/s | goodput ({rule}): {gp['requests_per_s']:.2f} req/s "
                 f"({100 * gp['fraction']:.1f} % of requests)")
    rq, en, kv, ln = summary["requests"], summary["engine"], summary["kv"], summary["links"]
    rej = f"{rq['rejected']:,} rejected" + (f" ({', '.join(f'{v} {k}' for k, v in rq['rejected_by_reason'].items())})"
                                          if rq["rejected"] else "")
    lines.append(f"requests: {rq['finished']:,} finished, {rej} | preemptions {en['preemptions']:,}"
                 f" (swaps out {en['swaps_out']:,}) | steps {en['steps']:,}"
                 f" | launches {en['launches']:,}, syncs {en['syncs']:,}")
    ex = summary.get("execution")
    if ex:
        lpt, spt = ex["launches_per_token"], ex["syncs_per_token"]
        lines.append(f"execution: {ex['mode']} | launches {'-' if lpt is None else f'{lpt:,.2f}'}, syncs "
                     f"{'-' if spt is None else f'{spt:,.2f}'} per output token | padded tokens "
                     f"{ex['padded_tokens']:,} | model on {ex['model_sms']} SMs ({ex['reserved_sms']} reserved)")
    if "hbm_peak_active_bytes" in kv:
        hit = kv.get("hbm_prefix_hit_rate")
        lines.append(f"KV: HBM peak {kv['hbm_peak_active_bytes'] / 1e9:.1f} of "
                     f"{kv['hbm_kv_bytes_per_gpu'] / 1e9:.1f} GB"
                     f" per GPU, cached peak {kv['hbm_peak_cached_bytes'] / 1e9:.1f} GB, DRAM peak "
                     f"{kv['dram_peak_used_bytes'] / 1e9:.1f} GB | prefix hit rate "
                     f"{'-' if hit is None else f'{100 * hit:.1f} %'} | PCIe H2D {ln['pcie_h2d_bytes'] / 1e9:.2f} GB,"
                     f" D2H {ln['pcie_d2h_bytes'] / 1e9:.2f} GB")
    if "hbm_mean_locked_bytes" in kv:
        lines.append(f"KV use (time-weighted mean / peak): active {kv['hbm_mean_active_bytes'] / 1e9:.2f} / "
                     f"{kv['hbm_peak_active_bytes'] / 1e9:.2f} GB, locked by the running batch "
                     f"{kv['hbm_mean_locked_bytes'] / 1e9:.2f} / {kv['hbm_peak_locked_bytes'] / 1e9:.2f} GB | "
                     f"fragmentation {kv['fragmentation_tokens_mean']:,.0f} token slots | HBM blocks evicted "
                     f"{kv['hbm_evicted_blocks']:,}")
    if "speculation" in summary:
        lines.append(speculation_line(summary["speculation"]))
    dropped = tr.get("dropped_rows") or {}
    if dropped:
        lines.append("trace: the reader dropped " + ", ".join(f"{v:,} {k}" for k, v in dropped.items())
                     + " rows of the file (see summary.json: trace.dropped_rows)")
    lines += kv_tier_lines(summary)
    lines += cost_notes_lines(costs)
    lines += rejection_advice(rq)
    tail = []
    if out_dir:
        tail.append(f"results: {out_dir}/ (summary.json, requests.parquet, steps.parquet)")
    if wall_s is not None:
        tail.append(f"wall {wall_s:.2f} s")
    if tail:
        lines.append(" | ".join(tail))
    return "\n".join(lines)


# what to raise for each reason a request is rejected (sim.metrics.requests.REJECT_REASONS)
_REJECT_ADVICE = {
    "exceeds max_model_len": "replica.max_model_len (the model's context window caps it)",
    "exceeds KV capacity": "the KV pool: replica.gpu_memory_utilization, replica.num_hbm_blocks, or "
                           "replica.tensor_parallel_size",
    "exceeds scheduler token budget": "policies.scheduling.max_num_batched_tokens, or use chunked-prefill",
    "could not be scheduled": "the KV pool (replica.num_hbm_blocks, replica.gpu_memory_utilization)",
}


def rejection_advice(requests: dict) -> list[str]:
    """A warning when a run rejected at least 1 % of its requests: the reason and the key to raise."""
    n, rejected = requests.get("total", 0), requests.get("rejected", 0)
    if not n or rejected < max(1, 0.01 * n):
        return []
    reason, count = max((requests.get("rejected_by_reason") or {"": rejected}).items(), key=lambda kv: kv[1])
    advice = _REJECT_ADVICE.get(reason)
    return [f"warning: {rejected:,} of {n:,} requests ({100 * rejected / n:.0f} %) were rejected, {count:,} as "
            f"'{reason}'" + (f"; to serve them raise {advice}" if advice else "")]


def kv_tier_lines(summary: dict) -> list[str]:
    """One or two lines on the KV hierarchy, when a lower tier served or stored anything."""
    kt = summary.get("kv_tiers") or {}
    rate = kt.get("token_hit_rate") or {}
    lower = {t: v for t, v in rate.items() if t != "hbm" and v}
    writes = sum((kt.get("write_blocks") or {}).values())
    if not lower and not writes:
        return []
    order = ("hbm", "dram", "nvme", "store")
    hits = ", ".join(f"{t.upper() if t != 'store' else 'store'} {100 * (rate.get(t) or 0):.1f} %"
                     for t in order if t == "hbm" or t in lower)
    st, pf, ls = kt["stall"], kt["prefetch"], summary.get("link_stats", {})

    def gb(link):
        return ls.get(link, {}).get("bytes", 0) / 1e9

    nvme = f", NVMe read {gb('nvme_read'):.1f} GB, write {gb('nvme_write'):.1f} GB" if "nvme_read" in ls and (
        gb("nvme_read") or gb("nvme_write")) else ""
    net = f", store read {gb('net_read'):.1f} GB, write {gb('net_write'):.1f} GB" if "net_read" in ls else ""
    return [f"KV tiers ({kt.get('mode')}): prefix hits {100 * (kt.get('token_hit_rate_all') or 0):.1f} % of prompt "
            f"tokens ({hits}) | {kt.get('recompute_choices', 0):,} lower-tier prefixes recomputed | write-back "
            f"{kt.get('writeback_bytes', 0) / 1e9:.1f} GB",
            f"KV loads: {st['requests']:,} requests waited {st['total_s']:.1f} s (mean {1e3 * st['mean_s']:.1f} ms, "
            f"max {st['max_s']:.2f} s) | prefetch {pf['blocks']:,} blocks: {pf['on_time_blocks']:,} on time, "
            f"{pf['late_blocks']:,} late, {pf['wasted_blocks']:,} wasted | PCIe H2D {gb('pcie_h2d'):.1f} GB, "
            f"D2H {gb('pcie_d2h'):.1f} GB{nvme}{net}"]


def speculation_line(sp: dict) -> str:
    """The summary's speculation line: drafter, acceptance, tokens per target step, draft and verify
    time per verify step, waste, lookahead KV, and ITL per step (vLLM's definition)."""
    d = sp["drafter"]
    what = {"model": f"draft model {d['model']}", "eagle": f"EAGLE head ({d['layers']} layer)",
            "medusa": f"{d['heads']} Medusa heads", "ngram": "n-gram lookup", "none": "free drafts"}[d["kind"]]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f} %"

    def num(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    itl = sp.get("itl_per_step_s", {}).get("mean")
    return (f"speculation: {sp['policy']}, {what} | acceptance {pct(sp['acceptance_rate'])}, "
            f"{num(sp['tokens_per_target_step'])} tokens per target step ({num(sp['tokens_per_decode_step'])} "
            f"over all decodes) | per verify step: draft {_fmt_s(sp['draft_s_per_verify_step'], 1e3)} ms, verify "
            f"{_fmt_s(sp['verify_s_per_verify_step'], 1e3)} ms | wasted {sp['wasted_draft_tokens']:,} draft tokens | "
            f"lookahead KV peak {sp['lookahead_kv_peak_bytes'] / 1e6:,.1f} MB, drafter weights "
            f"{d['weight_bytes_per_gpu'] / 1e9:.2f} GB | ITL per step (vLLM) {_fmt_s(itl, 1e3)} ms")


def cost_classes(costs: dict) -> str:
    """`` (14 measured, 3 generalised ops; recipe torch-unfused)`` for the summary header."""
    classes = costs.get("classes") or {}
    if not classes:
        return ""
    order = ("measured", "generalised", "modelled", "roofline")
    parts = [f"{classes[c]} {c}" for c in order if classes.get(c)]
    recipe = costs.get("recipe")
    return f" ({', '.join(parts)} ops" + (f"; recipe {recipe}" if recipe and recipe != "fused" else "") + ")"


def cost_notes_lines(costs: dict) -> list[str]:
    """Footer lines: ops not priced at their measured shape, extrapolations (how far), warnings and
    the validation error of the shape classes the run used."""
    lines = []
    ops = costs.get("ops") or {}
    for cls, label in (("generalised", "generalised from this GPU's other shapes"),
                       ("modelled", "modelled, not measured on this GPU"), ("roofline", "priced by the roofline")):
        by_src: dict[str, list[str]] = {}
        for name, e in ops.items():
            if e.get("source") == cls:
                by_src.setdefault(e.get("from", "") if cls != "roofline" else "", []).append(name)
        if by_src:
            lines.append(f"costs {label}: " + "; ".join(
                ", ".join(names) + (f" from {src}" if src else "") for src, names in by_src.items()))
    ext = costs.get("extrapolated") or {}
    if ext:
        def how_far(v: dict) -> str:
            parts = []
            if v.get("max_over_grid", 1.0) > 1.0:
                parts.append(f"up to {v['max_over_grid']:.3g}x its largest point")
            if v.get("min_under_grid", 1.0) < 1.0:
                parts.append(f"down to {v['min_under_grid']:.2g}x its smallest")
            return f"{v['lookups']:,} lookups" + (": " + ", ".join(parts) if parts else "")

        lines.append("cost table extrapolated beyond its grid for: " +
                     "; ".join(f"{k} ({how_far(v)})" for k, v in ext.items()))
    else:
        plain = costs.get("extrapolated_lookups") or {}
        if plain:
            lines.append("cost table extrapolated beyond its grid for: " +
                         ", ".join(f"{k} ({v:,} lookups)" for k, v in plain.items()))
    for w in costs.get("warnings") or []:
        lines.append(f"warning: {w}")
    eb = costs.get("error_bars")
    if eb and eb.get("line"):
        lines.append(eb["line"])
    return lines


# ====================================================================== paths
@contextlib.contextmanager
def _output_dir(path: Path, option: str, force: bool = False) -> Iterator[Path]:
    """Create (or check) an output directory before a run, so a bad one fails in a second, not after
    the run; a directory created here and still empty when the body fails is removed again. A directory
    that already holds files is refused unless ``force``."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a directory")
    if path.is_dir() and not force and any(path.iterdir()):
        from sim import results_io

        what = "a finished run" if results_io.verify(path, checksums=False) is None else "files"
        raise ConfigError(f"{option} {path}: already holds {what}; choose another --out, or --force to "
                          "overwrite it")
    new = [p for p in (path, *path.parents) if not p.exists()]   # the directories mkdir will create

    def remove_new() -> None:
        with contextlib.suppress(OSError):
            for p in new:   # deepest first; rmdir refuses a directory that is not empty
                p.rmdir()

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        remove_new()
        raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield path
    except BaseException:
        remove_new()
        raise


def _write_results(results, out: Path, option: str, config_toml: str) -> Path:
    """Write results to ``out``; if that fails (disk full, the directory removed meanwhile), keep the
    finished work in a fresh temporary directory and say where, as a one-line error."""
    try:
        results.write(out, {"config.toml": config_toml})
        return out
    except OSError as exc:
        rescue = Path(tempfile.mkdtemp(prefix="tiersim-results-"))
        results.write(rescue, {"config.toml": config_toml})
        raise TiersimError(f"{option} {out}: cannot write the results ({exc.strerror or exc}); "
                           f"they are in {rescue} instead") from None


def _config_file(path: str, option: str = "--config"):
    from sim.config import load_config

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p}: a directory, not a config file")
    return load_config(p)


def _from_file(exc: ConfigError, path: str | None, overrides: list[str]) -> ConfigError:
    """``exc``, raised while the run was built (a policy name, a model's context window), with the
    config file's name in front when the key it names was set in that file and not by ``--set``."""
    import re
    import tomllib

    msg = str(exc)
    key = re.match(r"([A-Za-z_][\w-]*(?:\.[\w-]+)+)[:= ]", msg)
    if path is None or key is None or msg.startswith(f"{path}:"):
        return exc
    parts = key.group(1).split(".")
    if any(o.split("=", 1)[0].strip() == key.group(1) for o in overrides):
        return exc
    try:
        node = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
        for part in parts:
            node = node[part]
    except (OSError, ValueError, KeyError, TypeError):
        return exc
    return type(exc)(f"{path}: {msg}")


# ====================================================================== commands
def cmd_run(args) -> int:
    from policies import registry
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    if args.out is not None and not args.out.strip():
        raise ConfigError("--out: an empty path; name the results directory (or leave --out out for output.dir)")
    scenario = None
    if args.preset:
        from sim.scenarios import load_scenario

        if args.config:
            raise TiersimError("--preset and --config both give the base config; use one (copy the preset's file "
                               "to change it: tiersim list presets shows where they are)")
        scenario = load_scenario(args.preset)
    config = scenario.config if scenario else _config_file(args.config) if args.config else SimConfig()
    overrides = list(args.set or [])
    if args.plugin:      # recorded in the config (config.toml then reproduces the run), loaded by the run
        for mod in args.plugin:
            registry.load_plugin(mod)
        plugins = list(config.plugins) + [_plugin_ref(m) for m in args.plugin if _plugin_ref(m) not in config.plugins]
        overrides += [f"plugins={json.dumps(plugins)}"]
    overrides += _trace_overrides(args.trace)
    if args.format:
        overrides += [f"trace.format={json.dumps(args.format)}"]
    if args.seed is not None:
        overrides += [f"seed={args.seed}"]
    if args.out:
        overrides += [f"output.dir={json.dumps(args.out)}"]
    if overrides:
        config = with_overrides(config, overrides)
    t0 = time.perf_counter()
    from sim.progress import RunProgress

    option = "--out" if args.out else "output.dir"
    with _output_dir(Path(config.output.dir), option, args.force) as out, \
            (contextlib.nullcontext() if args.quiet or args.no_progress else RunProgress()) as progress:
        try:
            sim = Simulation(config, progress=progress)
        except ConfigError as exc:
            raise _from_file(exc, args.config, overrides) from None
        results = sim.run()
    out = _write_results(results, out, option, config.to_toml())
    wall = time.perf_counter() - t0
    if args.plot:
        from sim.plots import plot_run

        plot_run(out)
    if args.json:
        print(json.dumps(results.summary, indent=2, sort_keys=True))
    elif not args.quiet:
        if scenario is not None:
            print(f"preset {scenario.name}: measures {scenario.measures}")
        print(format_summary(results.summary, str(out), wall))
        if args.plot:
            print(f"plot: {out / 'overview.png'}")
    return 0


def _plugin_ref(module: str) -> str:
    """A plugin as the config records it: a file by its absolute path, a module by its name."""
    p = Path(module)
    return str(p.resolve()) if module.endswith(".py") or p.is_file() else module


def _trace_overrides(trace: str | None) -> list[str]:
    """``--trace``: a bundled name sets trace.bundled (and clears trace.path), a file sets trace.path, so
    the saved config names the trace once."""
    if not trace:
        return []
    import traces

    if trace in traces.BUNDLED and not Path(trace).is_file():
        return [f"trace.bundled={json.dumps(trace)}", 'trace.path=""']
    return [f"trace.path={json.dumps(trace)}"]


def cmd_plot(args) -> int:
    from sim.results_data import is_sweep

    if is_sweep(args.dir):      # a sweep: its runs' latency CDFs overlaid
        from sim.compare import plot_cdfs
        from sim.results_io import FIGURE_SUFFIXES, check_output_file

        if args.out:
            check_output_file(args.out, "--out", FIGURE_SUFFIXES)

        print(plot_cdfs(_runs_of([args.dir]), args.out or Path(args.dir) / "overview.png"))
        return 0
    from sim.plots import plot_run

    print(plot_run(args.dir, args.out))
    return 0


def cmd_trace(args) -> int:
    import traces

    if args.trace_cmd != "describe":
        raise TiersimError("usage: tiersim trace describe FILE")
    from sim.workload import refuse_empty

    trace = traces.load_trace(args.file, format=args.format)
    refuse_empty(trace, args.file)
    d = traces.describe(trace)
    if args.json:
        print(json.dumps(d, indent=2, default=float))
    else:
        print(traces.format_description(d))
        dropped = trace.meta.get("dropped_failed")
        if dropped:
            print(f"(dropped {dropped:,} failed requests with zero response tokens)")
    return 0


def cmd_list(args) -> int:
    from policies import registry
    from sim.costs.table import shipped_tables
    from sim.specs import available_presets

    what = args.what
    if what in (None, "policies"):
        print("policies:")
        for kind, names in registry.all_policies().items():
            for name in names:
                print(f"  {kind:12} {name:18} {registry.describe(kind, name)}")
                if what == "policies":      # the parameters, with defaults, only when asked for policies
                    params = getattr(registry.lookup(kind, name), "Params", None)
                    if dataclasses.is_dataclass(params):
                        for f in dataclasses.fields(params):
                            default = f.default if f.default is not dataclasses.MISSING else "(required)"
                            print(f"  {'':12} {'':18}   {f.name} = {default!r}")
    if what in (None, "gpus"):
        print("gpus:    " + ", ".join(available_presets("gpus")))
    if what in (None, "models"):
        print("models:  " + ", ".join(available_presets("models")))
    if what in (None, "servers"):
        print("servers: " + ", ".join(available_presets("servers")))
    if what in (None, "traces"):
        import traces

        print("traces (bundled):")
        for name, b in traces.BUNDLED.items():
            print(f"  {name:24} {getattr(b, 'description', '')}")
    if what in (None, "tables"):
        print("cost tables: " + (", ".join(shipped_tables()) or "none shipped"))
    if what in (None, "presets"):
        from sim.scenarios import SCENARIO_DIR, available_scenarios, load_scenario

        print(f"presets (tiersim run --preset NAME; files in {SCENARIO_DIR}):")
        for name in available_scenarios():
            print(f"  {name:24} {load_scenario(name).measures}")
    if what in (None, "recipes"):
        from sim.costs.recipe import load_recipe, shipped_recipes

        print("recipes (costs.recipe):")
        for name in shipped_recipes():
            print(f"  {name:24} {load_recipe(name).description}")
    return 0


def cmd_predict_step(args) -> int:
    import numpy as np

    from policies import registry
    from sim.costs.model import StepShape, TransformerOps
    from sim.costs.recipe import load_recipe
    from sim.costs.roofline import RooflineBackend
    from sim.costs.step import StepCostModel
    from sim.costs.table import CostTable, TableBackend, resolve_table_dir
    from sim.specs import load_gpu, load_model

    gpu, model = load_gpu(args.gpu), load_model(args.model)
    ops = TransformerOps(model, args.tp)
    roof = RooflineBackend(ops, gpu)
    if args.backend == "roofline":
        backend = roof
    else:
        table = CostTable(resolve_table_dir(args.table or gpu.name))
        backend = TableBackend(ops, gpu, table, roof if args.fallback == "roofline" else None,
                               generalise=args.fallback == "generalise", recipe=load_recipe(args.recipe))
    execution = registry.build("execution", args.mode, {})
    cost = StepCostModel(ops, backend, execution)
    reserved = execution.reserved_sms(gpu.sm_count)      # a persistent kernel's SMs: the model runs on the rest
    if reserved:
        cost = cost.for_share((gpu.sm_count - reserved) / gpu.sm_count)
    B = args.batch
    if B < 1:
        raise TiersimError(f"--batch must be >= 1 (got {B})")
    for option, value in (("--context", args.context), ("--chunk-context", args.chunk_context)):
        if value < 0:
            raise TiersimError(f"{option} must be >= 0 (got {value})")
    if args.phase == "prefill" and args.context:
        raise TiersimError("--context is the decodes' cached context (decode, mixed); a prefill step's prompts "
                           "start with nothing cached (for a chunk after cached tokens: --phase mixed "
                           "--chunk-context N)")
    if args.phase != "mixed" and args.chunk_context:
        raise TiersimError("--chunk-context is for --phase mixed (tokens cached before its prefill chunk)")
    window = model.max_context_tokens
    longest = {"prefill": args.tokens, "decode": args.context + 1,
               "mixed": max(args.chunk_context + args.tokens, args.context + 1)}[args.phase]
    if longest > window:
        raise TiersimError(f"a sequence of {longest:,} tokens exceeds {model.name}'s context window of {window:,}")
    if args.phase == "decode" and args.tokens:
        raise TiersimError("--tokens is the prefill length (prefill) or chunk (mixed); a decode step's requests "
                           "have --context tokens cached and add one each")
    if args.phase == "prefill":
        if args.tokens < 1:
            raise TiersimError("--tokens (each request's prompt length) must be >= 1 for --phase prefill")
        shape = StepShape.prefill(B, args.tokens)
    elif args.phase == "decode":
        shape = StepShape.decode(B, args.context)
    else:
        if args.tokens < 1:
            raise TiersimError("--tokens (the prefill chunk) must be >= 1 for --phase mixed")
        shape = StepShape(prefill_q=np.array([args.tokens], np.int64),
                          prefill_c=np.array([args.chunk_context], np.int64),
                          num_decode=B, decode_ctx_sum=B * (args.context + 1), num_sampled=B + 1)
    before = dict(backend.extrapolations)
    duration, rows, overhead, launches, syncs = cost.breakdown(shape)
    extrapolated = sorted(k for k, v in backend.extrapolations.items() if v != before.get(k, 0))
    report = backend.lookup_report()
    sources = report.get("ops", {})
    error_bar = None
    if isinstance(backend, TableBackend) and backend.error_bars() is not None and args.phase != "mixed":
        error_bar = backend.error_bars().for_step(args.phase, args.mode, B,
                                                  args.tokens if args.phase == "prefill" else args.context,
                                                  backend.generalised)
    result = {
        "gpu": gpu.name, "model": model.name, "phase": args.phase, "batch": B, "tokens": args.tokens,
        "context": args.context, "mode": args.mode, "tensor_parallel_size": args.tp,
        "step_ms": duration * 1e3, "overhead_ms": overhead * 1e3, "launches": launches, "syncs": syncs,
        "extrapolated": extrapolated, "cost_table": backend.identity, "recipe": report.get("recipe"),
        "ops": [{"name": r.name, "table_op": r.table_op, "count": r.count, "time_ms": r.time_s * 1e3,
                 "flops": r.flops, "bytes": r.bytes, "kernels": r.kernels, "bound": r.bound,
                 "source": sources.get(r.name, {}).get("source", "")} for r in rows],
        "costs": report, "error_bar": error_bar,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model.name} on {gpu.name} | {args.phase}, batch {B}"
          + (f", {args.tokens} tokens each" if args.phase == "prefill" else "")
          + (f", context {args.context}" if args.phase != "prefill" else "")
          + (f" + a {args.tokens}-token prefill chunk" if args.phase == "mixed" else "")
          + (f" TP{args.tp}" if args.tp > 1 else "")
          + f" | {args.mode} | costs: {backend.identity.get('table', backend.identity.get('backend'))}"
          + cost_classes(report))
    print(f"{'op':16}{'count':>6}{'time ms':>10}{'share':>8}{'GFLOP':>10}{'MB':>10}{'kernels':>9}  {'bound':9}source")
    for r in rows:
        print(f"{r.name:16}{r.count:>6}{r.time_s * 1e3:>10.4f}{100 * r.time_s / duration:>7.1f}%"
              f"{r.flops / 1e9:>10.2f}{r.bytes / 1e6:>10.2f}{r.kernels:>9}  {r.bound:9}"
              f"{sources.get(r.name, {}).get('source', '')}")
    print(f"{'launch/sync/idle':16}{'':>6}{overhead * 1e3:>10.4f}{100 * overhead / duration:>7.1f}%"
          f"{'':>10}{'':>10}{'':>9}  {launches} launch(es), {syncs} sync(s)"
          + ("; negative: fused stages drop the inter-kernel gaps the op times include" if overhead < 0 else ""))
    print(f"{'step':16}{'':>6}{duration * 1e3:>10.4f}{100.0:>7.1f}%")
    for line in cost_notes_lines({k: v for k, v in report.items() if k != "extrapolated"}):
        print(line)
    if extrapolated:
        ext = report.get("extrapolated", {})
        print("note: extrapolated beyond the measured grid for " + ", ".join(
            k + (f" ({ext[k]['max_over_grid']:.3g}x its largest point)" if ext.get(k, {}).get("max_over_grid", 1) > 1
                 else f" ({ext[k]['min_under_grid']:.2g}x its smallest point)" if k in ext else "")
            for k in extrapolated))
    if error_bar:
        print(error_bar["line"])
    elif isinstance(backend, TableBackend) and backend.error_bars() is None:
        print("error bar: none (this table has no validation measurements)")
    return 0


def cmd_sweep(args) -> int:
    from sim.config import SimConfig, with_overrides
    from sim.progress import SweepProgress
    from sim.sweep import SweepSpec, load_sweep_file, parse_axis, parse_distribution, run_sweep

    if args.file:
        # --samples completes a file whose [random] axes have no samples key
        spec = load_sweep_file(args.file, samples=args.samples if args.samples and args.samples > 0 else None)
        base = spec.base
    else:
        spec = SweepSpec()
        base = _config_file(args.config) if args.config else SimConfig()
    if args.config and args.file:
        raise ConfigError("--config: the sweep file names its base config (config = FILE); give one or the other")
    overrides = list(args.set or [])
    traces_given = list(args.trace or [])
    if len(traces_given) == 1:
        overrides += _trace_overrides(traces_given[0])
    if overrides:
        base = with_overrides(base, overrides)
    grid_axes = dict(spec.grid)
    given = set()
    for a in args.grid or []:
        k, v = parse_axis(a)
        if k in given:
            raise ConfigError(f"--grid {k}: given twice; list every value once, --grid {k}=V1,V2,...")
        given.add(k)
        grid_axes[k] = v
    if len(traces_given) > 1:
        grid_axes["trace"] = traces_given
    random_axes = dict(spec.random)
    for a in args.sample or []:
        k, eq, dist = a.partition("=")
        if not eq:
            raise ConfigError(f"--sample {a!r}: expected KEY=DIST, e.g. --sample trace.rate_scale=uniform(1,8)")
        random_axes[k] = parse_distribution(dist)
    if args.samples is not None and args.samples < (1 if random_axes else 0):   # the option, not the file's key
        need = "1 to draw the random axes" if random_axes else "0"
        raise ConfigError(f"--samples must be >= {need} (got {args.samples})")
    if args.sample_seed is not None and args.sample_seed < 0:
        raise ConfigError(f"--sample-seed must be >= 0 (got {args.sample_seed})")
    plugins = list(spec.plugins) + [_plugin_ref(m) for m in args.plugin or [] if _plugin_ref(m) not in spec.plugins]
    for m in args.plugin or []:
        if m.endswith(".py") and not Path(m).is_file():
            raise ConfigError(f"--plugin {m}: no such file")
    spec = SweepSpec(base=base, grid=grid_axes, random=random_axes, points=spec.points,
                     samples=args.samples if args.samples is not None else spec.samples,
                     sample_seed=args.sample_seed if args.sample_seed is not None else spec.sample_seed,
                     plugins=plugins)
    if not spec.axes:
        raise ConfigError("tiersim sweep: no axes; give a sweep file, --grid KEY=V1,V2 or --sample KEY=DIST")
    if not args.out.strip():
        raise ConfigError("--out: an empty path; name the sweep directory")
    progress = None if args.quiet else SweepProgress()
    table = run_sweep(spec, out_dir=args.out, jobs=args.jobs, scheduler=args.scheduler, progress=progress,
                      force=args.force)
    if not args.quiet:
        params = [c for c in table.columns[: list(table.columns).index("run")]]
        cols = params + [c for c in ("status", "ttft_p99_s", "itl_p99_s", "throughput_tok_s", "goodput_fraction")
                         if c in table]
        print(table[cols].to_string(index=False))
    if "error" in table:    # errors reach stderr even with --quiet: a sweep that failed says why
        for run, status, error in table[["run", "status", "error"]].itertuples(index=False):
            if not status.startswith("done") and isinstance(error, str) and error:
                print(f"{run}: {status}: {error}", file=sys.stderr)
    if not args.quiet:
        print(f"results: {args.out}/ (summary.parquet, runs/, requests/ and steps/ datasets; tiersim report "
              f"{args.out})")
    return 0 if (table["status"].str.startswith("done")).all() else 1


def cmd_config(args) -> int:
    from sim.config import SimConfig, with_overrides
    from sim.config_docs import documented_toml

    if args.defaults and (args.config or args.set):
        raise ConfigError(f"{'--config' if args.config else '--set'}: has no effect with --defaults, which prints "
                          "the defaults; drop --defaults to print your config resolved")
    config = _config_file(args.config) if args.config else SimConfig()
    if args.set:
        config = with_overrides(config, list(args.set))
    if not args.defaults:
        from sim.engine import Simulation

        Simulation(config)      # what run would refuse (policy parameters, tiers, cross-checks) is refused here
    print(documented_toml(config), end="")
    return 0


def _runs_of(paths: list[str]):
    from sim.results_data import is_sweep, load_run, load_sweep

    runs = []
    for p in paths:
        if is_sweep(p):
            sw = load_sweep(p)
            got = sw.runs()
            left = len(sw.summary) - len(got)
            if not got:
                raise TiersimError(f"{p}: the sweep has no finished run ({left} failed or invalid: see "
                                   f"{Path(p) / 'index.jsonl'})")
            if left:
                print(f"{p}: {left} of {len(sw.summary)} runs did not finish and are left out (see "
                      f"{Path(p) / 'index.jsonl'})", file=sys.stderr)
            runs += got
        else:
            runs.append(load_run(p))
    labels = [r.label for r in runs]
    for r in runs:    # equal directory names (two runs called tiersim-results): use paths
        if labels.count(r.label) > 1:
            r.label = str(r.path)
    return runs


def cmd_compare(args) -> int:
    from sim.compare import plot_cdfs, print_table

    if args.out != "none":
        from sim.results_io import FIGURE_SUFFIXES, check_output_file

        check_output_file(args.out, "--out", FIGURE_SUFFIXES)
    runs = _runs_of(args.runs)
    if args.labels:
        names = args.labels.split(",")
        if len(names) != len(runs):
            raise ConfigError(f"--labels: {len(names)} labels for {len(runs)} runs")
        for r, n in zip(runs, names):
            r.label = n
    print_table(runs)
    if args.out != "none":
        print(f"CDFs: {plot_cdfs(runs, args.out)}")
    return 0


def cmd_report(args) -> int:
    from sim.report import export_figures, write_report
    from sim.results_io import check_output_dir, check_output_file

    if args.out:
        check_output_file(args.out, "--out", (".html", ".htm"))
    if args.figures:    # before the report is written: a bad --figures leaves nothing behind
        check_output_dir(args.figures, "--figures")
    out = write_report(args.dir, args.out)
    print(f"report: {out}")
    if args.figures:
        files = export_figures(args.dir, args.figures, args.format)
        print(f"figures: {len(files)} {args.format.upper()} files in {args.figures}/")
    return 0


def cmd_calibrate(args) -> int:
    from calibration import cli as calibration_cli

    return calibration_cli.run(args)


def cmd_validate(args) -> int:
    from calibration import validate

    return validate.main(args)


# ====================================================================== parser
class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is argparse.SUPPRESS or action.required
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.default is False or action.default is None and action.nargs == 0:
            return text + " (default: off)"
        if action.default is None:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


_CALIBRATION_COMMANDS = ("calibrate", "validate")


def build_parser(calibration: bool = True) -> argparse.ArgumentParser:
    """The ``tiersim`` parser. ``calibration=False`` leaves out the options of ``calibrate`` and
    ``validate`` (importing the calibration package to add them costs every other command ~0.1 s);
    :func:`main` builds them only for those commands or a bare ``tiersim``."""
    import sim

    p = argparse.ArgumentParser(prog="tiersim", description="Trace-driven simulator for LLM-inference "
                                "scheduling, KV tiering and execution-mode research.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--version", action="version", version=f"tiersim {sim.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def parser(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpWithDefaults, **kw)

    r = parser("run", help="replay a trace through a configured cluster")
    r.add_argument("--config", help="TOML config file (default: none; the defaults reproduce the bundled "
                                    "Azure conv run; tiersim config --defaults prints them)")
    r.add_argument("--preset", help="a shipped scenario preset (tiersim list presets) or a preset file, as the "
                   "base config (default: none)")
    r.add_argument("--trace", help="trace file or bundled trace name (default: the config's trace, azure-conv)")
    r.add_argument("--format", choices=["azure", "mooncake", "burstgpt", "csv", "parquet"],
                   help="trace format (default: detected from the file)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set policies.scheduling.name=chunked-prefill (default: none)")
    r.add_argument("--out", help="output directory (default: the config's output.dir, tiersim-results)")
    r.add_argument("--force", action="store_true", help="overwrite an output directory that already holds files")
    r.add_argument("--seed", type=int, help="random seed (default: the config's seed, 0)")
    r.add_argument("--plugin", action="append", metavar="MODULE",
                   help="a .py file or module that registers policies; recorded in config.toml (default: none)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--quiet", action="store_true", help="print nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--plot", action="store_true",
                   help="also write OUT/overview.png (latency CDFs, batch size and KV memory over time)")
    r.set_defaults(func=cmd_run)

    pl = parser("plot", help="overview figure of a results directory")
    pl.add_argument("dir", help="a directory written by tiersim run, or a sweep directory (its runs' CDFs)")
    pl.add_argument("--out", help="image file (default: DIR/overview.png)")
    pl.set_defaults(func=cmd_plot)

    cf = parser("config", help="print a config with every key's meaning (--defaults: the defaults)")
    cf.add_argument("--defaults", action="store_true", help="the default config (not with --config or --set)")
    cf.add_argument("--config", help="a config file to resolve and print (default: none, the defaults)")
    cf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (default: none)")
    cf.set_defaults(func=cmd_config)

    cp = parser("compare", help="summary metrics side by side, and overlaid TTFT/ITL/E2E CDFs")
    cp.add_argument("runs", nargs="+", help="results directories (a sweep directory adds all its runs)")
    cp.add_argument("--out", default="compare.png",
                    help="the CDF figure: .png, .pdf or .svg, or 'none'")
    cp.add_argument("--labels", help="comma-separated run labels (default: the directory names)")
    cp.set_defaults(func=cmd_compare)

    rp = parser("report", help="a self-contained HTML report of a run or a sweep")
    rp.add_argument("dir", help="a results directory or a sweep directory")
    rp.add_argument("--out", help="HTML file (default: DIR/report.html)")
    rp.add_argument("--figures", metavar="DIR", help="also write every figure to DIR (default: none)")
    rp.add_argument("--format", choices=["pdf", "svg", "png"], default="pdf", help="format of --figures files")
    rp.set_defaults(func=cmd_report)

    t = parser("trace", help="trace tools")
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    d = tsub.add_parser("describe", help="rate, burstiness, lengths and prefix reuse of a trace",
                        formatter_class=_HelpWithDefaults)
    d.add_argument("file", help="trace file or bundled trace name (see tiersim list traces)")
    d.add_argument("--format", choices=["azure", "mooncake", "burstgpt", "csv", "parquet"],
                   help="trace format (default: detected from the file)")
    d.add_argument("--json", action="store_true", help="print the description as JSON")
    t.set_defaults(func=cmd_trace)

    li = parser("list", help="registered policies, presets, bundled traces, shipped cost tables")
    li.add_argument("what", nargs="?", choices=["policies", "gpus", "models", "servers", "traces", "tables",
                                                "recipes", "presets"])
    li.set_defaults(func=cmd_list)

    ps = parser("predict-step", help="predicted time of one engine step, with its per-op breakdown")
    ps.add_argument("--gpu", default="h100-sxm-80gb", help="GPU preset")
    ps.add_argument("--model", default="llama-3.1-8b", help="model preset")
    ps.add_argument("--phase", choices=["prefill", "decode", "mixed"], required=True, help="step kind (required)")
    ps.add_argument("--batch", type=int, default=1, help="requests in the step (decodes for --phase mixed)")
    ps.add_argument("--tokens", type=int, default=0, help="prefill: each request's prompt length; "
                    "mixed: the prefill chunk's length")
    ps.add_argument("--context", type=int, default=0, help="decode: each request's cached context (the step "
                    "attends context + 1 keys)")
    ps.add_argument("--chunk-context", type=int, default=0, help="mixed: tokens already cached before the chunk")
    ps.add_argument("--mode", default="cuda-graph", help="execution policy (host-launched, cuda-graph, ...)")
    ps.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ps.add_argument("--backend", choices=["table", "roofline"], default="table", help="cost backend")
    ps.add_argument("--table", help="cost table name or directory (default: the GPU's shipped table)")
    ps.add_argument("--fallback", choices=["generalise", "roofline", "error"], default="generalise",
                    help="ops the table did not measure at this shape: generalise from the GPU's other "
                         "measurements, the roofline, or an error")
    ps.add_argument("--recipe", default="fused",
                    help="the engine's kernels per op: fused (the reference decoder), torch-unfused, or a .toml")
    ps.add_argument("--json", action="store_true", help="print the result as JSON")
    ps.set_defaults(func=cmd_predict_step)

    sw = parser("sweep", help="run a grid (and random samples) of config variants in parallel; resumable")
    sw.add_argument("file", nargs="?", help="a sweep TOML file (see configs/sweeps/); optional when --grid or "
                                           "--sample give the axes")
    sw.add_argument("--config", help="base TOML config (default: none, the defaults)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base key (default: none)")
    sw.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                    help="an axis of the sweep (repeat for a cartesian product; KEY may be trace or plugin) "
                         "(default: none)")
    sw.add_argument("--sample", action="append", metavar="KEY=DIST",
                    help="a random axis: uniform(lo,hi), loguniform(lo,hi), int(lo,hi) or choice(a,b) "
                         "(default: none)")
    sw.add_argument("--samples", type=int, help="random draws, crossed with the grid (default: the file's, 0)")
    sw.add_argument("--sample-seed", type=int, help="seed of the random draws (default: the file's, 0)")
    sw.add_argument("--trace", action="append", help="a trace for every run; repeated: a trace axis "
                                                    "(default: the base config's trace)")
    sw.add_argument("--plugin", action="append", metavar="MODULE",
                    help="a policy plugin loaded in every worker (default: none)")
    sw.add_argument("--out", required=True, help="sweep directory; rerunning resumes (required)")
    sw.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="local worker processes (1: run in this process) (default: the CPU count)")
    sw.add_argument("--scheduler", metavar="ADDRESS",
                    help="run on a Dask cluster at ADDRESS, or 'local' for a LocalCluster of --jobs workers "
                         "(needs tiersim[dask]) (default: none, local processes)")
    sw.add_argument("--force", action="store_true", help="start over in a directory that holds another sweep")
    sw.add_argument("--quiet", action="store_true", help="print nothing")
    sw.set_defaults(func=cmd_sweep)

    ca = parser("calibrate", help="measure this machine's GPU and fit a cost table")
    va = parser("validate", help="compare predicted step times with measured ones (--e2e: whole runs)")
    ca.set_defaults(func=cmd_calibrate)
    va.set_defaults(func=cmd_validate)
    if not calibration:
        return p
    try:
        from calibration import cli as calibration_cli

        calibration_cli.add_arguments(ca)
    except ImportError as exc:  # pragma: no cover - the package ships with tiersim
        ca.add_argument("--out", required=True)
        ca.set_defaults(_calibration_missing=str(exc))
    try:
        from calibration import validate

        validate.add_arguments(va)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args_in if not a.startswith("-")), None)
    parser = build_parser(calibration=command is None or command in _CALIBRATION_COMMANDS)
    args = parser.parse_args(args_in)
    try:
        return args.func(args)
    except TiersimError as exc:
        if os.environ.get("TIERSIM_DEBUG"):
            raise
        print(f"tiersim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if getattr(args, "func", None) is cmd_sweep:
            from sim.sweep import read_index

            with contextlib.suppress(Exception):
                done = len({r["run"] for r in read_index(Path(args.out)) if r.get("status") == "done"})
                hint = f" ({done} finished run{'' if done == 1 else 's'} kept; rerun the same command to resume)"
        elif getattr(args, "func", None) is cmd_run:
            hint = " (nothing was written: a run's results appear only when it finishes)"
        print(f"tiersim: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
