"""Metrics: the step log (columns declared once in ``columns``), token times and inter-token
statistics (``tokens``), per-request outcomes (``requests``), and the summary and results directory
(``summary``). Memory stays bounded by active work, not by the length of the trace."""
from sim.metrics.columns import FREE_COLUMNS, INT_COLUMNS, STEP_COLUMNS, step_schema
from sim.metrics.requests import REASON_CODE, REJECT_REASONS, RequestLog
from sim.metrics.step_log import StepLog, fill_run_rows
from sim.metrics.summary import Results, build_results, spill_dir
from sim.metrics.tokens import TokenLog, itl_statistics

__all__ = ["FREE_COLUMNS", "INT_COLUMNS", "STEP_COLUMNS", "step_schema", "REASON_CODE", "REJECT_REASONS",
           "RequestLog", "StepLog", "fill_run_rows", "Results", "build_results", "spill_dir", "TokenLog",
           "itl_statistics"]
