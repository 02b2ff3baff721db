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


def _monomials(dim: int, degree: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every degree-``degree`` monomial (a non-decreasing index tuple), built from the block below:
    ``(parent, last, scale)`` with monomial ``j = block_{degree-1}[parent[j]] * x[last[j]]`` and
    ``scale[j]`` the square root of its multinomial coefficient."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    below = {c: j for j, c in enumerate(itertools.combinations_with_replacement(range(dim),
                                                                                 degree - 1))}
    parent = torch.tensor([below[c[:-1]] for c in combos], dtype=torch.long)
    last = torch.tensor([c[-1] for c in combos], dtype=torch.long)
    scale = torch.tensor([math.sqrt(math.factorial(degree)
                                    / math.prod(math.factorial(n) for n in Counter(c).values()))
                          for c in combos], dtype=torch.float64)
    return parent, last, scale


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
            parent, last, scale = _monomials(dim, i)
            self.register_buffer(f"parent_{i}", parent, persistent=False)
            self.register_buffer(f"last_{i}", last, persistent=False)
            self.register_buffer(f"scale_{i}", scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``phi_p(x)`` for ``x`` ``[N, t, d]`` (``N`` a multiple of the heads)."""
        n, t = x.shape[0], x.shape[1]
        coefficients = self.coefficients.to(x.dtype)                          # [H, p + 1]
        groups = n // self.heads
        monomials = x
        blocks = [coefficients[:, None, 0:1].expand(groups, self.heads, t, 1),
                  x.reshape(groups, self.heads, t, self.dim) * coefficients[:, None, 1:2]]
        for i in range(2, self.degree + 1):
            # Monomials of degree i from those of degree i - 1: one gather each, no products
            # over index tuples (their backward would scatter every factor).
            monomials = (monomials.index_select(-1, getattr(self, f"parent_{i}"))
                         * x.index_select(-1, getattr(self, f"last_{i}")))
            weight = coefficients[:, i, None] * getattr(self, f"scale_{i}").to(x.dtype)  # [H, M]
            blocks.append(monomials.reshape(groups, self.heads, t, monomials.shape[-1])
                          * weight[:, None, :])
        return torch.cat(blocks, -1).reshape(n, t, self.width)

    def extra_repr(self) -> str:
        """Shape, for ``print(module)``."""
        return f"heads={self.heads}, dim={self.dim}, degree={self.degree}, width={self.width}"
