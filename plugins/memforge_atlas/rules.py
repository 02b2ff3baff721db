"""ATLAS' objectives and optimisers (docs/zoo.md, "ATLAS").

* :class:`OmegaObjective` (``atlas.omega``): the Omega rule. Token ``t``'s step descends
  ``sum_{i=t-c+1}^{t} gamma_i * 0.5 * ||M(k_i) - v_i||^2`` over the last ``c`` pairs, with a
  learned gate ``gamma_i = sigmoid(x_i W + b)`` in ``[0, 1]`` per token and head (in-context
  pruning: a pair with ``gamma = 0`` is never memorised). ``c = 1`` is the online delta rule.
* :class:`DotObjective` (``atlas.dot``): the negative dot product ``-<M(k), v>``, whose step is the
  Hebbian write of linear attention and DeepTransformers.
* :class:`Muon` (``atlas.muon``): momentum, then Newton-Schulz orthogonalisation of it at every
  token (``W_t = keep_t W_{t-1} - scale * NS_5(S_t)``).

Plain gradient descent with momentum (``atlas.gd``, the ablation of Muon without Newton-Schulz) is
the core's :class:`memforge.engine.rules.GatedStep`, registered under this plugin's name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memforge.engine.rules import GatedStep
from memforge.interfaces import ObjectiveInputs, StepGates
from memforge.linear import Linear
from memforge_atlas.newton_schulz import newton_schulz, newton_schulz_factor


class OmegaObjective(nn.Module):
    """The Omega rule's objective: ``0.5 * ||p - t||^2`` per pair, summed over a window of ``c``.

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        window: ``c >= 1``, pairs per step (the token's and the ``c - 1`` before it).
        gated: learn ``gamma_i``; ``False`` weighs every pair 1 (``ObjectiveInputs.window`` is
            ``None``).
        gamma_init: ``gamma`` at zero input, in ``(0, 1)``.
    """

    #: The loss of one pair is exactly ``0.5 * ||p - t||^2``.
    squared_error = True

    def __init__(self, dim: int, heads: int, *, window: int, gated: bool, gamma_init: float
                 ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < gamma_init < 1.0:
            raise ValueError(f"gamma_init must lie in (0, 1), got {gamma_init}")
        self.window = window
        self.gamma = Linear(dim, heads) if gated else None
        if self.gamma is not None:
            nn.init.normal_(self.gamma.weight, std=0.02)
            nn.init.constant_(self.gamma.bias, math.log(gamma_init / (1.0 - gamma_init)))

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """Per-pair ``0.5 * ||prediction - target||^2``, ``[..., t]``."""
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """``prediction - target``."""
        return prediction - target

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """``gamma`` ``[B, T, H]`` for ``x`` ``[B, T, D]`` (``None`` when not gated)."""
        gamma = None if self.gamma is None else torch.sigmoid(self.gamma(x))
        return ObjectiveInputs(None, gamma)

    def extra_repr(self) -> str:
        """The window, for ``print(module)``."""
        return f"window={self.window}, gated={self.gamma is not None}"


class DotObjective(nn.Module):
    """``-<prediction, target>`` per token: its gradient step is the Hebbian write
    ``W += theta * k v^T`` of a matrix memory (linear attention; DeepTransformers)."""

    window = 1
    squared_error = False

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """Per-token ``-<prediction, target>``, ``[..., t]``."""
        return -(prediction * target).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """``-target`` (independent of the prediction)."""
        return -target.expand_as(prediction)

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """No per-token inputs."""
        return ObjectiveInputs(None, None)


class Muon(nn.Module):
    """Muon as a fast-weight optimiser: ``S_t = eta_t S_{t-1} + theta_t u_t`` and
    ``W_t = keep_t W_{t-1} - scale * NS_5(S_t)`` for every fast-weight matrix.

    ``applies_at = "token"``: ATLAS' parallel form runs the momentum scan over the chunk and then
    orthogonalises every token's momentum (docs/zoo.md, "ATLAS"), so the rule keeps the
    chunk-start tier (gradients at the chunk start, momentum, Newton-Schulz, decay and reads per
    token) and is token-exact at chunk size 1. Newton-Schulz removes the update's scale: ``theta``
    only weighs a token's gradient against the carried momentum, and ``scale`` sets the step.

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        max_lr, lr_init: bound and initial value of ``theta``.
        momentum_init: initial ``eta``.
        scale: size of every orthogonalised step (its singular values are about ``scale``).
        steps: Newton-Schulz iterations.
    """

    #: Orthogonalise every token's momentum (see the class docstring). Newton-Schulz of a vector
    #: is only its direction, so a memory with a width-1 fast weight (a bias, or ``d_in == 1``)
    #: is refused at build time (:mod:`memforge_atlas.validation`).
    applies_at = "token"

    def __init__(self, dim: int, heads: int, *, max_lr: float, lr_init: float,
                 momentum_init: float, scale: float, steps: int) -> None:
        super().__init__()
        self.step = GatedStep(dim, heads, max_lr=max_lr, lr_init=lr_init, momentum=True,
                              momentum_init=momentum_init)
        self.scale, self.steps = scale, steps

    def forward(self, x: Tensor) -> StepGates:
        """``theta`` and ``eta`` ``[B, T, H]`` for ``x`` ``[B, T, D]``."""
        return self.step(x)

    def transform(self, update: Tensor) -> Tensor:
        """``scale * NS(update)`` for one fast-weight matrix's momentum ``[N, d_in, d_out]``."""
        return self.scale * newton_schulz(update, self.steps)

    def gram_factor(self, gram: Tensor) -> Tensor:
        """``scale * R`` with ``NS(X) = R X`` for the wide momentum ``X`` whose Gram matrix is
        ``gram`` (:class:`memforge.FactorsThroughGram`: a chunk's per-token steps then need no
        weight-sized matrix per token)."""
        return self.scale * newton_schulz_factor(gram, self.steps)

    def extra_repr(self) -> str:
        """Settings, for ``print(module)``."""
        return f"scale={self.scale:g}, steps={self.steps}, applies_at={self.applies_at!r}"
