"""Sub-commands of the training jobs (``train``, ``eval``); registered on import.

Thin layers over :func:`memforge.training.train` and :func:`memforge.training.evaluate.evaluate`:
they turn flags into a config, call the job, and print its report.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
from pathlib import Path

import attrs
from rich.console import Console

from memforge.cli import add_set_argument, command
from memforge.training.allocator import keep_freed_memory
from memforge.training.config import (
    DEFAULT_PRESET,
    DEFAULT_TASK,
    DEVICES,
    TrainConfig,
    TrainingError,
    parse_task_options,
)
from memforge.training.distributed import is_main_process
from memforge.training.evaluate import (
    EvalConfig,
    evaluate,
    parse_depths,
    parse_lengths,
    report_table,
    write_report,
)
from memforge.training.loop import train
from memforge.training.progress import DEFAULT_EVERY
from memforge.training.stopping import TrainingInterrupted, signal_name

_TRAIN = {field.name: field.default for field in attrs.fields(TrainConfig)}
_EVAL = {field.name: field.default for field in attrs.fields(EvalConfig)}


def _add_task_arguments(p: argparse.ArgumentParser, default: str | None,
                        default_help: str) -> list[argparse.Action]:
    return [
        p.add_argument("--task", default=default, metavar="NAME",
                       help=f"mqar, s-niah, babilong-qa1 or text (default: {default_help})"),
        p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a task option, e.g. num_pairs=16 or paths=docs/ (repeatable)"),
    ]


#: The ``train`` options as (dest, flag, kind, default) in the order they are added, for
#: :func:`resume_command`; kind is ``flag``, ``append`` or ``value``.
_TRAIN_OPTIONS: list[tuple[str, str, str, object]] = []


def _recorded(action: argparse.Action) -> argparse.Action:
    kind = "flag" if action.nargs == 0 else "append" if isinstance(action.default, list) else "value"
    _TRAIN_OPTIONS.append((action.dest, action.option_strings[0], kind, action.default))
    return action


def _configure_train(p: argparse.ArgumentParser) -> None:
    _TRAIN_OPTIONS.clear()
    model = p.add_mutually_exclusive_group()
    _recorded(model.add_argument("--preset", metavar="NAME",
                                 help=f"preset to train (default: {DEFAULT_PRESET})"))
    _recorded(model.add_argument("--spec", metavar="FILE", help="a .toml/.json spec file to train"))
    add_set_argument(p)
    _TRAIN_OPTIONS.append(("set", "--set", "append", []))
    for action in _add_task_arguments(p, DEFAULT_TASK, DEFAULT_TASK):
        _recorded(action)

    def add(*flags: str, **options) -> None:
        _recorded(p.add_argument(*flags, **options))

    add("--steps", type=int, default=_TRAIN["steps"], help="optimiser steps (default: %(default)s)")
    add("--batch-size", type=int, default=_TRAIN["batch_size"],
        help="sequences per step, all processes together (default: %(default)s)")
    add("--lr", type=float, default=_TRAIN["lr"], help="peak learning rate (default: %(default)s)")
    add("--warmup", type=int, default=_TRAIN["warmup_steps"],
        help="linear warmup steps, at most a fifth of --steps (default: %(default)s)")
    add("--weight-decay", type=float, default=_TRAIN["weight_decay"],
        help="AdamW weight decay on matrices (default: %(default)s)")
    add("--seed", type=int, default=_TRAIN["seed"], help="initialisation and data seed")
    add("--eval-every", type=int, default=_TRAIN["eval_every"],
        help="validate every N steps (default: %(default)s)")
    add("--eval-batches", type=int, default=_TRAIN["eval_batches"],
        help="validation batches per evaluation (default: %(default)s)")
    add("--checkpoint-every", type=int, default=None,
        help="checkpoint every N steps (default: --eval-every)")
    add("--device", choices=DEVICES, default=_TRAIN["device"],
        help="auto: CUDA when available (default: %(default)s)")
    add("--compile", action="store_true",
        help="torch.compile the training forward (memory layers compile their chunk step)")
    add("--out", metavar="DIR", help="run directory (default: runs/<name>-<spec_id>-<task>)")
    add("--resume", action="store_true",
        help="continue the run in the run directory from its latest checkpoint (a run stopped "
             "before its first checkpoint starts again)")
    add("--resume-from", metavar="CHECKPOINT",
        help="with --resume: continue from this checkpoint of the run instead of the latest "
             "(a name such as step-00000100, a step number, or its directory)")
    add("--stop-after", type=int, metavar="STEP",
        help="stop with a checkpoint after this step (continue later with --resume)")
    add("--no-progress", action="store_true", help="no progress bar or progress lines")
    add("--progress-every", type=float, default=DEFAULT_EVERY, metavar="SECONDS",
        help="seconds between progress lines when the output is not a terminal (default: "
             "%(default)s)")


def resume_command(args: argparse.Namespace, run_dir: Path, *, drop: tuple[str, ...] = ()) -> str:
    """The command that continues this ``memforge train`` invocation's run.

    The flags given (those that differ from their defaults) but those named in ``drop`` (by
    destination, e.g. ``stop_after``), plus ``--resume --out DIR``, quoted for a POSIX shell;
    ``--resume-from`` is dropped too (the run continues from its latest checkpoint).
    """
    words = ["memforge", "train"]
    for dest, flag, kind, default in _TRAIN_OPTIONS:
        value = getattr(args, dest, None)
        if dest in ("out", "resume", "resume_from", *drop) or value is None or value is False:
            continue
        if kind == "flag":
            words.append(flag)
        elif kind == "append":
            for item in value:
                words += [flag, str(item)]
        elif value != default:
            words += [flag, str(value)]
    return shlex.join([*words, "--resume", "--out", str(run_dir)])


@command("train", "train a model on a task (default: a small model on MQAR, CPU, minutes)",
         _configure_train)
def _train(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()
    _check_progress_every(args.progress_every)
    config = TrainConfig(
        model=args.spec or args.preset or DEFAULT_PRESET, overrides=args.set, task=args.task,
        task_options=parse_task_options(args.task, args.task_option), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
        device=args.device, compile=args.compile, out=args.out, resume=args.resume,
        resume_from=args.resume_from, stop_after=args.stop_after, progress=not args.no_progress,
    )
    try:
        result = train(config, console=console, progress_every=args.progress_every)
    except TrainingInterrupted as stopped:
        if is_main_process():
            _print_stop(console, stopped, resume_command(args, stopped.result.run_dir))
        return stopped.exit_status
    if not is_main_process():
        return 0
    metrics = result.metrics
    headline = [f"step {result.step}/{result.steps}"]
    for key in ("accuracy", "loss", "bits_per_byte"):
        if key in metrics:
            headline.append(f"validation {key} {metrics[key]:.4f}")
    headline.append(f"{result.tokens_per_s:,.0f} tokens/s")
    headline.append(f"{result.elapsed_s:.0f} s")
    console.print("[bold]done[/bold]: " + ", ".join(headline), highlight=False)
    if not result.finished:
        command = resume_command(args, result.run_dir, drop=("stop_after",))
        console.print(f"stopped early; continue with: {command}",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"run directory: {result.run_dir}", markup=False, highlight=False)
    return 0


def _check_progress_every(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds <= 0:
        raise TrainingError(f"--progress-every must be a number of seconds > 0, got {seconds}")


def _print_stop(console: Console, stopped: TrainingInterrupted, command: str) -> None:
    """What a run stopped by a signal says: where it stopped and how to continue."""
    result = stopped.result
    where = (f"checkpoint {stopped.checkpoint}" if stopped.checkpoint is not None
             else "no checkpoint yet (it starts again from step 0)")
    lines = [f"stopped by {signal_name(stopped.signal)} after step {result.step}/{result.steps}; "
             f"{where}",
             f"resume with: {command}"]
    if os.environ.get("WORLD_SIZE", "1") != "1":
        lines[-1] += "  (under torchrun, as before)"
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (its latest checkpoint) or a checkpoint directory")
    _add_task_arguments(p, None, "the run's task")
    p.add_argument("--lengths", metavar="N,N,...",
                   help="context lengths, e.g. 1k,2k,4k,8k (default: the training length)")
    p.add_argument("--depths", metavar="D,D,...",
                   help="needle depths in [0, 1] for s-niah (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--batches", type=int, default=_EVAL["batches"],
                   help="test batches per cell (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_EVAL["batch_size"],
                   help="sequences per batch (default: %(default)s)")
    p.add_argument("--piece-size", type=int, default=_EVAL["piece_size"],
                   help="tokens per model call; longer sequences carry the state (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default=_EVAL["device"])
    p.add_argument("--no-progress", action="store_true", help="no plan, progress bar or lines")
    p.add_argument("--progress-every", type=float, default=DEFAULT_EVERY, metavar="SECONDS",
                   help="seconds between progress lines when the output is not a terminal "
                        "(default: %(default)s)")


@command("eval", "evaluate a trained run by context length (and needle depth)", _configure_eval)
def _eval(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()
    _check_progress_every(args.progress_every)
    config = EvalConfig(
        source=args.source, task=args.task, task_options=parse_task_options(args.task, args.task_option),
        lengths=parse_lengths(args.lengths) if args.lengths else (),
        depths=parse_depths(args.depths) if args.depths else None, batches=args.batches,
        batch_size=args.batch_size, piece_size=args.piece_size, device=args.device,
    )
    report = evaluate(config, console=None if args.no_progress else console,
                      progress_every=args.progress_every)
    json_path, png_path = write_report(report)
    console.print(report_table(report))
    console.print(f"saved {json_path} and {png_path}", markup=False, highlight=False)
    return 0
