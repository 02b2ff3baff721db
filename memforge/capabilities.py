"""Checks that a component offers a capability another one needs, with errors that name both.

A capability is a runtime-checkable Protocol of :mod:`memforge.interfaces` (``ReadsMemory``,
``DecodesMemoryStatically``, ``ComposesAttention``, ...). Integrations and memory layers call
:func:`require` where they are built or used instead of assuming a method, so a component without
the capability is a one-line error that names it and the fix, not an ``AttributeError`` deep in
a forward.
"""

from __future__ import annotations

import inspect
from typing import Any, Generic, Protocol

from memforge.errors import MemforgeError, SpecError
from memforge.interfaces import READS, retrieval_reads


def _methods(protocol: type) -> list[str]:
    """The members a Protocol declares (its own and those of the Protocols it extends): the
    public names defined or annotated in each class of its MRO but ``Protocol``, ``Generic`` and
    ``object``."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (Protocol, Generic, object):
            continue
        names.update(cls.__dict__)
        names.update(inspect.get_annotations(cls))
    return sorted(n for n in names if not n.startswith("_"))


def missing(component: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``component`` lacks (empty: it has the capability)."""
    lacking = []
    for name in _methods(protocol):
        wants_method = callable(getattr(protocol, name, None))
        value = getattr(component, name, None)
        if value is None or (wants_method and not callable(value)):
            lacking.append(name)
    return lacking


def require(component: Any, protocol: type, *, needed_by: str, fix: str,
            error: type[MemforgeError] = SpecError) -> None:
    """Raise ``error`` unless ``component`` has every member of the capability ``protocol``.

    Args:
        component: the module that should have the capability.
        protocol: a Protocol of :mod:`memforge.interfaces`.
        needed_by: who needs it, for the message (``"titans.mac (layer 1)"``).
        fix: what the user can do instead.
        error: :class:`SpecError` at build time (the default), :class:`InputError` at use.
    """
    lacks = missing(component, protocol)
    if lacks:
        raise error(f"{needed_by} needs a {protocol.__name__} component "
                    f"(memforge.interfaces.{protocol.__name__}); {type(component).__name__} has no "
                    f"{', '.join(lacks)}; {fix}")


def require_reads(rule: Any, offered: frozenset[str] | tuple[str, ...], *, rule_name: str,
                  layer_name: str) -> None:
    """Raise :class:`SpecError` when retrieval ``rule`` declares a read the layer's kernel does
    not offer (``offered``: names from :data:`memforge.interfaces.READS`)."""
    lacking = sorted(retrieval_reads(rule) - frozenset(offered))
    if lacking:
        raise SpecError(f"retrieval {rule_name!r} reads {', '.join(lacking)}, which memory layer "
                        f"{layer_name!r} does not offer (it offers "
                        f"{', '.join(r for r in READS if r in offered) or 'no reads'}); choose a "
                        f"retrieval that reads only those")


__all__ = ["missing", "require", "require_reads"]
