"""memforge's exceptions: every user mistake raises one of these with a message that names the
problem and the fix, so the CLI can print one line instead of a traceback from deep inside torch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemforgeError(Exception):
    """Base class of every error memforge raises for a user mistake."""


class UnknownNameError(MemforgeError, KeyError):
    """A component, preset, kind, plugin, task or key name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpecError(MemforgeError, ValueError):
    """A model spec (or spec file) that is malformed, invalid, or from another schema version."""


class PluginError(MemforgeError):
    """A plugin that cannot be loaded, collides with another, or implements an unknown hook."""


class InputError(MemforgeError, ValueError):
    """Tensors or states handed to a model or layer that do not fit it."""


class NonFiniteError(InputError):
    """Hidden states or logits that hold NaN or infinity.

    Either the inputs held them, or the model's own activations overflowed (for a trained model,
    typically a memory that diverges on sequences longer than those it was trained on).
    """


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The names in ``choices`` that look most like ``name`` (case-insensitive), best first."""
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(str(name).lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def unknown_name_message(what: str, name: str, choices: Iterable[str]) -> str:
    """``unknown <what> 'name'; did you mean 'x'? available: a, b, c`` for error messages."""
    choices = sorted(str(c) for c in choices)
    message = f"unknown {what} {name!r}"
    hints = close_matches(name, choices)
    if hints:
        message += "; did you mean " + " or ".join(repr(h) for h in hints) + "?"
    message += "; available: " + (", ".join(choices) if choices else "(none)")
    return message
