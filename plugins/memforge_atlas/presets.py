"""Presets of the ``atlas`` plugin: OmegaNet, DeepTransformers and Atlas in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU, each the
``titans`` preset of its integration and size with the memory swapped, so the families compare
at equal width and depth with the same attention and feed-forward. The
integration, attention, feed-forward, projection, retention and retrieval are other plugins'
components, chosen by registry name through :func:`memforge.apply_overrides` (never imported):
the q/k/v pipeline ``titans.conv_qkv``, the decay ``titans.adaptive_decay`` (every model here
forgets, so its fast weights stay bounded on long input), chunk-start reads.

The three models (docs/zoo.md, "ATLAS"):

* OmegaNet: Omega rule (``c = 4``), ``phi_2`` features, a matrix memory on them, plain gradient
  descent: the closed-form executor (the window's pairs mixed per chunk).
* DeepTransformers: ``phi_2`` features, a 2-layer MLP memory, the dot-product (Hebbian) objective,
  plain gradient descent: the closed-form executor.
* Atlas: Omega rule (``c = 4``), ``phi_2`` features, a 2-layer MLP memory, Muon: the sequential
  executor, through the Gram matrices of the per-token momenta. Its MLP keeps the head width
  (expansion 1, not App. E's 4): per-token Newton-Schulz on ``4d x 4d`` Gram matrices would make
  the small size hours, not minutes.
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, sized_presets

#: The chunk in each size.
CHUNKS = {"tiny": 8, "small": 16}
#: Each model's memory layer and parts, as dotted overrides.
MODELS: dict[str, dict[str, Any]] = {
    "omeganet": {"memory_layer": "atlas.omeganet", "memory": "atlas.poly_mlp", "memory.depth": 1,
                 "objective": "atlas.omega", "optimizer": "atlas.gd",
                 "optimizer.momentum": False},
    "deep_transformer": {"memory_layer": "atlas.deep_transformer", "memory": "atlas.poly_mlp",
                         "memory.depth": 2, "objective": "atlas.dot", "optimizer": "atlas.gd",
                         "optimizer.momentum": False},
    "atlas": {"memory_layer": "atlas.atlas", "memory": "atlas.poly_mlp", "memory.depth": 2,
              "memory.expansion": 1.0, "objective": "atlas.omega", "optimizer": "atlas.muon"},
}
SUMMARIES = {"omeganet": "OmegaNet (Omega rule c=4, poly features, GD)",
             "deep_transformer": "DeepTransformers (Hebbian deep memory, poly features)",
             "atlas": "Atlas (Omega rule c=4, poly features, deep memory, Muon)"}


def atlas_spec(size: str, model: str, integration: str = "lmm", **settings: Any) -> ModelSpec:
    """The titans preset of ``integration`` (``lmm``, ``mac``, ``mag``, ``mal``) in ``size``, its
    widths, attention and feed-forward as they are, with ``model`` (a key of :data:`MODELS`)
    instead of Titans' memory; ``settings`` are further dotted overrides."""
    titans = memforge.preset(f"titans.{integration}" + ("_tiny" if size == "tiny" else ""))
    return memforge.apply_overrides(titans, {
        "projection": "titans.conv_qkv", "retention": "titans.adaptive_decay",
        "retrieval": "titans.chunk_start", **MODELS[model], "memory_layer.chunk_size": CHUNKS[size],
        **settings})


INTEGRATIONS = {"lmm": "blocks (layer + SwiGLU), no attention",
                "mac": "as context of segment attention (titans.mac)",
                "mag": "gating sliding-window attention (titans.mag)",
                "mal": "layer, then sliding-window attention (titans.mal)"}


PRESETS = [preset for model in MODELS for integration, summary in INTEGRATIONS.items()
           for preset in sized_presets(
               f"atlas.{model}_{integration}", f"{SUMMARIES[model]} {summary}",
               lambda size, m=model, i=integration: atlas_spec(size, m, i))]
