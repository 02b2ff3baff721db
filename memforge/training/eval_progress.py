"""Evaluation progress: a rich bar per (length, depth) cell on a terminal, plain lines elsewhere.

Progress is counted in the budget's estimated seconds (see ``memforge.training.budget``), not in
tokens: a full-attention token late in a long sequence costs more than an early one, so tokens
would promise too early an end. When the output is not a terminal a plain line is printed after
the first piece, then every ``every`` seconds, and when the last piece is read::

    cell 3/10 (length 65536, depth 0.5) | 37% | elapsed 0:01:02 | left 0:01:45
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from memforge.training.progress import DEFAULT_EVERY, clock, say


class EvalProgress:
    """A context manager reporting the progress of an evaluation's cells, inert without a console.

    ``cells`` holds each cell's label and estimated seconds, in the order they are scored.
    """

    def __init__(self, cells: Sequence[tuple[str, float]], *, console: Console | None,
                 every: float = DEFAULT_EVERY) -> None:
        self._cells = list(cells)
        # A zero estimate (an instant probe) still needs a unit of work per cell to show.
        self._total = sum(max(seconds, 1e-9) for _, seconds in self._cells)
        self._console, self._every = console, every
        self._progress: Progress | None = None
        self._overall: TaskID | None = None
        self._current: TaskID | None = None
        self._cell = -1
        self._done = 0.0
        self._started = 0.0
        self._last: float | None = None
        if console is not None and console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console)

    def __enter__(self) -> EvalProgress:
        self._started = time.monotonic()
        if self._progress is not None:
            self._progress.start()
            self._overall = self._progress.add_task("eval", total=self._total)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_cell(self, index: int) -> None:
        """Begin the ``index``-th cell."""
        self._cell = index
        if self._progress is not None:
            label, seconds = self._cells[index]
            self._current = self._progress.add_task(label, total=max(seconds, 1e-9))

    def advance(self, seconds: float) -> None:
        """Count ``seconds`` of estimated work as done (one piece of the current cell)."""
        self._done += seconds
        if self._progress is not None:
            self._progress.advance(self._overall, seconds)
            self._progress.advance(self._current, seconds)
            return
        if self._console is None:
            return
        now = time.monotonic()
        last_piece = self._done >= self._total * (1 - 1e-9)
        if self._last is not None and now - self._last < self._every and not last_piece:
            return
        self._last = now
        elapsed = now - self._started
        share = min(1.0, self._done / self._total)
        left = elapsed / share * (1 - share) if share > 0 else 0.0
        say(self._console, f"cell {self._cell + 1}/{len(self._cells)} ({self._cells[self._cell][0]}) "
                           f"| {100 * share:.0f}% | elapsed {clock(elapsed)} | left {clock(left)}")
