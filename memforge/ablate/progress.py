"""The whole study's progress: a rich progress bar on a terminal, plain lines otherwise.

The bar counts training steps over every run still to do, read from each running run's
``metrics.jsonl`` (so it works the same for local workers and Ray tasks on a shared file system);
a line is printed as each run ends, with its primary metric or its error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Bytes read from the end of a metrics log to find its latest step.
_TAIL = 4096


def current_step(run_dir: Path) -> int:
    """The latest step logged in ``run_dir``'s ``metrics.jsonl`` (0 when there is none)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def headline(outcome: Mapping[str, Any], metric: str) -> str:
    """``"test/accuracy 0.583"``: the outcome's ``metric`` at the training length, if it has it."""
    for entry in outcome.get("metrics", []):
        if entry["name"] == metric and "length" not in entry and "depth" not in entry:
            value = entry["value"]
            return f"{metric} {value:.3f}" if value is not None else f"{metric} diverged"
    return ""


class StudyProgress:
    """A :class:`memforge.ablate.executors.Monitor` that draws the study's progress."""

    def __init__(self, console: Console, jobs: list[Mapping[str, Any]], *, steps: Mapping[str, int],
                 done: Mapping[str, int], primary_metric: str) -> None:
        """``steps``/``done``: each job's total and already-taken steps (resumed runs)."""
        self.console = console
        self.total_runs = len(jobs)
        self.primary_metric = primary_metric
        self.steps = dict(steps)
        self.base = dict(done)
        self.current: dict[str, int] = {}
        self.running: dict[str, Path] = {}
        self.ended = 0
        self.failed = 0
        self.started_at = time.perf_counter()
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("steps"), TextColumn("{task.fields[runs]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("study", total=sum(self.steps.values()),
                                          completed=sum(self.base.values()), runs=self._runs())

    def __enter__(self) -> StudyProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _runs(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.ended}/{self.total_runs} runs ({len(self.running)} running{failed})"

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)
        self.console.file.flush()  # a log file shows each line as it happens

    def started(self, job: Mapping[str, Any]) -> None:
        """Note that ``job`` started."""
        self.running[job["id"]] = Path(job["run_dir"])
        if self.bar is None:
            self._print(f"[{self.ended}/{self.total_runs}] started {job['id']}")

    def finished(self, outcome: Mapping[str, Any]) -> None:
        """Print one line for the ended run."""
        run = outcome["id"]
        self.running.pop(run, None)
        self.ended += 1
        if outcome["status"] == "finished":
            self.current[run] = self.steps.get(run, 0) - self.base.get(run, 0)
            what = headline(outcome, self.primary_metric)
            seconds = outcome.get("elapsed_s") or 0.0
            text = f"finished {run} in {seconds:.0f} s" + (f": {what}" if what else "")
        else:
            self.failed += 1
            text = f"FAILED {run}: {outcome['error']}"
        self._print(f"[{self.ended}/{self.total_runs}] {text}")
        self.poll()

    def stopped(self, job: Mapping[str, Any]) -> None:
        """Print that a run was stopped by a signal (it resumes next time)."""
        self.running.pop(job["id"], None)
        self._print(f"[{self.ended}/{self.total_runs}] stopped {job['id']} (resumes from its "
                    f"checkpoint next time)")

    def poll(self) -> None:
        """Refresh step counts from the running runs' metrics logs."""
        for run, run_dir in self.running.items():
            self.current[run] = max(0, current_step(run_dir) - self.base.get(run, 0))
        if self.bar is not None:
            self.bar.update(self.task, completed=sum(self.base.values()) + sum(self.current.values()),
                            runs=self._runs())
