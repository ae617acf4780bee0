"""Command-line glue for the calibration suite: ``tiersim calibrate`` and ``python -m calibration``.

``add_arguments`` adds the suite's options to a parser; ``run`` runs the suite and then, when the module
``calibration.fit`` provides ``fit_table(out_dir) -> Path``, fits the cost table. Exit status: 0 when
every selected part was measured or skipped (and the fit, if any, succeeded), 1 when a part or the fit
failed, 2 for a usage error (unknown part or model, a directory that cannot be resumed).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import traceback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["import-profile"], default=None,
                        help="import-profile TRACE: an engine's profiler trace -> a recipe with per-op "
                             "corrections (calibration.import_profile); without it: measure this GPU")
    parser.add_argument("trace", nargs="?", default=None, help="import-profile: the trace (Kineto/Chrome JSON, "
                        "or python -m calibration.diagnose trace output; .gz allowed)")
    # required for every run; not enforced by argparse so that --list-parts works alone
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (raw/<part>.parquet, metadata.json); required. "
                             "import-profile: the recipe file to write (default NAME.toml)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny grids: CI, smoke tests, the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    parser.add_argument("--parts", metavar="A,B,C", default=None,
                        help="comma-separated parts to run (default: all; see --list-parts)")
    parser.add_argument("--models", metavar="M1,M2", default=None,
                        help="comma-separated model presets whose shapes are measured "
                             "(default: llama-3.1-8b,llama-3.2-1b)")
    parser.add_argument("--no-resume", action="store_true",
                        help="measure every selected part again, even where raw files exist")
    parser.add_argument("--list-parts", action="store_true", help="list the parts and exit")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="soft time budget per part in seconds (default 40 full, none with --quick; "
                             "0 = none)")
    parser.add_argument("--in-process", action="store_true",
                        help="run parts in this process (default on a real GPU: one process per part)")
    parser.add_argument("--no-fit", action="store_true", help="do not fit a cost table afterwards")
    from calibration.import_profile import add_arguments as import_arguments

    group = parser.add_argument_group("import-profile")
    import_arguments(group)


def _list_parts(out=sys.stdout) -> int:
    from calibration import suite

    for name in suite.known_part_names():
        part = suite.PARTS.get(name)
        if part is None:
            print(f"{name:18s} UNAVAILABLE: {suite.PART_IMPORT_ERRORS[name]}", file=out)
            continue
        why = suite.missing_requirements(part)
        state = f"  [skipped here: {why}]" if why else ""
        print(f"{name:18s} {part.description}{state}\n{'':18s} {part.coords}", file=out)
    return 0


def _fit(out_dir: str) -> int:
    if importlib.util.find_spec("calibration.fit") is None:
        print("calibration.fit is not available: skipping the cost-table fit")
        return 0
    try:
        fit = importlib.import_module("calibration.fit")
    except Exception as exc:
        print(f"calibration.fit failed to import ({type(exc).__name__}: {exc}): skipping the fit",
              file=sys.stderr)
        return 1
    fit_table = getattr(fit, "fit_table", None)
    if fit_table is None:
        print("calibration.fit has no fit_table(out_dir): skipping the cost-table fit")
        return 0
    try:
        path = fit_table(out_dir)
    except Exception as exc:
        print(f"cost-table fit failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print(f"cost table: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the suite as ``args`` say; the exit status (see the module docstring)."""
    if getattr(args, "action", None) == "import-profile":
        if not args.trace:
            print("calibrate import-profile: error: give the trace file: tiersim calibrate import-profile TRACE",
                  file=sys.stderr)
            return 2
        from calibration.import_profile import run as import_run

        return import_run(args)
    if getattr(args, "list_parts", False):
        return _list_parts()
    if not getattr(args, "out", None):
        print("calibrate: error: --out DIR is required", file=sys.stderr)
        return 2
    from calibration import suite
    from sim.errors import ConfigError

    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else \
        suite.DEFAULT_MODELS
    budget = args.budget_s
    if budget is not None and not budget >= 0:      # (NaN too)
        print(f"calibrate: error: --budget-s {budget:g}: must be >= 0 seconds (0: no budget)", file=sys.stderr)
        return 2
    if budget == 0:
        budget = math.inf
    try:
        parts = suite.resolve_parts(args.parts) if args.parts is not None else None
        summary = suite.run_suite(args.out, parts=parts, quick=args.quick, models=models,
                                  resume=not args.no_resume, progress=lambda m: print(m, flush=True),
                                  budget_s=budget, isolate=False if args.in_process else None)
    except ConfigError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    done, skipped, failed = summary["done"], summary["skipped"], summary["failed"]
    resumed = len(summary.get("resumed", []))
    print(f"calibration: {len(done)} done{f' ({resumed} from earlier runs)' if resumed else ''}, "
          f"{len(skipped)} skipped, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; metadata: {summary['metadata']}")
    status = 0 if summary["ok"] else 1
    if not args.no_fit and done:
        status = max(status, _fit(args.out))
    return status
