"""Presets of the ``ttt`` plugin: TTT-Linear and TTT-MLP in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
the sizes of the ``titans`` and ``delta`` presets, so the families compare at equal width and
depth. The integrations, attention and feed-forward are other plugins' components, chosen by
registry name through the public :func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec

#: (vocab, dim, layers, heads, mini-batch) of the two sizes; small uses TTT's mini-batch of 16.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 16)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes, as in the titans presets.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}
#: The memory network and its step's base_lr (TTT: 1 for TTT-Linear, 0.1 for TTT-MLP).
NETWORKS = {"linear": ("ttt.linear", 1.0), "mlp": ("ttt.mlp", 0.1)}
#: The spec the presets start from: a plain transformer (its kinds are all replaced below).
BASE = "baseline.transformer_tiny"


def ttt_spec(size: str, network: str, integration: str, attention: str = "baseline.causal",
             **settings: Any) -> ModelSpec:
    """A spec of ``size`` with a ``ttt.layer`` of the network ``network`` (a key of
    :data:`NETWORKS`) in the registered ``integration``, ``attention`` and ``baseline.swiglu``;
    ``settings`` are further dotted overrides (``{"attention.window": 8}``)."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    memory, base_lr = NETWORKS[network]
    return memforge.apply_overrides(memforge.preset(BASE), {
        "vocab_size": vocab, "dim": dim, "num_layers": layers, "heads": heads,
        "integration": integration, "attention": attention, "feedforward": "baseline.swiglu",
        "memory_layer": "ttt.layer", "memory_layer.chunk_size": chunk,
        "projection": "ttt.qkv", "memory": memory, "objective": "ttt.l2",
        "optimizer": "ttt.learned_step", "optimizer.base_lr": base_lr,
        "retention": "ttt.no_retention", "retrieval": "ttt.after_write", **settings})


def _lmm(size: str, network: str) -> ModelSpec:
    return ttt_spec(size, network, "titans.lmm")


def _mac(size: str, network: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return ttt_spec(size, network, "titans.mac", **{"integration.segment_len": segment,
                                                     "attention.persistent_tokens": persistent})


def _sliding(size: str, network: str, integration: str) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return ttt_spec(size, network, integration, "baseline.sliding_window",
                    **{"attention.window": window, "attention.persistent_tokens": persistent})


def _both(name: str, summary: str, build) -> list[PresetSpec]:
    """The small preset ``name`` and its ``_tiny`` size."""
    return [PresetSpec(name=name, summary=f"{summary}, small", build=lambda: build("small")),
            PresetSpec(name=f"{name}_tiny", summary=f"{summary}, tiny", build=lambda: build("tiny"))]


def _family(network: str, label: str) -> list[PresetSpec]:
    """The four integrations of one TTT network."""
    return [
        *_both(f"ttt.{network}_lmm", f"{label} blocks (layer + SwiGLU), no attention",
               lambda size: _lmm(size, network)),
        *_both(f"ttt.{network}_mac", f"{label} as context of segment attention (titans.mac)",
               lambda size: _mac(size, network)),
        *_both(f"ttt.{network}_mag", f"{label} gating sliding-window attention (titans.mag)",
               lambda size: _sliding(size, network, "titans.mag")),
        *_both(f"ttt.{network}_mal", f"{label} layer, then sliding-window attention (titans.mal)",
               lambda size: _sliding(size, network, "titans.mal")),
    ]


PRESETS = [*_family("linear", "TTT-Linear"), *_family("mlp", "TTT-MLP")]
