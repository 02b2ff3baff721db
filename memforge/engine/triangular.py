"""Inverse of a batch of unit lower-triangular matrices by block forward substitution.

The WY kernel needs ``(I + L)^{-1}`` for every chunk, ``L`` strictly lower (docs/delta.md, "Why
a blocked inverse"). The inverse is built by doubling the block size: with the inverses ``X_1``,
``X_2`` of two diagonal blocks of size ``s`` and the block ``L_21`` below the first,

    [[I + L_11, 0], [L_21, I + L_22]]^{-1} = [[X_1, 0], [-X_2 L_21 X_1, X_2]],

which is forward substitution carried out ``s`` rows at a time (the same products, grouped into
matrix multiplications). ``log2(C)`` levels, each two batched matmuls over every block pair of
every chunk at once: about ``C^3 / 3`` multiply-adds per chunk, like a triangular inversion, and no
loop over rows. Every step is a matmul or a copy, so autograd differentiates it as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def unit_lower_inverse(strict: Tensor) -> Tensor:
    """``(I + tril(strict, -1))^{-1}`` for ``strict`` ``[..., C, C]``; only the strictly lower part is read.

    Exact in the sense of forward substitution (the same operations, in blocks). ``C`` need not
    be a power of two: the matrix is padded with an identity block, whose inverse is itself and
    which does not mix with the rest.
    """
    size = strict.shape[-1]
    full = 1 << max(size - 1, 0).bit_length()
    # Only blocks that lie below the diagonal are ever read, so no masking is needed.
    lower = strict if full == size else F.pad(strict, (0, full - size, 0, full - size))
    batch = lower.shape[:-2]
    inverse = lower.new_ones(*batch, full, 1, 1)  # the 1 x 1 diagonal blocks, [..., C / s, s, s]
    block = 1
    while block < full:
        pairs = full // (2 * block)
        # The blocks just below the diagonal of each pair: rows (2m+1)s.., columns 2m s.. for pair m.
        below = (lower.reshape(*batch, pairs, 2, block, pairs, 2, block)
                 .diagonal(dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3))
        first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        corner = -(second @ below @ first)
        inverse = _join(first, corner, second)
        block *= 2
    return inverse[..., 0, :size, :size]


def _join(first: Tensor, corner: Tensor, second: Tensor) -> Tensor:
    """``[[first, 0], [corner, second]]`` for stacks of ``[..., s, s]`` blocks."""
    top = torch.cat((first, torch.zeros_like(first)), -1)
    return torch.cat((top, torch.cat((corner, second), -1)), -2)
