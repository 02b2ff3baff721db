"""Typed model specs: frozen attrs classes that round-trip through plain dicts (and so TOML/JSON).

A :class:`ModelSpec` holds the model's sizes and one :class:`ComponentChoice` per kind: a
registered component name (``impl``) and an instance of that component's own frozen config class.
Any kind can be chosen differently for some layers. Its dict form is one table per kind with the
reserved key ``impl``, and ``[layer.<layers>.<kind>]`` tables for per-layer choices, where
``<layers>`` is an index (``1``), a comma list (``0,2``) or a range (``1-3``)::

    schema_version = 3
    vocab_size = 256
    dim = 128
    num_layers = 4
    heads = 4

    [memory]
    impl = "titans.mlp"
    depth = 2

    [layer."0,2".integration]
    impl = "baseline.transformer"

The dict form names registry entries, never import paths, so moving code never breaks a stored
spec. ``None`` values are dropped when writing (TOML has no null), which is why optional fields
default to ``None``. Dicts of an older schema are migrated when read (:mod:`memforge.migrations`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from memforge.errors import (
    MemforgeError,
    SpecError,
    UnknownNameError,
    close_matches,
    unknown_name_message,
)
from memforge.interfaces import KINDS, MEMORY_KINDS
from memforge.migrations import (
    REPLACED_KINDS,
    expand_memory_layers,
    migrate,
    replaced_kind_message,
)
from memforge.registry import ComponentRegistry, ComponentSpec, with_article

#: The schema version this memforge writes and reads.
SCHEMA_VERSION = 3

#: Upper limits of the top-level sizes. No model memforge can train comes near them (the largest
#: public models have widths near 16K, vocabularies near 256K and about 130 blocks); they stop a
#: typo such as ``dim=1000000`` before any arithmetic on it. Parameter counts are checked
#: separately, before building (:data:`memforge.builder.MAX_PARAMETERS`).
SIZE_LIMITS: dict[str, int] = {"vocab_size": 2**24, "dim": 2**16, "num_layers": 1024, "heads": 1024}

#: The override value that removes an optional component (``--set memory=none``).
NONE = "none"


@attrs.frozen
class ComponentChoice:
    """The component chosen for one kind: its registry name and its config instance."""

    impl: str
    config: Any


def _size(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name, limit = attribute.name, SIZE_LIMITS[attribute.name]
    if not isinstance(value, int) or isinstance(value, bool):
        fix = (f"; write a whole number without a decimal point, e.g. {name}=64"
               if isinstance(value, float) else "")
        raise SpecError(f"{name!r} must be an integer, got {value!r} ({type(value).__name__}){fix}")
    if not 1 <= value <= limit:
        raise SpecError(f"{name!r} must be in [1, {limit}], got {value}")


#: Per-layer choices in canonical form: ``((layer, ((kind, choice), ...)), ...)``, both sorted.
LayerChoices = tuple[tuple[int, tuple[tuple[str, "ComponentChoice"], ...]], ...]


def _layer_choices(value: Any) -> LayerChoices:
    """Per-layer choices from ``{layer: {kind: ComponentChoice}}`` (or the canonical tuple)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise SpecError(f"'layers' must map layer indices to {{kind: ComponentChoice}}, got {value!r}")
    merged: dict[int, dict[str, ComponentChoice]] = {}
    for item in items:
        layer, kinds = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise SpecError(f"'layers' must be keyed by layer index (int), got {layer!r}")
        kinds = kinds.items() if isinstance(kinds, Mapping) else kinds
        if isinstance(kinds, (str, bytes)) or not isinstance(kinds, Iterable):
            raise SpecError(f"'layers'[{layer}] must map kinds to ComponentChoice, got {kinds!r}")
        for kind, choice in kinds:
            if kind not in KINDS:
                replaced = replaced_kind_message(f"layer.{layer}.{kind}")
                raise SpecError(replaced or f"[layer.{layer}] " + unknown_name_message(
                    "kind", str(kind), KINDS))
            if not isinstance(choice, ComponentChoice):
                raise SpecError(f"[layer.{layer}.{kind}] must be a ComponentChoice, got {choice!r}")
            merged.setdefault(layer, {})[kind] = choice
    return tuple((layer, tuple(sorted(kinds.items(), key=lambda kc: KINDS.index(kc[0]))))
                 for layer, kinds in sorted(merged.items()) if kinds)


