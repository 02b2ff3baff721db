"""Helpers for writing component config classes: typed, range-checked, documented fields.

Every component config is an ``attrs.frozen(kw_only=True)`` class whose fields all have defaults,
so ``Config()`` is always valid. :func:`option` makes such a field with a type check (a TOML file
can only hand it the wrong *type*, never an unparsed string), an optional range or choice check,
and help text that ``memforge list``/``show`` display::

    @attrs.frozen(kw_only=True)
    class MLPMemoryConfig:
        depth: int = option(2, ge=1, le=64, help="number of weight matrices (1 = linear memory)")
        activation: str = option("gelu", choices=("gelu", "silu"), help="hidden non-linearity")

Float fields refuse NaN and infinity whatever their bounds (no size, rate or base of a model is
infinite), and int fields refuse floats, ``2.0`` included, so a value is never silently rounded.
Every check raises ``TypeError`` or ``ValueError`` with one line naming the field, the value and
the allowed range; the spec loader adds the component's table name.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(expected: type):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if ok:
            return
        noun = _NOUNS.get(expected, expected.__name__)
        fix = ""
        if expected is int and isinstance(value, float) and math.isfinite(value):
            fix = f"; write a whole number without a decimal point, e.g. {attribute.name}={attribute.default}"
        raise TypeError(f"{attribute.name!r} must be {noun}, got {value!r} ({type(value).__name__}){fix}")

    return check


def _check_finite(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name!r} must be a finite number, got {value!r}; "
                         f"the default is {attribute.default!r}")


_COMPARISONS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def _bound(kind: str, bound: float):
    holds, symbol = _COMPARISONS[kind]

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not holds(value, bound):
            raise ValueError(f"{attribute.name!r} must be {symbol} {bound}, got {value!r}")

    return check


def _choices(choices: tuple[Any, ...]):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name!r} must be one of {', '.join(map(repr, choices))}; "
                             f"got {value!r}")

    return check


def _to_float(value: Any) -> Any:
    # TOML and JSON write 1.0 as 1; a float field accepts an int but nothing else.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range is no valid setting either
            return math.inf if value > 0 else -math.inf
    return value


def option(
    default: Any,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    typical: tuple[float, float] | None = None,
) -> Any:
    """An attrs field with a type check from ``default``'s type, optional bounds and choices.

    Args:
        default: the default value; its type (bool, int, float or str) is the field's type.
        help: one line shown by the CLI and the README.
        ge, gt, le, lt: inclusive/exclusive bounds for numbers. Floats must also be finite.
        choices: the allowed values.
        typical: for numbers, the range sensible models use (inside the bounds): what
            :mod:`memforge.testing.strategies` draws from. Not enforced.
    """
    kind = type(default)
    validators = [_check_type(kind)]
    if kind is float:
        validators.append(_check_finite)
    for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None:
            validators.append(_bound(name, bound))
    if choices is not None:
        validators.append(_choices(tuple(choices)))
    return attrs.field(
        default=default,
        validator=validators,
        converter=_to_float if kind is float else None,
        metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
                  "typical": typical},
    )


def describe_fields(config_cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for every field of a config class, in declaration order."""
    rows = []
    for field in attrs.fields(config_cls):
        rows.append((field.name, field.default, field.metadata.get("help", "")))
    return rows
