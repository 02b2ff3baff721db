"""Running a study: plan it, show the plan, run what is missing, record every outcome.

::

    plan = plan_study("examples/studies/titans_table5.toml", out="runs/studies/t5")
    show_plan(plan, console, workers=2, threads=1)
    summary = run_study(plan, executor="local", workers=2, console=console)

The study directory (``docs/ablation.md`` describes it in full)::

    STUDY_DIR/study.toml            a copy of the study file
    STUDY_DIR/plan.json             every run, written before any run starts
    STUDY_DIR/runs/<id>/            an ordinary ``memforge train`` run directory
    STUDY_DIR/results/<id>.json     each run's outcome, written atomically when it ends

A run whose results file says it finished (with the same settings) is skipped; a run directory
with a checkpoint resumes from it; so a finished study re-run does no work and an interrupted one
loses at most the steps since each run's last checkpoint.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from memforge.ablate.job import checkpoint_step
from memforge.ablate.study import PlannedRun, Study, StudyError, expand, load_study
from memforge.training.config import TrainConfig
from memforge.training.rundir import read_json, write_json
from memforge.training.runlock import RunLock

PLAN_FILE = "plan.json"
STUDY_FILE = "study.toml"
RESULTS_DIR = "results"
RUNS_DIR = "runs"
#: Where studies go unless ``out`` names a directory: ``runs/studies/<study name>``.
DEFAULT_STUDIES_ROOT = Path("runs") / "studies"
PLAN_SCHEMA = 1
_DEFAULT_STEPS = attrs.fields(TrainConfig).steps.default


@attrs.frozen(kw_only=True)
class StudyPlan:
    """An expanded study and what its directory already holds.

    Attributes:
        study: the parsed study; ``runs`` every planned run, in order.
        directory: the study directory.
        jobs: one JSON-able job per run (what a worker receives), by run id.
        outcomes: the recorded outcomes of runs that need no work, by run id.
        todo: ids of the runs still to do, in plan order.
        done_steps: steps already taken by runs that will resume, by run id.
        retry_failed: whether runs recorded as failed are to do again.
    """

    study: Study
    directory: Path
    runs: list[PlannedRun]
    jobs: dict[str, dict[str, Any]]
    outcomes: dict[str, dict[str, Any]]
    todo: list[str]
    done_steps: dict[str, int]
    retry_failed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``plan.json`` document."""
        study = self.study
        selection = attrs.asdict(study.selection) if study.selection is not None else None
        return {
            "schema": PLAN_SCHEMA, "name": study.name, "description": study.description,
            "baseline": study.baseline, "primary_metric": study.primary_metric,
            "selection": selection, "axes": [axis for axis, _ in study.grid],
            "variants": [{"name": v.name, "description": v.description} for v in study.variants],
            "seeds": list(study.seeds), "task": study.task, "task_options": dict(study.task_options),
            "train": dict(study.train), "evaluations": [e.to_json() for e in study.evaluations],
            "runs": [{"id": run.id, "variant": run.variant, "seed": run.seed, "lr": run.lr,
                      "axes": dict(run.axes), "params": run.params, "dir": run.dir,
                      "spec_id": self.jobs[run.id]["spec_id"], "fingerprint": run.fingerprint}
                     for run in self.runs],
        }


def _job(study: Study, run: PlannedRun, directory: Path) -> dict[str, Any]:
    from memforge.spec import spec_id, to_dict

    return {
        "id": run.id, "variant": run.variant, "seed": run.seed, "lr": run.lr,
        "axes": dict(run.axes), "params": run.params, "spec": to_dict(run.spec),
        "spec_id": spec_id(run.spec), "task": study.task, "task_options": dict(run.task_options),
        "train": dict(study.train), "evaluations": [e.to_json() for e in study.evaluations],
        "fingerprint": run.fingerprint, "run_dir": str((directory / run.dir).resolve()),
        "result_path": str((directory / RESULTS_DIR / f"{run.id}.json").resolve()),
    }


def _check_same_study(directory: Path, runs: list[PlannedRun]) -> None:
    """Refuse a directory whose runs were made with other settings under the same ids."""
    recorded: dict[str, str | None] = {}
    if (directory / PLAN_FILE).is_file():
        recorded = {r["id"]: r.get("fingerprint") for r in read_json(directory / PLAN_FILE)["runs"]}
    for run in runs:
        result = directory / RESULTS_DIR / f"{run.id}.json"
        if run.id not in recorded and result.is_file():
            recorded[run.id] = read_json(result).get("fingerprint")
    changed = [run.id for run in runs if run.id in recorded and recorded[run.id] != run.fingerprint]
    if changed:
        raise StudyError(
            f"{directory} holds runs made with other settings under the same ids ({len(changed)} "
            f"runs, e.g. {changed[0]}): the study file changed since; pass --out NEW_DIR for the "
            f"new study, or delete the changed runs' runs/<id> and results/<id>.json")


