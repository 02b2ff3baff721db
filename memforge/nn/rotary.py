"""Rotary position embeddings (RoPE, rotate-half layout)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memforge.nn._checks import check_width

__all__ = ["RotaryEmbedding", "apply_rotary", "rotary_angles", "rotate"]


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x`` ``[..., T, d]`` by rotary position embeddings at absolute ``positions`` ``[T]``.

    Uses the "rotate half" layout of GPT-NeoX / Hugging Face Llama: channel ``i`` is paired with
    channel ``i + d/2`` and the pair is rotated by ``positions * base ** (-2i / d)``. Because each
    pair is rotated by an angle linear in the position, ``<rot(q, m), rot(k, n)>`` depends only on
    ``m - n`` -- which is why a cache can store keys already rotated.

    Angles are computed in float32 (float64 for float64 inputs) and cast to ``x.dtype``.

    Args:
        x: tensor whose last axis ``d`` (even) is rotated and whose second-to-last axis is time.
        positions: integer (or float) positions, one per time step.
        base: the RoPE frequency base.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even last axis, got shape {tuple(x.shape)}")
    if positions.shape != (x.shape[-2],):
        raise ValueError(
            f"positions must have shape [T] = [{x.shape[-2]}] for x of shape {tuple(x.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    return rotate(x, *rotary_angles(positions, d, base, x.dtype, x.device))


def rotary_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[T, head_dim / 2]`` of the rotary angles at ``positions``, in ``dtype``.

    Computed in float32 (float64 for float64) and then cast, as :func:`apply_rotary` describes.
    """
    exact = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=exact) / head_dim)
    angles = positions.to(device=device, dtype=exact)[:, None] * inv_freq  # [T, d/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[..., T, d]`` by precomputed ``cos``/``sin`` ``[T, d / 2]`` (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for heads of width ``head_dim``; see :func:`apply_rotary`.

    Holds no parameters or buffers: the frequencies are recomputed per call (``d / 2`` numbers),
    so casting the model to bfloat16 can never degrade them.

    Args:
        head_dim: per-head width ``d`` (must be even).
        base: the RoPE frequency base.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"rotary embeddings need an even head_dim >= 2, got {head_dim}; "
                "pick dim and heads so that dim // heads is even"
            )
        self.head_dim = head_dim
        self.base = base

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[B, H, T, head_dim]`` at absolute ``positions`` ``[T]``."""
        check_width(x, self.head_dim, "RotaryEmbedding")
        return apply_rotary(x, positions, self.base)

    def rotate_pair(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys ``[B, H, T, head_dim]`` (same dtype) with one angle computation."""
        check_width(q, self.head_dim, "RotaryEmbedding")
        check_width(k, self.head_dim, "RotaryEmbedding")
        if positions.shape != (q.shape[-2],) or k.shape[-2] != q.shape[-2]:
            raise ValueError(f"positions must have shape [T] for q {tuple(q.shape)} and k "
                             f"{tuple(k.shape)} of T steps, got {tuple(positions.shape)}")
        cos, sin = rotary_angles(positions, self.head_dim, self.base, q.dtype, q.device)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
