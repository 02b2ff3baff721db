"""Presets of the ``titans`` plugin: each variant in a ``_tiny`` size (tests) and a small size
that trains on a laptop CPU in minutes.

The attention and feed-forward parts are the ``baseline`` plugin's, named through the registry
(:func:`part`) rather than imported from its modules: plugins share components by name only.
"""

from __future__ import annotations

from typing import Any

import attrs

from memforge.plugins import default_registry
from memforge.registry import PresetSpec
from memforge.spec import ComponentChoice, ModelSpec
from memforge_titans import configs as c
from memforge_titans.lmm import LMMIntegrationConfig
from memforge_titans.mac import MACIntegrationConfig
from memforge_titans.mag import MAGIntegrationConfig
from memforge_titans.mal import MALIntegrationConfig


def part(kind: str, name: str, **settings: Any) -> ComponentChoice:
    """The registered component ``name`` of ``kind`` with ``settings`` (its defaults otherwise)."""
    return ComponentChoice(name, default_registry().component(kind, name).config_cls(**settings))


#: (vocab, dim, layers, heads, chunk) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 16)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}


def titans_spec(size: str, integration: ComponentChoice,
                attention: ComponentChoice | None = None) -> ModelSpec:
    """A spec with the Titans memory defaults (deep MLP memory, l2 loss, momentum, adaptive
    decay, conv) and the size's chunk."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    return ModelSpec(
        vocab_size=vocab, dim=dim, num_layers=layers, heads=heads,
        integration=integration,
        attention=attention or part("attention", "baseline.causal"),
        feedforward=part("feedforward", "baseline.swiglu"),
        memory_layer=ComponentChoice("titans.neural_memory", c.NeuralMemoryConfig(chunk_size=chunk)),
        memory=ComponentChoice("titans.mlp", c.MLPMemoryConfig()),
        objective=ComponentChoice("titans.l2", c.L2ObjectiveConfig()),
        optimizer=ComponentChoice("titans.momentum", c.MomentumConfig()),
        retention=ComponentChoice("titans.adaptive_decay", c.AdaptiveDecayConfig()),
        retrieval=ComponentChoice("titans.chunk_start", c.RetrievalConfig()),
        projection=ComponentChoice("titans.conv_qkv", c.ConvProjectionConfig()),
    )


def _lmm(size: str) -> ModelSpec:
    return titans_spec(size, ComponentChoice("titans.lmm", LMMIntegrationConfig()))


def _mac(size: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return titans_spec(
        size, ComponentChoice("titans.mac", MACIntegrationConfig(segment_len=segment)),
        part("attention", "baseline.causal", persistent_tokens=persistent))


def _sliding(size: str, integration: str, config: object) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return titans_spec(size, ComponentChoice(integration, config),
                       part("attention", "baseline.sliding_window", window=window,
                            persistent_tokens=persistent))


def _mag(size: str) -> ModelSpec:
    return _sliding(size, "titans.mag", MAGIntegrationConfig())


def _mal(size: str) -> ModelSpec:
    return _sliding(size, "titans.mal", MALIntegrationConfig())


def _mag_hybrid(size: str) -> ModelSpec:
    """MAG blocks at odd layers, plain sliding-window blocks at even ones (4 layers small, 2 tiny):
    ``[layer."0,2".integration] impl = "baseline.transformer"``."""
    spec = _mag(size)
    layers = 2 * spec.num_layers if size == "small" else spec.num_layers
    plain = {"integration": part("integration", "baseline.transformer")}
    return attrs.evolve(spec, num_layers=layers, layers={i: plain for i in range(0, layers, 2)})


PRESETS = [
    PresetSpec(name="titans.lmm", summary="Titans LMM (memory only), small", build=lambda: _lmm("small")),
    PresetSpec(name="titans.lmm_tiny", summary="Titans LMM (memory only), tiny",
               build=lambda: _lmm("tiny")),
    PresetSpec(name="titans.mac", summary="Titans MAC (memory as context, segment 64), small",
               build=lambda: _mac("small")),
    PresetSpec(name="titans.mac_tiny", summary="Titans MAC (memory as context, segment 16), tiny",
               build=lambda: _mac("tiny")),
    PresetSpec(name="titans.mag", summary="Titans MAG (memory gates SWA, window 64), small",
               build=lambda: _mag("small")),
    PresetSpec(name="titans.mag_tiny", summary="Titans MAG (memory gates SWA, window 8), tiny",
               build=lambda: _mag("tiny")),
    PresetSpec(name="titans.mal", summary="Titans MAL (memory layer then SWA, window 64), small",
               build=lambda: _mal("small")),
    PresetSpec(name="titans.mal_tiny", summary="Titans MAL (memory layer then SWA, window 8), tiny",
               build=lambda: _mal("tiny")),
    PresetSpec(name="titans.mag_hybrid", summary="MAG at layers 1, 3; SWA blocks at 0, 2; small",
               build=lambda: _mag_hybrid("small")),
    PresetSpec(name="titans.mag_hybrid_tiny", summary="MAG at layer 1, an SWA block at 0; tiny",
               build=lambda: _mag_hybrid("tiny")),
]