def _optional_choice(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, ComponentChoice):
        raise SpecError(f"{attribute.name!r} must be a ComponentChoice or None, got {value!r}")


def _required_choice(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, ComponentChoice):
        raise SpecError(f"{attribute.name!r} must be a ComponentChoice, got {value!r}")


@attrs.frozen(kw_only=True)
class ModelSpec:
    """Everything needed to build a model, and nothing about how to train it.

    Attributes:
        vocab_size: number of token ids; inputs must lie in ``[0, vocab_size)``.
        dim: model width.
        num_layers: number of blocks.
        heads: attention and memory heads; must divide ``dim``.
        memory, objective, optimizer, retention, retrieval, projection, memory_layer: the memory
            parts (the network, its loss, its step, how it keeps old state, how it is read, what
            it is fed, and the layer built from them); ``None`` for models that carry no memory.
        attention, feedforward, integration: always chosen (the model-wide defaults).
        layers: per-layer choices, ``{layer: {kind: ComponentChoice}}``, which replace the
            model-wide choice of that kind in those layers (hybrids, placement ablations); stored
            sorted as a tuple, read them with :meth:`choice` or :meth:`layer_choices`.
        schema_version: the file format version (see :data:`SCHEMA_VERSION`).
    """

    vocab_size: int = attrs.field(validator=_size)
    dim: int = attrs.field(validator=_size)
    num_layers: int = attrs.field(validator=_size)
    heads: int = attrs.field(validator=_size)
    integration: ComponentChoice = attrs.field(validator=_required_choice)
    attention: ComponentChoice = attrs.field(validator=_required_choice)
    feedforward: ComponentChoice = attrs.field(validator=_required_choice)
    memory: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    objective: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    optimizer: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    retention: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    retrieval: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    projection: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    memory_layer: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    layers: LayerChoices = attrs.field(default=(), converter=_layer_choices)
    schema_version: int = SCHEMA_VERSION

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise SpecError(
                f"'heads'={self.heads} must divide 'dim'={self.dim}; pick heads among "
                f"{[h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]}"
            )
        bad = [layer for layer, _ in self.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise SpecError(f"[layer.{','.join(map(str, bad))}] does not exist: num_layers="
                            f"{self.num_layers} has layers 0..{self.num_layers - 1}; fix the "
                            f"layer index or num_layers")

    def choices(self) -> dict[str, ComponentChoice]:
        """The model-wide chosen components by kind, unset kinds left out."""
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None}

    def layer_overrides(self, layer: int) -> dict[str, ComponentChoice]:
        """The choices made for ``layer`` alone (empty when it uses the model-wide ones)."""
        return dict(next((kinds for index, kinds in self.layers if index == layer), ()))

    def layer_choices(self, layer: int) -> dict[str, ComponentChoice]:
        """Every kind's choice in ``layer``: its own where it has one, else the model-wide one."""
        return {**self.choices(), **self.layer_overrides(layer)}

    def choice(self, kind: str, layer: int) -> ComponentChoice | None:
        """The component chosen for ``kind`` in ``layer`` (``None``: the spec sets none)."""
        return self.layer_overrides(layer).get(kind, getattr(self, kind))


_TOP_LEVEL = ("schema_version", "vocab_size", "dim", "num_layers", "heads")

#: The key of the per-layer tables.
LAYER = "layer"

#: Read (a schema-1 field, and a shorthand in overrides) but never written.
MEMORY_LAYERS = "memory_layers"

