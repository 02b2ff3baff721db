"""The TTT layer's own small parts: the learned per-token step and the q/k/v projection.

The objective (ℓ2), the full retention and the after-write read are memforge's generic rule
parts (:mod:`memforge.engine.rules`), registered under ``ttt.`` names by :mod:`memforge_ttt`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memforge.interfaces import StepGates
from memforge.linear import Linear
from memforge.nn import causal_depthwise_conv


class LearnedStep(nn.Module):
    """TTT's learnable inner learning rate: ``eta_t = base_lr / head_dim * sigmoid(x_t w_h + b_h)``
    per token and head, no momentum (an :class:`memforge.interfaces.Optimizer`).

    From TTT's code (``ttt-lm-pytorch``, ``TTTBase.get_eta``): ``learnable_ttt_lr_weight`` ~
    N(0, 0.02) and ``learnable_ttt_lr_bias`` = 0 read the whole hidden state, one scalar per head;
    ``ttt_lr = base_lr * sigmoid(.) / head_dim``. TTT's code further scales the step of mini-batch
    position ``i`` by a learnable ``1/i``; that factor depends on the reading position, not the
    written token, so it is not a per-token step and is left out (docs/zoo.md, "TTT").

    Args:
        dim: layer input width ``D``.
        heads: heads ``H``.
        head_dim: per-head width ``d`` (the step is divided by it).
        base_lr: ``eta_base``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, base_lr: float) -> None:
        super().__init__()
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        self.scale = base_lr / head_dim
        self.lr_gate = Linear(dim, heads)
        nn.init.normal_(self.lr_gate.weight, std=0.02)
        nn.init.zeros_(self.lr_gate.bias)

    def forward(self, x: Tensor) -> StepGates:
        """Steps ``[B, T, H]`` for ``x`` ``[B, T, D]``; no momentum."""
        return StepGates(self.scale * torch.sigmoid(self.lr_gate(x)), None)

    def extra_repr(self) -> str:
        """The step's scale, for ``print(module)``."""
        return f"scale={self.scale:g}"


class ProjectionCache(NamedTuple):
    """The last ``kernel - 1`` projected, not yet convolved q and k ``[B, kernel - 1, 2 * H * d]``."""

    history: Tensor


class TTTProjection(nn.Module):
    """TTT's q, k, v: linear maps per head (no bias), then an optional causal depthwise
    convolution on q and k (TTT's ``conv_q`` / ``conv_k`` on its Mamba backbone). No activation
    and no normalisation: TTT's keys keep their scale, which its step's ``1 / head_dim`` assumes.

    The convolution keeps its last ``kernel - 1`` inputs as a cache, so a sequence fed in pieces
    gives the same q, k, v as fed whole (a :class:`memforge.interfaces.Projection`).

    Args:
        dim: input width ``D``.
        heads: heads ``H``.
        head_dim: per-head width ``d``.
        conv_kernel: convolution width; ``0`` turns it off.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, conv_kernel: int) -> None:
        super().__init__()
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0 (0 = off), got {conv_kernel}")
        self.heads, self.head_dim, self.kernel = heads, head_dim, conv_kernel
        width = heads * head_dim
        self.proj = Linear(dim, 3 * width, bias=False)
        # The module holds the taps; the product is causal_depthwise_conv on the rows as they lie.
        self.conv = (nn.Conv1d(2 * width, 2 * width, conv_kernel, groups=2 * width, bias=False)
                     if conv_kernel else None)

    def forward(self, x: Tensor, cache: ProjectionCache | None) -> tuple[Tensor, Tensor, Tensor, Any]:
        """``x`` ``[B, T, D]`` -> ``q, k, v`` ``[B, H, T, d]`` and the new cache."""
        h = self.proj(x)
        width = self.heads * self.head_dim
        qk, v = h[..., : 2 * width], h[..., 2 * width :]
        if self.conv is not None:
            history = (cache.history if cache is not None
                       else qk.new_zeros(x.shape[0], self.kernel - 1, qk.shape[-1]))
            window = torch.cat((history.to(qk.dtype), qk), dim=1)
            qk = causal_depthwise_conv(window, self.conv.weight)
            # A copy, so that the cache does not hold the whole window after a long prefill.
            cache = ProjectionCache(window[:, window.shape[1] - (self.kernel - 1):].clone())
        q, k = qk.chunk(2, dim=-1)
        return (*(t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)),
                cache)
