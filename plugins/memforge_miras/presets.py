"""Presets of the ``miras`` plugin: Moneta, Yaad and Memora in every integration.

Each comes in a ``_tiny`` size (tests) and a small size that trains on a laptop CPU in minutes,
the sizes of the ``titans``, ``delta`` and ``ttt`` presets, so the families compare at equal width
and depth. Every preset sets the paper's parts of its rule (docs/zoo.md, "MIRAS"). The
integrations, attention and feed-forward are other plugins' components, chosen by registry name
through the public :func:`memforge.apply_overrides` (never imported).
"""

from __future__ import annotations

from typing import Any

import memforge
from memforge import ModelSpec, PresetSpec

#: (vocab, dim, layers, heads, chunk) of the two sizes; small uses MIRAS' b = 16.
SIZES = {"tiny": (64, 32, 2, 2, 8), "small": (256, 128, 2, 4, 16)}
#: (MAC segment, sliding window, persistent tokens) of the two sizes, as in the titans presets.
ATTENTION_SIZES = {"tiny": (16, 8, 2), "small": (64, 64, 4)}
#: Each model's objective and retention (the memory, optimiser, projection and read are shared).
RULES = {"moneta": ("miras.lp", "miras.lq"), "yaad": ("miras.huber", "miras.l2_decay"),
         "memora": ("miras.l2", "miras.kl")}
#: Each model's own settings beyond its parts. Yaad's plain GD takes steps up to 0.1, ten times
#: miras.gd's Titans bounds: at those it stayed near 12% MQAR accuracy even as plain l2 descent,
#: and at 0.1 two of three seeds reached 49% and 53% (docs/zoo.md, "MIRAS": Yaad's default step
#: and step size).
SETTINGS = {"yaad": {"optimizer.max_lr": 0.1, "optimizer.lr_init": 0.05}}
#: The spec the presets start from: a plain transformer (its kinds are all replaced below).
BASE = "baseline.transformer_tiny"


def miras_spec(size: str, model: str, integration: str, attention: str = "baseline.causal",
               **settings: Any) -> ModelSpec:
    """A spec of ``size`` with the memory layer ``miras.<model>`` (a key of :data:`RULES`) and its
    paper's parts (with :data:`SETTINGS`), in the registered ``integration``, ``attention`` and
    ``baseline.swiglu``; ``settings`` are further dotted overrides (``{"attention.window": 8}``)."""
    vocab, dim, layers, heads, chunk = SIZES[size]
    objective, retention = RULES[model]
    return memforge.apply_overrides(memforge.preset(BASE), {
        "vocab_size": vocab, "dim": dim, "num_layers": layers, "heads": heads,
        "integration": integration, "attention": attention, "feedforward": "baseline.swiglu",
        "memory_layer": f"miras.{model}", "memory_layer.chunk_size": chunk,
        "projection": "miras.conv_qkv", "memory": "miras.mlp", "objective": objective,
        "optimizer": "miras.gd", "retention": retention, "retrieval": "miras.chunk_start",
        **SETTINGS.get(model, {}), **settings})


def _lmm(size: str, model: str) -> ModelSpec:
    return miras_spec(size, model, "titans.lmm")


def _mac(size: str, model: str) -> ModelSpec:
    segment, _, persistent = ATTENTION_SIZES[size]
    return miras_spec(size, model, "titans.mac", **{"integration.segment_len": segment,
                                                     "attention.persistent_tokens": persistent})


def _sliding(size: str, model: str, integration: str) -> ModelSpec:
    _, window, persistent = ATTENTION_SIZES[size]
    return miras_spec(size, model, integration, "baseline.sliding_window",
                      **{"attention.window": window, "attention.persistent_tokens": persistent})


def _both(name: str, summary: str, build) -> list[PresetSpec]:
    """The small preset ``name`` and its ``_tiny`` size."""
    return [PresetSpec(name=name, summary=f"{summary}, small", build=lambda: build("small")),
            PresetSpec(name=f"{name}_tiny", summary=f"{summary}, tiny", build=lambda: build("tiny"))]


def _family(model: str, label: str) -> list[PresetSpec]:
    """The four integrations of one MIRAS model."""
    return [
        *_both(f"miras.{model}_lmm", f"{label} blocks (layer + SwiGLU), no attention",
               lambda size: _lmm(size, model)),
        *_both(f"miras.{model}_mac", f"{label} as context of segment attention (titans.mac)",
               lambda size: _mac(size, model)),
        *_both(f"miras.{model}_mag", f"{label} gating sliding-window attention (titans.mag)",
               lambda size: _sliding(size, model, "titans.mag")),
        *_both(f"miras.{model}_mal", f"{label} layer, then sliding-window attention (titans.mal)",
               lambda size: _sliding(size, model, "titans.mal")),
    ]


PRESETS = [*_family("moneta", "Moneta"), *_family("yaad", "Yaad"), *_family("memora", "Memora")]