def plan_study(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               retry_failed: bool = False) -> StudyPlan:
    """Parse, validate and expand the study at ``path`` and see what ``out`` already holds.

    Writes nothing. Finished runs need no work; failed ones neither unless ``retry_failed``.
    """
    study = load_study(path)
    runs = expand(study)
    directory = Path(out) if out is not None else DEFAULT_STUDIES_ROOT / study.name
    if directory.exists() and not directory.is_dir():
        raise StudyError(f"study directory {directory} is a file; pass another --out")
    return _survey(study, runs, directory, retry_failed=retry_failed)


def _survey(study: Study, runs: list[PlannedRun], directory: Path, *,
            retry_failed: bool) -> StudyPlan:
    """The plan of ``runs`` given what ``directory`` holds now: which runs are done, which resume."""
    _check_same_study(directory, runs)
    jobs = {run.id: _job(study, run, directory) for run in runs}
    outcomes, todo, done_steps = {}, [], {}
    for run in runs:
        result = Path(jobs[run.id]["result_path"])
        outcome = read_json(result) if result.is_file() else None
        if outcome is not None and (outcome["status"] == "finished" or not retry_failed):
            outcomes[run.id] = outcome
            continue
        todo.append(run.id)
        step = checkpoint_step(directory / run.dir)
        if step:
            done_steps[run.id] = step
    return StudyPlan(study=study, directory=directory, runs=runs, jobs=jobs, outcomes=outcomes,
                     todo=todo, done_steps=done_steps, retry_failed=retry_failed)


