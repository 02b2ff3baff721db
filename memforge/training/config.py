"""What a training run is: :class:`TrainConfig`, and resolving its spec and task up front.

Everything a run needs is validated here, before any file is written, so a mistake never leaves a
half-made run directory behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from memforge.errors import MemforgeError, unknown_name_message
from memforge.spec import ModelSpec, spec_id

#: The preset ``memforge train`` uses when given none.
DEFAULT_PRESET = "titans.lmm"
#: The task ``memforge train`` uses when given none.
DEFAULT_TASK = "mqar"
#: Task options used unless given (``vocab_size`` otherwise defaults to the model's). MQAR with a
#: small vocabulary and few pairs: a small model learns the recall itself (well past the 1/4 of
#: guessing a value seen in context) within the default steps on a CPU.
#: Measured on a 2-core CPU with 2 threads: ``titans.lmm`` reaches 58% test accuracy after the
#: default 600 steps in 2.6 minutes; the attention baselines still sit at the guessing level then.
DEFAULT_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "mqar": {"vocab_size": 64, "seq_len": 64, "num_pairs": 4},
}
#: Where run directories go unless ``out`` names one.
DEFAULT_RUNS_ROOT = "runs"
DEVICES = ("auto", "cpu", "cuda")


class TrainingError(MemforgeError, ValueError):
    """A training or evaluation setting, run directory or checkpoint that cannot be used."""


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


#: The CLI flag of each setting that has one, so that messages name what the user typed.
FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup_steps": "--warmup",
         "weight_decay": "--weight-decay", "seed": "--seed", "eval_every": "--eval-every",
         "eval_batches": "--eval-batches", "checkpoint_every": "--checkpoint-every",
         "stop_after": "--stop-after", "overrides": "--set", "task": "--task",
         "task_options": "--task-option"}

#: The largest peak learning rate accepted. AdamW's step is about ``lr`` per weight whatever the
#: gradient's scale, so at 1 every weight moves by about 1 per step and training diverges; the
#: usual peaks lie between 1e-4 and 1e-2.
MAX_LR = 1.0
#: The most sequences per step: beyond it a step's token and activation tensors outgrow any
#: machine memforge runs on.
MAX_BATCH_SIZE = 65536
#: ``torch.manual_seed`` takes seeds below 2**64; memforge keeps them to 63 bits.
MAX_SEED = 2**63 - 1


def _name(attribute: attrs.Attribute) -> str:
    flag = FLAGS.get(attribute.name)
    return f"{attribute.name} ({flag})" if flag else attribute.name


def _integer(low: int, high: int | None = None) -> Validator:
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainingError(f"{_name(attribute)} must be an integer {allowed}, got {value!r}")
        if value < low or (high is not None and value > high):
            raise TrainingError(f"{_name(attribute)} must be {allowed}, got {value}")

    return validate


def _number(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, hint: str = "") -> Validator:
    """A finite real number in the interval; ``hint`` follows the message (the usual values)."""
    allowed = (("(" if low_open else "[") + f"{low:g}, " + ("inf)" if high is None else
               f"{high:g}" + (")" if high_open else "]")))

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (
                high is None or (value < high if high_open else value <= high))
        if not ok:
            raise TrainingError(f"{_name(attribute)} must be a finite number in {allowed}, got "
                                f"{value!r}{hint}")

    return validate


def _optional(validator: Validator) -> Validator:
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            validator(instance, attribute, value)

    return validate


def _betas(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(
        not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in value)
    if not ok:
        raise TrainingError(f"betas must be two numbers in [0, 1) (AdamW's moment decay rates), "
                            f"got {value!r}; the default is (0.9, 0.95)")


def _as_tuple(value: Any) -> Any:
    # A string is iterable but never a list of overrides: leave it for the validator to refuse.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value
    return tuple(value)


def _strings(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise TrainingError(f"{_name(attribute)} must be a list of 'key=value' strings, got "
                            f"{value!r}; e.g. ['memory.depth=3']")


def as_dict(value: Any) -> Any:
    """attrs converter: a mapping as a dict; anything else unchanged, for :func:`validate_mapping`."""
    return dict(value) if isinstance(value, Mapping) else value


def validate_mapping(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``value`` is a dict (of task options)."""
    if not isinstance(value, dict):
        raise TrainingError(f"{_name(attribute)} must be a mapping of option names to values, got "
                            f"{type(value).__name__}; e.g. {{'num_pairs': 8}}")


