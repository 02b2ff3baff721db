"""Typed model specs: frozen attrs classes that round-trip through plain dicts (and so TOML/JSON).

A :class:`ModelSpec` holds the model's sizes and one :class:`ComponentChoice` per kind: a
registered component name (``impl``) and an instance of that component's own frozen config class.
Its dict form is flat, one table per kind with the reserved key ``impl``::

    schema_version = 1
    vocab_size = 256
    dim = 128
    num_layers = 2
    heads = 4

    [memory]
    impl = "titans.mlp"
    depth = 2

The dict form names registry entries, never import paths, so moving code never breaks a stored
spec. ``None`` values are dropped when writing (TOML has no null), which is why optional fields
default to ``None``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from memforge.errors import MemforgeError, SpecError, UnknownNameError, close_matches
from memforge.interfaces import KINDS, MEMORY_KINDS
from memforge.registry import ComponentRegistry

#: The schema version this memforge writes and reads.
SCHEMA_VERSION = 1

#: Upper limits of the top-level sizes. No model memforge can train comes near them (the largest
#: public models have widths near 16K, vocabularies near 256K and about 130 blocks); they stop a
#: typo such as ``dim=1000000`` before any arithmetic on it. Parameter counts are checked
#: separately, before building (:data:`memforge.builder.MAX_PARAMETERS`).
SIZE_LIMITS: dict[str, int] = {"vocab_size": 2**24, "dim": 2**16, "num_layers": 1024, "heads": 1024}

#: The override value that removes an optional component (``--set memory=none``).
NONE = "none"

#: The integration used for blocks outside ``memory_layers``: attention + feed-forward.
FALLBACK_INTEGRATION = "baseline.transformer"


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


def _layer_tuple(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SpecError(f"'memory_layers' must be a list of layer indices, got {value!r}")
    items = tuple(value)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
        raise SpecError(f"'memory_layers' must hold integers, got {list(items)!r}")
    return tuple(sorted(set(items)))


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
        memory_layers: indices of the blocks that use the (memory-bearing) integration; the other
            blocks are plain attention blocks (hybrids). ``None``: every block.
        memory, surprise, forgetting, retrieval, projection: the memory parts; ``None`` for models
            whose integration carries no memory.
        attention, feedforward, integration: always chosen.
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
    surprise: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    forgetting: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    retrieval: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    projection: ComponentChoice | None = attrs.field(default=None, validator=_optional_choice)
    memory_layers: tuple[int, ...] | None = attrs.field(default=None, converter=_layer_tuple)
    schema_version: int = SCHEMA_VERSION

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise SpecError(
                f"'heads'={self.heads} must divide 'dim'={self.dim}; pick heads among "
                f"{[h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]}"
            )
        if self.memory_layers is not None:
            bad = [i for i in self.memory_layers if not 0 <= i < self.num_layers]
            if bad:
                raise SpecError(
                    f"'memory_layers' {bad} out of range for num_layers={self.num_layers}; "
                    f"use indices 0..{self.num_layers - 1}"
                )

    def choices(self) -> dict[str, ComponentChoice]:
        """The chosen components by kind, unset kinds left out."""
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None}

    def has_memory_at(self, layer: int) -> bool:
        """Whether block ``layer`` uses the spec's integration (else a plain attention block)."""
        return self.memory_layers is None or layer in self.memory_layers


_TOP_LEVEL = ("schema_version", "vocab_size", "dim", "num_layers", "heads", "memory_layers")


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
        data[kind] = {"impl": choice.impl, **config_to_dict(choice.config)}
    return data


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


