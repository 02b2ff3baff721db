"""Helpers for writing component config classes: typed, range-checked, documented fields.

Every component config is an ``attrs.frozen(kw_only=True)`` class whose fields all have defaults,
so ``Config()`` is always valid. :func:`option` makes such a field with a type check (a TOML file
can only hand it the wrong *type*, never an unparsed string), an optional range or choice check,
and help text that ``memforge list``/``show`` display::

    @attrs.frozen(kw_only=True)
    class MLPMemoryConfig:
        depth: int = option(2, ge=1, help="number of weight matrices (1 = linear memory)")
        activation: str = option("gelu", choices=("gelu", "silu"), help="hidden non-linearity")
"""

from __future__ import annotations

from typing import Any

import attrs


def _check_type(expected: type):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if not ok:
            raise TypeError(
                f"{attribute.name!r} must be {expected.__name__}, got {value!r} "
                f"({type(value).__name__})"
            )

    return check


def _to_float(value: Any) -> Any:
    # TOML and JSON write 1.0 as 1; a float field accepts an int but nothing else.
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
) -> Any:
    """An attrs field with a type check from ``default``'s type, optional bounds and choices.

    Args:
        default: the default value; its type (bool, int, float or str) is the field's type.
        help: one line shown by the CLI and the README.
        ge, gt, le, lt: inclusive/exclusive bounds for numbers.
        choices: the allowed values.
    """
    kind = type(default)
    validators = [_check_type(kind)]
    for bound, check in ((ge, attrs.validators.ge), (gt, attrs.validators.gt),
                         (le, attrs.validators.le), (lt, attrs.validators.lt)):
        if bound is not None:
            validators.append(check(bound))
    if choices is not None:
        validators.append(attrs.validators.in_(choices))
    return attrs.field(
        default=default,
        validator=validators,
        converter=_to_float if kind is float else None,
        metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices},
    )


def describe_fields(config_cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for every field of a config class, in declaration order."""
    rows = []
    for field in attrs.fields(config_cls):
        rows.append((field.name, field.default, field.metadata.get("help", "")))
    return rows
