"""The evaluation job: score a trained run by context length (and needle depth for S-NIAH).

``evaluate(EvalConfig(source="runs/x", task="s-niah", lengths=(1024, 4096)))`` loads the run's
spec and weights and scores every (length, depth) cell on fixed test batches, reading long
sequences in pieces with the carried state. :func:`write_report` saves ``eval-<task>.json`` and the
heatmap ``eval-<task>.png`` into the run directory; :func:`report_table` renders the numbers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from memforge.builder import build_model
from memforge.errors import NonFiniteError
from memforge.io import load_spec
from memforge.resources import format_bytes
from memforge.spec import ModelSpec
from memforge.training import rundir
from memforge.training.budget import (
    PROBE_BATCH,
    PROBE_TOKENS,
    check_batch_memory,
    check_costs,
    costs_of,
    probe_model,
)
from memforge.training.checkpoint import (
    SPEC,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    run_dir_of,
)
from memforge.training.config import (
    TrainingError,
    as_dict,
    resolve_device,
    resolve_task,
    validate_device,
    validate_mapping,
)
from memforge.training.eval_progress import EvalProgress
from memforge.training.metrics import DEFAULT_PIECE_SIZE, score_batches, task_batches
from memforge.training.plots import plot_heatmap
from memforge.training.progress import DEFAULT_EVERY, clock, say

#: Needle depths of an S-NIAH evaluation unless given.
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        flag = "--" + attribute.name.replace("_", "-")
        raise TrainingError(f"{attribute.name} ({flag}) must be an integer >= 1, got {value!r}")


def _lengths(instance: Any, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    if not isinstance(value, tuple):
        raise TrainingError(f"lengths (--lengths) must be a list of token counts, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise TrainingError(f"lengths (--lengths) must be positive integers, got {bad}; e.g. 1k,4k")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _depths(instance: Any, attribute: attrs.Attribute, value: tuple[float, ...] | None) -> None:
    if value is not None and not isinstance(value, tuple):
        raise TrainingError(f"depths (--depths) must be a list of numbers in [0, 1], got {value!r}")
    bad = [v for v in value or () if not _is_number(v) or not 0 <= v <= 1]
    if bad:
        raise TrainingError(f"depths must lie in [0, 1] (0: first, 1: right before the question), "
                            f"got {bad}")


def _optional_tuple(value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value  # refused by the validator, with its message
    return tuple(value)



@attrs.frozen(kw_only=True)
class EvalConfig:
    """What to evaluate (the CLI's ``memforge eval`` arguments).

    Attributes:
        source: a run directory (its latest checkpoint), a checkpoint directory, or its
            ``model.safetensors``.
        task: task name; default the run's own task.
        task_options: task options; for the run's own task they default to its training options.
        lengths: context lengths to score; default the training length.
        depths: needle depths (S-NIAH only); default 0, 0.25, 0.5, 0.75, 1.
        batches: test batches per cell (a text corpus: at most this many, over its validation
            files).
        batch_size: sequences per batch.
        piece_size: tokens per model call; longer sequences continue from the carried state.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    source: str | os.PathLike[str]
    task: str | None = None
    task_options: Mapping[str, Any] = attrs.field(factory=dict, converter=as_dict,
                                                  validator=validate_mapping, hash=False)
    lengths: tuple[int, ...] = attrs.field(default=(), converter=_optional_tuple,
                                          validator=_lengths)
    depths: tuple[float, ...] | None = attrs.field(default=None, converter=_optional_tuple,
                                                   validator=_depths)
    batches: int = attrs.field(default=4, validator=_positive)
    batch_size: int = attrs.field(default=8, validator=_positive)
    piece_size: int = attrs.field(default=DEFAULT_PIECE_SIZE, validator=_positive)
    device: str = attrs.field(default="auto", validator=validate_device)


@attrs.frozen(kw_only=True)
class EvalReport:
    """The numbers of one evaluation.

    Attributes:
        run_dir: where the evaluated run lives (and the report files go).
        checkpoint: the checkpoint directory evaluated.
        step: its training step.
        task: the task name; ``task_info`` its description at the first length.
        train_length: the sequence length the run trained on (``None`` if unknown).
        metric: the headline metric (``accuracy``; ``bits_per_byte`` for text).
        lengths, depths: the grid (``depths`` is ``None`` for tasks without a needle).
        cells: one dict per (length, depth) with ``length``, ``depth`` and every metric.
    """

    run_dir: Path
    checkpoint: Path
    step: int
    task: str
    task_info: dict[str, Any]
    train_length: int | None
    metric: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...] | None
    cells: list[dict[str, Any]]

    def value(self, length: int, depth: float | None = None, metric: str | None = None) -> float | None:
        """The ``metric`` (default the headline one) of one cell."""
        for cell in self.cells:
            if cell["length"] == length and cell["depth"] == depth:
                return cell.get(metric or self.metric)
        raise KeyError((length, depth))

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "run_dir": str(self.run_dir), "checkpoint": str(self.checkpoint), "step": self.step,
            "task": self.task, "task_info": self.task_info, "train_length": self.train_length,
            "metric": self.metric, "lengths": list(self.lengths),
            "depths": None if self.depths is None else list(self.depths), "cells": self.cells,
        }