def _choice_from_dict(kind: str, table: Any, registry: ComponentRegistry) -> ComponentChoice:
    if isinstance(table, str):  # a bare name selects the component with default settings
        table = {"impl": table}
    if not isinstance(table, Mapping):
        raise SpecError(f"[{kind}] must be a table with an 'impl' key, got {table!r}")
    if "impl" not in table:
        raise SpecError(f"[{kind}] has no 'impl' key; name a {kind} component, one of: "
                        f"{', '.join(registry.names(kind))}")
    if not isinstance(table["impl"], str):
        raise SpecError(f"{kind}.impl must be a component name in quotes, got {table['impl']!r}; "
                        f"one of: {', '.join(registry.names(kind))}")
    try:
        component = registry.component(kind, table["impl"])
    except UnknownNameError as exc:
        raise SpecError(f"{kind}.impl: {exc}") from None
    values = {k: v for k, v in table.items() if k != "impl"}
    config = build_config(component.config_cls, values, f"{kind}.")
    return ComponentChoice(component.name, config)


def from_dict(data: Mapping[str, Any], registry: ComponentRegistry | None = None) -> ModelSpec:
    """Build and validate a :class:`ModelSpec` from its dict form.

    Raises :class:`SpecError` for a newer schema version, unknown keys (with a did-you-mean),
    unknown component names (with close matches) and invalid values (naming field and range).
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
    for key in data:
        if key not in _TOP_LEVEL and key not in KINDS:
            raise _unknown_key(key, (*_TOP_LEVEL, *KINDS), "")
    kwargs: dict[str, Any] = {k: data[k] for k in _TOP_LEVEL if k in data}
    kwargs["schema_version"] = SCHEMA_VERSION
    for kind in KINDS:
        if kind in data:
            kwargs[kind] = _choice_from_dict(kind, data[kind], registry)
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
    check_spec(spec, registry)
    return spec


def spec_problems(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Cross-component problems of ``spec`` that the core can see (names, required kinds)."""
    problems = []
    for kind, choice in spec.choices().items():
        try:
            component = registry.component(kind, choice.impl)
        except UnknownNameError as exc:
            problems.append(f"{kind}: {exc}")
            continue
        if not isinstance(choice.config, component.config_cls):
            problems.append(f"{kind}: config for {choice.impl!r} must be a "
                            f"{component.config_cls.__name__}, got {type(choice.config).__name__}")
    integration = spec.choices().get("integration")
    if integration is not None and integration.impl in registry.names("integration"):
        component = registry.component("integration", integration.impl)
        for kind in component.requires:
            if getattr(spec, kind) is None:
                problems.append(f"integration {integration.impl!r} needs a {kind} component; add a "
                                f"[{kind}] table (one of: {', '.join(registry.names(kind))})")
        carries_memory = bool(set(MEMORY_KINDS) & component.uses)
        if spec.memory_layers is not None and not carries_memory:
            problems.append(f"'memory_layers' is set but integration {integration.impl!r} carries "
                            f"no memory; drop memory_layers or choose a memory integration")
        elif spec.memory_layers == ():
            problems.append(f"'memory_layers' is empty, so integration {integration.impl!r} would "
                            f"be in no block and its memory settings unused; list the blocks that "
                            f"carry memory (e.g. memory_layers=[0]) or leave memory_layers out for "
                            f"memory in every block")
        unused = [kind for kind in MEMORY_KINDS
                  if getattr(spec, kind) is not None and kind not in component.uses]
        if unused:
            users = [name for name in registry.names("integration")
                     if set(unused) <= registry.component("integration", name).uses]
            problems.append(
                f"integration {integration.impl!r} uses no {'/'.join(unused)} component, but the "
                f"spec sets {', '.join(f'[{k}] {getattr(spec, k).impl!r}' for k in unused)}, "
                f"whose settings would be ignored; remove "
                f"{'that table' if len(unused) == 1 else 'those tables'} "
                f"({' '.join(f'--set {k}={NONE}' for k in unused)}) or choose an integration that "
                f"uses {'it' if len(unused) == 1 else 'them'}"
                + (f" ({', '.join(users)})" if users else ""))
    return problems