#: The first part of every valid override path (``dim``, ``memory.depth``, ``layer.1.memory``).
OVERRIDE_ROOTS: tuple[str, ...] = (*_TOP_LEVEL, MEMORY_LAYERS, LAYER, *KINDS)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A component config's fields as plain JSON/TOML types, ``None`` values left out."""
    return {
        field.name: _plain(getattr(config, field.name))
        for field in attrs.fields(type(config))
        if getattr(config, field.name) is not None
    }


def to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The canonical dict form of ``spec`` (plain types, ``None`` dropped, ``impl`` per kind)."""
    data: dict[str, Any] = {}
    for key in _TOP_LEVEL:
        value = getattr(spec, key)
        if value is not None:
            data[key] = _plain(value)
    for kind, choice in spec.choices().items():
        data[kind] = _choice_table(choice)
    if spec.layers:
        data[LAYER] = {str(layer): {kind: _choice_table(choice) for kind, choice in kinds}
                       for layer, kinds in spec.layers}
    return data


def _choice_table(choice: ComponentChoice) -> dict[str, Any]:
    return {"impl": choice.impl, **config_to_dict(choice.config)}


def parse_layers(selector: Any, num_layers: int | None = None) -> list[int]:
    """The layer indices a per-layer table's key names: ``3``, ``"3"``, ``"0,2"``, ``"1-3"``.

    With ``num_layers`` given, an index past the model is a one-line error naming the range.
    """
    where = f"[layer.{selector}]"
    if isinstance(selector, int) and not isinstance(selector, bool):
        layers = [selector]
    elif isinstance(selector, str) and selector.strip():
        layers = []
        for part in selector.split(","):
            first, dash, last = part.strip().partition("-")
            if not (first.isdigit() and (not dash or last.isdigit())):
                raise SpecError(f"{where}: layers are written as an index (1), a comma list "
                                f"(0,2) or a range (1-3), got {selector!r}")
            start, stop = int(first), int(last) if dash else int(first)
            if stop < start:
                raise SpecError(f"{where}: the range {part.strip()!r} runs backwards; write "
                                f"{stop}-{start}")
            layers.extend(range(start, stop + 1))
    else:
        raise SpecError(f"{where}: layers are written as an index (1), a comma list (0,2) or a "
                        f"range (1-3), got {selector!r}")
    if num_layers is not None:
        bad = sorted({i for i in layers if i >= num_layers})
        if bad:
            raise SpecError(f"[layer.{','.join(map(str, bad))}] does not exist: num_layers="
                            f"{num_layers} has layers 0..{num_layers - 1}; fix the layer index "
                            f"or num_layers")
    return sorted(set(layers))


def _layers_from_dict(value: Any, num_layers: Any, registry: ComponentRegistry
                      ) -> dict[int, dict[str, ComponentChoice]]:
    if not isinstance(value, Mapping):
        raise SpecError(f"[{LAYER}] must hold tables [layer.<layers>.<kind>], got {value!r}")
    known = num_layers if isinstance(num_layers, int) and not isinstance(num_layers, bool) else None
    layers: dict[int, dict[str, ComponentChoice]] = {}
    for selector, kinds in value.items():
        indices = parse_layers(selector, known)
        if not isinstance(kinds, Mapping):
            raise SpecError(f"[layer.{selector}] must hold one table per kind, e.g. "
                            f"[layer.{selector}.integration], got {kinds!r}")
        for kind, table in kinds.items():
            if kind not in KINDS:
                replaced = replaced_kind_message(f"layer.{selector}.{kind}")
                if replaced:
                    raise SpecError(replaced)
                raise _unknown_key(kind, KINDS, f"in [layer.{selector}] ")
            choice = _choice_from_dict(kind, table, registry, f"layer.{selector}.{kind}")
            for index in indices:
                if kind in layers.setdefault(index, {}):
                    raise SpecError(f"[layer.{index}.{kind}] is set twice (by [layer.{selector}] "
                                    f"and another table naming layer {index}); keep one")
                layers[index][kind] = choice
    return layers


def _unknown_key(key: str, valid: Iterable[str], where: str) -> SpecError:
    valid = sorted(valid)
    hints = close_matches(key, valid)
    hint = f"; did you mean {hints[0]!r}?" if hints else ""
    return SpecError(f"unknown key {where}{key!r}{hint} (valid keys: {', '.join(valid)})")


def build_config(config_cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate ``config_cls`` from ``values``; errors name the key, value and rule."""
    valid = [f.name for f in attrs.fields(config_cls)]
    for key in values:
        if key not in valid:
            raise _unknown_key(key, valid, where)
    try:
        return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where.rstrip('.')}: {exc}") from None


