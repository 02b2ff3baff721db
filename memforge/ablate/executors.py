"""Where a study's runs execute: a pool of local worker processes, or Ray tasks.

Both run the same function, :func:`memforge.ablate.job.run_job`, on the same JSON-able jobs, and
report to a :class:`Monitor` as runs start and end.

* ``local``: at most ``workers`` spawned processes at a time, one per run, each with its share of
  the CPU threads (``workers x threads <= cores``) or, where GPUs exist, its own GPU
  (``CUDA_VISIBLE_DEVICES``). A process per run isolates crashes, resets thread settings and
  hands its memory back. Workers have their own process group, so a terminal's Ctrl-C reaches
  only the study, which then stops them with one SIGTERM each (they checkpoint and exit); a
  study killed outright takes its workers along (they get SIGTERM when it dies).
* ``ray``: Ray tasks with ``num_cpus`` (and ``num_gpus``) per run, on an existing cluster
  (``address``) or on a local one started for the study and shut down after it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Protocol

from memforge.ablate.job import run_job, worker_main, write_result
from memforge.training.rundir import read_json

#: Seconds between progress polls while runs are going.
POLL_S = 0.5
#: Seconds stopped workers get to checkpoint and exit before they are killed.
GRACE_S = 30.0
#: Exit codes of a worker whose run a signal stopped with a checkpoint (worker_main's 128 +
#: signal), or that a SIGINT/SIGTERM ended outright.
_STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
EXECUTORS = ("local", "ray")


class Monitor(Protocol):
    """What an executor tells the study's progress display."""

    def started(self, job: Mapping[str, Any]) -> None:
        """Run ``job`` has started."""

    def finished(self, outcome: Mapping[str, Any]) -> None:
        """A run has ended (its results file is written)."""

    def stopped(self, job: Mapping[str, Any]) -> None:
        """A run was stopped by a signal, with no outcome (it resumes next time)."""

    def poll(self) -> None:
        """Refresh the display (called every :data:`POLL_S` while runs are going)."""


def failed_outcome(job: Mapping[str, Any], error: str) -> dict[str, Any]:
    """The outcome of a run whose worker died before recording one."""
    return {**{key: job[key] for key in ("id", "variant", "seed", "lr", "axes", "params")},
            "status": "failed", "error": error, "tokens_per_s": None, "elapsed_s": None,
            "steps": None, "metrics": [], "spec_id": job["spec_id"], "task": job["task"],
            "fingerprint": job["fingerprint"]}


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a child started inside the block (spawn copies them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _read_outcome(job: Mapping[str, Any], exitcode: int | None) -> dict[str, Any] | None:
    """The run's recorded outcome; ``None`` if it was stopped by a signal (it resumes next time)."""
    path = Path(job["result_path"])
    if path.exists():
        outcome = read_json(path)
        if outcome.get("fingerprint") == job["fingerprint"]:
            return outcome
    if exitcode in _STOPPED:
        return None
    outcome = failed_outcome(job, f"the worker process exited with code {exitcode} before "
                                  f"recording an outcome (killed, or out of memory?)")
    write_result(path, outcome)
    return outcome


def run_local(jobs: Sequence[Mapping[str, Any]], *, workers: int, threads: int,
              gpus: Sequence[str] = (), monitor: Monitor) -> list[dict[str, Any]]:
    """Run ``jobs`` in at most ``workers`` spawned processes at a time; returns their outcomes.

    Each process gets ``threads`` torch threads and, when ``gpus`` are given (one per worker
    slot), its own GPU. Interrupting (Ctrl-C) stops the running workers after a checkpoint;
    their runs resume from it next time.
    """
    context = multiprocessing.get_context("spawn")
    pending = deque(jobs)
    free = list(range(workers))
    running: dict[int, tuple[Any, Mapping[str, Any]]] = {}
    outcomes = []
    try:
        while pending or running:
            while pending and free:
                slot, job = free.pop(0), pending.popleft()
                env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot]
                process = context.Process(target=worker_main, args=(dict(job), threads, os.getpid()),
                                          name=f"memforge-ablate-{job['id']}", daemon=True)
                with _environment(env):
                    process.start()
                running[slot] = (process, job)
                monitor.started(job)
            wait([process.sentinel for process, _ in running.values()], timeout=POLL_S)
            for slot, (process, job) in list(running.items()):
                if process.exitcode is None:
                    continue
                process.join()
                outcome = _read_outcome(job, process.exitcode)
                if outcome is None:
                    monitor.stopped(job)
                else:
                    outcomes.append(outcome)
                    monitor.finished(outcome)
                del running[slot]
                free.append(slot)
            monitor.poll()
    finally:
        _stop_workers([process for process, _ in running.values()])
    return outcomes