def used_kinds(spec: ModelSpec, registry: ComponentRegistry) -> frozenset[str]:
    """The kinds ``spec``'s model builds: its integration's declared kinds, those of the plain
    attention block (:data:`FALLBACK_INTEGRATION`) if some layer is outside ``memory_layers``,
    and ``integration`` itself. A plugin's ``memforge_validate_spec`` uses it to check only the
    components a model really uses."""
    kinds = {"integration", *registry.component("integration", spec.integration.impl).uses}
    if not all(spec.has_memory_at(layer) for layer in range(spec.num_layers)):
        kinds |= registry.component("integration", FALLBACK_INTEGRATION).uses
    return frozenset(kinds)


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


def _split_path(path: str) -> list[str]:
    parts = path.strip().split(".")
    if len(parts) > 2 or (parts[0] not in _TOP_LEVEL and parts[0] not in KINDS):
        raise _unknown_key(path, (*_TOP_LEVEL, *KINDS), "in override ")
    if len(parts) == 2 and parts[0] not in KINDS:
        raise SpecError(f"override {path!r}: {parts[0]!r} has no sub-keys")
    return parts


def apply_overrides(
    spec: ModelSpec, overrides: Mapping[str, Any], registry: ComponentRegistry | None = None
) -> ModelSpec:
    """A new, validated spec with ``{dotted.path: value}`` overrides applied.

    ``"dim"`` sets a top-level field; ``"surprise"`` (or ``"surprise.impl"``) switches a kind's
    component, whose settings reset to the new component's defaults unless also overridden;
    ``"memory.depth"`` sets one config field; ``"memory": "none"`` (or ``None``) removes an
    optional (memory) component, e.g. when switching to an integration without memory.
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
    parsed = [(_split_path(path), value) for path, value in overrides.items()]
    # Component switches first, so field assignments land on the new component's table.
    for parts, value in sorted(parsed, key=lambda item: (len(item[0]), item[0][-1] != "impl")):
        if len(parts) == 1 and parts[0] in KINDS or len(parts) == 2 and parts[1] == "impl":
            if value is None or value == NONE:
                if parts[0] not in MEMORY_KINDS:
                    raise SpecError(f"override {'.'.join(parts)}={NONE}: every model needs its "
                                    f"{parts[0]} component; name one instead: "
                                    f"{', '.join(registry.names(parts[0]))}")
                data[parts[0]] = None
            else:
                data[parts[0]] = {"impl": value}
        elif len(parts) == 1:
            data[parts[0]] = value
        else:
            if not isinstance(data.get(parts[0]), dict):
                raise SpecError(f"override {'.'.join(parts)!r}: the spec has no [{parts[0]}] "
                                f"component; choose one first ({parts[0]}=NAME)")
            data[parts[0]][parts[1]] = value
    return from_dict({k: v for k, v in data.items() if v is not None}, registry)


def override(
    spec: ModelSpec, assignments: Iterable[str], registry: ComponentRegistry | None = None
) -> ModelSpec:
    """A new, validated spec with ``"key=value"`` assignments applied (the CLI's ``--set``).

    ``"dim=64"``, ``"surprise=titans.gradient"``, ``"memory.depth=3"``; values are TOML literals
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
                            f"(e.g. memory.depth=3 or surprise=titans.gradient)")
        overrides[path.strip()] = _parse_value(text.strip())
    return apply_overrides(spec, overrides, registry)


def _check_spec_argument(spec: Any, function: str) -> None:
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{function} needs a ModelSpec, got {type(spec).__name__}; get one from "
                        f"memforge.preset(NAME) or memforge.load_spec(PATH)")


def spec_id(spec: ModelSpec) -> str:
    """A stable 10-character hash of the spec's canonical JSON, for run names and de-duplication.

    The canonical JSON is :func:`to_dict` with sorted keys and no spaces; the id is the first 10
    hex digits of its SHA-256. Stored run names depend on it, so it must not change between
    versions (``tests/test_spec.py`` pins a golden value).
    """
    _check_spec_argument(spec, "spec_id")
    canonical = json.dumps(to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _default_registry() -> ComponentRegistry:
    from memforge.plugins import default_registry

    return default_registry()
