"""Presets of the ``delta`` plugin: DeltaNet and Gated DeltaNet in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
the same sizes as the ``titans`` presets, so the families compare at equal width and depth. The
integrations, attention and feed-forward are other plugins' components, chosen by registry name
through the public :func:`memforge.apply_overrides` (never imported): ``titans.lmm`` with a delta
layer and ``baseline.swiglu`` is the Gated DeltaNet paper's block (pre-norm, the layer, then a
SwiGLU MLP).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec

#: (vocab, dim, layers, heads, WY kernel chunk) of the two sizes.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 64)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes, as in the titans presets.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}
LAYERS = {"deltanet": "delta.deltanet", "gdn": "delta.gated_deltanet"}
#: The spec the presets start from: a plain transformer (its kinds are all replaced below).
BASE = "baseline.transformer_tiny"


def delta_spec(size: str, layer: str, integration: str, attention: str = "baseline.causal",
               **settings: Any) -> ModelSpec:
    """A spec of ``size`` with the memory layer ``layer`` (a key of :data:`LAYERS`) in the
    registered ``integration``, ``attention`` and ``baseline.swiglu``; ``settings`` are further
    dotted overrides (``{"attention.window": 8}``). No Titans memory kinds (the delta layers use
    none)."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    return memforge.apply_overrides(memforge.preset(BASE), {
        "vocab_size": vocab, "dim": dim, "num_layers": layers, "heads": heads,
        "integration": integration, "attention": attention, "feedforward": "baseline.swiglu",
        "memory_layer": LAYERS[layer], "memory_layer.chunk_size": chunk, **settings})


def _lmm(size: str, layer: str) -> ModelSpec:
    return delta_spec(size, layer, "titans.lmm")


def _mac(size: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return delta_spec(size, "gdn", "titans.mac", **{"integration.segment_len": segment,
                                                     "attention.persistent_tokens": persistent})


def _sliding(size: str, integration: str) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return delta_spec(size, "gdn", integration, "baseline.sliding_window",
                      **{"attention.window": window, "attention.persistent_tokens": persistent})


def _hybrid(size: str) -> ModelSpec:
    """Gated DeltaNet blocks at layers 0 and 2, sliding-window attention blocks at 1 and 3 (the
    paper's GDN-H1 pattern): ``[layer."1,3".integration] impl = "baseline.transformer"``."""
    _, window, _ = ATTENTION_SIZES[size]
    spec = delta_spec(size, "gdn", "titans.lmm", "baseline.sliding_window",
                      **{"attention.window": window})
    return memforge.apply_overrides(spec, {"num_layers": 4,
                                           "layer.1,3.integration": "baseline.transformer"})


def _engine_gdn(size: str) -> ModelSpec:
    """Gated DeltaNet as the engine's rule: the ``delta.engine`` layer with a linear memory, the
    l2 objective, plain gradient steps (``beta = sigmoid``), ``delta.gated_decay`` and reads after
    the write, which the engine runs on the token-exact WY executor."""
    spec = delta_spec(size, "gdn", "titans.lmm")
    return memforge.apply_overrides(spec, {
        "memory_layer": "delta.engine", "memory_layer.chunk_size": SIZES[size][4],
        "projection": "titans.conv_qkv", "memory": "titans.linear", "objective": "titans.l2",
        "optimizer": "titans.sgd", "optimizer.max_lr": 1.0, "optimizer.lr_init": 0.5,
        "retention": "delta.gated_decay", "retrieval": "titans.after_write"})


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
    *_both("delta.engine_gdn_lmm", "Gated DeltaNet rule on the engine layer (WY executor)",
           _engine_gdn),
]
