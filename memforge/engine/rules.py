"""Generic parts of a learning rule: objective, optimiser, retention and retrieval modules.

Each is a plain ``nn.Module`` with plain constructor arguments that satisfies one Protocol of
:mod:`memforge.interfaces` (``Objective``, ``Optimizer``, ``Retention``, ``RetrievalRule``); any
plugin registers them under its own names (the titans plugin as ``titans.l2``,
``titans.momentum``, ``titans.sgd``, ``titans.adaptive_decay``, ...).

Gate parameterisation (docs/memory.md, "The update rule"): per token and per head, from a linear
map of the layer input, squashed by a sigmoid. The step size is bounded by ``max_lr``; biases start
the gates at sensible values (small steps, strong momentum, little forgetting) so the memory stays
bounded on long random input from the first step. Retention is returned in log space
(``log_keep <= 0``), computed so that full forgetting stays finite with a finite gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.interfaces import ChunkReader, ObjectiveInputs, StepGates
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


class L2Objective(nn.Module):
    """Associative loss ``0.5 * ||M(k) - v||^2`` (Titans Eq. 12, halved as in App. C).

    Its gradient with respect to the memory output is the error ``M(k) - v``. It has no per-token
    inputs and no side input (``side`` is ignored).
    """

    #: Pairs per step: the token's own (the online rule).
    window = 1
    #: Exactly ``0.5 * ||p - t||^2``: what the token-exact WY executor needs.
    squared_error = True

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """Per-token ``0.5 * ||prediction - target||^2``, ``[..., t]``."""
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """``prediction - target``: the gradient of :meth:`loss` with respect to the prediction."""
        return prediction - target

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """No per-token inputs: ``ObjectiveInputs(None, None)``."""
        return ObjectiveInputs(None, None)


class GatedStep(nn.Module):
    """Gradient descent with a data-dependent step size and, optionally, momentum.

    ``theta_t = max_lr * sigmoid(.)`` and, with momentum, ``eta_t = sigmoid(.)`` (Titans Eqs.
    9-14); without it plain gradient descent (``eta = 0`` exactly).

    Args:
        dim: layer input width ``D``.
        heads: number of memory heads.
        max_lr: upper bound of the step size ``theta``.
        lr_init: initial step size (at zero input).
        momentum: carry past updates (``True``) or plain gradient descent (``False``).
        momentum_init: initial ``eta`` when momentum is on.
    """

    def __init__(self, dim: int, heads: int, *, max_lr: float, lr_init: float, momentum: bool,
                 momentum_init: float = 0.9) -> None:
        super().__init__()
        #: Declared capability (memforge.interfaces.Optimizer): momentum gates or none.
        self.uses_momentum = bool(momentum)
        self.lr_gate = _Gate(dim, heads, lr_init, max_lr)
        self.momentum_gate = _Gate(dim, heads, momentum_init) if momentum else None

    def forward(self, x: Tensor) -> StepGates:
        """Step sizes (and momentum) for the layer input ``x`` ``[B, T, D]``."""
        momentum = self.momentum_gate(x) if self.momentum_gate is not None else None
        return StepGates(self.lr_gate(x), momentum)


class AdaptiveDecay(nn.Module):
    """Data-dependent forgetting ``alpha_t = max_decay * sigmoid(z_t)`` per token and head.

    Returns ``log_keep = log(1 - alpha) = log1p(-max_decay * sigmoid(z))``, and exactly
    ``logsigmoid(-z)`` when ``max_decay == 1``: finite, with a finite gradient, at any ``z``
    (full forgetting is a large negative number, never ``log 0``).
    """

    def __init__(self, dim: int, heads: int, *, init: float, max_decay: float) -> None:
        super().__init__()
        if not 0.0 < init < max_decay <= 1.0:
            raise ValueError(f"need 0 < init < max_decay <= 1, got init={init}, "
                             f"max_decay={max_decay}")
        self.max_decay = max_decay
        # The gate's linear map; its bias starts alpha at `init` (attribute name kept for
        # checkpoints: `gate.proj`).
        self.gate = _Gate(dim, heads, init, max_decay)

    def forward(self, x: Tensor) -> Tensor:
        """``log_keep`` ``[B, T, H]`` (``<= 0``) for ``x`` ``[B, T, D]``."""
        z = self.gate.proj(x)
        if self.max_decay == 1.0:
            return F.logsigmoid(-z)
        return torch.log1p(-self.max_decay * torch.sigmoid(z))


class ConstantDecay(nn.Module):
    """The same forgetting ``alpha`` for every token and head (a fixed weight decay).

    ``alpha = 1`` (forget everything at every token) is ``log_keep`` at the lowest finite value
    of the dtype's exponent range (``log`` of its smallest normal number), not ``-inf``.
    """

    def __init__(self, heads: int, *, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.heads = heads
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        """``log(1 - alpha)`` broadcast to ``[B, T, H]``."""
        floor = math.log(torch.finfo(x.dtype).tiny)
        log_keep = math.log1p(-self.alpha) if self.alpha < 1.0 else floor
        return x.new_full((*x.shape[:2], self.heads), max(log_keep, floor))


class NoForgetting(nn.Module):
    """No decay: ``keep = 1`` exactly (the kernels skip the decay products)."""

    #: Declared capability (memforge.interfaces.Retention): ``forward`` is always ``None``.
    full_retention = True

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


__all__ = [
    "AdaptiveDecay",
    "ConstantDecay",
    "GatedStep",
    "L2Objective",
    "NoForgetting",
    "ReadAfterWrite",
    "ReadAtChunkStart",
    "ReadBeforeWrite",
]
