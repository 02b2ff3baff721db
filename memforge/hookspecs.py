"""Every hook a memforge plugin can implement. This module is the plugin author's reference.

A plugin is a module (or object) with functions named after these specs and marked with
``@memforge.hookimpl``. Built-in plugins (``baseline``, ``titans``) are written exactly like
third-party ones; third-party packages are found through the entry-point group
``memforge.plugins``, whose entry-point *name* becomes the plugin name and the namespace of its
components (``mylab.fancy_memory``).

Rules that keep plugins composable:

* Hooks return data; the core merges it. No hook chooses an implementation (no ``firstresult``),
  so the order in which plugins load never changes the result.
* Hooks run while the registry is assembled or a model is built, never inside ``forward``.
* An implementation may accept a subset of a spec's arguments (pluggy's opt-in arguments); never
  give an implementation's parameters default values (pluggy does not pass them).
* A function whose name starts with ``memforge_`` but matches no spec here is reported as a
  misspelled hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from memforge.registry import ComponentRegistry, ComponentSpec, PresetSpec
    from memforge.spec import ModelSpec

hookspec = pluggy.HookspecMarker("memforge")


@hookspec
def memforge_register_components() -> Sequence[ComponentSpec]:
    """Return the components this plugin provides.

    Called once per registry assembly, with no arguments. Each :class:`~memforge.ComponentSpec`
    names its kind, a namespaced name ``<plugin>.<impl>`` (the prefix must be the plugin's name),
    a frozen config class whose fields all have defaults, and a factory
    ``factory(config, ctx) -> nn.Module``. Two plugins returning the same name is an error that
    names both; block one of them to resolve it.
    """


@hookspec
def memforge_register_presets() -> Sequence[PresetSpec]:
    """Return named model specs this plugin provides (``<plugin>.<variant>``).

    A :class:`~memforge.PresetSpec` holds ``name``, a one-line ``summary`` and ``build``, a function
    of no arguments returning a :class:`~memforge.ModelSpec`. Presets are specs, not modules, so they
    can be printed, saved, overridden and swept.
    """


@hookspec
def memforge_validate_spec(spec: ModelSpec, registry: ComponentRegistry) -> Sequence[str] | None:
    """Check cross-component constraints of ``spec`` and return a list of problems (or ``None``).

    Called by :func:`memforge.build_model` and when a spec is loaded. Every plugin's problems are
    collected and raised together as one :class:`~memforge.errors.SpecError`. Return messages that
    name the fields involved and the fix, e.g. ``"titans.mac: segment_len=100 is not a multiple of
    chunk_size=64; set memory_layer.chunk_size to a divisor of 100"``. Only check specs that use
    your own components, in every layer that uses them: a spec may choose a kind per layer
    (``spec.choice(kind, layer)``, :func:`memforge.spec.used_kinds`).
    """


@hookspec
def memforge_model_built(model: nn.Module, spec: ModelSpec) -> None:
    """Notification after :func:`memforge.build_model` built ``model`` from ``spec``.

    Use it for instrumentation (forward hooks, logging). It must not replace modules or change
    parameters: every plugin sees the same model, whatever the order.
    """
