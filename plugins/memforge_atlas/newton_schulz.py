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

    Works on the wide orientation (``m <= n``, transposing a tall matrix and back), and runs the
    iteration on the small ``m x m`` side: every step is ``X_{k+1} = P_k X_k`` with
    ``P_k = a I + b A_k + c A_k^2`` a polynomial of ``A_k = X_k X_k^T``, so
    ``A_{k+1} = P_k A_k P_k`` and the result is ``(P_{s-1} ... P_0) X_0``. That is the same
    iteration in exact arithmetic, with two products touching an ``m x n`` matrix instead of
    ``2 s``; autograd then keeps no ``m x n`` tensor per step, which is what bounds the memory
    of a per-token Muon in training (docs/zoo.md, "ATLAS"). Float64 agrees with the plain
    iteration to about 1e-14; float32 rounds ``A``'s small eigenvalues (squared singular values)
    coarser, up to about 5e-5 relative on an ill-conditioned square input. Differentiable.
    """
    tall = update.shape[-2] > update.shape[-1]
    wide = update.mT if tall else update
    scale = 1.0 / (update.norm(dim=(-2, -1), keepdim=True) + EPS)
    gram = (wide @ wide.mT) * scale.square()                # A_0 = X_0 X_0^T
    a, b, c = COEFFICIENTS
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    product = eye
    for step in range(steps):
        poly = a * eye + (b * gram + c * gram @ gram)
        product = poly @ product
        if step < steps - 1:
            gram = poly @ gram @ poly
    x = (product * scale) @ wide
    return x.mT if tall else x
