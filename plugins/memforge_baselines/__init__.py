"""The essential built-in plugin ``baseline``: attention, feed-forward and the Transformer block.

These are the parts every model is made of (a hybrid's attention layers are
``baseline.transformer`` blocks: ``[layer.0.integration] impl = "baseline.transformer"``) and the
baselines a researcher compares memory models with: a
full-attention Transformer (the Transformer++ recipe: RoPE, RMSNorm, SwiGLU) and a sliding-window
Transformer. This plugin cannot be blocked.

Module imports stay inside the factories so that loading the plugin costs almost nothing.
"""

from __future__ import annotations

import attrs

from memforge import hookimpl, option
from memforge.interfaces import BuildContext
from memforge.registry import ComponentRegistry, ComponentSpec
from memforge.spec import ModelSpec, used_kinds

#: The attention components of this plugin (both rotary).
ATTENTION = ("baseline.causal", "baseline.sliding_window")

__all__ = [
    "ATTENTION",
    "ROPE_BASE_MAX",
    "ROPE_BASE_MIN",
    "CausalAttentionConfig",
    "SlidingWindowAttentionConfig",
    "SwiGLUConfig",
    "TransformerBlockConfig",
    "swiglu_hidden",
]


#: Rotary bases below 1 are refused. Pair ``i`` of a head turns by ``position * base**(-2i/d)``
#: radians: with ``base >= 1`` every rate is at most 1, so angles never exceed the position and
#: stay finite. Below 1 the rates grow with ``i`` instead, up to ``base**(-(d-2)/d)``, and the
#: angles overflow float32 (3.4e38) at long positions: ``cos(inf)`` is NaN, and so are the
#: logits (a base of 1e-38 does it from position 53 at head width 64; one below float32's smallest
#: normal number, about 1.2e-38, becomes 0 and every angle but the first is infinite).
ROPE_BASE_MIN = 1.0
#: Above 1e12 even the slowest pair's wavelength, ``2 pi base**((d-2)/d)``, passes any context a
#: model reads, and bases past float32's range become infinite; the usual values are 1e4 to 1e7.
ROPE_BASE_MAX = 1e12


def swiglu_hidden(dim: int, multiplier: float) -> int:
    """The hidden width of ``baseline.swiglu``: ``dim * multiplier`` rounded to a multiple of 8."""
    return round(dim * multiplier / 8) * 8  # multiples of 8 for matmuls


@attrs.frozen(kw_only=True)
class CausalAttentionConfig:
    """Full causal softmax attention (``baseline.causal``)."""

    persistent_tokens: int = option(0, ge=0, le=4096, typical=(0, 8),
                                    help="learned always-visible key/value tokens")
    rope_base: float = option(10000.0, ge=ROPE_BASE_MIN, le=ROPE_BASE_MAX, typical=(100.0, 1e6),
                              help="rotary embedding base")


@attrs.frozen(kw_only=True)
class SlidingWindowAttentionConfig:
    """Causal attention over the last ``window`` tokens (``baseline.sliding_window``)."""

    # Compiled decoding keeps a ring of window - 1 cached positions; 2**20 is far past any need.
    window: int = option(128, ge=1, le=2**20, typical=(1, 256),
                         help="tokens each query sees, itself included")
    persistent_tokens: int = option(0, ge=0, le=4096, typical=(0, 8),
                                    help="learned tokens visible to every query")
    rope_base: float = option(10000.0, ge=ROPE_BASE_MIN, le=ROPE_BASE_MAX, typical=(100.0, 1e6),
                              help="rotary embedding base")


@attrs.frozen(kw_only=True)
class SwiGLUConfig:
    """Llama's gated feed-forward layer (``baseline.swiglu``)."""

    multiplier: float = option(8 / 3, gt=0, le=64, typical=(1.0, 4.0),
                               help="hidden width as a multiple of dim (rounded to a multiple of 8)")


@attrs.frozen(kw_only=True)
class TransformerBlockConfig:
    """A pre-norm attention + feed-forward block (``baseline.transformer``); no settings."""


def _causal(config: CausalAttentionConfig, ctx: BuildContext):
    from memforge_baselines.attention import CausalSelfAttention

    return CausalSelfAttention(ctx.dim, ctx.heads, window=None,
                               persistent_tokens=config.persistent_tokens,
                               rope_base=config.rope_base)


def _sliding(config: SlidingWindowAttentionConfig, ctx: BuildContext):
    from memforge_baselines.attention import CausalSelfAttention

    return CausalSelfAttention(ctx.dim, ctx.heads, window=config.window,
                               persistent_tokens=config.persistent_tokens,
                               rope_base=config.rope_base)


def _swiglu(config: SwiGLUConfig, ctx: BuildContext):
    from memforge.nn import SwiGLU

    return SwiGLU(ctx.dim, swiglu_hidden(ctx.dim, config.multiplier))


def _transformer(config: TransformerBlockConfig, ctx: BuildContext):
    from memforge_baselines.blocks import TransformerBlock

    return TransformerBlock(ctx.build("attention"), ctx.build("feedforward"), ctx.dim)


@hookimpl
def memforge_register_components():
    return [
        ComponentSpec(kind="attention", name="baseline.causal", config_cls=CausalAttentionConfig,
                      factory=_causal, summary="full causal softmax attention with RoPE (SDPA)"),
        ComponentSpec(kind="attention", name="baseline.sliding_window",
                      config_cls=SlidingWindowAttentionConfig, factory=_sliding,
                      summary="sliding-window causal attention, O(T x window), optional prefix"),
        ComponentSpec(kind="feedforward", name="baseline.swiglu", config_cls=SwiGLUConfig,
                      factory=_swiglu, summary="SwiGLU feed-forward (Llama)"),
        ComponentSpec(kind="integration", name="baseline.transformer",
                      config_cls=TransformerBlockConfig, factory=_transformer,
                      requires=("attention", "feedforward"),
                      summary="pre-norm attention + feed-forward block, no memory"),
    ]


@hookimpl
def memforge_validate_spec(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Sizes the baseline components cannot work with, in any layer that uses them, found before
    anything is built."""
    problems: list[str] = []
    head_dim = spec.dim // spec.heads
    for layer in range(spec.num_layers):
        used = used_kinds(spec, registry, layer)
        feedforward, attention = spec.choice("feedforward", layer), spec.choice("attention", layer)
        if ("feedforward" in used and feedforward.impl == "baseline.swiglu"
                and isinstance(feedforward.config, SwiGLUConfig)):
            multiplier = feedforward.config.multiplier
            if swiglu_hidden(spec.dim, multiplier) < 8:
                problems.append(f"feedforward.multiplier={multiplier:g} gives baseline.swiglu a "
                                f"hidden width of 0 at dim={spec.dim} (dim * multiplier rounds to "
                                f"a multiple of 8); use feedforward.multiplier >= "
                                f"{8 / spec.dim:.4g}")
        if "attention" in used and attention.impl in ATTENTION and head_dim % 2:
            even = [h for h in range(1, min(spec.heads * 2, spec.dim) + 1)
                    if spec.dim % h == 0 and (spec.dim // h) % 2 == 0]
            problems.append(f"attention {attention.impl!r} needs an even head width for its "
                            f"rotary embedding, but dim={spec.dim} / heads={spec.heads} = "
                            f"{head_dim}; " + (f"use heads among {even}" if even else
                                               "use an even dim"))
    return list(dict.fromkeys(problems))


@hookimpl
def memforge_register_presets():
    from memforge_baselines.presets import PRESETS

    return PRESETS
