"""The essential built-in plugin ``baseline``: attention, feed-forward and the Transformer block.

These are the parts every model can fall back on (layers outside ``memory_layers`` are
``baseline.transformer`` blocks) and the baselines a researcher compares memory models with: a
full-attention Transformer (the Transformer++ recipe: RoPE, RMSNorm, SwiGLU) and a sliding-window
Transformer. This plugin cannot be blocked.

Module imports stay inside the factories so that loading the plugin costs almost nothing.
"""

from __future__ import annotations

import attrs

from memforge import hookimpl, option
from memforge.interfaces import BuildContext
from memforge.registry import ComponentSpec

__all__ = [
    "CausalAttentionConfig",
    "SlidingWindowAttentionConfig",
    "SwiGLUConfig",
    "TransformerBlockConfig",
]


@attrs.frozen(kw_only=True)
class CausalAttentionConfig:
    """Full causal softmax attention (``baseline.causal``)."""

    persistent_tokens: int = option(0, ge=0, help="learned always-visible key/value tokens")
    rope_base: float = option(10000.0, gt=0, help="rotary embedding base")


@attrs.frozen(kw_only=True)
class SlidingWindowAttentionConfig:
    """Causal attention over the last ``window`` tokens (``baseline.sliding_window``)."""

    window: int = option(128, ge=1, help="tokens each query sees, itself included")
    persistent_tokens: int = option(0, ge=0, help="learned tokens visible to every query")
    rope_base: float = option(10000.0, gt=0, help="rotary embedding base")


@attrs.frozen(kw_only=True)
class SwiGLUConfig:
    """Llama's gated feed-forward layer (``baseline.swiglu``)."""

    multiplier: float = option(8 / 3, gt=0, help="hidden width as a multiple of dim")


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
    from memforge_baselines.layers import SwiGLU

    hidden = max(1, round(ctx.dim * config.multiplier / 8) * 8)  # multiples of 8 for matmuls
    return SwiGLU(ctx.dim, hidden)


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
def memforge_register_presets():
    from memforge_baselines.presets import PRESETS

    return PRESETS
