"""The name registry: which components and presets exist, and which plugin provides each.

Assembled from the plugins' hook results (see :mod:`memforge.plugins`); look-ups by name give
errors with close matches. Its contents are sorted by name, so they never depend on the order in
which plugins were registered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from memforge.errors import PluginError, UnknownNameError, unknown_name_message
from memforge.interfaces import KINDS

if TYPE_CHECKING:
    from torch import nn

    from memforge.interfaces import BuildContext
    from memforge.spec import ModelSpec


def unknown_kind_message(kind: str) -> str:
    """``unknown component kind ...`` with the kinds to choose from, and, for a kind of an older
    spec schema (``surprise``, ``forgetting``), the kinds that replaced it."""
    from memforge.migrations import REPLACED_KINDS

    message = unknown_name_message("component kind", kind, KINDS)
    if kind in REPLACED_KINDS:
        message += (f"; {kind!r} was replaced by {' and '.join(map(repr, REPLACED_KINDS[kind]))} "
                    f"in spec schema 3")
    return message


def _check_kind(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in KINDS:
        raise PluginError(unknown_kind_message(value))


def _check_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise PluginError(f"a registered name must be a string '<plugin>.<name>', got {value!r}")


def _check_callable(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not callable(value):
        raise PluginError(f"{attribute.name} of {instance.name!r} must be callable, got "
                          f"{type(value).__name__}")


def _check_config_cls(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, type) and attrs.has(value)):
        raise PluginError(f"config_cls of {instance.name!r} must be an attrs class "
                          f"(@attrs.frozen(kw_only=True)), got {value!r}")
    undefaulted = [f.name for f in attrs.fields(value) if f.default is attrs.NOTHING]
    if undefaulted:
        raise PluginError(f"config_cls {value.__name__} of {instance.name!r} must give every field a "
                          f"default (memforge.option(...)); {', '.join(undefaulted)} has none")


def _check_kinds(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for kind in value:
        if kind not in KINDS:
            raise PluginError(f"{attribute.name} of {instance.name!r}: "
                              + unknown_kind_message(str(kind)))


@attrs.frozen(kw_only=True)
class ComponentSpec:
    """A component a plugin offers for one kind.

    Attributes:
        kind: one of :data:`memforge.interfaces.KINDS`.
        name: ``<plugin>.<impl>``, lower_snake; the prefix must be the providing plugin's name.
        config_cls: a frozen attrs class whose fields all have defaults (see :func:`memforge.option`).
        factory: ``factory(config, ctx: BuildContext) -> nn.Module``; turns the config into flat
            constructor arguments of a module (modules never see config objects).
        summary: one line for ``memforge list``.
        requires: the other kinds the factory always builds through ``ctx.build`` (an
            integration its memory layer, attention and feed-forward; ``titans.neural_memory``
            its memory, rules and projection); the spec must choose a component for each.
        optional: the kinds the factory builds only when the spec chooses one. The kinds a
            layer uses are those declared from its integration down (transitively); a memory
            kind (:data:`~memforge.interfaces.MEMORY_KINDS`) that the spec sets but no
            component of a layer uses is an error naming the component that ignores it (its
            settings would be silently ignored), and so is building an undeclared memory kind
            through ``ctx.build``. A component that declares neither uses no other kind, except
            an integration that declares neither (written before declarations existed): memforge
            cannot know what it uses, so it may build any kind, and the kinds it left unused are
            refused once it is built.
        paper: optional citation.
    """

    kind: str = attrs.field(validator=_check_kind)
    name: str = attrs.field(validator=_check_name)
    config_cls: type = attrs.field(validator=_check_config_cls)
    factory: Callable[[Any, BuildContext], nn.Module] = attrs.field(eq=False, validator=_check_callable)
    summary: str
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_check_kinds)
    optional: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_check_kinds)
    paper: str = ""

    @property
    def declares_kinds(self) -> bool:
        """Whether this component declares any kind it builds (``requires`` or ``optional``)."""
        return bool(self.requires or self.optional)

    @property
    def uses(self) -> frozenset[str]:
        """The kinds this component may build: ``requires`` and ``optional``, or every kind for
        an integration that declares neither."""
        if self.kind == "integration" and not self.declares_kinds:
            return frozenset(KINDS)
        return frozenset(self.requires) | frozenset(self.optional)

    @property
    def plugin(self) -> str:
        """The namespace (plugin name) part of :attr:`name`."""
        return self.name.split(".", 1)[0]


@attrs.frozen(kw_only=True)
class PresetSpec:
    """A named model spec: ``build()`` returns a fresh :class:`~memforge.ModelSpec`."""

    name: str = attrs.field(validator=_check_name)
    summary: str
    build: Callable[[], ModelSpec] = attrs.field(eq=False, validator=_check_callable)

    @property
    def plugin(self) -> str:
        """The namespace (plugin name) part of :attr:`name`."""
        return self.name.split(".", 1)[0]


def sized_presets(name: str, summary: str, build: Callable[[str], ModelSpec]) -> list[PresetSpec]:
    """A preset in the built-in families' two sizes: ``name`` (``build("small")``: trains on a
    laptop CPU in minutes) and ``name + "_tiny"`` (``build("tiny")``: builds and runs in
    milliseconds, for tests), their summaries ``summary`` with the size appended."""
    return [PresetSpec(name=name, summary=f"{summary}, small", build=lambda: build("small")),
            PresetSpec(name=f"{name}_tiny", summary=f"{summary}, tiny", build=lambda: build("tiny"))]


def _check_names(plugin: str, items: Iterable[ComponentSpec | PresetSpec], what: str) -> None:
    for item in items:
        prefix, dot, rest = item.name.partition(".")
        if not dot or not rest or prefix != plugin:
            raise PluginError(
                f"plugin {plugin!r} registers {what} {item.name!r}, but names must be "
                f"'{plugin}.<name>' (namespaced by the plugin's name); rename it"
            )


def _merge(
    contributions: Mapping[str, Iterable[Any]], what: str, origins: Mapping[str, str]
) -> dict[str, Any]:
    """Merge per-plugin lists into one name -> item dict; a duplicate name names both plugins."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for plugin in sorted(contributions):
        for item in contributions[plugin]:
            if item.name in merged:
                first, second = owner[item.name], plugin
                raise PluginError(
                    f"{what} {item.name!r} is registered twice: by plugin {first!r}"
                    f"{origins.get(first, '')} and by plugin {second!r}{origins.get(second, '')}; "
                    f"block one of them (MEMFORGE_BLOCK={second} or "
                    f"memforge.configure_plugins(block=[{second!r}]))"
                )
            merged[item.name] = item
            owner[item.name] = plugin
    return dict(sorted(merged.items()))


