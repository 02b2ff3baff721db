"""One writer per run directory: an exclusive lock on ``<run>/.lock`` while a run trains.

The lock is an ``fcntl.flock`` on the open lock file, so the operating system releases it when the
process ends in any way (``kill -9`` included): a killed run never leaves a stale lock behind, and
the file itself may stay. The holder writes its pid, host, start time and command line into the
file, so a refused second writer can say who holds the directory. The file is never deleted:
removing it would let a third process lock a fresh file while a second still holds the old one.

``flock`` is advisory and local to a machine's kernel; on network file systems it is only as
good as the file system's lock support (NFSv4 and Lustre with ``flock`` mounts provide it).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from memforge.training.config import TrainingError

#: The lock file's name inside a run directory.
LOCK_FILE = ".lock"


def _holder_text(raw: bytes) -> str:
    """Who holds a lock, from its file's contents (tolerating a holder still writing them)."""
    try:
        info = json.loads(raw.decode("utf-8"))
        return (f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that has not written its details yet"


def _command_line() -> str:
    """This process's command line, readable (``python -m memforge ...`` for the module form)."""
    if not sys.argv or not sys.argv[0]:
        return "python"
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


class RunLock:
    """An exclusive lock on a run directory, as a context manager.

    ::

        with RunLock(run_dir):   # creates run_dir if need be; refuses if another process holds it
            ...                  # write the run
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory and lock file if needed), or refuse.

        Raises:
            TrainingError: another process holds the directory; the message names its pid, host
                and command.
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TrainingError(f"cannot write to run directory {self.run_dir} ({exc.strerror}); "
                                f"train in a directory of your own with --out DIR (another "
                                f"user's run can be evaluated, not continued)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 65536, 0))
            os.close(fd)
            raise TrainingError(
                f"run directory {self.run_dir} is in use by another process ({holder}); wait for "
                f"it to finish or stop it (SIGTERM makes it checkpoint and exit), or pass another "
                f"--out") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays; see the module docstring)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
