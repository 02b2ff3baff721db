"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memforge.nn._checks import check_width

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learnable per-channel scale (no bias, no centring).

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight``; ``weight`` starts at ones. Half-precision inputs
    are normalised in float32 and cast back, as in Llama, so the statistics don't underflow.

    Args:
        dim: width of the last axis.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm needs dim >= 1, got dim={dim}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[..., dim]`` over its last axis; returns the same shape and dtype."""
        check_width(x, self.dim, "RMSNorm")
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
