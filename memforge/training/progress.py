"""The training progress bar: step, loss, tokens per second and time left (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """A context manager showing the bar when ``enabled`` (rank 0 with progress on), else inert."""

    def __init__(self, total: int, start: int, *, enabled: bool, console: Console | None = None,
                 description: str = "train") -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task(description, total=total, completed=start,
                                                 loss="-", speed="-")

    def __enter__(self) -> TrainProgress:
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

    def log(self, message: str) -> None:
        """Print a line above the bar (e.g. a validation result)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
