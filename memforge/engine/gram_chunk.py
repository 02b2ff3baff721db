"""A chunk of per-token transformed steps without per-token weights, for an optimiser whose
transform factors through the update's Gram matrix (:class:`memforge.FactorsThroughGram`, Muon's
Newton-Schulz; docs/memory.md, "The sequential executor").

Within a chunk, token ``t``'s momentum is ``S_t = e_t S_0 + X^T diag(q_t) G`` (``X``, ``G``: the
pairs' inputs and errors at the chunk-start weights, ``[L, d_in]`` and ``[L, d_out]``; ``q_t``: how
much of each pair's gradient ``S_t`` holds; ``e_t``: how much of the carried ``S_0``). In the wide
orientation ``S_t = e_t S_0 + A^T diag(q_t) B`` (``A`` the factor on the short side, width ``m``),
so its Gram matrix is

    S_t S_t^T = e_t^2 S_0 S_0^T + e_t (A^T D_t Y + Y^T D_t A) + A^T D_t (B B^T) D_t A,

with ``D_t = diag(q_t)`` and ``Y = B S_0^T``: products of width ``L`` and ``m``, never of a
weight-sized matrix per token. With ``R_t`` the transform's factor of that Gram matrix, the chunk
moves the weights by ``sum_t c_t R_t S_t`` (``c_t``: the decay from token ``t`` to the chunk's
end), which is ``(sum_t c_t e_t R_t) S_0 + (sum_t c_t R_t A^T D_t) B``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gram_chunk_end(factor: Callable[[Tensor], Tensor], pairs: list[tuple[Tensor, Tensor]],
                   mixes: Tensor, carried: Tensor | None, to_end: Tensor | None,
                   keep_end: Tensor | None, base: tuple[Tensor, ...], moments: tuple[Tensor, ...]
                   ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The state after a chunk of ``W_t = keep_t W_{t-1} - transform(S_t)``, and its momentum.

    Args:
        factor: the optimiser's ``gram_factor``.
        pairs: ``(X, G)`` per matrix, ``[N, L, d_in]`` and ``[N, L, d_out]``.
        mixes: ``q`` ``[N, b, L]``, pair ``i``'s weight in token ``t``'s momentum.
        carried: ``e`` ``[N, b]``, the carried momentum's weight in token ``t``'s (``None``:
            no momentum, ``moments`` is ``()``).
        to_end: ``c`` ``[N, b]``, the decay from token ``t`` to the chunk's end (``None``: none).
        keep_end: ``[N]``, the decay over the whole chunk (``None``: none).
        base: the chunk-start weights, ``[N, d_in, d_out]`` per matrix.
        moments: the chunk-start momentum, same shapes, or ``()``.
    """
    ends, new_moments = [], []
    for index, (x, g) in enumerate(pairs):
        start = moments[index] if moments else None
        ends.append(_matrix_end(factor, x, g, mixes, carried, to_end, keep_end, base[index], start))
        if start is not None:
            last = mixes[:, -1, :, None]
            left, right = (x * last, g) if x.shape[-1] <= g.shape[-1] else (x, g * last)
            new_moments.append(torch.baddbmm(start * carried[:, -1, None, None], left.mT, right))
    return tuple(ends), tuple(new_moments)


def _matrix_end(factor: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, mixes: Tensor,
                carried: Tensor | None, to_end: Tensor | None, keep_end: Tensor | None,
                w0: Tensor, s0: Tensor | None) -> Tensor:
    """One matrix of :func:`gram_chunk_end` (module docstring's notation)."""
    tall = x.shape[-1] > g.shape[-1]

    def wide(matrix: Tensor) -> Tensor:
        return matrix.mT if tall else matrix

    short, long = (g, x) if tall else (x, g)                            # A [N, L, m], B [N, L, n]
    weighted = mixes[..., None] * short[:, None]                        # D_t A  [N, b, L, m]
    gram = weighted.mT @ ((long @ long.mT)[:, None] @ weighted)         # [N, b, m, m]
    if s0 is not None:
        s0w = wide(s0)                                                  # [N, m, n]
        cross = weighted.mT @ (long @ s0w.mT)[:, None]                  # A^T D_t Y
        e = carried[..., None, None]
        gram = gram + e * (cross + cross.mT) + e.square() * (s0w @ s0w.mT)[:, None]
    r = factor(gram)
    if to_end is not None:
        r = r * to_end[..., None, None]
    update = (r @ weighted.mT).sum(1) @ long
    if s0 is not None:
        update = update + (r * e).sum(1) @ s0w
    start = wide(w0) if keep_end is None else wide(w0) * keep_end[:, None, None]
    return wide(start - update)
