"""``memforge inspect RUN_OR_PRESET``: record the memory while it reads one sequence.

The sequence is one sample of a task (the run's own task and options by default) or a text file
read as bytes. The command writes ``trace.json`` (:mod:`memforge.inspect.export`),
``series.png`` and ``summary.png`` (:mod:`memforge.inspect.plots`) into ``--out`` and prints,
per memory layer, how many query reads retrieved the answer (docs/inspect.md, "Retrieval").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from memforge.cli import add_set_argument, command, print_names
from memforge.training.config import DEVICES, TrainingError

#: Longest text file read by ``--text``, in bytes (one forward, plus the replay of every token).
MAX_TEXT_BYTES = 16384


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_PRESET",
                   help="a run directory (its latest checkpoint), a checkpoint directory, or a "
                        "preset name or spec file (an untrained model)")
    add_set_argument(p)
    read = p.add_mutually_exclusive_group()
    read.add_argument("--task", metavar="NAME",
                      help="mqar, s-niah, babilong-qa1 or text (default: the run's task, or mqar)")
    read.add_argument("--text", metavar="FILE",
                      help="read this file as bytes (a byte-level model: vocab_size >= 256)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. num_pairs=8 (repeatable; the run's own by default)")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="which test sequence of the task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="task stream (and, for a preset, "
                                                       "initialisation) seed (default: 0)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: RUN/inspect/<task>-"
                                                "<sample>, or runs/inspect/<preset>-<task>-<sample>)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="default: %(default)s")


def _run(source: str, assignments: list[str]) -> tuple[Path | None, dict[str, Any], Path | None]:
    """A run's checkpoint, task description and directory (``None, {}, None`` for a preset)."""
    from memforge.training import rundir
    from memforge.training.checkpoint import find_checkpoint, run_dir_of

    path = Path(source)
    if not path.is_dir():
        return None, {}, None
    if assignments:
        raise TrainingError("--set changes a spec, but a run's model is fixed by its "
                            "checkpoint; leave --set out or inspect a preset")
    checkpoint = find_checkpoint(path)
    run_dir = run_dir_of(checkpoint)
    task_file = run_dir / rundir.TASK_FILE
    task = rundir.read_json(task_file) if task_file.is_file() else {}
    return checkpoint, task, run_dir


def _load(source: str, assignments: list[str], checkpoint: Path | None, seed: int,
          device: torch.device) -> Any:
    """The run's model from ``checkpoint``, or the untrained model of a preset or spec file."""
    from memforge.builder import build_model
    from memforge.cli import resolve_spec
    from memforge.saving import load_model

    if checkpoint is not None:
        return load_model(checkpoint, device=device)
    torch.manual_seed(seed)
    return build_model(resolve_spec(source, assignments), device).eval()


def _source_name(source: str) -> str:
    """A preset's name, or a spec file's or path's stem (``titans.mac_tiny`` stays whole)."""
    path = Path(source)
    return path.stem if path.suffix in (".toml", ".json") or path.exists() else source


def _out_dir(args: argparse.Namespace, run_task: dict[str, Any], run_dir: Path | None) -> Path:
    """Where the files go: ``--out``, or a folder named after the source, task and sample."""
    if args.out is not None:
        return Path(args.out)
    name = "text" if args.text is not None else args.task or run_task.get("task") or "mqar"
    if run_dir is not None:
        return run_dir / "inspect" / f"{name}-{args.sample}"
    return Path("runs") / "inspect" / f"{_source_name(args.source)}-{name}-{args.sample}"


