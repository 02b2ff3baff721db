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

This module is the only place in the core that names plugin components: the meaning of a
schema-1 file is fixed by what those names built at the time.
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


def migrate(data: Mapping[str, Any], version: int) -> dict[str, Any]:
    """``data``, a spec dict of schema ``version``, as a dict of the current schema."""
    data = dict(data)
    if version < 2:
        data = _from_1(data)
    return data


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
