"""Newton-Schulz orthogonalisation, the core of the Muon optimiser (docs/zoo.md, "ATLAS").

Muon (Jordan et al. 2024; ATLAS uses it as its memory's optimiser) replaces an update ``G`` by an
approximation of its orthogonal polar factor ``U V^T`` (``G = U S V^T``): the matrix is scaled to
Frobenius norm 1 (so every singular value is at most 1), then the odd quintic

    X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

runs 5 times. Each step maps every singular value ``s`` to ``a s + b s^3 + c s^5`` and leaves the
singular vectors alone; these coefficients push small singular values up fast and settle them in
a band around 1 (about 0.7 to 1.2) rather than at 1 exactly, which is all Muon needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Muon's quintic coefficients ``(a, b, c)``.
COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: Newton-Schulz steps Muon runs.
STEPS = 5
#: Added to the Frobenius norm before dividing by it. Muon's 1e-7 would let a vanishing momentum
#: take a full-size step and give it outer gradients near 1e7 / ||S||; with 1e-4 a momentum far
#: below that norm (the memory already fits its window) takes a proportionally smaller step, and
#: a zero momentum stays zero with a bounded gradient.
EPS = 1e-4


def newton_schulz(update: Tensor, steps: int = STEPS) -> Tensor:
    """The approximately orthogonalised ``update`` ``[..., m, n]`` (same shape), scale-free.

    Works on the wide orientation (``m <= n``, transposing a tall matrix and back): the result is
    :func:`newton_schulz_factor` of the wide matrix's Gram matrix times the wide matrix. Float64
    agrees with the plain iteration to about 1e-14; float32 rounds the Gram matrix's small
    eigenvalues (squared singular values) coarser, up to about 5e-5 relative on an
    ill-conditioned square input. Differentiable.
    """
    tall = update.shape[-2] > update.shape[-1]
    wide = update.mT if tall else update
    x = newton_schulz_factor(wide @ wide.mT, steps) @ wide
    return x.mT if tall else x


def newton_schulz_factor(gram: Tensor, steps: int = STEPS) -> Tensor:
    """``R`` ``[..., m, m]`` with ``NS(X) = R X`` for a wide ``X`` ``[..., m, n]`` whose Gram matrix
    ``X X^T`` is ``gram``.

    Every step is ``X_{k+1} = P_k X_k`` with ``P_k = a I + b A_k + c A_k^2`` a polynomial of
    ``A_k = X_k X_k^T``, so ``A_{k+1} = P_k A_k P_k`` and ``NS(X) = (P_{s-1} ... P_0) X_0``:
    the iteration runs on the small ``m x m`` side only, which keeps autograd from saving an
    ``m x n`` tensor per step and lets a chunk of per-token Muon steps run from the Gram
    matrices alone (docs/memory.md, "The sequential executor"). ``X``'s Frobenius norm is
    ``sqrt(trace(gram))``; a trace rounded below zero counts as 0 (with a zero gradient there,
    not sqrt's infinite one).
    """
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    positive = trace > 0
    norm = torch.where(positive, torch.where(positive, trace, 1.0).sqrt(), 0.0)
    scale = 1.0 / (norm + EPS)
    shape = gram.shape
    # Flat batches, so that each polynomial is one fused baddbmm (``c A^2`` added to ``a I + b A``)
    # rather than a product and three element-wise passes over the batch.
    gram = (gram * scale.square()).reshape(math.prod(shape[:-2]), *shape[-2:])  # A_0 = X_0 X_0^T
    a, b, c = COEFFICIENTS
    eye = torch.eye(shape[-1], dtype=gram.dtype, device=gram.device)
    product = eye.expand_as(gram) if steps <= 0 else None    # no step: X_0 itself
    for step in range(steps):
        poly = torch.baddbmm(torch.add(a * eye, gram, alpha=b), gram, gram, alpha=c)
        product = poly if product is None else torch.bmm(poly, product)
        if step < steps - 1:
            gram = torch.bmm(torch.bmm(poly, gram), poly)
    return product.reshape(shape) * scale
