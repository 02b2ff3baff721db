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

    Works on the wide orientation (``m <= n``, transposing a tall matrix and back), so the Gram
    matrix ``X X^T`` is the smaller square. Differentiable: outer gradients flow through it.
    """
    x = update / (update.norm(dim=(-2, -1), keepdim=True) + EPS)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x
