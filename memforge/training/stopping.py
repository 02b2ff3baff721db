"""Stopping a run on SIGINT or SIGTERM with a checkpoint, and the exception that reports it.

A cluster scheduler sends SIGTERM some seconds before it kills a job, and Ctrl-C sends SIGINT.
While :func:`memforge.training.train` runs its steps, the first of either signal only asks the
run to stop: the step in progress finishes, a checkpoint is written (atomically, as every
checkpoint), and :func:`~memforge.training.train` raises :class:`TrainingInterrupted`, whose
``exit_status`` is the conventional ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second
signal acts at once, as it would without memforge: the handler that was installed before runs
(SIGINT raises ``KeyboardInterrupt``; SIGTERM's default action ends the process).

Handlers are installed only in the main thread (Python delivers signals there alone) and only for
the duration of the steps; the previous ones are put back afterwards, also when training fails. A
signal that was ignored (``SIG_IGN``, as for background jobs) stays ignored. Under ``torchrun``
every process installs them and the processes agree each step on whether any of them was
signalled (see :meth:`memforge.training.distributed.Distributed.max_int`), so all stop after the
same step and no collective operation is left waiting.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

#: The signals that stop a run gracefully.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a step, with a checkpoint (a ``KeyboardInterrupt``).

    Attributes:
        signal: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
        result: the :class:`~memforge.training.TrainResult` of the session so far.
        checkpoint: the checkpoint written at the stop (or the one the session started from);
            ``None`` if the run stopped before its first step.
        exit_status: ``128 + signal``, the status a shell reports for a process the signal ended.
    """

    def __init__(self, signum: int, result: Any, checkpoint: Path | None) -> None:
        self.signal, self.result, self.checkpoint = signum, result, checkpoint
        where = (f"checkpoint {checkpoint}" if checkpoint is not None
                 else "no checkpoint (nothing was trained)")
        super().__init__(f"training stopped by {signal_name(signum)} after step {result.step} of "
                         f"{result.steps}, {where}; continue with the same settings and resume=True "
                         f"(memforge train ... --resume --out {result.run_dir})")

    @property
    def exit_status(self) -> int:
        """``128 + signal``: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal

    def __str__(self) -> str:
        return str(self.args[0])


Handler = Callable[[int, FrameType | None], Any] | int | None


class StopSignals:
    """A context manager turning the first SIGINT/SIGTERM into a stop request (see the module).

    Attributes:
        requested: the first signal received, or ``None``.
    """

    def __init__(self, *, announce: bool = True) -> None:
        """``announce``: write a line to stderr when a signal arrives (rank 0 only, say)."""
        self.requested: int | None = None
        self._announce = announce
        self._previous: dict[int, Handler] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; nothing to install here
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is None or previous == signal.SIG_IGN:
                continue  # installed outside Python (cannot be put back), or deliberately ignored
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            if self._announce:
                # os.write, not print: a handler may run in the middle of another print.
                os.write(2, (f"\nmemforge: {signal_name(signum)} received; stopping after the "
                             f"current step with a checkpoint (send it again to stop at once)\n"
                             ).encode())
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that our handler is gone