def _string(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise TrainingError(f"{_name(attribute)} must be a name, got {type(value).__name__} {value!r}")


def validate_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``value`` is one of :data:`DEVICES`."""
    if value not in DEVICES:
        raise TrainingError(unknown_name_message("device", str(value), DEVICES))


def _model(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike, ModelSpec)):
        raise TrainingError(f"model must be a preset name, a spec file path or a ModelSpec, "
                            f"got {type(value).__name__}")


def _resume_from(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (str, int, os.PathLike)) or isinstance(value, bool):
        raise TrainingError(f"resume_from must be a checkpoint name, step or directory, "
                            f"got {type(value).__name__}")
    if not instance.resume:
        raise TrainingError("--resume-from picks the checkpoint to resume from; pass --resume too")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Everything that defines a training run (the CLI's ``memforge train`` flags).

    Attributes:
        model: a preset name, a ``.toml``/``.json`` spec file, or a :class:`ModelSpec`.
        overrides: ``"key=value"`` spec overrides (``--set``).
        task: task name (see :data:`memforge.tasks.TASKS`).
        task_options: the task's options; ``vocab_size`` defaults to the model's.
        steps: optimiser steps; the cosine schedule decays over them. The only setting a resumed
            run may change (extending a run re-stretches the decay over the new count).
        batch_size: sequences per step, summed over all processes.
        lr: peak learning rate, reached after ``warmup_steps`` of linear warmup.
        warmup_steps: linear warmup length (capped at a fifth of ``steps``).
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        weight_decay: AdamW decay, applied to matrices only (not norms or biases).
        betas: AdamW betas.
        grad_clip: maximum global gradient norm.
        seed: model initialisation and data; batch ``step`` is a pure function of (seed, step).
        eval_every: validation every this many steps (and at the last step).
        eval_batches: validation batches (of ``batch_size``) per evaluation.
        checkpoint_every: checkpoint every this many steps (and at the end); default ``eval_every``.
        keep_checkpoints: how many of the newest checkpoints to keep.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        compile: run the training forward through :func:`memforge.compile_model` (``torch.compile``,
            with memory layers compiling their chunk step instead of being unrolled).
        out: run directory; default ``runs/<name>-<spec_id>-<task>``.
        resume: continue the run in the run directory from its latest checkpoint.
        resume_from: with ``resume``, continue from this checkpoint of the run instead of the
            latest (a name such as ``step-00000100``, a step number, or its directory).
        stop_after: stop (with a checkpoint) after this step, though the schedule runs to
            ``steps``; continue later with ``resume``.
        progress: show a progress bar (rank 0 only).
    """

    model: str | os.PathLike[str] | ModelSpec = attrs.field(default=DEFAULT_PRESET, validator=_model)
    overrides: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_strings)
    task: str = attrs.field(default=DEFAULT_TASK, validator=_string)
    task_options: Mapping[str, Any] = attrs.field(factory=dict, converter=as_dict, validator=validate_mapping,
                                                  hash=False)
    steps: int = attrs.field(default=600, validator=_integer(1))
    batch_size: int = attrs.field(default=64, validator=_integer(1, MAX_BATCH_SIZE))
    lr: float = attrs.field(default=3e-3, validator=_number(
        0, MAX_LR, low_open=True, hint="; the usual peaks lie between 1e-4 and 1e-2 (default 3e-3)"))
    warmup_steps: int = attrs.field(default=50, validator=_integer(0))
    min_lr_ratio: float = attrs.field(default=0.1, validator=_number(0, 1))
    weight_decay: float = attrs.field(default=0.1, validator=_number(
        0, hint="; the usual values lie between 0 and 0.1 (default 0.1)"))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), converter=_as_tuple,
                                             validator=_betas)
    grad_clip: float = attrs.field(default=1.0, validator=_number(0, low_open=True))
    seed: int = attrs.field(default=0, validator=_integer(0, MAX_SEED))
    eval_every: int = attrs.field(default=100, validator=_integer(1))
    eval_batches: int = attrs.field(default=4, validator=_integer(1))
    checkpoint_every: int | None = attrs.field(default=None, validator=_optional(_integer(1)))
    keep_checkpoints: int = attrs.field(default=2, validator=_integer(1))
    device: str = attrs.field(default="auto", validator=validate_device)
    compile: bool = False
    out: str | os.PathLike[str] | None = None
    resume: bool = False
    resume_from: str | int | os.PathLike[str] | None = attrs.field(default=None, validator=_resume_from)
    stop_after: int | None = attrs.field(default=None, validator=_optional(_integer(1)))
    progress: bool = False

    def __attrs_post_init__(self) -> None:
        # Decoupled weight decay multiplies every matrix by (1 - lr * weight_decay) each step: at 1
        # or more the weights are zeroed or flip sign at every step.
        if self.lr * self.weight_decay >= 1:
            raise TrainingError(f"weight_decay (--weight-decay) {self.weight_decay:g} times lr (--lr) "
                                f"{self.lr:g} must be < 1 (AdamW scales every matrix by "
                                f"1 - lr * weight_decay per step); lower one of them")

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints."""
        return self.checkpoint_every or self.eval_every

    def settings(self, world_size: int) -> dict[str, Any]:
        """The settings that shape the run's trajectory, as stored in ``run.json``.

        A resumed run must match them all except ``steps``; operational choices (device,
        compile, checkpoint cadence, progress) are left out because they may change freely.
        """
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "weight_decay": self.weight_decay,
            "betas": list(self.betas),
            "grad_clip": self.grad_clip,
            "seed": self.seed,
            "world_size": world_size,
        }


#: Settings in ``run.json`` that a resumed run may change.
RESUMABLE_CHANGES = frozenset({"steps"})


def resolve_spec(model: str | os.PathLike[str] | ModelSpec,
                 overrides: Sequence[str] = ()) -> tuple[ModelSpec, str]:
    """The model's validated spec and a short name for run directories."""
    import memforge

    if isinstance(model, ModelSpec):
        spec, name = model, "spec"
    else:
        path = Path(model)
        if path.suffix.lower() in (".toml", ".json") or path.exists():
            spec, name = memforge.load_spec(path), path.stem
        else:
            spec, name = memforge.preset(str(model)), str(model)
    return (memforge.override(spec, overrides) if overrides else spec), name


