"""A chunk of per-token transformed steps without per-token weights, for an optimiser whose
transform factors through the update's Gram matrix (:class:`memforge.FactorsThroughGram`, Muon's
Newton-Schulz; docs/memory.md, "The sequential executor").

Notation per matrix, sequence and head: the chunk's ``L`` pairs (the window's carried ones, then
the chunk's) have layer inputs ``P`` ``[L, d_in]`` and errors ``G`` ``[L, d_out]`` at the
chunk-start weights; token ``t``'s momentum is ``S_t = e_t S_0 + P^T diag(q_t) G``, with ``q_t``
each pair's weight in it and ``e_t`` the carried momentum's. In the wide orientation (``S^T``
when ``d_in > d_out``, so ``S_0`` there means ``S_0^T``) that is ``e_t S_0 + A^T Q_t B`` with
``A`` the factor on the short side (width ``m``), ``B`` the one on the long side and ``Q_t =
diag(q_t)``, so the Gram matrix is

    S_t S_t^T = e_t^2 S_0 S_0^T + e_t (A^T Q_t Y + Y^T Q_t A) + A^T Q_t (B B^T) Q_t A,  Y = B S_0^T,

products of width ``L`` and ``m`` per token. With ``R_t`` the transform's factor of it and
``k_t`` the decay from token ``t`` to the chunk's end, the chunk moves the weights by
``sum_t k_t R_t S_t = (sum_t k_t e_t R_t) S_0 + (sum_t k_t R_t A^T Q_t) B``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gram_chunk_end(factor: Callable[[Tensor], Tensor], pairs: list[tuple[Tensor, Tensor]],
                   mixes: Tensor, carried: Tensor | None, to_end: Tensor | None,
                   keep_end: Tensor | None, base: tuple[Tensor, ...], moments: tuple[Tensor, ...]
                   ) -> tuple[Tensor, ...]:
    """The state after a chunk of ``W_t = keep_t W_{t-1} - transform(S_t)``, one per matrix.

    Args:
        factor: the optimiser's ``gram_factor``.
        pairs: ``(P, G)`` per matrix, ``[N, L, d_in]`` and ``[N, L, d_out]``.
        mixes: ``q`` ``[N, b, L]``, pair ``i``'s weight in token ``t``'s momentum.
        carried: ``e`` ``[N, b]``, the carried momentum's weight in token ``t``'s (``None``:
            no momentum, ``moments`` is ``()``).
        to_end: ``k`` ``[N, b]``, the decay from token ``t`` to the chunk's end (``None``: none).
        keep_end: ``[N]``, the decay over the whole chunk (``None``: none).
        base: the chunk-start weights, ``[N, d_in, d_out]`` per matrix.
        moments: the chunk-start momentum, same shapes, or ``()``.
    """
    e = None if carried is None else carried[..., None, None]
    return tuple(_matrix_end(factor, x, g, mixes, e, to_end, keep_end, base[index],
                             moments[index] if moments else None)
                 for index, (x, g) in enumerate(pairs))


def _matrix_end(factor: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, mixes: Tensor,
                e: Tensor | None, to_end: Tensor | None, keep_end: Tensor | None,
                w0: Tensor, s0: Tensor | None) -> Tensor:
    """One matrix of :func:`gram_chunk_end` (the module docstring's notation)."""
    tall = x.shape[-1] > g.shape[-1]

    def wide(matrix: Tensor) -> Tensor:
        return matrix.mT if tall else matrix

    short, long = (g, x) if tall else (x, g)                            # A [N, L, m], B [N, L, n]
    weighted = mixes[..., None] * short[:, None]                        # Q_t A  [N, b, L, m]
    s0w = None if s0 is None else wide(s0)                              # [N, m, n]
    # The Gram matrix is a sum of parts that cancel when a step undoes the carried momentum;
    # summed in float32 its small eigenvalues, which Newton-Schulz enlarges, would be rounding.
    exact = torch.float64 if x.device.type != "mps" else x.dtype
    gram = _gram(*(None if t is None else t.to(exact)
                   for t in (weighted, long, s0w, e))).to(x.dtype)
    r = factor(gram)
    if to_end is not None:
        r = r * to_end[..., None, None]
    update = (r @ weighted.mT).sum(1) @ long
    if s0w is not None:
        update = update + (r * e).sum(1) @ s0w
    start = wide(w0) if keep_end is None else wide(w0) * keep_end[:, None, None]
    return wide(start - update)


def _gram(weighted: Tensor, long: Tensor, s0w: Tensor | None, e: Tensor | None) -> Tensor:
    """``S_t S_t^T`` ``[N, b, m, m]`` from the factors (the module docstring's formula)."""
    gram = weighted.mT @ ((long @ long.mT)[:, None] @ weighted)
    if s0w is None:
        return gram
    cross = weighted.mT @ (long @ s0w.mT)[:, None]                      # A^T Q_t Y
    return gram + e * (cross + cross.mT) + e.square() * (s0w @ s0w.mT)[:, None]
