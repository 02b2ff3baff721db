"""Training progress: a rich bar on a terminal, plain lines at a steady interval elsewhere.

On a terminal the bar shows the step, loss, tokens per second and time left. When the output is
a file or a pipe (a batch job's log), a bar would only write control codes, so a plain line is
printed instead after the first step and then every ``every`` seconds::

    step 120/600 (20%) | loss 2.3412 | 15,870 tokens/s | elapsed 0:01:02 | left 0:04:10

Validation results are printed as lines in both modes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
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

#: Seconds between plain progress lines when the output is not a terminal.
DEFAULT_EVERY = 30.0


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(console: Console, message: str) -> None:
    """Print one plain line (no markup, highlighting or wrapping)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def announce(console: Console, run_dir: Path, plan: Mapping[str, Any]) -> None:
    """Print the run directory and the plan of a run at its start.

    ``plan`` holds ``model``, ``parameters``, ``task``, ``seq_len``, ``steps``, ``batch_size``,
    ``lr``, ``device``, ``processes`` and ``start`` (the step training starts from, with
    ``checkpoint``, the checkpoint it resumes from, when that is not 0).
    """
    say(console, f"run directory: {run_dir}")
    tokens = plan["batch_size"] * plan["seq_len"]
    line = (f"plan: {plan['model']} ({plan['parameters']:,} parameters) on {plan['task']} "
            f"({plan['seq_len']} tokens a sequence), {plan['steps']} steps of {plan['batch_size']} "
            f"sequences ({tokens:,} tokens a step), lr {plan['lr']:g}, {plan['device']}")
    if plan["processes"] > 1:
        line += f" x {plan['processes']} processes"
    say(console, line)
    if plan["start"]:
        say(console, f"resuming at step {plan['start']} from {plan['checkpoint']}")


class TrainProgress:
    """A context manager reporting progress when ``enabled`` (rank 0 with progress on), else inert.

    A rich bar when ``console`` is a terminal; otherwise plain lines after the first step and
    then every ``every`` seconds (see the module docstring).
    """

    def __init__(self, total: int, start: int, *, enabled: bool, console: Console | None = None,
                 description: str = "train", every: float = DEFAULT_EVERY) -> None:
        self._console: Console | None = None
        self._progress: Progress | None = None
        self._total, self._start, self._every = total, start, every
        self._started = 0.0
        self._last: float | None = None
        if not enabled:
            return
        self._console = console or Console()
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._task = self._progress.add_task(description, total=total, completed=start,
                                                 loss="-", speed="-")

    def __enter__(self) -> TrainProgress:
        self._started = time.monotonic()
        self._last = None
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Move to ``step`` and show the latest loss and speed."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}",
                                  speed=f"{tokens_per_s:,.0f}")
            return
        if self._console is None:
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every and step < self._total:
            return
        self._last = now
        elapsed = now - self._started
        done = step - self._start
        left = elapsed / done * (self._total - step) if done > 0 else 0.0
        say(self._console, f"step {step}/{self._total} ({100 * step // self._total}%) | loss "
                           f"{loss:.4f} | {tokens_per_s:,.0f} tokens/s | elapsed {clock(elapsed)} | "
                           f"left {clock(left)}")

    def log(self, message: str) -> None:
        """Print a line (above the bar on a terminal), e.g. a validation result."""
        if self._progress is not None:
            say(self._progress.console, message)
        elif self._console is not None:
            say(self._console, message)
