"""The run directory: its files, the check that a resumed run matches, and the metrics log.

::

    <run>/spec.toml      the resolved model spec
    <run>/task.json      the task's description (its options, plus corpus fingerprint for text)
    <run>/run.json       the run settings (steps, lr, seed, ...) and how it was run
    <run>/metrics.jsonl  one JSON object per line: train rows every step, validation rows
    <run>/loss.png       the loss curve
    <run>/checkpoints/   see :mod:`memforge.training.checkpoint`
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from memforge.io import atomic_write_bytes, dumps_spec, load_spec
from memforge.spec import ModelSpec, to_dict
from memforge.training.checkpoint import latest_checkpoint
from memforge.training.config import RESUMABLE_CHANGES, TrainingError

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
        raise TrainingError(f"{path} cannot be read ({exc}); the run directory is damaged") from None


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


def check_run_dir(
    run_dir: Path, spec: ModelSpec, task_info: Mapping[str, Any], settings: Mapping[str, Any],
    *, resume: bool,
) -> Path | None:
    """Check that ``run_dir`` can take this run, writing nothing; the checkpoint to resume from.

    A new run needs an absent or empty directory; a resumed one needs a checkpoint and the very
    spec, task and settings it was started with (only ``steps`` may change).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run directory {run_dir} is a file; pass another --out")
    holds_run = run_dir.is_dir() and any(run_dir.iterdir())
    if not resume:
        if holds_run:
            raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it, "
                                f"or --out DIR to start a new run elsewhere")
        return None
    if not holds_run:
        raise TrainingError(f"nothing to resume: {run_dir} holds no run; pass the run's directory "
                            f"with --out (the default directory is named after the model, its "
                            f"spec_id and the task, so a changed spec looks elsewhere), or drop "
                            f"--resume to start a new run")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise TrainingError(f"{run_dir} has no checkpoint to resume from (it stopped before its "
                            f"first); delete the directory and start the run again")
    stored_spec = to_dict(load_spec(run_dir / SPEC_FILE))
    problems = [
        *_differences("spec", stored_spec, to_dict(spec)),
        *_differences("task", read_json(run_dir / TASK_FILE), task_info),
        *_differences("run", {k: v for k, v in read_json(run_dir / RUN_FILE).items() if k in settings},
                      settings, skip=RESUMABLE_CHANGES),
    ]
    if problems:
        raise TrainingError(f"cannot resume {run_dir} with changed settings: {'; '.join(problems)}; "
                            f"pass the run's own settings (see its {SPEC_FILE}, {TASK_FILE} and "
                            f"{RUN_FILE}), or start a new run with --out DIR")
    return checkpoint


def write_run_files(run_dir: Path, spec: ModelSpec, task_info: Mapping[str, Any],
                    run_info: Mapping[str, Any]) -> None:
    """Create ``run_dir`` and write (or, on resume, refresh) its spec, task and run files."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
