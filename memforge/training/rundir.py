"""The run directory: its files, the check that a resumed run matches, and the metrics log.

::

    <run>/spec.toml      the resolved model spec
    <run>/task.json      the task's description (its options, plus corpus fingerprint for text)
    <run>/run.json       the run settings (steps, lr, seed, ...) and how it was run
    <run>/metrics.jsonl  one JSON object per line: train rows every step, validation rows
    <run>/loss.png       the loss curve
    <run>/checkpoints/   see :mod:`memforge.training.checkpoint`
    <run>/.lock          held while a process trains the run, see :mod:`memforge.training.runlock`
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from memforge.io import atomic_write_bytes, dumps_spec, load_spec
from memforge.spec import ModelSpec, to_dict
from memforge.training.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    DamagedLatestError,
    available,
    is_leftover,
    latest_checkpoint,
    named_checkpoint,
)
from memforge.training.config import RESUMABLE_CHANGES, TrainingError
from memforge.training.runlock import LOCK_FILE

SPEC_FILE = "spec.toml"
TASK_FILE = "task.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    """Parse a JSON file of the run directory; a damaged one is a :class:`TrainingError`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path} cannot be read ({exc}); the run directory is damaged: "
                            f"restore the file, or start a new run with --out DIR") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(what: str, stored: Mapping[str, Any], now: Mapping[str, Any],
                 skip: Iterable[str] = ()) -> list[str]:
    stored, now = _flatten(plain(stored)), _flatten(plain(now))
    missing = object()
    return [
        f"{what} setting {key!r} differs (run: {stored.get(key, '(unset)')!r}, "
        f"now: {now.get(key, '(unset)')!r})"
        for key in sorted(set(stored) | set(now))
        if key not in skip and stored.get(key, missing) != now.get(key, missing)
    ]


def read_json_object(path: Path) -> dict[str, Any]:
    """Like :func:`read_json`, for a file that must hold a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise TrainingError(f"{path} holds a JSON {type(value).__name__}, not an object; the run "
                            f"directory is damaged: restore the file, or start a new run with --out DIR")
    return value


#: The files a run directory holds besides its checkpoints (and the lock, see ``runlock``).
RUN_FILES = frozenset({SPEC_FILE, TASK_FILE, RUN_FILE, METRICS_FILE, LOSS_PLOT, LOCK_FILE})
#: Temporary files ``atomic_write_bytes`` leaves behind for them if killed mid-write.
_RUN_FILE_TMP = re.compile(r"\.(?:" + "|".join(re.escape(n) for n in sorted(RUN_FILES)) +
                           r")\.[0-9a-z_]+\.tmp")


def _is_run_file(path: Path) -> bool:
    """Whether ``path`` is something a run writes before its first checkpoint."""
    if path.is_symlink():
        return False
    if path.name == CHECKPOINTS and path.is_dir():
        return all(is_leftover(child) for child in path.iterdir())
    return path.is_file() and (path.name in RUN_FILES or bool(_RUN_FILE_TMP.fullmatch(path.name)))


def _settings_problems(run_dir: Path, spec: ModelSpec, task_info: Mapping[str, Any],
                       settings: Mapping[str, Any]) -> list[str]:
    """How this run's spec, task and settings differ from those stored in ``run_dir``."""
    problems = []
    if (run_dir / SPEC_FILE).exists():
        problems += _differences("spec", to_dict(load_spec(run_dir / SPEC_FILE)), to_dict(spec))
    if (run_dir / TASK_FILE).exists():
        problems += _differences("task", read_json_object(run_dir / TASK_FILE), task_info)
    if (run_dir / RUN_FILE).exists():
        stored = read_json_object(run_dir / RUN_FILE)
        problems += _differences("run", {k: v for k, v in stored.items() if k in settings},
                                 settings, skip=RESUMABLE_CHANGES)
    return problems