def _choice_from_dict(kind: str, table: Any, registry: ComponentRegistry,
                      where: str | None = None) -> ComponentChoice:
    where = where or kind
    if isinstance(table, str):  # a bare name selects the component with default settings
        table = {"impl": table}
    if not isinstance(table, Mapping):
        raise SpecError(f"[{where}] must be a table with an 'impl' key, got {table!r}")
    if "impl" not in table:
        raise SpecError(f"[{where}] has no 'impl' key; name {with_article(kind)} component, one of: "
                        f"{', '.join(registry.names(kind))}")
    if not isinstance(table["impl"], str):
        raise SpecError(f"{where}.impl must be a component name in quotes, got {table['impl']!r}; "
                        f"one of: {', '.join(registry.names(kind))}")
    try:
        component = registry.component(kind, table["impl"])
    except UnknownNameError as exc:
        raise SpecError(f"{where}.impl: {exc}") from None
    values = {k: v for k, v in table.items() if k != "impl"}
    config = build_config(component.config_cls, values, f"{where}.")
    return ComponentChoice(component.name, config)


def from_dict(data: Mapping[str, Any], registry: ComponentRegistry | None = None) -> ModelSpec:
    """Build and validate a :class:`ModelSpec` from its dict form (of any schema version).

    Older schemas are migrated first (:mod:`memforge.migrations`). Raises :class:`SpecError`
    for a newer schema version, unknown keys (with a did-you-mean), unknown component names (with
    close matches) and invalid values (naming field and range).
    """
    registry = registry or _default_registry()
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a table/object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SpecError(f"'schema_version' must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise SpecError(
            f"spec has schema_version {version}, but this memforge reads up to {SCHEMA_VERSION}; "
            f"upgrade memforge to load it"
        )
    try:
        spec = _spec_from_dict(data, version, registry)
    except SpecError as exc:
        older = None if "schema_version" in data else _older_schema(data)
        if older is None:
            raise
        raise SpecError(f"{exc}; a schema-{older} file? add schema_version = {older}") from None
    check_spec(spec, registry)
    return spec


def _older_schema(data: Mapping[str, Any]) -> int | None:
    """The older schema a spec without ``schema_version`` looks written in, from what only that
    schema wrote (docs/architecture.md, "Schema versions"), else ``None``."""
    integration = data.get("integration")
    if MEMORY_LAYERS in data or (isinstance(integration, Mapping) and "chunk_size" in integration):
        return 1
    layers = data.get(LAYER)
    tables = [data, *(layers.values() if isinstance(layers, Mapping) else ())]
    if any(isinstance(t, Mapping) and set(REPLACED_KINDS) & set(t) for t in tables):
        return 2
    return None


def _spec_from_dict(data: Mapping[str, Any], version: int, registry: ComponentRegistry
                    ) -> ModelSpec:
    """The spec of ``data`` at schema ``version``, migrated, before the cross-field checks."""
    data = migrate(data, version)
    for key in data:
        if key not in _TOP_LEVEL and key not in KINDS and key not in (LAYER, MEMORY_LAYERS):
            replaced = replaced_kind_message(str(key))
            if replaced:
                raise SpecError(replaced)
            raise _unknown_key(key, (*_TOP_LEVEL, *KINDS, LAYER), "")
    data = expand_memory_layers(data, registry)
    kwargs: dict[str, Any] = {k: data[k] for k in _TOP_LEVEL if k in data}
    kwargs["schema_version"] = SCHEMA_VERSION
    for kind in KINDS:
        if kind in data:
            kwargs[kind] = _choice_from_dict(kind, data[kind], registry)
    if LAYER in data:
        kwargs["layers"] = _layers_from_dict(data[LAYER], data.get("num_layers"), registry)
    missing = [k for k in ("vocab_size", "dim", "num_layers", "heads", "integration", "attention",
                           "feedforward") if k not in kwargs]
    if missing:
        raise SpecError(f"spec is missing {', '.join(repr(m) for m in missing)}; start from a "
                        f"preset (memforge show PRESET) and change what you need")
    try:
        spec = ModelSpec(**kwargs)
    except MemforgeError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(str(exc)) from None
    return spec


