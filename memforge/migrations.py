"""Older spec dicts brought to the current schema (docs/architecture.md, "Schema versions").

:func:`memforge.spec.from_dict` calls :func:`migrate` on every dict it reads, so spec files,
saved models and runs written by an older memforge keep loading. Each step is a pure function of
the dict form from one version to the next; the result is validated like any other spec.

Schema 1 -> 2:

* The Titans memory layer became a kind of its own (``memory_layer``). In schema 1 the four
  Titans integrations built it themselves from the memory kinds and carried its ``chunk_size``;
  schema 2 writes ``[memory_layer] impl = "titans.neural_memory"`` with that chunk size, and the
  integration table loses the key. A schema-1 table without ``chunk_size`` had the integration's
  default, kept here (:data:`SCHEMA1_CHUNK_DEFAULTS`).
* ``memory_layers = [...]`` meant "the integration in these blocks, a plain attention block
  (``baseline.transformer``) in the others". Schema 2 writes per-layer choices instead
  (``[layer.0.integration] impl = "baseline.transformer"``); :func:`expand_memory_layers` does
  the translation, and still reads the key in schema-2 dicts and overrides as a shorthand.

Schema 2 -> 3:

* Titans' surprise rule is split into what it was made of (docs/architecture.md, "Kinds"): the
  loss (kind ``objective``) and the step (kind ``optimizer``). ``[surprise] impl =
  "titans.momentum"`` becomes ``[objective] impl = "titans.l2"`` and ``[optimizer] impl =
  "titans.momentum"`` with the same settings; ``titans.gradient`` becomes ``titans.l2`` and
  ``titans.sgd`` (:data:`SCHEMA2_SURPRISE`). Another plugin's surprise component cannot be split
  without knowing its loss: a one-line error says so.
* The kind ``forgetting`` is called ``retention`` (its components and settings unchanged).
* Per-layer tables likewise. The layer's modules were renamed with the kinds, so the weights of a
  schema-2 model are renamed too (:func:`migrate_state_dict`); the spec's id changes with the
  schema, as every schema change does (:func:`memforge.spec.spec_id`).

This module is the only place in the core that names plugin components: the meaning of an older
file is fixed by what those names built at the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from memforge.errors import SpecError
from memforge.interfaces import MEMORY_KINDS
from memforge.registry import ComponentRegistry

#: The schema-1 integrations that built the Titans memory layer, with their default chunk sizes.
SCHEMA1_CHUNK_DEFAULTS: dict[str, int] = {
    "titans.lmm": 64, "titans.mac": 16, "titans.mag": 64, "titans.mal": 64}

#: The memory layer those integrations built.
SCHEMA1_MEMORY_LAYER = "titans.neural_memory"

#: The block of the layers outside ``memory_layers`` in schema 1.
SCHEMA1_PLAIN_BLOCK = "baseline.transformer"

#: The schema-2 surprise components and the (objective, optimizer) each was made of.
SCHEMA2_SURPRISE: dict[str, tuple[str, str]] = {
    "titans.momentum": ("titans.l2", "titans.momentum"),
    "titans.gradient": ("titans.l2", "titans.sgd"),
}

#: Kinds of an older schema, by the kinds that replaced them (schema 3).
REPLACED_KINDS: dict[str, tuple[str, ...]] = {
    "surprise": ("objective", "optimizer"),
    "forgetting": ("retention",),
}

#: State-dict name parts of the memory layer's modules renamed with their kinds (schema 3).
SCHEMA2_MODULES: dict[str, str] = {".surprise.": ".optimizer.", ".forgetting.": ".retention."}


def migrate(data: Mapping[str, Any], version: int) -> dict[str, Any]:
    """``data``, a spec dict of schema ``version``, as a dict of the current schema."""
    data = dict(data)
    if version < 2:
        data = _from_1(data)
    if version < 3:
        data = _from_2(data)
    return data


def migrate_state_dict(weights: Mapping[str, Any], version: Any) -> dict[str, Any]:
    """The weights of a model saved with a spec of schema ``version``, under today's names.

    Schema 3 renamed the memory layer's ``surprise`` and ``forgetting`` modules to ``optimizer``
    and ``retention`` (the loss, now ``objective``, has no parameters). ``version`` is the
    ``schema_version`` the stored spec names; anything but an integer below 3 (absent: today's
    schema) leaves the names as they are.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version >= 3:
        return dict(weights)
    renamed = {}
    for key, value in weights.items():
        for old, new in SCHEMA2_MODULES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _from_1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: the Titans integrations' memory layer becomes a ``[memory_layer]`` table."""
    data["schema_version"] = 2
    table = data.get("integration")
    if isinstance(table, str):
        table = {"impl": table}
    if (isinstance(table, Mapping) and table.get("impl") in SCHEMA1_CHUNK_DEFAULTS
            and "memory_layer" not in data):
        table = dict(table)
        chunk = table.pop("chunk_size", SCHEMA1_CHUNK_DEFAULTS[table["impl"]])
        data["integration"] = table
        data["memory_layer"] = {"impl": SCHEMA1_MEMORY_LAYER, "chunk_size": chunk}
    return data