_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"512,1k,2k"`` as ``(512, 1024, 2048)``: ``k`` is 1024 tokens, ``m`` 1024**2."""
    lengths = []
    for item in text.split(","):
        match = _LENGTH.match(item)
        if not match:
            raise TrainingError(f"length {item.strip()!r} is not a token count; use e.g. 512, 1k "
                                f"or 2.5k, separated by commas")
        number, unit = float(match[1]), match[2].lower()
        lengths.append(round(number * {"": 1, "k": 1024, "m": 1024**2}[unit]))
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` as ``(0.0, 0.5, 1.0)``."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise TrainingError(f"depths {text!r} must be numbers in [0, 1] separated by commas, "
                            f"e.g. 0,0.25,0.5,0.75,1") from None


def _run_spec(checkpoint: Path, run_dir: Path) -> ModelSpec:
    for path in (checkpoint / SPEC, run_dir / rundir.SPEC_FILE):
        if path.is_file():
            return load_spec(path)
    raise TrainingError(f"no {SPEC} next to {checkpoint} or in {run_dir}; the model cannot be "
                        f"rebuilt without its spec")


def _task_plan(config: EvalConfig, run_task: Mapping[str, Any],
               task_file: Path) -> tuple[str, dict[str, Any]]:
    """The task name and its base options: the run's own (from ``task_file``), when it is the
    run's task."""
    from memforge import tasks

    recorded = run_task.get("task")
    if recorded is not None and not isinstance(recorded, str):
        raise TrainingError(f"{task_file} holds task={recorded!r}, not a task name; the run "
                            f"directory is damaged: restore the file, or pass --task NAME")
    name = config.task or recorded
    if name is None:
        raise TrainingError("the run records no task (no task.json); pass --task NAME")
    try:
        known = tasks.task_options(name)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    options = {k: v for k, v in run_task.items() if k in known} if name == run_task.get("task") else {}
    return name, {**options, **config.task_options}


def evaluate(config: EvalConfig, *, console: Console | None = None,
             progress_every: float = DEFAULT_EVERY) -> EvalReport:
    """Score the run at every length (and depth); everything is checked before scoring.

    With a ``console``, the plan (lengths, cells, estimated time) is printed before scoring and
    then the progress: a bar per cell on a terminal, else a plain line every ``progress_every``
    seconds (see ``memforge.training.eval_progress``).
    """
    checkpoint_dir = find_checkpoint(config.source)
    run_dir = run_dir_of(checkpoint_dir)
    spec = _run_spec(checkpoint_dir, run_dir)
    task_file = run_dir / rundir.TASK_FILE
    run_task = rundir.read_json_object(task_file) if task_file.is_file() else {}
    name, options = _task_plan(config, run_task, task_file)

    probe = resolve_task(name, options, spec)
    has_depth = hasattr(probe, "depth")
    if config.depths is not None and not has_depth:
        raise TrainingError(f"task {name!r} has no needle depth; --depths is for s-niah")
    depths = (config.depths or DEFAULT_DEPTHS) if has_depth else None
    lengths = config.lengths or (probe.seq_len,)
    grid: list[tuple[int, float | None, Any]] = []
    for length in lengths:
        for depth in depths or (None,):
            cell_options = {**options, "seq_len": length, **({"depth": depth} if has_depth else {})}
            try:
                grid.append((length, depth, resolve_task(name, cell_options, spec)))
            except TrainingError as exc:
                raise TrainingError(f"length {length}: {exc}") from None

    check_batch_memory(lengths, config.batch_size, config.batches)
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(checkpoint_dir)
    model = build_model(spec, device)
    load_weights(model, checkpoint)
    probe = probe_model(model, spec.vocab_size, min(config.batch_size, PROBE_BATCH),
                        min(config.piece_size, PROBE_TOKENS), device)
    costs = costs_of(probe, lengths=lengths, cells_per_length=len(depths or (None,)),
                     batch_size=config.batch_size, batches=config.batches,
                     piece_size=config.piece_size, vocab_size=spec.vocab_size)
    check_costs(costs, device)
    if console is not None:
        say(console, f"plan: {name} on {checkpoint_dir} (step {checkpoint.step}), lengths "
                     f"{', '.join(map(str, lengths))}"
                     f"{f' x {len(depths)} depths' if depths else ''} = "
                     f"{_count(len(grid), 'cell')} of {_count(config.batches, 'batch')} of "
                     f"{config.batch_size} sequences, {device}; estimated "
                     f"{_duration(sum(c.seconds for c in costs))}, at least "
                     f"{format_bytes(max(c.bytes for c in costs))} of memory")

    def cell_seconds(length: int) -> float:
        return config.batches * config.batch_size * probe.time.seconds(0, length)

    labels = [(f"length {length}" + (f", depth {depth:g}" if depth is not None else ""),
               cell_seconds(length)) for length, depth, _ in grid]
    byte_level = name == "text"
    cells = []
    with EvalProgress(labels, console=console, every=progress_every) as progress:
        for index, (length, depth, task) in enumerate(grid):
            progress.start_cell(index)
            batches = task_batches(task, config.batch_size, config.batches, split="test")

            def on_piece(start: int, end: int) -> None:
                progress.advance(config.batch_size * probe.time.seconds(start, end))

            try:
                metrics = score_batches(model, batches, vocab_size=spec.vocab_size, device=device,
                                        piece_size=config.piece_size, byte_level=byte_level,
                                        on_piece=on_piece)
            except NonFiniteError as exc:
                # A model that overflows at this length (typically a memory diverging past the
                # training length) is a result to report, not a reason to lose the other cells.
                metrics = {"diverged": str(exc)}
            cells.append({"length": length, "depth": depth, **metrics})
    train_length = run_task.get("seq_len") if run_task.get("task") == name else None
    return EvalReport(
        run_dir=run_dir, checkpoint=checkpoint_dir, step=checkpoint.step, task=name,
        task_info=rundir.plain(grid[0][2].describe()), train_length=train_length,
        metric="bits_per_byte" if byte_level else "accuracy", lengths=tuple(lengths),
        depths=depths, cells=cells,
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 'es' if noun.endswith('ch') else 's'}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else clock(seconds)


