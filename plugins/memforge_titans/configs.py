"""Config classes of the ``titans`` plugin's components (frozen attrs; every field defaulted)."""

from __future__ import annotations

import attrs

from memforge import option

ACTIVATIONS = ("gelu", "silu", "relu")


@attrs.frozen(kw_only=True)
class NeuralMemoryConfig:
    """The Titans memory layer (``titans.neural_memory``), built from the spec's memory,
    objective, optimizer, retention, retrieval and projection."""

    # The kernel builds chunk_size x chunk_size matrices per sequence and head:
    # 4096 is 64 MB each, beyond what any setting needs.
    chunk_size: int = option(64, ge=1, le=4096, typical=(1, 64),
                             help="tokens whose gradients use the same chunk-start weights")


@attrs.frozen(kw_only=True)
class MLPMemoryConfig:
    """Deep MLP memory (``titans.mlp``)."""

    depth: int = option(2, ge=1, le=64, typical=(1, 4),
                        help="weight matrices in the memory MLP (L_M; 1 = linear)")
    expansion: float = option(4.0, gt=0, le=64, typical=(1.0, 8.0),
                              help="hidden width as a multiple of the head width")
    activation: str = option("gelu", choices=ACTIVATIONS, help="hidden non-linearity")
    residual: bool = option(True, help="output x + f(x)")
    # On by default: without it a trained titans.lmm (S-NIAH at 64 tokens) saw its fast weights
    # grow from norm 72 to inf within 64 tokens past the training length; with it they stayed
    # below 100 up to 2048 tokens (32x), and MQAR learned faster (57% vs 48% at 600 steps).
    norm: bool = option(True, help="layer-norm f(x) before the residual (TTT/MIRAS form, the "
                                   "peer's default); bounds the inner gradient as weights grow")


@attrs.frozen(kw_only=True)
class LinearMemoryConfig:
    """Linear (matrix) memory (``titans.linear``): ``M(k) = k W``, the delta-rule state."""


@attrs.frozen(kw_only=True)
class L2ObjectiveConfig:
    """The l2 associative loss ``0.5 * ||M(k) - v||^2`` (``titans.l2``), Titans Eq. 12."""


@attrs.frozen(kw_only=True)
class MomentumConfig:
    """Gradient descent with a data-dependent step size and momentum (``titans.momentum``),
    Titans Eqs. 9-14."""

    # The loss is summed over features: a bound of 0.1 let small MAC/MAG/LMM memories diverge within
    # a few thousand float32 tokens in training; theta <= 0.01 stayed finite up to 8K tokens. Above
    # 1 a single step overshoots the target of an l2-normalised key, so no larger
    # bound is accepted.
    max_lr: float = option(0.01, gt=0, le=1, typical=(1e-3, 0.1),
                           help="upper bound of the step size theta")
    lr_init: float = option(0.005, gt=0, lt=1, typical=(1e-4, 1e-2), help="initial step size theta")
    momentum_init: float = option(0.9, gt=0, lt=1, typical=(0.5, 0.99), help="initial momentum eta")

    def __attrs_post_init__(self) -> None:
        if self.lr_init >= self.max_lr:
            raise ValueError(f"'lr_init'={self.lr_init} must be < 'max_lr'={self.max_lr}")


@attrs.frozen(kw_only=True)
class SGDConfig:
    """Gradient descent with a data-dependent step size, no momentum (``titans.sgd``)."""

    # See MomentumConfig for both bounds.
    max_lr: float = option(0.01, gt=0, le=1, typical=(1e-3, 0.1),
                           help="upper bound of the step size theta")
    lr_init: float = option(0.005, gt=0, lt=1, typical=(1e-4, 1e-2), help="initial step size theta")

    def __attrs_post_init__(self) -> None:
        if self.lr_init >= self.max_lr:
            raise ValueError(f"'lr_init'={self.lr_init} must be < 'max_lr'={self.max_lr}")


@attrs.frozen(kw_only=True)
class AdaptiveDecayConfig:
    """Data-dependent forgetting gate (``titans.adaptive_decay``)."""

    init: float = option(0.02, gt=0, lt=1, typical=(1e-3, 0.1), help="initial alpha")
    max_decay: float = option(1.0, gt=0, le=1, typical=(0.2, 1.0), help="upper bound of alpha")

    def __attrs_post_init__(self) -> None:
        if self.init >= self.max_decay:
            raise ValueError(f"'init'={self.init} must be < 'max_decay'={self.max_decay}")


@attrs.frozen(kw_only=True)
class ConstantDecayConfig:
    """The same forgetting for every token (``titans.constant_decay``)."""

    alpha: float = option(0.02, ge=0, le=1, help="alpha for every token and head")


@attrs.frozen(kw_only=True)
class NoForgettingConfig:
    """No forgetting (``titans.no_forgetting``)."""


@attrs.frozen(kw_only=True)
class RetrievalConfig:
    """Read orders have no settings (``titans.chunk_start``, ``before_write``, ``after_write``)."""


@attrs.frozen(kw_only=True)
class ConvProjectionConfig:
    """q/k/v with a causal depthwise convolution (``titans.conv_qkv``)."""

    conv_kernel: int = option(4, ge=1, le=256, typical=(1, 8), help="depthwise convolution width")


@attrs.frozen(kw_only=True)
class PlainProjectionConfig:
    """q/k/v without convolution (``titans.plain_qkv``): the "w/o convolution" ablation."""
