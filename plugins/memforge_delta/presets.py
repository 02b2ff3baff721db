"""Presets of the ``delta`` plugin: DeltaNet and Gated DeltaNet in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
the same sizes as the ``titans`` presets, so the families compare at equal width and depth. The
integrations, attention and feed-forward are other plugins' components, named through the
registry (:func:`part`), never imported: ``titans.lmm`` with a delta layer and ``baseline.swiglu``
is the Gated DeltaNet paper's block (pre-norm, the layer, then a SwiGLU MLP).
"""

from __future__ import annotations

from typing import Any

import attrs

from memforge import ComponentChoice, ModelSpec, PresetSpec
from memforge.plugins import default_registry


def part(kind: str, name: str, **settings: Any) -> ComponentChoice:
    """The registered component ``name`` of ``kind`` with ``settings`` (its defaults otherwise)."""
    return ComponentChoice(name, default_registry().component(kind, name).config_cls(**settings))


#: (vocab, dim, layers, heads, WY kernel chunk) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 64)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes, as in the titans presets.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}
LAYERS = {"deltanet": "delta.deltanet", "gdn": "delta.gated_deltanet"}


def delta_spec(size: str, layer: str, integration: ComponentChoice,
               attention: ComponentChoice | None = None) -> ModelSpec:
    """A spec of ``size`` with the memory layer ``layer`` (a key of :data:`LAYERS`) in
    ``integration``; no Titans memory kinds (the delta layers use none)."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    return ModelSpec(
        vocab_size=vocab, dim=dim, num_layers=layers, heads=heads,
        integration=integration,
        attention=attention or part("attention", "baseline.causal"),
        feedforward=part("feedforward", "baseline.swiglu"),
        memory_layer=part("memory_layer", LAYERS[layer], chunk_size=chunk),
    )


def _lmm(size: str, layer: str) -> ModelSpec:
    return delta_spec(size, layer, part("integration", "titans.lmm"))


def _mac(size: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return delta_spec(size, "gdn", part("integration", "titans.mac", segment_len=segment),
                      part("attention", "baseline.causal", persistent_tokens=persistent))


def _sliding(size: str, integration: str) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return delta_spec(size, "gdn", part("integration", integration),
                      part("attention", "baseline.sliding_window", window=window,
                           persistent_tokens=persistent))


def _hybrid(size: str) -> ModelSpec:
    """Gated DeltaNet blocks at layers 0 and 2, sliding-window attention blocks at 1 and 3 (the
    paper's GDN-H1 pattern): ``[layer."1,3".integration] impl = "baseline.transformer"``."""
    _, window, _ = ATTENTION_SIZES[size]
    spec = delta_spec(size, "gdn", part("integration", "titans.lmm"),
                      part("attention", "baseline.sliding_window", window=window))
    plain = {"integration": part("integration", "baseline.transformer")}
    return attrs.evolve(spec, num_layers=4, layers={1: plain, 3: plain})


def _both(name: str, summary: str, build) -> list[PresetSpec]:
    """The small preset ``name`` and its ``_tiny`` size."""
    return [PresetSpec(name=name, summary=f"{summary}, small", build=lambda: build("small")),
            PresetSpec(name=f"{name}_tiny", summary=f"{summary}, tiny", build=lambda: build("tiny"))]


PRESETS = [
    *_both("delta.deltanet_lmm", "DeltaNet blocks (layer + SwiGLU), no attention",
           lambda size: _lmm(size, "deltanet")),
    *_both("delta.gdn_lmm", "Gated DeltaNet blocks (the GDN paper's block), no attention",
           lambda size: _lmm(size, "gdn")),
    *_both("delta.gdn_mac", "Gated DeltaNet as context of segment attention (titans.mac)", _mac),
    *_both("delta.gdn_mag", "Gated DeltaNet gating sliding-window attention (titans.mag)",
           lambda size: _sliding(size, "titans.mag")),
    *_both("delta.gdn_mal", "Gated DeltaNet layer, then sliding-window attention (titans.mal)",
           lambda size: _sliding(size, "titans.mal")),
    *_both("delta.gdn_hybrid", "GDN blocks at layers 0, 2; sliding-window attention at 1, 3",
           _hybrid),
]
