"""Presets of the ``miras`` plugin: Moneta, Yaad and Memora in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
each the ``titans`` preset of its integration and size with the MIRAS layer and parts swapped in,
so the families compare at equal width and depth with the same attention and feed-forward. Every
preset sets the paper's parts of its rule (docs/zoo.md, "MIRAS"). The integrations, attention and
feed-forward are other plugins' components, chosen by registry name through the public
:func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec, sized_presets

#: The chunk in each size; small uses MIRAS' b = 16.
CHUNKS = {"tiny": 8, "small": 16}
#: Each model's objective and retention (the memory, optimiser, projection and read are shared).
RULES = {"moneta": ("miras.lp", "miras.lq"), "yaad": ("miras.huber", "miras.l2_decay"),
         "memora": ("miras.l2", "miras.kl")}
#: Each model's own settings beyond its parts. Yaad takes the normalised Huber step and plain GD
#: steps up to 0.1, ten times miras.gd's Titans bounds: at those it stayed near 12% MQAR accuracy
#: even as plain l2 descent, and at 0.1 two of three seeds reached 49% and 53%, where the sign
#: step stayed at 3% (docs/zoo.md, "MIRAS": Yaad's default step and step size).
SETTINGS = {"yaad": {"objective.l1_step": "normalised", "optimizer.max_lr": 0.1,
                     "optimizer.lr_init": 0.05}}
#: The titans integrations each model comes in, and how a preset's summary says it.
INTEGRATIONS = {"lmm": "blocks (layer + SwiGLU), no attention",
                "mac": "as context of segment attention (titans.mac)",
                "mag": "gating sliding-window attention (titans.mag)",
                "mal": "layer, then sliding-window attention (titans.mal)"}


def miras_spec(size: str, model: str, integration: str = "lmm", **settings: Any) -> ModelSpec:
    """The titans preset of ``integration`` (``lmm``, ``mac``, ``mag``, ``mal``) in ``size``, its
    widths, attention and feed-forward as they are, with the memory layer ``miras.<model>`` (a
    key of :data:`RULES`) and its paper's parts (with :data:`SETTINGS`) instead of Titans';
    ``settings`` are further dotted overrides."""
    objective, retention = RULES[model]
    titans = memforge.preset(f"titans.{integration}" + ("_tiny" if size == "tiny" else ""))
    return memforge.apply_overrides(titans, {
        "memory_layer": f"miras.{model}", "memory_layer.chunk_size": CHUNKS[size],
        "projection": "miras.conv_qkv", "memory": "miras.mlp", "objective": objective,
        "optimizer": "miras.gd", "retention": retention, "retrieval": "miras.chunk_start",
        **SETTINGS.get(model, {}), **settings})


def _family(model: str, label: str) -> list[PresetSpec]:
    """The four integrations of one MIRAS model."""
    return [preset for integration, summary in INTEGRATIONS.items()
            for preset in sized_presets(f"miras.{model}_{integration}", f"{label} {summary}",
                                        lambda size, i=integration: miras_spec(size, model, i))]


PRESETS = [*_family("moneta", "Moneta"), *_family("yaad", "Yaad"), *_family("memora", "Memora")]
