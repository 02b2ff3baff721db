"""Presets of the ``baseline`` plugin: full-attention and sliding-window Transformers.

``*_tiny`` sizes are for tests (they build and run in milliseconds); the plain names are small
models that train on a laptop CPU in minutes.
"""

from __future__ import annotations

from memforge.registry import PresetSpec
from memforge.spec import ComponentChoice, ModelSpec
from memforge_baselines import (
    CausalAttentionConfig,
    SlidingWindowAttentionConfig,
    SwiGLUConfig,
    TransformerBlockConfig,
)

#: (vocab, dim, layers, heads) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2), "small": (256, 128, 4, 4)}


def _transformer(size: str, window: int | None) -> ModelSpec:
    vocab, dim, layers, heads = SIZES[size]
    attention = (ComponentChoice("baseline.causal", CausalAttentionConfig()) if window is None
                 else ComponentChoice("baseline.sliding_window",
                                      SlidingWindowAttentionConfig(window=window)))
    return ModelSpec(
        vocab_size=vocab, dim=dim, num_layers=layers, heads=heads,
        integration=ComponentChoice("baseline.transformer", TransformerBlockConfig()),
        attention=attention,
        feedforward=ComponentChoice("baseline.swiglu", SwiGLUConfig()),
    )


PRESETS = [
    PresetSpec(name="baseline.transformer", summary="Transformer++ (full attention), small",
               build=lambda: _transformer("small", None)),
    PresetSpec(name="baseline.transformer_tiny", summary="Transformer++ (full attention), tiny",
               build=lambda: _transformer("tiny", None)),
    PresetSpec(name="baseline.swa", summary="sliding-window Transformer (window 64), small",
               build=lambda: _transformer("small", 64)),
    PresetSpec(name="baseline.swa_tiny", summary="sliding-window Transformer (window 8), tiny",
               build=lambda: _transformer("tiny", 8)),
]