@attrs.frozen
class LayerUse:
    """What one layer of a spec builds, following the declared kinds from its integration down.

    Attributes:
        components: the component of each kind the layer uses, by kind.
        missing: ``(kind, who)`` for each required kind the spec does not set; ``who`` is the
            component that needs it (``"integration 'titans.lmm'"``).
        open: the layer's integration declares no kinds (a plugin written before declarations):
            it may build any kind, so what it ignores is known only once built. Every other
            component that declares none uses none.
    """

    components: dict[str, ComponentSpec]
    missing: list[tuple[str, str]]
    open: bool


def layer_use(spec: ModelSpec, registry: ComponentRegistry, layer: int) -> LayerUse:
    """The kinds ``layer`` uses: its integration, and what each used component ``requires`` (and
    ``optional`` kinds the spec sets), transitively. Unknown names are skipped (reported apart)."""
    chosen = spec.layer_choices(layer)
    components: dict[str, ComponentSpec] = {}
    missing: list[tuple[str, str]] = []
    is_open = False
    queue = ["integration"]
    while queue:
        kind = queue.pop(0)
        if kind in components or kind not in chosen:
            continue
        try:
            component = registry.component(kind, chosen[kind].impl)
        except UnknownNameError:
            continue
        components[kind] = component
        if kind == "integration" and not component.declares_kinds:
            is_open = True
        for needed in component.requires:
            if needed in chosen:
                queue.append(needed)
            elif (needed, f"{kind} {component.name!r}") not in missing:
                missing.append((needed, f"{kind} {component.name!r}"))
        queue.extend(k for k in component.optional if k in chosen)
    return LayerUse(components, missing, is_open)


def _grouped(problems: list[tuple[int, str]], num_layers: int) -> list[str]:
    """Problems found per layer, each said once: plainly when every layer has it, else naming
    the layers (``layer 0, 2: ...``)."""
    layers_of: dict[str, list[int]] = {}
    for layer, problem in problems:
        layers_of.setdefault(problem, []).append(layer)
    return [problem if len(layers) == num_layers or num_layers == 1
            else f"layer {', '.join(map(str, layers))}: {problem}"
            for problem, layers in layers_of.items()]


def _owner(use: LayerUse, kind: str) -> str:
    """The component of a layer that would have used ``kind``: its memory layer for the memory
    network and rules, else its integration."""
    if kind in MEMORY_KINDS and kind != "memory_layer" and "memory_layer" in use.components:
        return "memory_layer"
    return "integration"