def _length_label(report: EvalReport, length: int) -> str:
    beyond = report.train_length is not None and length > report.train_length
    return f"{length}{'*' if beyond else ''}"


def write_report(report: EvalReport, directory: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Save ``eval-<task>.json`` and the heatmap ``eval-<task>.png``; returns both paths."""
    directory = Path(directory) if directory is not None else report.run_dir
    json_path = directory / f"eval-{report.task}.json"
    png_path = directory / f"eval-{report.task}.png"
    rundir.write_json(json_path, rundir.plain(report.to_json()))
    rows = [f"{d:g}" for d in report.depths] if report.depths is not None else [report.metric]
    values = [[report.value(length, depth) for length in report.lengths]
              for depth in (report.depths or (None,))]
    title = f"{report.task} {report.metric}, step {report.step}"
    if report.train_length is not None:
        title += f" (* beyond training length {report.train_length})"
    plot_heatmap(values, rows, [_length_label(report, n) for n in report.lengths], png_path,
                 title=title, xlabel="context length (tokens)",
                 ylabel="needle depth" if report.depths is not None else "",
                 value_range=(0.0, 1.0) if report.metric == "accuracy" else None)
    return json_path, png_path


def _cell_text(report: EvalReport, length: int, depth: float | None) -> str:
    """One table cell: the headline metric, or ``diverged`` where the activations overflowed."""
    cell = next(c for c in report.cells if c["length"] == length and c["depth"] == depth)
    return "diverged" if "diverged" in cell else _fmt(cell.get(report.metric))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report_table(report: EvalReport) -> Table:
    """The report as a rich table: depth x length for S-NIAH, one row per length otherwise."""
    caption = (f"* beyond training length {report.train_length}"
               if report.train_length is not None and max(report.lengths) > report.train_length
               else None)
    title = f"{report.task}: {report.metric} at step {report.step}"
    table = Table(title=title, caption=caption, title_justify="left")
    if report.depths is not None:
        table.add_column("depth \\ length")
        for length in report.lengths:
            table.add_column(_length_label(report, length), justify="right")
        for depth in report.depths:
            table.add_row(f"{depth:g}", *(_cell_text(report, n, depth) for n in report.lengths))
        table.add_row("mean", *(_fmt(_mean([report.value(n, d) for d in report.depths]))
                                for n in report.lengths))
        return table
    columns = [k for k in ("accuracy", "exact_match", "loss", "perplexity", "bits_per_byte", "tokens")
               if any(k in cell for cell in report.cells)]
    table.add_column("length")
    for column in columns:
        table.add_column(column, justify="right")
    for cell in report.cells:
        text = ["diverged", *[""] * (len(columns) - 1)] if "diverged" in cell else [
            _fmt(cell.get(c)) for c in columns]
        table.add_row(_length_label(report, cell["length"]), *text)
    return table


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean, or ``None`` when any value is missing (a diverged cell has no number)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)