def task_error(exc: Exception) -> TrainingError:
    """A task's ``ValueError``/``TypeError`` as a :class:`TrainingError` (the CLI prints those)."""
    return TrainingError(str(exc))


def parse_task_options(task: str | None, items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` as typed options of ``task`` (of any task if ``None``), with did-you-means."""
    from memforge import tasks

    try:
        return tasks.parse_task_options(items, task=task)
    except (ValueError, TypeError) as exc:
        raise task_error(exc) from None


def resolve_task(name: str, options: Mapping[str, Any], spec: ModelSpec) -> Any:
    """Build task ``name`` for a model of ``spec``, checking every token id fits its vocabulary.

    ``vocab_size`` defaults to the model's (where the task has that option). The task's data is
    touched once (a text corpus is read) so a bad path fails here, before any file is written.
    """
    from memforge import tasks

    try:
        known = tasks.task_options(name)
        options = {**DEFAULT_TASK_OPTIONS.get(name, {}), **options}
        if "vocab_size" in known:
            options.setdefault("vocab_size", spec.vocab_size)
        task = tasks.make_task(name, **options)
    except (ValueError, TypeError) as exc:
        raise task_error(exc) from None
    if task.vocab_size > spec.vocab_size:
        fix = ("set the task option vocab_size lower" if "vocab_size" in known
               else f"build the model with --set vocab_size={task.vocab_size}")
        raise TrainingError(
            f"task {name!r} uses token ids up to {task.vocab_size - 1}, out of range for the "
            f"model's vocab_size={spec.vocab_size}; {fix}")
    try:
        task.describe()
    except (ValueError, TypeError) as exc:
        raise task_error(exc) from None
    return task


def default_run_dir(name: str, spec: ModelSpec, task: str) -> Path:
    """``runs/<name>-<spec_id>-<task>``, with path separators in ``name`` made safe."""
    safe = name.replace(os.sep, "_").replace("/", "_")
    return Path(DEFAULT_RUNS_ROOT) / f"{safe}-{spec_id(spec)}-{task}"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``"auto"``, ``"cpu"`` or ``"cuda"`` (one GPU per local rank)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda but CUDA is not available here; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
