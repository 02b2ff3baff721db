"""The TTT fast-weight networks (docs/zoo.md, "TTT"): forward only, every fast weight a matrix.

Both implement :class:`memforge.interfaces.MemoryNetwork` without a hand-written ``backward``:
the engine derives one by autograd (``memforge.engine.derived_backward``). Their fast weights are
the initial values ``[H, d_in, d_out]`` of every matrix *and of every inner bias*: a bias is a
``[H, 1, d_out]`` matrix applied through the kernel's ``linear`` callback to a column of ones, so
its per-token gradient is the outer product ``1^T g_t`` like any other matrix's and the
closed-form chunk kernel runs it unchanged. The per-head layer norm's affine weight and bias are
*outer* parameters (``[H, d]``): learned by the outer optimiser, never moved at test time.

The kernels flatten batch and heads sequence-major, head-minor (``n = b * H + h``), so the norm's
per-head parameters are applied to ``x`` viewed as ``[B, H, t, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.interfaces import LinearFn


def head_layer_norm(y: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Layer norm over the last dim of ``y`` ``[N, t, d]`` (``N = B * H``) with per-head affine
    ``weight`` and ``bias`` ``[H, d]`` (TTT's ``ln_fwd``: biased variance, ``eps`` inside the root)."""
    heads = weight.shape[0]
    grouped = y.unflatten(0, (-1, heads))  # [B, H, t, d]
    mean = grouped.mean(-1, keepdim=True)
    var = (grouped - mean).square().mean(-1, keepdim=True)
    normed = (grouped - mean) * torch.rsqrt(var + eps)
    return (normed * weight[:, None, :] + bias[:, None, :]).flatten(0, 1)


class _TTTNetwork(nn.Module):
    """What both networks share: the affine per-head norm (outer parameters) and the residual."""

    def __init__(self, heads: int, dim: int, norm_eps: float) -> None:
        super().__init__()
        if heads < 1 or dim < 1:
            raise ValueError(f"heads and dim must be >= 1, got heads={heads}, dim={dim}")
        self.heads, self.dim, self.norm_eps = heads, dim, norm_eps
        # TTT's ttt_norm_weight / ttt_norm_bias: ones and zeros, one pair per head.
        self.norm_weight = nn.Parameter(torch.ones(heads, dim))
        self.norm_bias = nn.Parameter(torch.zeros(heads, dim))

    def _output(self, x: Tensor, residual_branch: Tensor) -> Tensor:
        """``x + LN(residual_branch)``."""
        return x + head_layer_norm(residual_branch, self.norm_weight.to(x.dtype),
                                   self.norm_bias.to(x.dtype), self.norm_eps)

    @staticmethod
    def _ones(x: Tensor) -> Tensor:
        """The column of ones a bias matrix ``[1, d_out]`` is applied to: ``[N, t, 1]``."""
        return x.new_ones(*x.shape[:-1], 1)


class TTTLinear(_TTTNetwork):
    """TTT-Linear: ``f(x) = x + LN(x W + b)`` per head; fast weights ``(W, b)``.

    Args:
        heads: heads ``H``, each with its own initial ``W``, ``b`` and norm.
        dim: per-head width ``d``.
        init_std: standard deviation of the initial ``W`` (``b`` starts at 0).
        norm_eps: the layer norm's epsilon.
    """

    def __init__(self, heads: int, dim: int, *, init_std: float = 0.02, norm_eps: float = 1e-6) -> None:
        super().__init__(heads, dim, norm_eps)
        self.weight = nn.Parameter(torch.randn(heads, dim, dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(heads, 1, dim))

    def initial_weights(self) -> tuple[Tensor, ...]:
        """``(W [H, d, d], b [H, 1, d])``."""
        return (self.weight, self.bias)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        """``f(x)`` for ``x`` ``[N, t, d]``; no tape (the backward is derived by autograd)."""
        return self._output(x, linear(0, x) + linear(1, self._ones(x))), None

    def extra_repr(self) -> str:
        """Shape, for ``print(module)``."""
        return f"heads={self.heads}, dim={self.dim}, norm_eps={self.norm_eps:g}"


class TTTMLP(_TTTNetwork):
    """TTT-MLP: ``f(x) = x + LN(GELU(x W1 + b1) W2 + b2)`` per head; fast weights
    ``(W1, b1, W2, b2)``, hidden width ``expansion * d``.

    GELU is the tanh approximation, as in TTT's code (``F.gelu(approximate="tanh")``).

    Args:
        heads: heads ``H``.
        dim: per-head width ``d``.
        expansion: hidden width ``expansion * d`` (TTT: 4).
        init_std: standard deviation of the initial ``W1``, ``W2`` (biases start at 0).
        norm_eps: the layer norm's epsilon.
    """

    def __init__(self, heads: int, dim: int, *, expansion: int = 4, init_std: float = 0.02,
                 norm_eps: float = 1e-6) -> None:
        super().__init__(heads, dim, norm_eps)
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        hidden = expansion * dim
        self.hidden = hidden
        self.weight1 = nn.Parameter(torch.randn(heads, dim, hidden) * init_std)
        self.bias1 = nn.Parameter(torch.zeros(heads, 1, hidden))
        self.weight2 = nn.Parameter(torch.randn(heads, hidden, dim) * init_std)
        self.bias2 = nn.Parameter(torch.zeros(heads, 1, dim))

    def initial_weights(self) -> tuple[Tensor, ...]:
        """``(W1 [H, d, h], b1 [H, 1, h], W2 [H, h, d], b2 [H, 1, d])``."""
        return (self.weight1, self.bias1, self.weight2, self.bias2)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        """``f(x)`` for ``x`` ``[N, t, d]``; no tape (the backward is derived by autograd)."""
        ones = self._ones(x)
        hidden = F.gelu(linear(0, x) + linear(1, ones), approximate="tanh")
        return self._output(x, linear(2, hidden) + linear(3, ones)), None

    def extra_repr(self) -> str:
        """Shape, for ``print(module)``."""
        return f"heads={self.heads}, dim={self.dim}, hidden={self.hidden}, norm_eps={self.norm_eps:g}"
