"""Running a part's grid of points: each point isolated, a soft time budget, coarse points first.

A failing point is recorded (its label and error) and the grid goes on; after ``max_consecutive_failures``
failures in a row the rest is skipped (a sticky CUDA error poisons the context, so later points would
fail too). When the budget runs out the remaining points are skipped. Either way every row of the part
says so in ``extra`` (``failed_points``, ``truncated``), and a part whose every point failed raises.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from calibration.raw import PartContext

T = TypeVar("T")


def coarse_first(points: Sequence[T]) -> list[T]:
    """Reorder a sorted grid so that a truncated run still spans it: ends and every 4th point first."""
    n = len(points)
    if n <= 2:
        return list(points)
    order: list[int] = []
    for idx in [0, n - 1] + list(range(0, n, 4)) + list(range(2, n, 4)) + list(range(n)):
        if idx not in order:
            order.append(idx)
    return [points[i] for i in order]


class PointRunner:
    """Runs grid points of one part under its budget and collects rows and failures."""

    def __init__(self, ctx: PartContext, part: str, *, max_consecutive_failures: int = 3,
                 reserve_s: float = 0.0) -> None:
        self.ctx = ctx
        self.part = part
        self.t0 = time.monotonic()
        budget = ctx.budget_s if ctx.budget_s and ctx.budget_s > 0 else math.inf
        self.deadline = self.t0 + max(0.0, budget - reserve_s) if math.isfinite(budget) else math.inf
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.skipped: list[str] = []
        self.truncated = ""
        self.max_consecutive_failures = max_consecutive_failures
        self._consecutive = 0
        self.points_run = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def stopped(self) -> bool:
        """True once the budget is spent or too many points failed in a row."""
        if self.truncated:
            return True
        if time.monotonic() >= self.deadline:
            self.truncated = f"budget of {self.ctx.budget_s:.0f} s spent after {self.elapsed():.1f} s"
            self.ctx.progress(f"{self.part}: {self.truncated}; skipping the remaining points")
        return bool(self.truncated)

    def run(self, label: str, measure: Callable[[], list[dict]]) -> bool:
        """Run one point; its rows are kept, an exception is recorded. False if skipped or failed."""
        if self.stopped():
            self.skipped.append(label)
            return False
        self.points_run += 1
        try:
            rows = measure()
        except Exception as exc:  # one point's failure must not lose the others
            self._consecutive += 1
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.failures.append({"point": label, "error": error})
            self.ctx.progress(f"{self.part}: point {label} failed: {error}")
            if self._consecutive >= self.max_consecutive_failures:
                self.truncated = f"{self._consecutive} consecutive points failed"
                self.ctx.progress(f"{self.part}: {self.truncated}; skipping the remaining points")
            return False
        self._consecutive = 0
        self.rows.extend(rows)
        return True

    def note_skipped(self, label: str, reason: str) -> None:
        """A point not measured on purpose (e.g. too large for memory): recorded, not an error."""
        self.skipped.append(f"{label} ({reason})")

    def finish(self, **extra: object) -> list[dict]:
        """The rows, each annotated with the part-level facts; raises if every point failed."""
        if not self.rows and self.failures:
            first = self.failures[0]
            raise RuntimeError(f"all {len(self.failures)} measured points failed; first "
                               f"{first['point']}: {first['error']}")
        notes: dict[str, object] = dict(extra)
        if self.failures:
            notes["failed_points"] = self.failures
        if self.truncated:
            notes["truncated"] = self.truncated
            notes["points_not_run"] = len(self.skipped)
        if notes:
            annotate(self.rows, **notes)
        return self.rows


def annotate(rows: list[dict], **extra: object) -> None:
    """Merge keys into each row's ``extra`` JSON (existing keys win)."""
    for row in rows:
        merged = dict(extra)
        merged.update(json.loads(row["extra"] or "{}"))
        row["extra"] = json.dumps(merged, sort_keys=True)
