"""The ``memforge ablate`` command: run a study file, or report a study directory.

::

    memforge ablate STUDY.toml [--out DIR] [--workers N] [--executor local|ray]
                    [--ray-address ADDR] [--cpus-per-run N] [--dry-run] [--retry-failed]
    memforge ablate report DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from memforge.ablate.executors import EXECUTORS
from memforge.ablate.runner import (
    PLAN_FILE,
    Resources,
    cpu_cores,
    estimate_time,
    local_resources,
    plan_study,
    run_study,
    show_plan,
)
from memforge.ablate.study import StudyError
from memforge.cli import command

_USAGE = "STUDY.toml | report DIR"


def _configure(p: argparse.ArgumentParser) -> None:
    p.usage = ("memforge ablate STUDY.toml [--out DIR] [--workers N] [--executor local|ray] "
               "[--ray-address ADDR] [--cpus-per-run N] [--dry-run] [--retry-failed] [--no-report]"
               "\n       memforge ablate report DIR")
    p.add_argument("target", nargs="+", metavar="STUDY.toml",
                   help="a study file to run (or: report DIR, to write a study directory's report)")
    p.add_argument("--out", metavar="DIR",
                   help="study directory (default: runs/studies/<study name>)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="runs at a time (local default: 1, or one per GPU; each worker gets "
                        "cores/N threads)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local worker processes, or Ray tasks (pip install 'memforge[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (default: start a local one for the study)")
    p.add_argument("--cpus-per-run", type=int, metavar="N",
                   help="Ray: CPUs (and torch threads) per run (default: cores/workers locally, "
                        "1 on a cluster)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the study and show the plan and time estimate; run nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the runs recorded as failed (default: keep their outcome)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise StudyError(f"{flag} must be >= 1, got {value}")


def _ray_resources(args: argparse.Namespace, jobs: int) -> Resources:
    if args.ray_address is None:
        workers = args.workers or 1
        threads = args.cpus_per_run or max(1, cpu_cores() // workers)
        return Resources(workers=workers, threads=threads)
    # On a cluster, Ray places tasks by their CPU request; --workers only caps them.
    return Resources(workers=args.workers or max(1, jobs), threads=args.cpus_per_run or 1)


@command("ablate", "run an ablation study file (memforge ablate report DIR: its report)", _configure)
def _ablate(args: argparse.Namespace, console: Console) -> int:
    target = args.target
    if target[0] == "report":
        if len(target) != 2:
            raise StudyError("usage: memforge ablate report DIR (one study directory)")
        return _report(Path(target[1]), console)
    if len(target) != 1:
        raise StudyError(f"expected one study file, got {len(target)} arguments; usage: "
                         f"memforge ablate {_USAGE}")
    _positive(args.workers, "--workers")
    _positive(args.cpus_per_run, "--cpus-per-run")
    if args.ray_address is not None and args.executor != "ray":
        raise StudyError("--ray-address is for --executor ray; add --executor ray")
    if args.cpus_per_run is not None and args.executor != "ray":
        raise StudyError("--cpus-per-run is for --executor ray; the local executor gives each "
                         "worker cores/--workers threads")
    plan = plan_study(target[0], args.out, retry_failed=args.retry_failed)
    if args.executor == "ray":
        resources = _ray_resources(args, len(plan.todo))
    else:
        resources = local_resources(args.workers, plan.study.train.get("device", "auto"))
    estimate = estimate_time(plan, resources) if plan.todo else None
    show_plan(plan, console, resources=resources, estimate=estimate)
    if args.dry_run:
        return 0
    if not plan.todo:
        console.print("nothing to do: every run of the study has its outcome", highlight=False)
    summary = run_study(plan, console=console, executor=args.executor, resources=resources,
                        ray_address=args.ray_address)
    finished = len(summary.outcomes) - len(summary.failed)
    console.print(f"study {plan.study.name}: {finished} runs finished, {len(summary.failed)} "
                  f"failed; results in {summary.directory}", markup=False, highlight=False)
    for run in summary.failed:
        console.print(f"  failed {run}: {summary.outcomes[run]['error']}", markup=False,
                      highlight=False)
    if not args.no_report:
        _report(summary.directory, console, required=False)
    return 1 if summary.failed else 0


def _report(directory: Path, console: Console, *, required: bool = True) -> int:
    """Write the study's report (``memforge.ablate.report.write_report``) and list its files."""
    if not (directory / PLAN_FILE).is_file():
        raise StudyError(f"{directory} is not a study directory (no {PLAN_FILE}); pass the "
                         f"directory `memforge ablate STUDY.toml` wrote (--out)")
    try:
        from memforge.ablate.report import write_report
    except ImportError:
        if not required:
            console.print("no report: this memforge has no memforge.ablate.report", highlight=False)
            return 0
        raise StudyError("this memforge has no study report (memforge.ablate.report is "
                         "missing)") from None
    for path in write_report(directory, console=console):
        console.print(f"wrote {path}", markup=False, highlight=False)
    return 0
