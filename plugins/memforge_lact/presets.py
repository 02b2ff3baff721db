"""Presets of the ``lact`` plugin: the LaCT block and the LaCT layer in every Titans integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on MQAR at the
``memforge train`` defaults (64-token sequences) in minutes, each the ``titans`` preset of its
integration and size with the memory layer swapped, so the families compare at equal width and
depth with the same attention and feed-forward. The layer's default chunk is
the paper's 2048 tokens; a 64-token MQAR sequence would then never read a single update, so the
presets use chunks of 16 (small) and 8 (tiny) tokens: every chunk's write reaches the later
chunks' queries. Integrations, attention and feed-forward are other plugins' components, chosen
by registry name through :func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, sized_presets
from memforge.engine import LAYER_PARTS

#: The LaCT chunk in each size.
CHUNKS = {"tiny": 8, "small": 16}


def lact_spec(size: str, integration: str = "lmm", **settings: Any) -> ModelSpec:
    """The titans preset of ``integration`` (``lmm``, ``mac``, ``mag``, ``mal``) in ``size``, its
    widths, attention and feed-forward as they are, with ``lact.layer`` instead of Titans' memory
    layer and none of its parts (the LaCT layer uses none); ``settings`` are further dotted
    overrides."""
    titans = memforge.preset(f"titans.{integration}" + ("_tiny" if size == "tiny" else ""))
    return memforge.apply_overrides(titans, {
        **dict.fromkeys(LAYER_PARTS), "memory_layer": "lact.layer",
        "memory_layer.chunk_size": CHUNKS[size], **settings})


def _block(size: str) -> ModelSpec:
    """The paper's pairing: a window as long as the chunk, so every token sees its own chunk
    through the attention and the chunks before it through the memory."""
    return memforge.apply_overrides(lact_spec(size), {
        "integration": "lact.block", "attention": "baseline.sliding_window",
        "attention.window": CHUNKS[size]})


def _continuum(size: str) -> ModelSpec:
    """Levels every 8, 16 and 32 tokens (small) or 4 and 8 (tiny): inside a 64-token MQAR
    sequence every level writes before later queries read."""
    chunk, levels = {"small": (8, 3), "tiny": (4, 2)}[size]
    return lact_spec(size, **{"memory_layer": "lact.continuum", "memory_layer.chunk_size": chunk,
                              "memory_layer.ratio": 2, "memory_layer.levels": levels})


PRESETS = [
    *sized_presets("lact.lact", "LaCT blocks: sliding-window attention beside the LaCT memory",
                   _block),
    *sized_presets("lact.lmm", "LaCT memory blocks (layer + SwiGLU), no attention",
                   lambda size: lact_spec(size)),
    *sized_presets("lact.mac", "LaCT memory as context of segment attention (titans.mac)",
                   lambda size: lact_spec(size, "mac")),
    *sized_presets("lact.mag", "LaCT memory gating sliding-window attention (titans.mag)",
                   lambda size: lact_spec(size, "mag")),
    *sized_presets("lact.mal", "LaCT memory layer, then sliding-window attention (titans.mal)",
                   lambda size: lact_spec(size, "mal")),
    *sized_presets("lact.continuum_lmm", "continuum memory blocks (levels at 3 periods), no attention",
                   _continuum),
]
