"""Settings of the ``ttt`` plugin's components (docs/zoo.md, "TTT"; frozen attrs, every field
defaulted). Defaults are those of the TTT paper and its official code (Sun et al. 2024,
arXiv 2407.04620, ``ttt-lm-pytorch``) unless a comment says otherwise."""

from __future__ import annotations

import attrs

from memforge import option


@attrs.frozen(kw_only=True)
class LinearNetworkConfig:
    """``ttt.linear``: ``f(x) = x + LN(x W + b)`` per head (TTT-Linear)."""

    init_std: float = option(0.02, gt=0, le=1.0, typical=(0.005, 0.1),
                             help="standard deviation of the initial W (TTT's code: 0.02); b starts at 0")
    norm_eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-3),
                             help="epsilon of the per-head layer norm (TTT's code: 1e-6)")


@attrs.frozen(kw_only=True)
class MLPNetworkConfig:
    """``ttt.mlp``: ``f(x) = x + LN(GELU(x W1 + b1) W2 + b2)`` per head (TTT-MLP)."""

    expansion: int = option(4, ge=1, le=64, typical=(1, 8),
                            help="hidden width as a multiple of the head width (TTT: 4)")
    init_std: float = option(0.02, gt=0, le=1.0, typical=(0.005, 0.1),
                             help="standard deviation of the initial W1, W2 (TTT's code: 0.02); "
                                  "biases start at 0")
    norm_eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-3),
                             help="epsilon of the per-head layer norm (TTT's code: 1e-6)")


@attrs.frozen(kw_only=True)
class ObjectiveConfig:
    """``ttt.l2``: ``0.5 * ||f(k) - v||^2`` (TTT's reconstruction loss); no settings."""


@attrs.frozen(kw_only=True)
class LearnedStepConfig:
    """``ttt.learned_step``: ``eta_t = base_lr / head_dim * sigmoid(x w + b)`` per token and head."""

    base_lr: float = option(1.0, gt=0, le=100.0, typical=(0.01, 10.0),
                            help="eta_base (TTT: 1 for TTT-Linear, 0.1 for TTT-MLP); divided by "
                                 "the head width as TTT's code does")


@attrs.frozen(kw_only=True)
class NoRetentionConfig:
    """``ttt.no_retention``: full retention (TTT forgets nothing); no settings."""


@attrs.frozen(kw_only=True)
class AfterWriteConfig:
    """``ttt.after_write``: token ``t`` reads ``W_t``, after its own step; no settings."""


@attrs.frozen(kw_only=True)
class ProjectionConfig:
    """``ttt.qkv``: per-head linear q, k, v and an optional causal convolution on q and k."""

    conv_kernel: int = option(4, ge=0, le=256, typical=(0, 8),
                              help="taps of the causal depthwise convolution on q and k (TTT's "
                                   "config: 4, on its Mamba backbone); 0: none")


@attrs.frozen(kw_only=True)
class LayerConfig:
    """``ttt.layer``: the fast-weight memory layer built from the spec's projection, memory,
    objective, optimizer, retention and retrieval."""

    # The kernel builds chunk_size x chunk_size matrices per sequence and head (see
    # titans.neural_memory): 4096 is already far beyond any setting TTT used.
    chunk_size: int = option(16, ge=1, le=4096, typical=(1, 64),
                             help="mini-batch size b: tokens whose gradients use the same "
                                  "mini-batch-start weights (TTT: 16)")