def write_plan(plan: StudyPlan) -> None:
    """Create the study directory with its copy of the study file and ``plan.json``."""
    (plan.directory / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    (plan.directory / RUNS_DIR).mkdir(exist_ok=True)
    (plan.directory / STUDY_FILE).write_bytes(plan.study.path.read_bytes())
    write_json(plan.directory / PLAN_FILE, plan.to_json())


def cpu_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@attrs.frozen(kw_only=True)
class Resources:
    """How the runs share the machine: concurrent ``workers``, ``threads`` each, their GPUs."""

    workers: int
    threads: int
    gpus: tuple[str, ...] = ()


def local_resources(workers: int | None, device: str) -> Resources:
    """Worker count, threads per worker and GPUs for the local executor (no oversubscription)."""
    import torch

    cores = cpu_cores()
    if device != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        workers = workers or count
        if workers > count:
            raise StudyError(f"--workers {workers} but there are {count} GPUs; pass --workers "
                             f"{count} or fewer (one GPU per worker)")
        return Resources(workers=workers, threads=max(1, cores // workers),
                         gpus=tuple(str(i) for i in range(workers)))
    workers = workers or 1
    if workers > cores:
        raise StudyError(f"--workers {workers} but this machine has {cores} CPU cores; pass "
                         f"--workers {cores} or fewer (each worker needs at least one core)")
    return Resources(workers=workers, threads=max(1, cores // workers))


def show_plan(plan: StudyPlan, console: Console, *, resources: Resources,
              estimate: tuple[float, float] | None) -> None:
    """Print the plan: runs per variant with parameter counts, what is done, the time estimate."""
    study = plan.study
    table = Table(title=f"study {study.name}: {len(plan.runs)} runs", title_justify="left")
    for column, justify in (("variant", "left"), ("parameters", "right"), ("runs", "right"),
                            ("done", "right"), ("to do", "right")):
        table.add_column(column, justify=justify)
    todo = set(plan.todo)
    for variant in study.variants:
        runs = [run for run in plan.runs if run.variant == variant.name]
        params = sorted({run.params for run in runs})
        shown = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,} to {params[-1]:,}"
        name = variant.name + (" (baseline)" if variant.name == study.baseline else "")
        left = sum(run.id in todo for run in runs)
        table.add_row(name, shown, str(len(runs)), str(len(runs) - left), str(left))
    console.print(table)
    lines = [f"task {study.task}, {study.train.get('steps', _DEFAULT_STEPS)} steps, seeds "
             f"{', '.join(map(str, study.seeds))}"]
    if study.grid:
        lines.append("grid: " + "; ".join(f"{axis} in {list(values)}" for axis, values in study.grid))
    if study.selection is not None:
        lines.append(f"learning rate per variant: the best mean {study.selection.metric} "
                     f"({study.selection.mode}) over seeds")
    lines.append("evaluations: " + ", ".join(
        e.name + (f" at {list(e.lengths)}" if e.lengths else "") for e in study.evaluations))
    resumed = f", {len(plan.done_steps)} resuming" if plan.done_steps else ""
    lines.append(f"{len(plan.todo)} runs to do{resumed}, {resources.workers} workers x "
                 f"{resources.threads} threads" + (f", GPUs {','.join(resources.gpus)}"
                                                   if resources.gpus else ""))
    if estimate is not None:
        total, wall = estimate
        lines.append(f"estimated time: about {_minutes(wall)} ({_minutes(total)} of runs), "
                     f"from a short calibration of each model")
    lines.append(f"study directory: {plan.directory}")
    for line in lines:
        console.print(line, markup=False, highlight=False)


def _minutes(seconds: float) -> str:
    """A duration as seconds, minutes, or (over two hours) hours."""
    if seconds > 120 * 60:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def estimate_time(plan: StudyPlan, resources: Resources) -> tuple[float, float]:
    """(total, wall) seconds for the runs still to do, from a short calibration."""
    from memforge.ablate.calibrate import estimate

    return estimate([plan.jobs[run] for run in plan.todo], workers=resources.workers,
                    threads=resources.threads, done_steps=plan.done_steps)


@attrs.frozen(kw_only=True)
class StudySummary:
    """How a study ended: every run's outcome, by run id (in plan order)."""

    directory: Path
    outcomes: dict[str, dict[str, Any]]

    @property
    def failed(self) -> list[str]:
        """Ids of the failed runs."""
        return [run for run, outcome in self.outcomes.items() if outcome["status"] != "finished"]


def run_study(plan: StudyPlan, *, console: Console, executor: str = "local",
              resources: Resources, ray_address: str | None = None) -> StudySummary:
    """Write the plan, then run every run still to do; returns all outcomes.

    ``resources`` come from :func:`local_resources` for ``local``; for ``ray`` its ``workers``
    caps the tasks in flight and its ``threads`` is each task's ``num_cpus``. Refused while
    another process runs a study in the same directory. What is still to do is planned again
    under the study's lock, since the directory may have changed since ``plan`` was made.
    """

    from memforge.ablate.executors import ray_cluster

    with ExitStack() as stack:
        # One study process per directory, locked before anything is read, written or started:
        # a second one would delete and re-run the results of the runs the first is running.
        stack.enter_context(RunLock(plan.directory))
        plan = _survey(plan.study, plan.runs, plan.directory, retry_failed=plan.retry_failed)
        if plan.todo and executor == "ray":
            stack.enter_context(ray_cluster(
                ray_address, local_cpus=resources.workers * resources.threads))
        return _run_study(plan, console=console, executor=executor, resources=resources)


def _run_study(plan: StudyPlan, *, console: Console, executor: str,
               resources: Resources) -> StudySummary:
    from memforge.ablate.executors import run_local, run_ray
    from memforge.ablate.progress import StudyProgress

    write_plan(plan)
    jobs = [plan.jobs[run] for run in plan.todo]
    for job in jobs:  # a failed outcome being retried must not be mistaken for the new one
        Path(job["result_path"]).unlink(missing_ok=True)
    steps = {job["id"]: job["train"].get("steps", _DEFAULT_STEPS) for job in jobs}
    progress = StudyProgress(console, jobs, steps=steps, done=plan.done_steps,
                             primary_metric=plan.study.primary_metric)
    with progress:
        if jobs and executor == "local":
            run_local(jobs, workers=resources.workers, threads=resources.threads,
                      gpus=resources.gpus, monitor=progress)
        elif jobs:
            device = plan.study.train.get("device", "auto")
            run_ray(jobs, workers=resources.workers, cpus_per_run=resources.threads,
                    gpus_per_run=1.0 if device == "cuda" else 0.0, monitor=progress)
    outcomes = {}
    for run in plan.runs:
        path = Path(plan.jobs[run.id]["result_path"])
        if path.is_file():
            outcomes[run.id] = read_json(path)
    return StudySummary(directory=plan.directory, outcomes=outcomes)