def _stop_workers(processes: Sequence[Any]) -> None:
    """Stop running workers: SIGTERM makes each checkpoint after its step and exit; a worker
    still running :data:`GRACE_S` later is killed (it resumes from its last checkpoint)."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.exitcode is None:
            process.kill()
            process.join()


@contextmanager
def ray_cluster(address: str | None, *, local_cpus: int | None) -> Iterator[None]:
    """Connected to Ray for the block: the cluster at ``address``, or a local one started with
    ``local_cpus`` CPUs; shut down (or disconnected) at the end. Refuses before anything runs when
    Ray is missing or the cluster cannot be reached."""
    from memforge.ablate.study import StudyError

    try:
        import ray
    except ImportError:
        raise StudyError("the ray executor needs Ray: pip install 'memforge[ray]' "
                         "(or pass --executor local)") from None
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": logging.WARNING, "configure_logging": False}
    try:
        if address is not None:
            ray.init(address=address, **options)
        else:  # "local": a new cluster of our own, even when one runs on this machine already
            ray.init(address="local", num_cpus=local_cpus, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address is not None else "a local Ray cluster"
        raise StudyError(f"cannot start or join {where}: {str(exc).splitlines()[0]}; check the "
                         f"address (--ray-address auto joins the cluster `ray start --head` "
                         f"started on this machine)") from None
    try:
        yield
    finally:
        ray.shutdown()


def ray_stopped(error: BaseException) -> bool:
    """Whether a Ray task's ``error`` stopped its run rather than ended it: the worker or its node
    was lost, the task was cancelled, or the run was interrupted by a signal (it checkpointed).
    Such a run records no outcome and resumes next time, as a signalled local worker's does."""
    from ray import exceptions

    lost = (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.TaskCancelledError,
            exceptions.RayActorError, exceptions.LocalRayletDiedError)
    cause = getattr(error, "cause", None)  # a RayTaskError carries the task's own exception
    return isinstance(error, (*lost, KeyboardInterrupt)) or isinstance(cause, KeyboardInterrupt)


def run_ray(jobs: Sequence[Mapping[str, Any]], *, workers: int, cpus_per_run: int,
            gpus_per_run: float = 0.0, monitor: Monitor) -> list[dict[str, Any]]:
    """Run ``jobs`` as Ray tasks, at most ``workers`` at a time, inside :func:`ray_cluster`;
    returns their outcomes.

    Outcomes are also written from this process, so results gather here even when the workers
    run on other machines (resuming a run needs its run directory on a file system shared with
    the workers).
    """
    import ray

    task = ray.remote(run_job).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                       max_retries=0)
    pending = deque(jobs)
    inflight: dict[Any, Mapping[str, Any]] = {}
    outcomes = []
    while pending or inflight:
        while pending and len(inflight) < workers:
            job = pending.popleft()
            inflight[task.remote(dict(job), cpus_per_run)] = job
            monitor.started(job)
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
        for ref in done:
            job = inflight.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as exc:
                if ray_stopped(exc):  # like a signalled local worker: it resumes next time
                    monitor.stopped(job)
                    continue
                # Anything else ended this run for good; the run is failed, not the study.
                outcome = failed_outcome(job, f"Ray task failed: {str(exc).splitlines()[0]}")
            write_result(Path(job["result_path"]), outcome)
            outcomes.append(outcome)
            monitor.finished(outcome)
        monitor.poll()
    return outcomes