def check_run_dir(
    run_dir: Path, spec: ModelSpec, task_info: Mapping[str, Any], settings: Mapping[str, Any],
    *, resume: bool, resume_from: str | int | os.PathLike[str] | None = None,
) -> Path | None:
    """Check that ``run_dir`` can take this run, writing nothing; the checkpoint to resume from.

    * A new run needs an absent or empty directory.
    * A resumed one needs a checkpoint (the latest, or ``resume_from``) and the very spec, task
      and settings the run was started with (only ``steps`` may change).
    * A directory that holds only a run's own files and no checkpoint (a run stopped before its
      first checkpoint) starts afresh, with or without ``resume``, if the settings are the same:
      nothing in it can be continued, and nothing is lost by starting again, since a run's
      steps are a pure function of its settings; the metrics log and plot are rewritten. Other
      settings are refused like a resume's, so that a mistaken ``--out`` never overwrites
      another run's files; files a run does not write are never overwritten either.

    Returns:
        The checkpoint to continue from, or ``None`` for a fresh start.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run directory {run_dir} is a file; pass another --out")
    entries = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    checkpoint = None
    if entries and resume_from is not None:
        checkpoint = named_checkpoint(run_dir, resume_from)
    elif entries:
        try:
            checkpoint = latest_checkpoint(run_dir)
        except DamagedLatestError as exc:
            if not resume:
                raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue "
                                    f"it, or --out DIR to start a new run elsewhere") from None
            raise CheckpointError(f"{exc.problem}; resume from an earlier checkpoint with --resume "
                                  f"--resume-from NAME (available: {available(run_dir)}), or start "
                                  f"a new run with --out DIR") from None
    if checkpoint is None:
        if resume and not entries:
            raise TrainingError(
                f"nothing to resume: {run_dir} holds no run; pass the run's directory with --out "
                f"(the default directory is named after the model, its spec_id and the task, so "
                f"a changed spec looks elsewhere), or drop --resume to start a new run")
        if resume_from is not None:
            raise TrainingError(f"--resume-from {resume_from}: {run_dir} holds no checkpoint; "
                                f"drop --resume-from to start the run again")
        foreign = [e.name for e in entries if not _is_run_file(e)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise TrainingError(f"{run_dir} is not empty and holds no memforge run ({shown}); "
                                f"pass --out DIR with a new or empty directory")
        problems = _settings_problems(run_dir, spec, task_info, settings)
        if problems:
            raise TrainingError(
                f"cannot restart {run_dir}, a run that stopped before its first checkpoint, with "
                f"changed settings: {'; '.join(problems)}; pass the run's own settings (see its "
                f"{SPEC_FILE}, {TASK_FILE} and {RUN_FILE}), delete the directory, or start a new "
                f"run with --out DIR")
        return None
    if not resume:
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it, "
                            f"or --out DIR to start a new run elsewhere")
    problems = _settings_problems(run_dir, spec, task_info, settings)
    if problems:
        raise TrainingError(f"cannot resume {run_dir} with changed settings: {'; '.join(problems)}; "
                            f"pass the run's own settings (see its {SPEC_FILE}, {TASK_FILE} and "
                            f"{RUN_FILE}), or start a new run with --out DIR")
    return checkpoint


def write_run_files(run_dir: Path, spec: ModelSpec, task_info: Mapping[str, Any],
                    run_info: Mapping[str, Any]) -> None:
    """Create ``run_dir`` and write (or, on resume, refresh) its spec, task and run files.

    Temporary files of these writes that a killed process left behind are removed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if _RUN_FILE_TMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    atomic_write_bytes(run_dir / SPEC_FILE, dumps_spec(spec).encode("utf-8"))
    write_json(run_dir / TASK_FILE, plain(task_info))
    write_json(run_dir / RUN_FILE, plain(run_info))


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics log; a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """The append-only ``metrics.jsonl`` of a run (rank 0 only)."""

    def __init__(self, path: Path, *, keep_until: int | None = None) -> None:
        """Open the log; ``keep_until`` first drops rows past that step (a resumed run redoes them)."""
        self.path = path
        self.rows = read_metrics(path)
        if keep_until is not None:
            self.rows = [row for row in self.rows if row["step"] <= keep_until]
            text = "".join(json.dumps(row) + "\n" for row in self.rows)
            atomic_write_bytes(path, text.encode("utf-8"))
        self._handle: IO[str] = open(path, "a", encoding="utf-8")  # closed in close()

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row and flush it, so a crash loses at most the row being written."""
        self.rows.append(dict(row))
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file."""
        self._handle.close()
