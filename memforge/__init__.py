"""memforge: build, train and ablate memory-augmented sequence models from plugins.

The public API (pinned by ``tests/test_public_api.py``)::

    spec = memforge.preset("titans.mac_tiny", dim=64)           # a ModelSpec, not a module
    spec = memforge.override(spec, ["memory.depth=3"])          # dotted overrides, validated
    model = memforge.build_model(spec)                          # a plain torch.nn.Module
    out = model(tokens)                                         # out.logits, out.state
    out = model(tokens, labels=tokens)                          # out.loss: next-token loss
    memforge.save_model(model, "my_model")                      # spec + safetensors, no pickle
    model = memforge.load_model("runs/my-run")                  # a run, checkpoint or saved model

Plugin authors build against the contracts (``memforge.interfaces``, whose Protocols are also
re-exported here: ``memforge.MemoryLayer``, ``memforge.ReadsMemory``, ...), the capability checks
(``memforge.capabilities``), the shared building blocks (``memforge.nn``: ``RMSNorm``,
``RotaryEmbedding``, ``SwiGLU``, attention helpers), ``memforge.Linear`` and
``memforge.StaticDecoder``; docs/plugins.md says which names are stable.

Importing memforge does not import torch's compiler stack (``torch._dynamo``): only compiling
does, on first use.
"""

from __future__ import annotations

from typing import Any

import pluggy

from memforge import capabilities, interfaces, nn
from memforge.builder import build_model
from memforge.checks import checks_values
from memforge.compiling import compile_model
from memforge.config import option
from memforge.decoding import StaticDecoder
from memforge.errors import (
    InputError,
    MemforgeError,
    NonFiniteError,
    PluginError,
    SpecError,
    UnknownNameError,
)
from memforge.interfaces import (
    KINDS,
    MEMORY_KINDS,
    TIERS,
    Attention,
    Block,
    BuildContext,
    ChunkReader,
    CompilesSteps,
    ComposesAttention,
    DecodesAttentionStatically,
    DecodesMemoryStatically,
    DecodesStatically,
    DescribesRule,
    FactorsThroughGram,
    FeedForward,
    MemoryLayer,
    MemoryNetwork,
    Objective,
    ObjectiveInputs,
    Optimizer,
    Projection,
    ProjectsWeights,
    ReadsMemory,
    ReadsMemoryStatically,
    Retention,
    RetrievalRule,
    RuleDescription,
    StaticDecodeStart,
    StepGates,
    TransformsUpdate,
)
from memforge.io import load_spec, save_spec
from memforge.linear import Linear
from memforge.model import ModelOutput, ModelState
from memforge.plugins import configure_plugins, default_registry
from memforge.registry import ComponentSpec, PresetSpec, sized_presets
from memforge.saving import load_model, save_model
from memforge.spec import ComponentChoice, ModelSpec, apply_overrides, override, spec_id

__version__ = "0.1.0"

#: Marks a plugin's hook implementations: ``@memforge.hookimpl def memforge_register_components()``.
hookimpl = pluggy.HookimplMarker("memforge")


def preset(name: str, **overrides: Any) -> ModelSpec:
    """The spec of preset ``name``, with optional overrides.

    Keyword overrides are top-level fields (``dim=64``), component switches
    (``optimizer="titans.sgd"``) or a kind's field table (``memory={"depth": 3}``); dotted
    paths work through a dict: ``preset(name, **{"memory.depth": 3})``.
    """
    spec = default_registry().preset(name).build()
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            flat[key] = value
    return apply_overrides(spec, flat) if flat else spec


def presets() -> list[str]:
    """Names of every registered preset, sorted."""
    return default_registry().preset_names()


def available(kind: str | None = None) -> list[str] | dict[str, list[str]]:
    """Registered component names: of one ``kind`` as a list, or all as ``{kind: [names]}``."""
    registry = default_registry()
    if kind is not None:
        return registry.names(kind)
    return {k: registry.names(k) for k in KINDS}


__all__ = [
    "MEMORY_KINDS",
    "Attention",
    "Block",
    "BuildContext",
    "ChunkReader",
    "CompilesSteps",
    "ComposesAttention",
    "DecodesAttentionStatically",
    "DecodesMemoryStatically",
    "DecodesStatically",
    "FactorsThroughGram",
    "FeedForward",
    "DescribesRule",
    "Objective",
    "ObjectiveInputs",
    "Optimizer",
    "ProjectsWeights",
    "Retention",
    "RuleDescription",
    "StepGates",
    "TIERS",
    "TransformsUpdate",
    "Linear",
    "MemoryLayer",
    "MemoryNetwork",
    "Projection",
    "ReadsMemory",
    "ReadsMemoryStatically",
    "RetrievalRule",
    "StaticDecodeStart",
    "StaticDecoder",
    "capabilities",
    "interfaces",
    "nn",
    "ComponentChoice",
    "ComponentSpec",
    "InputError",
    "KINDS",
    "MemforgeError",
    "NonFiniteError",
    "ModelOutput",
    "ModelSpec",
    "ModelState",
    "PluginError",
    "PresetSpec",
    "SpecError",
    "UnknownNameError",
    "apply_overrides",
    "available",
    "build_model",
    "checks_values",
    "compile_model",
    "configure_plugins",
    "hookimpl",
    "load_model",
    "load_spec",
    "option",
    "override",
    "preset",
    "presets",
    "save_model",
    "save_spec",
    "sized_presets",
    "spec_id",
]
