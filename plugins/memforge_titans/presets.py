"""Presets of the ``titans`` plugin: each variant in a ``_tiny`` size (tests) and a small size
that trains on a laptop CPU in minutes."""

from __future__ import annotations

from memforge_baselines import CausalAttentionConfig, SwiGLUConfig

from memforge.registry import PresetSpec
from memforge.spec import ComponentChoice, ModelSpec
from memforge_titans import configs as c
from memforge_titans.lmm import LMMIntegrationConfig

#: (vocab, dim, layers, heads, chunk) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 16)}


def titans_spec(size: str, integration: ComponentChoice,
                attention: ComponentChoice | None = None) -> ModelSpec:
    """A spec with the Titans memory defaults (deep MLP memory, momentum, adaptive decay, conv)."""
    vocab, dim, layers, heads, _ = SIZES[size]
    return ModelSpec(
        vocab_size=vocab, dim=dim, num_layers=layers, heads=heads,
        integration=integration,
        attention=attention or ComponentChoice("baseline.causal", CausalAttentionConfig()),
        feedforward=ComponentChoice("baseline.swiglu", SwiGLUConfig()),
        memory=ComponentChoice("titans.mlp", c.MLPMemoryConfig()),
        surprise=ComponentChoice("titans.momentum", c.MomentumSurpriseConfig()),
        forgetting=ComponentChoice("titans.adaptive_decay", c.AdaptiveDecayConfig()),
        retrieval=ComponentChoice("titans.chunk_start", c.RetrievalConfig()),
        projection=ComponentChoice("titans.conv_qkv", c.ConvProjectionConfig()),
    )


def _lmm(size: str) -> ModelSpec:
    chunk = SIZES[size][4]
    return titans_spec(size, ComponentChoice("titans.lmm", LMMIntegrationConfig(chunk_size=chunk)))


PRESETS = [
    PresetSpec(name="titans.lmm", summary="Titans LMM (memory only), small", build=lambda: _lmm("small")),
    PresetSpec(name="titans.lmm_tiny", summary="Titans LMM (memory only), tiny",
               build=lambda: _lmm("tiny")),
]
