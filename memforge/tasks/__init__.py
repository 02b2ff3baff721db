"""Seeded, download-free tasks for training and evaluation, and a registry to build them by name.

Every task is a frozen attrs config with ``batch(batch_size, *, seed, split)`` returning a
:class:`TaskBatch` and ``describe()`` returning a JSON-able dict (see :class:`Task`)::

    task = make_task("mqar", **parse_task_options(["num_pairs=8", "seq_len=256"], task="mqar"))
    inputs, targets = task.batch(32, seed=0)

Evaluate at another length with ``attrs.evolve(task, seq_len=...)``.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from types import NoneType, UnionType
from typing import Any

import attrs

from memforge.tasks.babilong import BabilongQA1
from memforge.tasks.base import IGNORE_INDEX, SPLITS, Task, TaskBatch
from memforge.tasks.mqar import MQAR
from memforge.tasks.niah import NeedleInHaystack
from memforge.tasks.text import TextCorpus

__all__ = [
    "IGNORE_INDEX",
    "MQAR",
    "SPLITS",
    "TASKS",
    "BabilongQA1",
    "NeedleInHaystack",
    "Task",
    "TaskBatch",
    "TextCorpus",
    "make_task",
    "parse_task_options",
    "task_options",
]

#: Task classes by registry name.
TASKS: dict[str, type] = {
    MQAR.name: MQAR,
    NeedleInHaystack.name: NeedleInHaystack,
    BabilongQA1.name: BabilongQA1,
    TextCorpus.name: TextCorpus,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", ""}


def _lookup(name: str) -> type:
    """The task class called ``name``, or an error with close matches and every name."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ValueError(f"unknown task {name!r}; {hint}known tasks: {', '.join(TASKS)}")


def task_options(name: str) -> dict[str, Any]:
    """Map each option of task ``name`` to its resolved type (e.g. ``int``, ``float | None``)."""
    cls = _lookup(name)
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in attrs.fields(cls) if field.init}


def _check_option_names(name: str, given: Sequence[str]) -> dict[str, Any]:
    """Raise for options task ``name`` lacks (with did-you-mean); return its option types."""
    options = task_options(name)
    for option in given:
        if option not in options:
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"task {name!r} has no option {option!r}; {hint}valid options: {', '.join(options)}"
            )
    return options


def make_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options`` (its attrs fields).

    Raises:
        ValueError: for an unknown task or option (with close matches), or an invalid value.
        TypeError: for a value of the wrong type.
    """
    _check_option_names(name, list(options))
    return TASKS[name](**options)


def _convert(option: str, text: str, kind: Any) -> Any:
    """Convert the string ``text`` to the annotated type ``kind`` of ``option``."""
    args = typing.get_args(kind)
    if isinstance(kind, UnionType) and NoneType in args:
        if text.strip().lower() in _NONE:
            return None
        (kind,) = [a for a in args if a is not NoneType]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        # Comma-separated items; an empty string is the empty tuple.
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(f"option {option}={text!r} is not a bool; use true/false, yes/no, on/off or 1/0")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ValueError(f"option {option}={text!r} is not {noun}") from None
    return text


def parse_task_options(items: Sequence[str], *, task: str | None = None) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` into typed keyword options for :func:`make_task`.

    Values are converted to the option's declared type: ints, floats, bools (true/false, yes/no,
    on/off, 1/0), strings, comma-separated tuples of strings, and ``none``/``null`` for optional
    options. With ``task`` the names are checked against that task's options; without it, the
    types come from whichever task declares the option (they agree where tasks share a name).

    Raises:
        ValueError: for an item without ``=``, a repeated or unknown option, or a bad value.
    """
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"task option {item!r} must look like name=value")
        if key in pairs:
            raise ValueError(f"task option {key!r} is given twice")
        pairs[key] = value
    if task is not None:
        types = _check_option_names(task, list(pairs))
    else:
        types = {}
        for name in TASKS:
            types.update(task_options(name))
        for key in pairs:
            if key not in types:
                close = difflib.get_close_matches(key, types, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"no task has option {key!r}; {hint}valid options: {', '.join(sorted(types))}"
                )
    return {key: _convert(key, value, types[key]) for key, value in pairs.items()}
