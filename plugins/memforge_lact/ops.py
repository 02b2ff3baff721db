"""The LaCT fast path: large-chunk test-time training of SwiGLU fast weights (docs/zoo.md, "LaCT").

Per sequence and head (``N = B * H`` of them), fast weights ``W0, W2`` (``d -> h``) and ``W1``
(``h -> d``), ``f_W(x) = W1 (silu(W0 x) * (W2 x))``. Chunks of ``c`` tokens are counted from the
start of the sequence; for chunk ``j`` with start weights ``W^j``::

    o_t   = f_{W^j}(q_t)                                   # apply: every query of the chunk
    D_m   = sum_{i in chunk} eta_{m,i} d<f_W(k_i), v_i>/dW_m at W^j     # m = 0, 1, 2
    S_m   = mean_{i in chunk}(mu_i) * S_m + D_m             # momentum (optional)
    U_m   = NS5(S_m) if Muon else S_m                      # Newton-Schulz (optional)
    W_m   = renorm(W^j_m + U_m)                            # update, then each output row of W_m
                                                           # rescaled to its norm at the sequence start

i.e. one step of gradient descent on ``-sum_i eta_i <f_W(k_i), v_i>`` per chunk, with the
gradient at the chunk-start weights ("apply then update": a query never reads its own chunk's
write). The gradient is derived by hand: for ``a0 = W0 k``, ``a2 = W2 k``, ``s = silu(a0)``,
``g = W1^T v``: ``dW1 = v (s * a2)^T``, ``dW2 = (g * s) k^T``,
``dW0 = (g * a2 * silu'(a0)) k^T``, each summed over the chunk as one batched matmul.

Layout: weights are stored input-major so that a product is ``x @ W``: ``w02`` ``[N, d, 2h]``
holds ``W0^T`` in its first ``h`` columns and ``W2^T`` in the rest; ``w1`` ``[N, h, d]`` is
``W1^T``. An "output row" of ``W_m`` is then a column, so renormalisation divides by the norm
over dimension ``-2``.

A chunk is applied when a token after it arrives (or a snapshot of the memory is asked for): the
tokens of the last chunk of a call stay *pending* in the state, a full chunk included, so that a
sequence split anywhere with the state carried equals the whole, and a call whose last chunk no
later token reads never pays for its update (as the public code skips it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Added to every row norm before dividing by it (the public code's value).
RENORM_EPS = 1e-5
#: Added to the Frobenius norm that scales Newton-Schulz's input (the public code's value).
MUON_EPS = 1e-7
#: Muon's quintic coefficients ``(a, b, c)`` per Newton-Schulz step: the LaCT code's schedule of
#: five, or ATLAS' fixed triple five times (docs/zoo.md, "LaCT").
MUON_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "schedule": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                 (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
    "fixed": ((3.4445, -4.7750, 2.0315),) * 5,
}


class Pending(NamedTuple):
    """The ``p`` tokens of the current chunk whose update is not applied yet (``0 <= p <= c``).

    Attributes:
        keys: ``[N, p, d]``.
        values: ``[N, p, d]``.
        lr: per-token steps ``eta`` ``[N, p, 3]`` (for ``W0, W1, W2``).
        momentum: momentum gates ``mu`` ``[N, p]``, or ``None`` without momentum.
    """

    keys: Tensor
    values: Tensor
    lr: Tensor
    momentum: Tensor | None


class FastWeights(NamedTuple):
    """The fast weights ``w02`` ``[N, d, 2h]`` and ``w1`` ``[N, h, d]`` (see the module docstring)."""

    w02: Tensor
    w1: Tensor


class ChunkConfig(NamedTuple):
    """What the update needs besides the tokens.

    Attributes:
        chunk_size: ``c``.
        norms: the row norms at the sequence start, ``[N or 1, 1, 2h]`` and ``[N or 1, 1, d]``,
            or ``None`` for no renormalisation.
        muon: the Newton-Schulz coefficients, or ``None`` for no Muon.
    """

    chunk_size: int
    norms: FastWeights | None
    muon: tuple[tuple[float, float, float], ...] | None


class _NormalizeRows(torch.autograd.Function):
    """``x / (||x|| + eps)`` over the last dimension with a backward of three passes over ``x``
    (autograd's of the same expression makes six: the division's two gradients, then the norm's)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inverse = 1.0 / (norm + eps)
        ctx.save_for_backward(x, norm, inverse)
        return x * inverse

    @staticmethod
    @once_differentiable  # the saved norm is a constant here: a second derivative would be wrong
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # d/dx_j of x_i / (n + eps) = delta_ij / (n + eps) - x_i x_j / (n (n + eps)^2); a zero
        # row's second term is 0 (x = 0), as autograd's subgradient of the norm at 0 gives.
        x, norm, inverse = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad, x, dim=-1).unsqueeze(-1)
        coefficient = dot * inverse.square() / norm.clamp_min(torch.finfo(x.dtype).tiny)
        return torch.addcmul(grad * inverse, x, coefficient, value=-1.0), None


def normalize_rows(x: Tensor, eps: float) -> Tensor:
    """``x / (||x||_2 + eps)`` along the last dimension (LaCT's q and k normalisation)."""
    return _NormalizeRows.apply(x, eps)


def apply(weights: FastWeights, queries: Tensor) -> Tensor:
    """``f_W(q)`` for queries ``[N, t, d]``: ``[N, t, d]``."""
    gate, up = (queries @ weights.w02).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ weights.w1


