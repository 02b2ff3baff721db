"""The memory layer's projection: hidden states to per-head queries, keys and values
(docs/memory.md, "The memory layer"); the titans plugin registers it as ``titans.conv_qkv`` and
``titans.plain_qkv``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.linear import Linear
from memforge.nn import causal_depthwise_conv


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
        # The module holds the taps (its initialisation and state-dict key); the product is
        # causal_depthwise_conv on the rows as they lie.
        self.conv = nn.Conv1d(width, width, conv_kernel, groups=width, bias=False) if conv_kernel else None

    def forward(self, x: Tensor, cache: ProjectionCache | None) -> tuple[Tensor, Tensor, Tensor, Any]:
        """``x`` ``[B, T, D]`` -> ``q, k, v`` ``[B, H, T, d]`` and the new cache."""
        h = self.proj(x)
        if self.conv is not None:
            batch = x.shape[0]
            history = (cache.history if cache is not None
                       else h.new_zeros(batch, self.kernel - 1, h.shape[-1]))
            window = torch.cat((history.to(h.dtype), h), dim=1)
            h = causal_depthwise_conv(window, self.conv.weight)
            # A copy, so that the cache does not hold the whole window after a long prefill.
            cache = ProjectionCache(window[:, window.shape[1] - (self.kernel - 1):].clone())
        # [B, T, 3 * H * d] -> [B, 3 * H, T, d]: q and k are normalised in one call.
        h = F.silu(h).unflatten(-1, (3 * self.heads, self.head_dim)).transpose(1, 2)
        query_key, v = h[:, : 2 * self.heads], h[:, 2 * self.heads:]
        q, k = F.normalize(query_key, dim=-1).chunk(2, dim=1)
        return q, k, v, cache


__all__ = ["ProjectionCache", "QKVProjection"]
