"""Sub-commands of the training jobs (``train``, ``eval``); registered on import.

Thin layers over :func:`memforge.training.train` and :func:`memforge.training.evaluate.evaluate`:
they turn flags into a config, call the job, and print its report.
"""

from __future__ import annotations

import argparse

import attrs
from rich.console import Console

from memforge.cli import add_set_argument, command
from memforge.training.allocator import keep_freed_memory
from memforge.training.config import (
    DEFAULT_PRESET,
    DEFAULT_TASK,
    DEVICES,
    TrainConfig,
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

_TRAIN = {field.name: field.default for field in attrs.fields(TrainConfig)}
_EVAL = {field.name: field.default for field in attrs.fields(EvalConfig)}


def _add_task_arguments(p: argparse.ArgumentParser, default: str | None, default_help: str) -> None:
    p.add_argument("--task", default=default, metavar="NAME",
                   help=f"mqar, s-niah, babilong-qa1 or text (default: {default_help})")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. num_pairs=16 or paths=docs/ (repeatable)")


def _configure_train(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", metavar="NAME", help=f"preset to train (default: {DEFAULT_PRESET})")
    model.add_argument("--spec", metavar="FILE", help="a .toml/.json spec file to train")
    add_set_argument(p)
    _add_task_arguments(p, DEFAULT_TASK, DEFAULT_TASK)
    p.add_argument("--steps", type=int, default=_TRAIN["steps"],
                   help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_TRAIN["batch_size"],
                   help="sequences per step, all processes together (default: %(default)s)")
    p.add_argument("--lr", type=float, default=_TRAIN["lr"], help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=_TRAIN["warmup_steps"],
                   help="linear warmup steps, at most a fifth of --steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=_TRAIN["weight_decay"],
                   help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--seed", type=int, default=_TRAIN["seed"], help="initialisation and data seed")
    p.add_argument("--eval-every", type=int, default=_TRAIN["eval_every"],
                   help="validate every N steps (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=_TRAIN["eval_batches"],
                   help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--device", choices=DEVICES, default=_TRAIN["device"],
                   help="auto: CUDA when available (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (memory layers compile their chunk step)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<name>-<spec_id>-<task>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its latest checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop with a checkpoint after this step (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("train", "train a model on a task (default: a small model on MQAR, CPU, minutes)",
         _configure_train)
def _train(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()
    config = TrainConfig(
        model=args.spec or args.preset or DEFAULT_PRESET, overrides=args.set, task=args.task,
        task_options=parse_task_options(args.task, args.task_option), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
        device=args.device, compile=args.compile, out=args.out, resume=args.resume,
        stop_after=args.stop_after, progress=not args.no_progress,
    )
    result = train(config, console=console)
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
        console.print(f"stopped early; continue with the same flags plus --resume "
                      f"--out {result.run_dir}", markup=False, highlight=False)
    console.print(f"run directory: {result.run_dir}", markup=False, highlight=False)
    return 0


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


@command("eval", "evaluate a trained run by context length (and needle depth)", _configure_eval)
def _eval(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()
    config = EvalConfig(
        source=args.source, task=args.task, task_options=parse_task_options(args.task, args.task_option),
        lengths=parse_lengths(args.lengths) if args.lengths else (),
        depths=parse_depths(args.depths) if args.depths else None, batches=args.batches,
        batch_size=args.batch_size, piece_size=args.piece_size, device=args.device,
    )
    report = evaluate(config)
    json_path, png_path = write_report(report)
    console.print(report_table(report))
    console.print(f"saved {json_path} and {png_path}", markup=False, highlight=False)
    return 0
