"""ATLAS' polynomial feature map ``phi_p`` on keys and queries (docs/zoo.md, "ATLAS").

``phi_p(x) = [a_0 m_0(x), a_1 m_1(x), ..., a_p m_p(x)]``: block ``i`` holds every monomial of
degree ``i`` of the ``d`` coordinates of ``x`` once (``x_1 x_1``, ``x_1 x_2``, ..., never
``x_2 x_1`` again), scaled by the square root of its multinomial coefficient, so that
``m_i(x) . m_i(y) = (x . y)^i`` exactly and

    phi_p(x) . phi_p(y) = sum_i a_i^2 (x . y)^i.

This is the paper's ``[x^beta]_{|beta| <= p}`` with the fewest coordinates: ``C(d + p, p)``
(block ``i`` has ``C(d + i - 1, i)``), against ``sum_i d^i`` for Kronecker powers. The degree
coefficients ``a_i`` are learned (one set per head) and start at ``1 / i!``, the Taylor
coefficients of ``exp`` (ATLAS §3; with ``a_i = 1 / sqrt(i!)`` the map would be the truncated
Taylor features of the kernel ``exp(x . y)`` exactly).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch
from torch import Tensor, nn


def feature_width(dim: int, degree: int) -> int:
    """Width of ``phi_p`` on ``dim`` coordinates: ``C(dim + degree, degree)`` monomials."""
    return math.comb(dim + degree, degree)


def _monomials(dim: int, degree: int) -> tuple[Tensor, Tensor]:
    """The coordinate indices ``[M, degree]`` of every degree-``degree`` monomial (non-decreasing
    tuples) and ``sqrt`` of their multinomial coefficients ``[M]``."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    scales = [math.sqrt(math.factorial(degree)
                        / math.prod(math.factorial(n) for n in Counter(c).values()))
              for c in combos]
    return torch.tensor(combos, dtype=torch.long).reshape(len(combos), degree), torch.tensor(scales)


class PolynomialFeatures(nn.Module):
    """``phi_p``: ``[N, t, d] -> [N, t, C(d + p, p)]`` with learned degree coefficients per head.

    Rows are sequence-major and head-minor (``n = b * H + h``, the kernels' order), so row ``n``
    takes head ``n % H``'s coefficients.

    Args:
        heads: heads ``H`` (each learns its own ``a_0..a_p``).
        dim: input width ``d``.
        degree: ``p >= 1``.
    """

    def __init__(self, heads: int, dim: int, degree: int) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.heads, self.dim, self.degree = heads, dim, degree
        self.width = feature_width(dim, degree)
        init = torch.tensor([1.0 / math.factorial(i) for i in range(degree + 1)])
        self.coefficients = nn.Parameter(init.repeat(heads, 1))  # [H, p + 1]
        for i in range(2, degree + 1):
            index, scale = _monomials(dim, i)
            self.register_buffer(f"index_{i}", index, persistent=False)
            self.register_buffer(f"scale_{i}", scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``phi_p(x)`` for ``x`` ``[N, t, d]`` (``N`` a multiple of the heads)."""
        blocks = [x.new_ones(*x.shape[:-1], 1), x]
        for i in range(2, self.degree + 1):
            index, scale = getattr(self, f"index_{i}"), getattr(self, f"scale_{i}")
            blocks.append(x[..., index].prod(-1) * scale.to(x.dtype))
        n, t = x.shape[0], x.shape[1]
        widths = [b.shape[-1] for b in blocks]
        # One coefficient per block, per head: [H, p + 1] -> [1, H, 1, width] over the rows.
        per_column = self.coefficients.to(x.dtype).repeat_interleave(
            torch.tensor(widths, device=x.device), dim=1, output_size=self.width)
        features = torch.cat(blocks, -1).reshape(n // self.heads, self.heads, t, self.width)
        return (features * per_column[None, :, None, :]).reshape(n, t, self.width)

    def extra_repr(self) -> str:
        """Shape, for ``print(module)``."""
        return f"heads={self.heads}, dim={self.dim}, degree={self.degree}, width={self.width}"