def _from_2(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 -> 3: ``surprise`` -> ``objective`` + ``optimizer``, ``forgetting`` -> ``retention``,
    model-wide and in every per-layer table."""
    data = {**_split_kinds(data, "the spec"), "schema_version": 3}
    layers = data.get("layer")
    if isinstance(layers, Mapping):
        data["layer"] = {
            selector: _split_kinds(kinds, f"[layer.{selector}]") if isinstance(kinds, Mapping)
            else kinds for selector, kinds in layers.items()}
    return data


def _split_kinds(tables: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``tables`` (a spec's or one per-layer table's kinds) with the schema-2 kinds replaced."""
    tables = dict(tables)
    for old, new in REPLACED_KINDS.items():
        if old not in tables:
            continue
        clash = [kind for kind in new if kind in tables]
        if clash:
            raise SpecError(f"{where} sets both [{old}] (schema 2) and [{clash[0]}] (its "
                            f"replacement); keep [{clash[0]}] and remove [{old}]")
        table = tables.pop(old)
        if old == "forgetting":
            tables["retention"] = table
            continue
        impl = table.get("impl") if isinstance(table, Mapping) else table
        if impl not in SCHEMA2_SURPRISE:
            raise SpecError(
                f"{where}'s [surprise] {impl!r} cannot be split into the schema-3 kinds "
                f"objective and optimizer automatically (only {', '.join(SCHEMA2_SURPRISE)} "
                f"can); replace [surprise] by an [objective] and an [optimizer] table naming "
                f"that plugin's new components")
        objective, optimizer = SCHEMA2_SURPRISE[impl]
        settings = {k: v for k, v in table.items() if k != "impl"} if isinstance(
            table, Mapping) else {}
        tables["objective"] = {"impl": objective}
        tables["optimizer"] = {"impl": optimizer, **settings}
    return tables


def replaced_kind_message(path: str, value: Any = None) -> str | None:
    """What replaced the older kind that the dotted path ``path`` starts with (``surprise``,
    ``surprise.max_lr``, ``forgetting``, ``layer.1.forgetting.init``): one sentence naming the
    schema-3 assignment to write instead (with ``value`` when given); ``None`` when ``path``
    names no replaced kind."""
    parts = path.strip().split(".")
    at = 2 if parts[0] == "layer" and len(parts) > 2 else 0
    if parts[at] not in REPLACED_KINDS:
        return None
    if not isinstance(value, (str, int, float)):  # a table or list: name no value
        value = None
    prefix = "".join(f"{part}." for part in parts[:at])
    field = parts[at + 1] if len(parts) > at + 1 else "impl"
    suffix = "" if field == "impl" else f".{field}"
    shown = "" if value is None else f"={value}"
    if parts[at] == "forgetting":
        return (f"{path!r}: the kind 'forgetting' is called 'retention' since spec schema 3 (same "
                f"components and settings); write {prefix}retention{suffix}{shown}")
    if field != "impl":
        instead = f"{prefix}optimizer{suffix}{shown}"
    elif value in SCHEMA2_SURPRISE:
        instead = f"{prefix}optimizer={SCHEMA2_SURPRISE[value][1]}"
    elif value == "none":
        instead = f"{prefix}objective=none and {prefix}optimizer=none"
    elif value is None:
        instead = f"{prefix}optimizer=titans.momentum or {prefix}optimizer=titans.sgd"
    else:
        instead = f"{prefix}objective=... and {prefix}optimizer=... for {value}'s parts"
    return (f"{path!r}: the kind 'surprise' was split into 'objective' (the loss, "
            f"{prefix}objective=titans.l2) and 'optimizer' (step size and momentum) in spec schema "
            f"3; write {instead}")


def _layer_indices(value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SpecError(f"'memory_layers' must be a list of layer indices, got {value!r}")
    items = list(value)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
        raise SpecError(f"'memory_layers' must hold integers, got {items!r}")
    return sorted(set(items))


def expand_memory_layers(data: Mapping[str, Any], registry: ComponentRegistry) -> dict[str, Any]:
    """``data`` with its ``memory_layers`` key (if any) replaced by per-layer integration choices.

    The blocks listed keep the spec's integration; every other block gets
    :data:`SCHEMA1_PLAIN_BLOCK`. Per-layer integration choices already in ``data`` are replaced:
    ``memory_layers`` says which block has which integration, for every block.
    """
    data = dict(data)
    if "memory_layers" not in data:
        return data
    layers = _layer_indices(data.pop("memory_layers"))
    num_layers = data.get("num_layers")
    if isinstance(num_layers, int) and not isinstance(num_layers, bool):
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise SpecError(f"'memory_layers' {bad} out of range for num_layers={num_layers}; "
                            f"use indices 0..{num_layers - 1}")
    table = data.get("integration")
    impl = table.get("impl") if isinstance(table, Mapping) else table
    if isinstance(impl, str) and impl in registry.names("integration"):
        component = registry.component("integration", impl)
        if not set(MEMORY_KINDS) & component.uses:
            raise SpecError(f"'memory_layers' is set but integration {impl!r} carries no memory; "
                            f"drop memory_layers or choose a memory integration")
        if not layers:
            raise SpecError(f"'memory_layers' is empty, so integration {impl!r} would be in no "
                            f"block and its memory settings unused; list the blocks that carry "
                            f"memory (e.g. memory_layers=[0]) or leave memory_layers out for "
                            f"memory in every block")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        return data  # the spec's own check reports num_layers
    per_layer = {key: dict(kinds) for key, kinds in _tables(data.get("layer")).items()}
    for key, kinds in list(per_layer.items()):
        kinds.pop("integration", None)
        if not kinds:
            del per_layer[key]
    for index in range(num_layers):
        if index not in layers:
            per_layer.setdefault(str(index), {})["integration"] = {"impl": SCHEMA1_PLAIN_BLOCK}
    if per_layer:
        data["layer"] = per_layer
    else:
        data.pop("layer", None)
    return data


def _tables(value: Any) -> dict[str, Any]:
    """The ``[layer.*]`` tables as ``{selector: {kind: table}}`` (anything else left to the
    spec's own checks, which name it)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(key): kinds for key, kinds in value.items() if isinstance(kinds, Mapping)}