def _make_dir(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); the folders created, deepest first.

    Raises TrainingError in one line when it cannot be a folder (a file, a read-only place)."""
    missing = [d for d in (out, *out.parents) if not d.exists()]
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); "
                            f"give a writable folder") from None
    return missing


def _task_sample(args: argparse.Namespace, spec: Any, run_task: dict[str, Any]
                 ) -> tuple[str, dict[str, Any], torch.Tensor, torch.Tensor | None, list[dict[str, Any]]]:
    """``(task name, description, tokens [T], targets [T] or None, queries)``."""
    from memforge import tasks
    from memforge.inspect.retrieval import mqar_queries, needle_queries
    from memforge.tasks.niah import FIRST_DIGIT, MARK
    from memforge.training.config import resolve_task

    if args.text is not None:
        data = Path(args.text)
        if not data.is_file():
            raise TrainingError(f"--text {data}: no such file")
        raw = data.read_bytes()[:MAX_TEXT_BYTES]
        if not raw:
            raise TrainingError(f"--text {data} is empty; give a file with some text")
        if spec.vocab_size < 256:
            raise TrainingError(f"--text reads bytes (ids up to 255), but the model's vocab_size "
                                f"is {spec.vocab_size}; inspect a byte-level model (trained with "
                                f"--task text) or use --task")
        return "text", {"text": str(data), "bytes": len(raw)}, torch.tensor(list(raw)), None, []
    name = args.task or run_task.get("task") or "mqar"
    try:
        known = tasks.task_options(name)
        given = tasks.parse_task_options(args.task_option, task=name)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    base = {k: v for k, v in run_task.items() if k in known} if name == run_task.get("task") else {}
    task = resolve_task(name, {**base, **given}, spec)
    if not 0 <= args.sample < 100_000:
        raise TrainingError(f"--sample must lie in [0, 100000), got {args.sample}")
    batch = task.batch(args.sample + 1, seed=args.seed, split="test")
    tokens, targets = batch.inputs[args.sample], batch.targets[args.sample]
    if name == "mqar":
        queries = mqar_queries(tokens, targets, task.num_pairs)
    elif name == "s-niah":
        start = tokens.tolist().index(MARK)
        digits = list(range(FIRST_DIGIT, FIRST_DIGIT + (16 if task.variant == "uuid" else 10)))
        queries = needle_queries(tokens, targets, (start, start + 2 + task.key_len + task.value_len),
                                 digits)
    else:
        queries = []
    return name, task.describe(), tokens, targets, queries


def _components(spec: Any) -> dict[int, str]:
    """Registry names of each block's memory layer."""
    return {i: choice.impl for i in range(spec.num_layers)
            if (choice := spec.choice("memory_layer", i)) is not None}


@command("inspect", "record the memory while it reads a task sample or a text file", _configure)
def _inspect(args: argparse.Namespace, console: Console) -> int:
    from memforge.inspect.export import trace_json
    from memforge.inspect.plots import plot_series, plot_summary
    from memforge.inspect.recorder import recording
    from memforge.training.config import resolve_device

    device = resolve_device(args.device)
    checkpoint, run_task, run_dir = _run(args.source, args.set)
    out = _out_dir(args, run_task, run_dir)
    created = _make_dir(out)
    try:
        model = _load(args.source, args.set, checkpoint, args.seed, device)
        name, described, tokens, targets, queries = _task_sample(args, model.spec, run_task)
        with torch.no_grad(), recording(model) as trace:
            logits = model(tokens[None].to(device)).logits[0].cpu()
    except BaseException:
        for folder in created:  # leave nothing behind for a refused input
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    content = trace_json(trace, sample=0, tokens=tokens, source=args.source, task=described,
                         queries=queries, components=_components(model.spec), logits=logits,
                         targets=targets)
    (out / "trace.json").write_text(json.dumps(content))
    plot_series(content, out / "series.png")
    plot_summary(content, out / "summary.png")
    if queries:
        rows = []
        for layer in content["layers"]:
            s = layer.get("retrieval", {}).get("summary")
            if s:
                rows.append((layer["module"], f"{s['retrieved']:.0%} of {s['queries']}",
                             f"{s['chance']:.0%}"))
        correct = sum(p["correct"] for p in content["predictions"])
        print_names(console, f"memory reads at the queries (model correct at {correct} of "
                             f"{len(queries)})", ("layer", "retrieved", "chance"), rows)
    for file in ("trace.json", "series.png", "summary.png"):
        console.print(str(out / file), markup=False, highlight=False)
    return 0
