"""The small modules of the Titans memory layer: surprise, forgetting, retrieval, projection.

Each is a plain ``nn.Module`` with plain constructor arguments that satisfies one of the
Protocols in :mod:`memforge.interfaces`; :mod:`memforge_titans` registers them as components.

Gate parameterisation (the paper leaves it open; docs/memory.md, "The update rule"): per token and
per head, from a linear map of the layer input, squashed by a sigmoid. The step size is bounded by
``max_lr``; biases start the gates at sensible values (small steps, strong momentum, little
forgetting) so the memory stays bounded on long random input from the first step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.interfaces import ChunkReader, SurpriseGates
from memforge.linear import Linear


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class _Gate(nn.Module):
    """``scale * sigmoid(x W + b)`` per head: ``[B, T, D] -> [B, T, H]``, starting near ``init``."""

    def __init__(self, dim: int, heads: int, init: float, scale: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < init < scale:
            raise ValueError(f"gate initial value must lie in (0, {scale}), got {init}")
        self.scale = scale
        self.proj = Linear(dim, heads)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, _logit(init / scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(self.proj(x))


class L2Surprise(nn.Module):
    """Associative loss ``0.5 * ||M(k) - v||^2`` (Titans Eq. 12, halved as in App. C).

    Its gradient with respect to the memory output is the error ``M(k) - v``. Gates:
    ``theta_t = max_lr * sigmoid(.)`` and, with momentum, ``eta_t = sigmoid(.)``.

    Args:
        dim: layer input width ``D``.
        heads: number of memory heads.
        max_lr: upper bound of the step size ``theta``.
        lr_init: initial step size (at zero input).
        momentum: carry past surprise (``True``) or plain gradient descent (``False``).
        momentum_init: initial ``eta`` when momentum is on.
    """

    def __init__(self, dim: int, heads: int, *, max_lr: float, lr_init: float, momentum: bool,
                 momentum_init: float) -> None:
        super().__init__()
        self.lr_gate = _Gate(dim, heads, lr_init, max_lr)
        self.momentum_gate = _Gate(dim, heads, momentum_init) if momentum else None

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Per-token ``0.5 * ||prediction - target||^2``, ``[..., t]``."""
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor) -> Tensor:
        """``prediction - target``: the gradient of :meth:`loss` with respect to the prediction."""
        return prediction - target

    def forward(self, x: Tensor) -> SurpriseGates:
        """Step sizes (and momentum) for the layer input ``x`` ``[B, T, D]``."""
        momentum = self.momentum_gate(x) if self.momentum_gate is not None else None
        return SurpriseGates(self.lr_gate(x), momentum)


class AdaptiveDecay(nn.Module):
    """Data-dependent forgetting ``alpha_t = max_decay * sigmoid(.)`` per token and head."""

    def __init__(self, dim: int, heads: int, *, init: float, max_decay: float) -> None:
        super().__init__()
        self.gate = _Gate(dim, heads, init, max_decay)

    def forward(self, x: Tensor) -> Tensor:
        """``alpha`` ``[B, T, H]`` for ``x`` ``[B, T, D]``."""
        return self.gate(x)


class ConstantDecay(nn.Module):
    """The same forgetting ``alpha`` for every token and head (a fixed weight decay)."""

    def __init__(self, heads: int, *, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.heads = heads
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        """``alpha`` broadcast to ``[B, T, H]``."""
        return x.new_full((*x.shape[:2], self.heads), self.alpha)


class NoForgetting(nn.Module):
    """No decay: ``alpha = 0`` exactly (the kernels skip the decay products)."""

    def forward(self, x: Tensor) -> None:
        """Always ``None``."""
        return None


class ReadAtChunkStart(nn.Module):
    """Read every token with the weights at the start of its chunk (cheapest; with chunk size 1
    this is reading ``M_{t-1}``). A token never sees a write of its own chunk."""

    reads = ("at_chunk_start",)
    reads_within_chunk = False

    def forward(self, reader: ChunkReader, queries: Tensor) -> Tensor:
        return reader.at_chunk_start(queries)


class ReadBeforeWrite(nn.Module):
    """Read token ``t`` with the exact weights ``M_{t-1}``: everything before it, not itself."""

    reads = ("before_write",)
    reads_within_chunk = True

    def forward(self, reader: ChunkReader, queries: Tensor) -> Tensor:
        return reader.before_write(queries)


class ReadAfterWrite(nn.Module):
    """Read token ``t`` with the exact weights ``M_t``, after its own write (TTT's order)."""

    reads = ("after_write",)
    reads_within_chunk = True

    def forward(self, reader: ChunkReader, queries: Tensor) -> Tensor:
        return reader.after_write(queries)


class ProjectionCache(NamedTuple):
    """The last ``kernel - 1`` projected (pre-convolution) inputs ``[B, kernel - 1, 3 * H * d]``."""

    history: Tensor


class QKVProjection(nn.Module):
    """Queries, keys and values for the memory (docs/memory.md, "The memory layer"; GDN order).

    ``linear -> causal depthwise conv (optional) -> SiLU``, then q and k are l2-normalised per
    head. The convolution keeps its last ``kernel - 1`` inputs as a cache, so a sequence fed in
    pieces gives the same q, k, v as fed whole.

    Args:
        dim: input width ``D``.
        heads: heads ``H``.
        head_dim: per-head width ``d``.
        conv_kernel: depthwise convolution width; ``0`` turns the convolution off.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, conv_kernel: int) -> None:
        super().__init__()
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0 (0 = off), got {conv_kernel}")
        self.heads, self.head_dim, self.kernel = heads, head_dim, conv_kernel
        width = 3 * heads * head_dim
        self.proj = Linear(dim, width, bias=False)
        self.conv = nn.Conv1d(width, width, conv_kernel, groups=width, bias=False) if conv_kernel else None

    def forward(self, x: Tensor, cache: ProjectionCache | None) -> tuple[Tensor, Tensor, Tensor, Any]:
        """``x`` ``[B, T, D]`` -> ``q, k, v`` ``[B, H, T, d]`` and the new cache."""
        h = self.proj(x)
        if self.conv is not None:
            batch = x.shape[0]
            history = (cache.history if cache is not None
                       else h.new_zeros(batch, self.kernel - 1, h.shape[-1]))
            window = torch.cat((history, h), dim=1)
            if h.shape[1] == 1:
                # Decoding: one output is a weighted sum of the window, far cheaper than a conv call.
                h = (window * self.conv.weight[:, 0].t()).sum(1, keepdim=True)
            else:
                h = self.conv(window.transpose(1, 2)).transpose(1, 2)
            cache = ProjectionCache(window[:, window.shape[1] - (self.kernel - 1):])
        h = F.silu(h)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
                   for t in h.chunk(3, dim=-1))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, cache