def unused_problems(spec: ModelSpec, registry: ComponentRegistry,
                    used: dict[int, frozenset[str]]) -> list[str]:
    """Kinds the spec sets that no component uses, given the kinds ``used`` by each layer.

    A model-wide memory kind is refused when no layer uses that kind, a per-layer table when its
    layer does not; the message names the component that ignores it and the fix.
    """
    problems = []
    uses = {layer: layer_use(spec, registry, layer) for layer in range(spec.num_layers)}
    for layer, kinds in spec.layers:
        for kind, choice in kinds:
            if kind not in used[layer]:
                owner = _owner(uses[layer], kind)
                who = spec.choice(owner, layer)
                problems.append(
                    f"[layer.{layer}.{kind}] {choice.impl!r} is set but layer {layer}'s {owner} "
                    f"{who.impl if who else None!r} does not use it; remove the "
                    f"[layer.{layer}.{kind}] table")
    unused = [kind for kind in MEMORY_KINDS if getattr(spec, kind) is not None
              and not any(kind in used[layer] for layer in range(spec.num_layers))]
    if not unused:
        return problems
    owners = {_owner(uses[layer], kind) for layer in range(spec.num_layers) for kind in unused}
    owner = "memory_layer" if owners == {"memory_layer"} else "integration"
    names = sorted({spec.choice(owner, layer).impl for layer in range(spec.num_layers)
                    if spec.choice(owner, layer) is not None})
    alternatives = [name for name in registry.names(owner)
                    if registry.component(owner, name).declares_kinds
                    and set(unused) <= registry.component(owner, name).uses]
    one = len(unused) == 1
    problems.append(
        f"{owner} {' / '.join(repr(n) for n in names)} uses no {'/'.join(unused)} component, but "
        f"the spec sets {', '.join(f'[{k}] {getattr(spec, k).impl!r}' for k in unused)}, whose "
        f"settings would be ignored; remove {'that table' if one else 'those tables'} "
        f"({' '.join(f'--set {k}={NONE}' for k in unused)}) or choose {'an' if owner[0] == 'i' else 'a'} "
        f"{owner} that uses {'it' if one else 'them'}"
        + (f" ({', '.join(alternatives)})" if alternatives else ""))
    return problems