def newton_schulz(update: Tensor, coefficients: tuple[tuple[float, float, float], ...]) -> Tensor:
    """The Newton-Schulz orthogonalisation of ``update`` ``[N, m, n]`` (each matrix divided by its
    Frobenius norm, then ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, on the wide side)."""
    wide = update.shape[-2] <= update.shape[-1]
    x = update if wide else update.transpose(-1, -2)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + MUON_EPS)
    for a, b, c in coefficients:
        gram = x @ x.transpose(-1, -2)
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x if wide else x.transpose(-1, -2)


def renormalize(weight: Tensor, norms: Tensor) -> Tensor:
    """Each output row of ``weight`` (a column, dimension ``-2``) rescaled to ``norms``."""
    return weight * (norms / (torch.linalg.vector_norm(weight, dim=-2, keepdim=True) + RENORM_EPS))


def chunk_update(weights: FastWeights, momentum: FastWeights | None, keys: Tensor, values: Tensor,
                 lr: Tensor, gate: Tensor | None, config: ChunkConfig
                 ) -> tuple[FastWeights, FastWeights | None]:
    """One chunk's update: ``keys``/``values`` ``[N, c, d]``, ``lr`` ``[N, c, 3]``, ``gate``
    ``[N, c]`` (or ``None``); returns the new weights and momentum."""
    hidden = weights.w1.shape[-2]
    a0, a2 = (keys @ weights.w02).split(hidden, dim=-1)      # W0 k, W2 k: [N, c, h] each
    sig = torch.sigmoid(a0)
    s = a0 * sig                                               # silu(a0)
    back = values @ weights.w1.transpose(-1, -2)               # [N, c, h]: W1^T v
    eta0, eta1, eta2 = lr.unsqueeze(-1).unbind(-2)             # [N, c, 1] each
    # The steps weigh the hidden side of each product; silu'(a) = sig (1 + a - silu(a)).
    d_w0 = keys.transpose(-1, -2) @ ((back * a2 * eta0) * (sig * (1 + a0 - s)))
    d_w2 = keys.transpose(-1, -2) @ (back * s * eta2)
    d_w02 = torch.cat([d_w0, d_w2], dim=-1)                    # [N, d, 2h]
    d_w1 = (s * a2 * eta1).transpose(-1, -2) @ values          # [N, h, d]
    if momentum is not None and gate is not None:
        mean = gate.mean(dim=1)[:, None, None]
        d_w02 = torch.addcmul(d_w02, momentum.w02, mean)
        d_w1 = torch.addcmul(d_w1, momentum.w1, mean)
        momentum = FastWeights(d_w02, d_w1)
    if config.muon is not None:
        d_w02 = torch.cat([newton_schulz(part, config.muon)
                           for part in d_w02.split(hidden, dim=-1)], dim=-1)
        d_w1 = newton_schulz(d_w1, config.muon)
    w02, w1 = weights.w02 + d_w02, weights.w1 + d_w1
    if config.norms is not None:
        w02, w1 = renormalize(w02, config.norms.w02), renormalize(w1, config.norms.w1)
    return FastWeights(w02, w1), momentum


def apply_pending(weights: FastWeights, momentum: FastWeights | None, pending: Pending,
                  config: ChunkConfig) -> tuple[FastWeights, FastWeights | None]:
    """The weights and momentum after ``pending``'s update (unchanged when it holds no token)."""
    if pending.keys.shape[1] == 0:
        return weights, momentum
    return chunk_update(weights, momentum, pending.keys, pending.values, pending.lr,
                        pending.momentum, config)


def _join(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    if old is None or new is None:
        return new
    return new if old.shape[1] == 0 else torch.cat([old, new], dim=1)


def lact_scan(weights: FastWeights, momentum: FastWeights | None, pending: Pending,
              queries: Tensor, keys: Tensor, values: Tensor, lr: Tensor, gate: Tensor | None,
              config: ChunkConfig) -> tuple[Tensor, FastWeights, FastWeights | None, Pending]:
    """Read and write ``T`` new tokens (``queries``/``keys``/``values`` ``[N, T, d]``, ``lr``
    ``[N, T, 3]``, ``gate`` ``[N, T]`` or ``None``) after the ``pending`` tokens.

    Returns ``(outputs [N, T, d], weights, momentum, pending)``: ``weights`` are those at the
    start of the chunk the new ``pending`` tokens belong to.
    """
    done, steps, c = pending.keys.shape[1], queries.shape[1], config.chunk_size
    keys_all, values_all = _join(pending.keys, keys), _join(pending.values, values)
    lr_all, gate_all = _join(pending.lr, lr), _join(pending.momentum, gate)
    total = done + steps
    applied = (total - 1) // c       # chunks with a token after them
    # Chunks by split, not slicing: the backward of a split is one concatenation, that of each
    # slice a zero-filled full-length gradient.
    chunks = list(zip(*(t.split(c, dim=1) for t in (keys_all, values_all, lr_all)), strict=True))
    gates = [None] * len(chunks) if gate_all is None else gate_all.split(c, dim=1)
    first = min(c - done % c, steps)   # new tokens up to the first chunk boundary after `done`
    sizes = [first] + [c] * ((steps - first) // c) + [(steps - first) % c] * bool((steps - first) % c)
    reads = queries.split(sizes, dim=1)
    outputs = []
    for j, (k_j, v_j, lr_j) in enumerate(chunks):
        if (j + 1) * c > done:       # the chunk's new queries read its start weights
            outputs.append(apply(weights, reads[len(outputs)]))
        if j < applied:
            weights, momentum = chunk_update(weights, momentum, k_j, v_j, lr_j, gates[j], config)
    cut = applied * c
    rest = Pending(keys_all[:, cut:], values_all[:, cut:], lr_all[:, cut:],
                   None if gate_all is None else gate_all[:, cut:])
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out, weights, momentum, rest
