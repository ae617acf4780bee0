"""Progress displays for runs and sweeps (``rich``): requests done of the trace's total, simulated time
against the trace's last arrival, elapsed time and an ETA. On a terminal a live bar; otherwise one line
every ``every_s`` seconds (and one at the end), so logs stay short. Nothing here changes results.
"""
from __future__ import annotations

import sys
import time


def _hms(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "-:--:--"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def sim_text(sim_s: float, last_arrival_s: float) -> str:
    """``simulated 1,019 s (last arrival at 438 s)``: the run goes on after the last arrival until
    every request has finished, so simulated time may pass the trace's span."""
    return f"simulated {sim_s:,.0f} s (last arrival at {last_arrival_s:,.0f} s)"


def eta_s(done: float, total: float, elapsed_s: float) -> float | None:
    """Remaining wall time at the rate so far (None until something is done)."""
    if done <= 0 or total <= 0:
        return None
    return max(elapsed_s * (total - done) / done, 0.0)


class RunProgress:
    """The progress callback of one run (``Simulation(progress=...)``); use as a context manager so a
    live bar is closed whatever happens."""

    def __init__(self, stream=None, every_s: float = 10.0, label: str = "run") -> None:
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr)
        self.live = self.console.is_terminal
        self.every_s = every_s
        self.label = label
        self.progress = None
        self.task = None
        self.last = -1e9

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, p) -> None:
        done = p.finished >= p.total
        if self.live:
            if self.progress is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("requests | {task.fields[sim]} |"), TimeElapsedColumn(),
                                         TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                                         transient=False)
                self.progress.start()
                self.task = self.progress.add_task(self.label, total=p.total, sim="")
            self.progress.update(self.task, completed=p.finished, sim=sim_text(p.sim_time_s, p.trace_span_s))
            if done:
                self.progress.stop()
                self.progress = None
            return
        if not done and (p.wall_s < 1.0 or p.wall_s - self.last < self.every_s):
            return
        self.last = p.wall_s
        frac = p.finished / p.total if p.total else 1.0
        self.console.print(f"{self.label}: {p.finished:,}/{p.total:,} requests ({100 * frac:.1f} %) | "
                           f"{sim_text(p.sim_time_s, p.trace_span_s)} | elapsed {_hms(p.wall_s)}, "
                           f"ETA {_hms(0.0 if done else eta_s(p.finished, p.total, p.wall_s))}",
                           highlight=False, soft_wrap=True)


class SweepProgress:
    """Runs done of the sweep's total with an ETA, and each running run's requests and simulated time."""

    def __init__(self, stream=None, every_s: float = 10.0) -> None:
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr)
        self.live = self.console.is_terminal
        self.every_s = every_s
        self.progress = None
        self.overall = None
        self.tasks: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.total = 0
        self.done = 0
        self.skipped = 0
        self.last_line = -1e9

    def start(self, total: int, already_done: int) -> None:
        self.total, self.skipped, self.done = total, already_done, already_done
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.overall = self.progress.add_task("sweep runs", total=total, completed=already_done, info="")
        else:
            self.console.print(f"sweep: {total} runs, {already_done} already done", highlight=False)

    def note(self, text: str) -> None:
        """A line above the bars (a point of the sweep that will not run, and why)."""
        (self.progress.console if self.progress is not None else self.console).print(text, highlight=False)

    def run_update(self, key: str, finished: int, total: int, sim_s: float, last_arrival_s: float) -> None:
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"  {key}", total=total, info="")
        self.progress.update(self.tasks[key], completed=finished, total=total,
                             info=f"requests | {sim_text(sim_s, last_arrival_s)}")

    def run_finished(self, key: str, status: str, wall_s: float | None = None) -> None:
        self.done += 1
        if self.progress is not None:
            if key in self.tasks:
                self.progress.remove_task(self.tasks.pop(key))
            self.progress.update(self.overall, completed=self.done)
            if status != "done":
                self.progress.console.print(f"{key}: {status}", highlight=False)
            return
        elapsed = time.perf_counter() - self.t0
        eta = eta_s(self.done - self.skipped, self.total - self.skipped, elapsed)
        self.console.print(f"[{self.done}/{self.total}] {key}: {status}"
                           + (f" ({wall_s:.1f} s)" if wall_s is not None else "")
                           + f" | elapsed {_hms(elapsed)}, ETA {_hms(eta if self.done < self.total else 0.0)}",
                           highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
