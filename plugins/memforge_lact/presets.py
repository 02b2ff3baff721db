"""Presets of the ``lact`` plugin: the LaCT block and the LaCT layer in every Titans integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on MQAR at the
``memforge train`` defaults (64-token sequences) in minutes, the sizes of the ``titans`` and
``delta`` presets so the families compare at equal width and depth. The layer's default chunk is
the paper's 2048 tokens; a 64-token MQAR sequence would then never read a single update, so the
presets use chunks of 16 (small) and 8 (tiny) tokens: every chunk's write reaches the later
chunks' queries. Integrations, attention and feed-forward are other plugins' components, chosen
by registry name through :func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec

#: (vocab, dim, layers, heads, LaCT chunk) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 16)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes, as in the titans presets.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}
#: The spec the presets start from: a plain transformer (its kinds are all replaced below).
BASE = "baseline.transformer_tiny"


def lact_spec(size: str, integration: str, attention: str = "baseline.causal",
              **settings: Any) -> ModelSpec:
    """A spec of ``size`` with ``lact.layer`` in the registered ``integration``, ``attention`` and
    ``baseline.swiglu``; ``settings`` are further dotted overrides."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    return memforge.apply_overrides(memforge.preset(BASE), {
        "vocab_size": vocab, "dim": dim, "num_layers": layers, "heads": heads,
        "integration": integration, "attention": attention, "feedforward": "baseline.swiglu",
        "memory_layer": "lact.layer", "memory_layer.chunk_size": chunk, **settings})


def _block(size: str) -> ModelSpec:
    """The paper's pairing: a window as long as the chunk, so every token sees its own chunk
    through the attention and the chunks before it through the memory."""
    chunk = SIZES[size][4]
    return lact_spec(size, "lact.block", "baseline.sliding_window", **{"attention.window": chunk})


def _mac(size: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return lact_spec(size, "titans.mac", **{"integration.segment_len": segment,
                                            "attention.persistent_tokens": persistent})


def _sliding(size: str, integration: str) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return lact_spec(size, integration, "baseline.sliding_window",
                     **{"attention.window": window, "attention.persistent_tokens": persistent})


def _continuum(size: str) -> ModelSpec:
    """Levels every 8, 16 and 32 tokens (small) or 4 and 8 (tiny): inside a 64-token MQAR
    sequence every level writes before later queries read."""
    chunk, levels = {"small": (8, 3), "tiny": (4, 2)}[size]
    return lact_spec(size, "titans.lmm", **{"memory_layer": "lact.continuum",
                                            "memory_layer.chunk_size": chunk,
                                            "memory_layer.ratio": 2, "memory_layer.levels": levels})


def _both(name: str, summary: str, build) -> list[PresetSpec]:
    """The small preset ``name`` and its ``_tiny`` size."""
    return [PresetSpec(name=name, summary=f"{summary}, small", build=lambda: build("small")),
            PresetSpec(name=f"{name}_tiny", summary=f"{summary}, tiny", build=lambda: build("tiny"))]


PRESETS = [
    *_both("lact.lact", "LaCT blocks: sliding-window attention beside the LaCT memory", _block),
    *_both("lact.lmm", "LaCT memory blocks (layer + SwiGLU), no attention",
           lambda size: lact_spec(size, "titans.lmm")),
    *_both("lact.mac", "LaCT memory as context of segment attention (titans.mac)", _mac),
    *_both("lact.mag", "LaCT memory gating sliding-window attention (titans.mag)",
           lambda size: _sliding(size, "titans.mag")),
    *_both("lact.mal", "LaCT memory layer, then sliding-window attention (titans.mal)",
           lambda size: _sliding(size, "titans.mal")),
    *_both("lact.continuum_lmm", "continuum memory blocks (levels at 3 periods), no attention",
           _continuum),
]
