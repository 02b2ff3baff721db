"""One run of a study, as a worker process or a Ray task does it: train, evaluate, record.

:func:`run_job` takes a plain JSON-able job (made by :mod:`memforge.ablate.runner`) so it travels
to a spawned process or a Ray worker unchanged. The run directory is an ordinary ``memforge train``
run directory; a run interrupted after its first checkpoint resumes from it, one interrupted
before starts again. The outcome is written atomically to the job's results file:
``"finished"`` with its metrics, or ``"failed"`` with a one-line message (a NaN loss, a diverging
model, any error), so one bad run never stops a study. A run stopped by SIGINT or SIGTERM
checkpoints and records no outcome: it is not done, and resumes next time.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The scalar metrics recorded per evaluation (when the evaluator reports them).
METRICS = ("accuracy", "exact_match", "loss", "bits_per_byte")
#: Per-session training record kept in the run directory, so tokens/s survives resumption.
SESSIONS_FILE = "ablate-sessions.json"
_STEP_DIR = re.compile(r"step-(\d+)$")
#: prctl option: the signal the kernel sends this process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type when that says more than the message, then the message."""
    text = "; ".join(line.strip(" -") for line in str(exc).splitlines() if line.strip())
    from memforge.errors import MemforgeError

    if isinstance(exc, MemforgeError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s latest checkpoint, or ``None`` when it has none."""
    from memforge.errors import MemforgeError
    from memforge.training.checkpoint import latest_checkpoint

    try:
        checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    except MemforgeError:  # a damaged pointer: the run itself reports it when it starts
        return None
    match = _STEP_DIR.search(checkpoint.name) if checkpoint is not None else None
    return int(match[1]) if match else None


def _record_session(run_dir: Path, result: Any, start: int, batch_size: int) -> list[dict]:
    """Add this training session (steps, tokens, times) to the run's sessions file."""
    from memforge.training.rundir import read_json, write_json

    tokens = (result.step - start) * batch_size * read_json(run_dir / "task.json").get("seq_len", 0)
    session = {"steps": result.step - start, "tokens": tokens, "elapsed_s": result.elapsed_s,
               "train_s": tokens / result.tokens_per_s if result.tokens_per_s else 0.0}
    path = run_dir / SESSIONS_FILE
    sessions = (read_json(path) if path.exists() else []) + [session]
    write_json(path, sessions)
    return sessions


def _train(job: Mapping[str, Any], run_dir: Path) -> tuple[Any, dict[str, float]]:
    """Train (or resume) the run; returns the result, the throughput over all its sessions and the
    wall time of the earlier sessions."""
    from memforge.spec import from_dict
    from memforge.training import TrainConfig, train
    from memforge.training.stopping import TrainingInterrupted

    # A run directory with files resumes from its checkpoint; one stopped before its first
    # checkpoint starts again (memforge.training does both under resume=True).
    started = run_dir.is_dir() and any(run_dir.iterdir())
    start = checkpoint_step(run_dir) or 0
    config = TrainConfig(model=from_dict(job["spec"]), task=job["task"],
                         task_options=job["task_options"], lr=job["lr"], seed=job["seed"],
                         out=run_dir, resume=started, progress=False, **job["train"])
    try:
        result = train(config)
    except TrainingInterrupted as stopped:
        # Only beside a checkpoint: a run directory without one must hold nothing but run files
        # to start again.
        if stopped.checkpoint is not None and stopped.result.step > start:
            _record_session(run_dir, stopped.result, start, config.batch_size)
        raise
    sessions = _record_session(run_dir, result, start, config.batch_size)
    train_s = sum(s["train_s"] for s in sessions)
    return result, {"tokens_per_s": sum(s["tokens"] for s in sessions) / train_s if train_s else 0.0,
                    "earlier_s": sum(s["elapsed_s"] for s in sessions[:-1])}


def _entry(name: str, value: float | None, length: int | None, depth: float | None,
           diverged: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "value": value}
    if length is not None:
        entry["length"] = length
    if depth is not None:
        entry["depth"] = depth
    if diverged is not None:
        entry["diverged"] = diverged
    return entry


def _evaluate(job: Mapping[str, Any], evaluation: Mapping[str, Any], run_dir: Path) -> list[dict]:
    """The metric entries of one evaluation (see the study directory format in docs/ablation.md)."""
    from memforge.training import EvalConfig, evaluate

    report = evaluate(EvalConfig(
        source=run_dir, task=evaluation["task"], task_options=evaluation["options"],
        lengths=tuple(evaluation["lengths"]),
        depths=None if evaluation["depths"] is None else tuple(evaluation["depths"]),
        batches=evaluation["batches"], batch_size=evaluation["batch_size"],
        device=job["train"].get("device", "auto")))
    by_length = bool(evaluation["lengths"])
    names = [m for m in METRICS if any(m in cell for cell in report.cells)] or [report.metric]
    entries = []
    for cell in report.cells:
        length = cell["length"] if by_length else None
        for metric in names:
            entries.append(_entry(f"{evaluation['name']}/{metric}", cell.get(metric), length,
                                  cell["depth"], cell.get("diverged")))
    if report.depths is not None:
        # The mean over needle depths per length: what "metric against length" plots.
        for length in report.lengths:
            cells = [c for c in report.cells if c["length"] == length]
            for metric in names:
                values = [c.get(metric) for c in cells]
                mean = None if None in values else sum(values) / len(values)
                entries.append(_entry(f"{evaluation['name']}/{metric}", mean,
                                      length if by_length else None, None))
    return entries


def run_job(job: Mapping[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Train and evaluate one planned run and write its results file; returns the outcome.

    ``threads`` caps this process's torch threads (its share of the CPU). Never raises for a
    failing run: the outcome then has ``status = "failed"`` and the one-line ``error``. A run
    stopped by a signal raises :class:`~memforge.training.stopping.TrainingInterrupted` (a
    ``KeyboardInterrupt``) and records no outcome: it is not done, and resumes next time.
    """
    started = time.perf_counter()
    outcome: dict[str, Any] = {
        **{key: job[key] for key in ("id", "variant", "seed", "lr", "axes", "params")},
        "status": "failed", "error": None, "tokens_per_s": None, "elapsed_s": None,
        "steps": None, "metrics": [], "spec_id": job["spec_id"], "task": job["task"],
        "fingerprint": job["fingerprint"],
    }
    run_dir = Path(job["run_dir"])
    try:
        import torch

        from memforge.training.allocator import keep_freed_memory

        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()
        result, throughput = _train(job, run_dir)
        outcome["steps"] = result.step
        outcome["metrics"] = [_entry(f"validation/{m}", float(result.metrics[m]), None, None)
                              for m in METRICS if m in result.metrics]
        for evaluation in job["evaluations"]:
            outcome["metrics"] += _evaluate(job, evaluation, run_dir)
        outcome.update(status="finished", tokens_per_s=throughput["tokens_per_s"],
                       elapsed_s=throughput["earlier_s"] + time.perf_counter() - started)
    except Exception as exc:  # any failure is this run's result, not the study's end
        outcome["error"] = one_line(exc)
        outcome["elapsed_s"] = time.perf_counter() - started
    write_result(Path(job["result_path"]), outcome)
    return outcome


def write_result(path: Path, outcome: Mapping[str, Any]) -> None:
    """Write a results file atomically (a reader never sees half of one)."""
    from memforge.training.rundir import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(outcome))


def _stop_with_parent(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent (pid ``parent``) dies (a killed
    study's workers then checkpoint and exit instead of running on unwatched)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent died before the request took effect: this process was re-parented, to init or
    # to a subreaper (systemd --user, a container's init), so compare pids rather than test for 1.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(job: Mapping[str, Any], threads: int, parent: int | None = None) -> None:
    """Entry point of a local worker process: one run, its outcome in its results file.

    ``parent`` is the pid of the study process that started this one (default: this process's
    parent as it is now); the worker stops if that process is gone.

    A run stopped by SIGINT or SIGTERM checkpoints (see :mod:`memforge.training.stopping`) and
    the process exits with ``128 + signal`` and no outcome, so the run resumes next time.
    """
    from memforge.training.stopping import TrainingInterrupted

    # Its own process group: a terminal's Ctrl-C reaches the study, which stops its workers
    # with one SIGTERM each (a second signal would cut a worker's checkpoint short).
    os.setpgrp()
    _stop_with_parent(os.getppid() if parent is None else parent)
    try:
        run_job(job, threads)
    except TrainingInterrupted as stopped:
        sys.exit(stopped.exit_status)
