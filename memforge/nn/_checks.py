"""Shape checks shared by the building blocks."""

from __future__ import annotations

from torch import Tensor


def check_width(x: Tensor, dim: int, owner: str) -> None:
    """Raise ``ValueError`` unless ``x``'s last axis has width ``dim``."""
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{owner} expected an input of shape [..., {dim}], got {tuple(x.shape)}")
