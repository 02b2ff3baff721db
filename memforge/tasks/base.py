"""Shared pieces of the task API: the batch type, the Task protocol, split seeding and validators.

Every task is a frozen attrs class whose fields are its whole configuration; ``batch`` is a pure
function of (config, batch size, seed, split). All randomness goes through a ``torch.Generator``
seeded from (seed, split), so no task ever touches the global RNG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any, NamedTuple, Protocol, runtime_checkable

import attrs
import torch

#: Label value for positions that are not scored (the ``ignore_index`` of ``cross_entropy``).
IGNORE_INDEX = -100

#: The splits every task accepts (``TextCorpus`` has no ``"test"``; see its docstring).
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class TaskBatch(NamedTuple):
    """One batch of a task.

    Attributes:
        inputs: ``[B, T]`` int64 token ids.
        targets: ``[B, T]`` int64 next-token labels: ``targets[:, t]`` is what the model should
            predict after reading ``inputs[:, :t + 1]``; :data:`IGNORE_INDEX` (-100) where unscored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor


@runtime_checkable
class Task(Protocol):
    """What the trainer and evaluator need from a task."""

    name: str
    vocab_size: int
    seq_len: int

    def batch(self, batch_size: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Return a batch that is a deterministic function of (config, batch_size, seed, split)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able description of the task's configuration for run logs."""
        ...


def split_generator(task: str, seed: int, split: str) -> torch.Generator:
    """Return a CPU generator for the stream (seed, split).

    Zoology offsets the test seed by 10, which makes train seed 10 replay test seed 0. Hashing the
    split name with the seed instead gives every (seed, split) pair its own stream, so no train
    seed can ever reproduce a validation or test stream.
    """
    if split not in SPLITS:
        raise ValueError(f"{task}: split={split!r} is not one of {list(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{task}: seed={seed!r} must be an int")
    digest = hashlib.sha256(f"memforge.tasks:{split}:{seed}".encode()).digest()
    generator = torch.Generator()
    # 63 bits keep the value inside manual_seed's accepted range on every platform.
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator


def check_batch_size(task: str, batch_size: int) -> None:
    """Raise a clear error unless ``batch_size`` is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{task}: batch_size={batch_size!r} must be an int >= 1")


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``; used for cross-field config checks."""
    if not ok:
        raise ValueError(message)


def describe_fields(task: Any) -> dict[str, Any]:
    """Return ``{"task": name, field: value, ...}`` over a task's init fields, JSON-able."""
    out: dict[str, Any] = {"task": task.name}
    for field in attrs.fields(type(task)):
        if field.init:
            value = getattr(task, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def int_range(low: int, high: int | None = None) -> Validator:
    """Validator: an int (not a bool) in ``[low, high]`` (``high=None``: no upper bound)."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{instance.name}: {attribute.name}={value!r} must be an int {allowed}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"{instance.name}: {attribute.name}={value} must be {allowed}")

    return validate


def float_range(low: float, high: float, *, exclusive: bool = False) -> Validator:
    """Validator: a real number in ``[low, high]``, or in ``(low, high)`` when ``exclusive``."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        allowed = f"({low}, {high})" if exclusive else f"[{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{instance.name}: {attribute.name}={value!r} must be a number in {allowed}")
        inside = low < value < high if exclusive else low <= value <= high  # also rejects NaN
        if not inside:
            raise ValueError(f"{instance.name}: {attribute.name}={value} must be in {allowed}")

    return validate


def one_of(choices: Collection[str]) -> Validator:
    """Validator: one of ``choices``."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{instance.name}: {attribute.name}={value!r} must be one of {sorted(choices)}")

    return validate


def is_bool(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Validator: a real ``bool`` (so a stray string like ``"false"`` is not silently truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{instance.name}: {attribute.name}={value!r} must be a bool")
