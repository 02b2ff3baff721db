"""Presets of the ``delta`` plugin: DeltaNet and Gated DeltaNet in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes.
Each starts from the ``titans`` preset of its integration and size, with the memory layer
swapped, so the families compare at equal width and depth with the same attention and
feed-forward. The integrations, attention and feed-forward are other plugins' components, chosen
by registry name through the public :func:`memforge.apply_overrides` (never imported):
``titans.lmm`` with a delta layer and ``baseline.swiglu`` is the Gated DeltaNet paper's block
(pre-norm, the layer, then a SwiGLU MLP).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, sized_presets
from memforge.engine import LAYER_PARTS

#: The WY kernel's chunk in each size.
CHUNKS = {"tiny": 8, "small": 64}
LAYERS = {"deltanet": "delta.deltanet", "gdn": "delta.gated_deltanet"}
#: The sliding window of the titans MAG and MAL presets, per size (the hybrid's attention blocks).
WINDOWS = {"tiny": 8, "small": 64}


def delta_spec(size: str, layer: str, integration: str = "lmm", **settings: Any) -> ModelSpec:
    """The titans preset of ``integration`` (``lmm``, ``mac``, ``mag``, ``mal``) in ``size``, its
    widths, attention and feed-forward as they are, with the memory layer ``layer`` (a key of
    :data:`LAYERS`) instead of Titans' and none of the Titans layer's parts (the delta layers use
    none); ``settings`` are further dotted overrides."""
    titans = memforge.preset(f"titans.{integration}" + ("_tiny" if size == "tiny" else ""))
    return memforge.apply_overrides(titans, {
        **dict.fromkeys(LAYER_PARTS), "memory_layer": LAYERS[layer],
        "memory_layer.chunk_size": CHUNKS[size], **settings})


def _hybrid(size: str) -> ModelSpec:
    """Gated DeltaNet blocks at layers 0 and 2, sliding-window attention blocks at 1 and 3 (the
    paper's GDN-H1 pattern): ``[layer."1,3".integration] impl = "baseline.transformer"``."""
    spec = delta_spec(size, "gdn", **{"attention": "baseline.sliding_window",
                                      "attention.window": WINDOWS[size]})
    return memforge.apply_overrides(spec, {"num_layers": 4,
                                           "layer.1,3.integration": "baseline.transformer"})


def _engine_gdn(size: str) -> ModelSpec:
    """Gated DeltaNet as the engine's rule: the ``delta.engine`` layer with a linear memory, the
    l2 objective, plain gradient steps (``beta = sigmoid``), ``delta.gated_decay`` and reads after
    the write, which the engine runs on the token-exact WY executor."""
    spec = delta_spec(size, "gdn")
    return memforge.apply_overrides(spec, {
        "memory_layer": "delta.engine", "memory_layer.chunk_size": CHUNKS[size],
        "projection": "titans.conv_qkv", "memory": "titans.linear", "objective": "titans.l2",
        "optimizer": "titans.sgd", "optimizer.max_lr": 1.0, "optimizer.lr_init": 0.5,
        "retention": "delta.gated_decay", "retrieval": "titans.after_write"})


PRESETS = [
    *sized_presets("delta.deltanet_lmm", "DeltaNet blocks (layer + SwiGLU), no attention",
                   lambda size: delta_spec(size, "deltanet")),
    *sized_presets("delta.gdn_lmm", "Gated DeltaNet blocks (the GDN paper's block), no attention",
                   lambda size: delta_spec(size, "gdn")),
    *sized_presets("delta.gdn_mac", "Gated DeltaNet as context of segment attention (titans.mac)",
                   lambda size: delta_spec(size, "gdn", "mac")),
    *sized_presets("delta.gdn_mag", "Gated DeltaNet gating sliding-window attention (titans.mag)",
                   lambda size: delta_spec(size, "gdn", "mag")),
    *sized_presets("delta.gdn_mal", "Gated DeltaNet layer, then sliding-window attention (titans.mal)",
                   lambda size: delta_spec(size, "gdn", "mal")),
    *sized_presets("delta.gdn_hybrid", "GDN blocks at layers 0, 2; sliding-window attention at 1, 3",
                   _hybrid),
    *sized_presets("delta.engine_gdn_lmm", "Gated DeltaNet rule on the engine layer (WY executor)",
                   _engine_gdn),
]