def with_article(word: str) -> str:
    """``word`` after its indefinite article, for messages: ``an optimizer``, ``a memory``."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class ComponentRegistry:
    """Components and presets by name, built from each plugin's hook results.

    Args:
        components: ``{plugin_name: [ComponentSpec, ...]}``.
        presets: ``{plugin_name: [PresetSpec, ...]}``.
        origins: ``{plugin_name: " (from distribution X 1.0)"}``, used in collision messages.
        pm: the plugin manager the registry came from, whose ``memforge_validate_spec`` and
            ``memforge_model_built`` hooks specs and models built against it go through.
    """

    def __init__(
        self,
        components: Mapping[str, Iterable[ComponentSpec]],
        presets: Mapping[str, Iterable[PresetSpec]],
        origins: Mapping[str, str] | None = None,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self.pm = pm
        origins = origins or {}
        components = {p: list(items) for p, items in components.items()}
        presets = {p: list(items) for p, items in presets.items()}
        for plugin, items in components.items():
            _check_names(plugin, items, "component")
        for plugin, items in presets.items():
            _check_names(plugin, items, "preset")
        # Build everything first and assign last: a conflict leaves no half-filled registry.
        merged_components = _merge(components, "component", origins)
        merged_presets = _merge(presets, "preset", origins)
        self._components: dict[str, ComponentSpec] = merged_components
        self._presets: dict[str, PresetSpec] = merged_presets
        self.plugins: tuple[str, ...] = tuple(sorted(set(components) | set(presets)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ComponentRegistry):
            return NotImplemented
        return self._components == other._components and self._presets == other._presets

    def names(self, kind: str | None = None, pattern: str = "*") -> list[str]:
        """Sorted component names, optionally of one kind and matching an fnmatch ``pattern``."""
        if kind is not None and kind not in KINDS:
            raise UnknownNameError(unknown_kind_message(kind))
        return [
            name
            for name, spec in self._components.items()
            if (kind is None or spec.kind == kind) and fnmatch.fnmatchcase(name, pattern)
        ]

    def component(self, kind: str, name: str) -> ComponentSpec:
        """The component ``name`` of ``kind``; an unknown name lists close matches."""
        spec = self._components.get(name)
        if spec is None or spec.kind != kind:
            if spec is not None:
                raise UnknownNameError(
                    f"{name!r} is {with_article(spec.kind)} component, not "
                    f"{with_article(kind)} component; "
                    f"available {kind} components: {', '.join(self.names(kind))}"
                )
            raise UnknownNameError(unknown_name_message(f"{kind} component", name, self.names(kind)))
        return spec

    def components(self) -> list[ComponentSpec]:
        """Every registered component, sorted by name."""
        return list(self._components.values())

    def preset_names(self, pattern: str = "*") -> list[str]:
        """Sorted preset names matching an fnmatch ``pattern``."""
        return [name for name in self._presets if fnmatch.fnmatchcase(name, pattern)]

    def preset(self, name: str) -> PresetSpec:
        """The preset ``name``; an unknown name lists close matches."""
        try:
            return self._presets[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message("preset", name, self._presets)) from None

    def presets(self) -> list[PresetSpec]:
        """Every registered preset, sorted by name."""
        return list(self._presets.values())
