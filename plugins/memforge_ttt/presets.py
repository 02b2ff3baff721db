"""Presets of the ``ttt`` plugin: TTT-Linear and TTT-MLP in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
each the ``titans`` preset of its integration and size with TTT's layer and parts swapped in, so
the families compare at equal width and depth with the same attention and feed-forward. The
integrations, attention and feed-forward are other plugins' components, chosen by registry name
through the public :func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec, sized_presets

#: The mini-batch (chunk) in each size; small uses TTT's mini-batch of 16.
CHUNKS = {"tiny": 8, "small": 16}
#: The memory network and its step's base_lr (TTT: 1 for TTT-Linear, 0.1 for TTT-MLP).
NETWORKS = {"linear": ("ttt.linear", 1.0), "mlp": ("ttt.mlp", 0.1)}


def ttt_spec(size: str, network: str, integration: str = "lmm", **settings: Any) -> ModelSpec:
    """The titans preset of ``integration`` (``lmm``, ``mac``, ``mag``, ``mal``) in ``size``, its
    widths, attention and feed-forward as they are, with a ``ttt.layer`` of the network
    ``network`` (a key of :data:`NETWORKS`) and TTT's parts instead of Titans'; ``settings`` are
    further dotted overrides."""
    memory, base_lr = NETWORKS[network]
    titans = memforge.preset(f"titans.{integration}" + ("_tiny" if size == "tiny" else ""))
    return memforge.apply_overrides(titans, {
        "memory_layer": "ttt.layer", "memory_layer.chunk_size": CHUNKS[size],
        "projection": "ttt.qkv", "memory": memory, "objective": "ttt.l2",
        "optimizer": "ttt.learned_step", "optimizer.base_lr": base_lr,
        "retention": "ttt.no_retention", "retrieval": "ttt.after_write", **settings})


#: The titans integrations each network comes in, and how a preset's summary says it.
INTEGRATIONS = {"lmm": "blocks (layer + SwiGLU), no attention",
                "mac": "as context of segment attention (titans.mac)",
                "mag": "gating sliding-window attention (titans.mag)",
                "mal": "layer, then sliding-window attention (titans.mal)"}


def _family(network: str, label: str) -> list[PresetSpec]:
    """The four integrations of one TTT network."""
    return [preset for integration, summary in INTEGRATIONS.items()
            for preset in sized_presets(f"ttt.{network}_{integration}", f"{label} {summary}",
                                        lambda size, i=integration: ttt_spec(size, network, i))]


PRESETS = [*_family("linear", "TTT-Linear"), *_family("mlp", "TTT-MLP")]