def spec_problems(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Cross-component problems of ``spec`` that the core can see: unknown names, wrong config
    types, kinds a layer needs but the spec does not set, and kinds set that no component uses."""
    problems = []
    for where, kind, choice in [(kind, kind, choice) for kind, choice in spec.choices().items()] + [
            (f"layer.{layer}.{kind}", kind, choice) for layer, kinds in spec.layers
            for kind, choice in kinds]:
        try:
            component = registry.component(kind, choice.impl)
        except UnknownNameError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not isinstance(choice.config, component.config_cls):
            problems.append(f"{where}: config for {choice.impl!r} must be a "
                            f"{component.config_cls.__name__}, got {type(choice.config).__name__}")
    if problems:
        return problems
    uses = {layer: layer_use(spec, registry, layer) for layer in range(spec.num_layers)}
    missing = [(layer, f"{who} needs {with_article(kind)} component; add a [{kind}] table (one of: "
                       f"{', '.join(registry.names(kind))})")
               for layer, use in uses.items() for kind, who in use.missing]
    problems.extend(_grouped(missing, spec.num_layers))
    if not problems:
        used = {layer: frozenset(KINDS) if use.open else frozenset(use.components)
                for layer, use in uses.items()}
        problems.extend(unused_problems(spec, registry, used))
    return problems


def used_kinds(spec: ModelSpec, registry: ComponentRegistry, layer: int | None = None
               ) -> frozenset[str]:
    """The kinds ``spec``'s model builds (in ``layer``, or in any layer): what each layer's
    integration declares, transitively. A plugin's ``memforge_validate_spec`` uses it to check
    only the components a model really uses."""
    layers = range(spec.num_layers) if layer is None else (layer,)
    return frozenset(kind for index in layers
                     for kind in layer_use(spec, registry, index).components)


def check_spec(spec: ModelSpec, registry: ComponentRegistry | None = None) -> None:
    """Raise one :class:`SpecError` listing every problem of ``spec`` (core and plugin checks)."""
    registry = registry or _default_registry()
    problems = spec_problems(spec, registry)
    if not problems and registry.pm is not None:
        for result in registry.pm.hook.memforge_validate_spec(spec=spec, registry=registry):
            problems.extend(result or ())
    if len(problems) == 1:
        raise SpecError(f"invalid spec: {problems[0]}")
    if problems:
        raise SpecError(f"invalid spec ({len(problems)} problems): " + "; ".join(problems))


def _parse_value(text: str) -> Any:
    """A TOML literal (``3``, ``0.5``, ``true``, ``[0, 2]``, ``"x"``), else the bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _split_path(path: str, value: Any = None) -> list[str]:
    """A dotted override path as its parts: ``[field]``, ``[kind]``, ``[kind, field]``, or
    ``[LAYER, layers, kind]`` and ``[LAYER, layers, kind, field]``. A path naming a kind of an
    older schema is refused saying what to write instead (for ``value``)."""
    parts = path.strip().split(".")
    replaced = replaced_kind_message(path, value)
    if replaced:
        raise SpecError(f"override {replaced}")
    if parts[0] == LAYER:
        if len(parts) not in (3, 4) or parts[2] not in KINDS:
            raise SpecError(f"override {path!r}: per-layer paths are layer.<layers>.<kind> or "
                            f"layer.<layers>.<kind>.<field>, e.g. layer.1.integration=titans.mac "
                            f"or layer.0,2.memory.depth=3")
        parse_layers(parts[1])
        return parts
    valid = (*_TOP_LEVEL, MEMORY_LAYERS, *KINDS)
    if len(parts) > 2 or parts[0] not in valid:
        raise _unknown_key(path, (*valid, f"{LAYER}.<layers>.<kind>"), "in override ")
    if len(parts) == 2 and parts[0] not in KINDS:
        raise SpecError(f"override {path!r}: {parts[0]!r} has no sub-keys")
    return parts


def _set_choice(tables: dict[str, Any], kind: str, value: Any, registry: ComponentRegistry,
                path: str, optional: bool) -> None:
    """Switch ``tables[kind]`` to component ``value`` (its defaults), or remove it for ``none``."""
    if value is None or value == NONE:
        if not optional:
            raise SpecError(f"override {path}={NONE}: every model needs its {kind} component; "
                            f"name one instead: {', '.join(registry.names(kind))}")
        tables.pop(kind, None)
    else:
        tables[kind] = {"impl": value}


def apply_overrides(
    spec: ModelSpec, overrides: Mapping[str, Any], registry: ComponentRegistry | None = None
) -> ModelSpec:
    """A new, validated spec with ``{dotted.path: value}`` overrides applied.

    ``"dim"`` sets a top-level field; ``"optimizer"`` (or ``"optimizer.impl"``) switches a kind's
    component, whose settings reset to the new component's defaults unless also overridden;
    ``"memory.depth"`` sets one config field; ``"memory": "none"`` (or ``None``) removes an
    optional (memory) component, e.g. when switching to an integration without memory.

    ``"layer.<layers>.<kind>"`` and ``"layer.<layers>.<kind>.<field>"`` do the same for some
    layers only (``<layers>``: ``1``, ``0,2`` or ``1-3``). A field set for a layer without its
    own choice of that kind starts from the model-wide choice; ``"layer.1.memory": "none"``
    removes layer 1's own choice, so it uses the model-wide one again. ``"memory_layers"``
    (``[1, 3]``) is the schema-1 shorthand for hybrids: the layers listed keep the spec's
    integration, the others become plain attention blocks (:mod:`memforge.migrations`).
    """
    registry = registry or _default_registry()
    _check_spec_argument(spec, "apply_overrides")
    if not isinstance(overrides, Mapping):
        raise SpecError(f"apply_overrides needs a mapping of dotted paths to values, got "
                        f"{type(overrides).__name__}; e.g. {{'memory.depth': 3}}")
    for path in overrides:
        if not isinstance(path, str):
            raise SpecError(f"override keys must be dotted paths such as 'memory.depth', got {path!r}")
    data = to_dict(spec)
    per_layer: dict[int, dict[str, Any]] = {int(k): v for k, v in data.pop(LAYER, {}).items()}
    parsed = [(_split_path(path, value), value) for path, value in overrides.items()]

    def order(item: tuple[list[str], Any]) -> tuple[int, int]:
        parts = item[0]
        kind_parts = parts[2:] if parts[0] == LAYER else parts
        is_field = len(kind_parts) == 2 and kind_parts[1] != "impl"
        # Sizes first, then model-wide switches, per-layer switches, and fields last: a field
        # lands on the component its path names after every switch.
        rank = 0 if kind_parts[0] not in KINDS else 1 + (parts[0] == LAYER)
        return (is_field, rank)

    for parts, value in sorted(parsed, key=order):
        path = ".".join(parts)
        if parts[0] != LAYER and parts[0] not in KINDS:
            data[parts[0]] = value
        elif parts[0] != LAYER:
            if len(parts) == 1 or parts[1] == "impl":
                _set_choice(data, parts[0], value, registry, path, parts[0] in MEMORY_KINDS)
            elif not isinstance(data.get(parts[0]), dict):
                raise SpecError(f"override {path!r}: the spec has no [{parts[0]}] component; "
                                f"choose one first ({parts[0]}=NAME)")
            else:
                data[parts[0]][parts[1]] = value
        else:
            kind, field = parts[2], parts[3] if len(parts) == 4 else "impl"
            for index in parse_layers(parts[1]):
                tables = per_layer.setdefault(index, {})
                if field == "impl":
                    _set_choice(tables, kind, value, registry, path, True)
                    continue
                if kind not in tables:
                    if not isinstance(data.get(kind), dict):
                        raise SpecError(f"override {path!r}: layer {index} has no [{kind}] "
                                        f"component; choose one first "
                                        f"({LAYER}.{parts[1]}.{kind}=NAME)")
                    tables[kind] = dict(data[kind])
                tables[kind][field] = value
    layers = {str(index): tables for index, tables in sorted(per_layer.items()) if tables}
    if layers:
        data[LAYER] = layers
    return from_dict({k: v for k, v in data.items() if v is not None}, registry)


def override(
    spec: ModelSpec, assignments: Iterable[str], registry: ComponentRegistry | None = None
) -> ModelSpec:
    """A new, validated spec with ``"key=value"`` assignments applied (the CLI's ``--set``).

    ``"dim=64"``, ``"optimizer=titans.sgd"``, ``"memory.depth=3"``,
    ``"layer.1.integration=titans.mac"``, ``"layer.0,2.memory.depth=3"``; values are TOML literals
    (``[0, 2]``, ``true``, ``0.5``), anything else is taken as a string. See
    :func:`apply_overrides` for the rules.
    """
    _check_spec_argument(spec, "override")
    if isinstance(assignments, Mapping):
        raise SpecError("override takes a list of 'key=value' strings; for a dict of values use "
                        "memforge.apply_overrides(spec, {'memory.depth': 3})")
    if isinstance(assignments, (str, bytes)) or not isinstance(assignments, Iterable):
        raise SpecError(f"override needs a list of 'key=value' strings, got "
                        f"{type(assignments).__name__} {assignments!r}; e.g. ['memory.depth=3']")
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        if not isinstance(assignment, str):
            raise SpecError(f"override assignments must be 'key=value' strings, got "
                            f"{type(assignment).__name__} {assignment!r}; e.g. 'memory.depth=3'")
        path, sep, text = assignment.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"override {assignment!r} must look like 'key=value' "
                            f"(e.g. memory.depth=3 or optimizer=titans.sgd)")
        overrides[path.strip()] = _parse_value(text.strip())
    return apply_overrides(spec, overrides, registry)


def _check_spec_argument(spec: Any, function: str) -> None:
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{function} needs a ModelSpec, got {type(spec).__name__}; get one from "
                        f"memforge.preset(NAME) or memforge.load_spec(PATH)")


def spec_id(spec: ModelSpec) -> str:
    """A stable 10-character hash of the spec's canonical JSON, for run names and de-duplication.

    The canonical JSON is :func:`to_dict` with sorted keys and no spaces; the id is the first 10
    hex digits of its SHA-256. Stored run names depend on it, so it changes only with the schema
    (``tests/test_spec.py`` pins a golden value): a file of an older schema has the id of its
    migration, and ids computed by a memforge of an older schema differ (docs/architecture.md,
    "Schema versions").
    """
    _check_spec_argument(spec, "spec_id")
    canonical = json.dumps(to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _default_registry() -> ComponentRegistry:
    from memforge.plugins import default_registry

    return default_registry()
