"""The closed-form kernel's per-chunk gradients and reads: every token's gradient at the
chunk-start weights as ``(input, error)`` pairs per matrix, and the :class:`ChunkReader` that
reads a chunk's queries at the chunk start or with each token's exact weights in the TTT dual
form (docs/memory.md, "The exact chunk kernel")."""

from __future__ import annotations

import torch
from torch import Tensor

from memforge.engine.chunk_coefficients import CoefficientBank, ReadCoefficients
from memforge.engine.chunk_state import LossGradient
from memforge.engine.derived_backward import with_backward
from memforge.interfaces import LinearFn, MemoryNetwork


def surprise_pairs(
    network: MemoryNetwork,
    objective: LossGradient,
    weights: tuple[Tensor, ...],
    keys: Tensor,
    values: Tensor,
    side: Tensor | None,
) -> list[tuple[Tensor, Tensor]]:
    """Per-token gradients at the chunk-start weights, as ``(inputs_i, grads_i)`` per matrix
    (``side`` ``[N, t]``: the rows' side input of the objective, or ``None``)."""
    network = with_backward(network)  # a network without backward gets autograd's
    prediction, tape = network.forward(keys, lambda i, h: h @ weights[i])
    error = objective.loss_grad(prediction, values, side)
    return network.backward(tape, error, lambda i, g: g @ weights[i].mT)


class LazyPairs:
    """The surprise pairs of one chunk, computed on first use and then kept.

    A call that neither completes the chunk nor reads it exactly (single-token decoding with
    chunk-start reads) never needs them, and skips a forward and backward over the chunk.
    """

    def __init__(self, network: MemoryNetwork, objective: LossGradient,
                 weights: tuple[Tensor, ...], keys: Tensor, values: Tensor,
                 side: Tensor | None) -> None:
        self._args = (network, objective, weights, keys, values, side)
        self._pairs: list[tuple[Tensor, Tensor]] | None = None

    def get(self) -> list[tuple[Tensor, Tensor]]:
        """``(inputs_i, grads_i)`` per matrix, see :func:`surprise_pairs`."""
        if self._pairs is None:
            self._pairs = surprise_pairs(*self._args)
        return self._pairs


class ClosedFormReader:
    """The :class:`memforge.interfaces.ChunkReader` of one chunk; every method is a pure read.

    Exact reads apply, layer by layer, the per-token weights ``M_l`` in the TTT dual form:
    ``h_l @ M_l = keep_l (h_l @ M_0) + carry_l (h_l @ S_0) + sum_j gain[l, j] (h_l . x_j) g_j``,
    i.e. ``keep * (h @ M_0) + carry * (h @ S_0) + ((h @ X^T) * gain) @ G`` with a causal ``gain``
    (``gain = -W``, see the module docstring). ``rows`` are the chunk positions of the queries
    the reader is given (a call may cover only part of a chunk).
    """

    def __init__(
        self,
        network: MemoryNetwork,
        weights: tuple[Tensor, ...],
        moments: tuple[Tensor, ...],
        pairs: LazyPairs,
        bank: CoefficientBank,
        index: int,
        rows: slice,
    ) -> None:
        self._network, self._weights, self._moments = network, weights, moments
        self._pairs, self._bank, self._index, self._rows = pairs, bank, index, rows

    def at_chunk_start(self, queries: Tensor) -> Tensor:
        """Read every query with the weights at the start of the chunk."""
        return self._network.forward(queries, lambda i, h: h @ self._weights[i])[0]

    def before_write(self, queries: Tensor) -> Tensor:
        """Read query ``l`` with ``M_{l-1}``."""
        return self._network.forward(queries, self._exact(self._bank.before_write(self._index)))[0]

    def after_write(self, queries: Tensor) -> Tensor:
        """Read query ``l`` with ``M_l``."""
        return self._network.forward(queries, self._exact(self._bank.after_write(self._index)))[0]

    def _exact(self, coef: ReadCoefficients) -> LinearFn:
        """A ``linear`` callback applying the per-token weights described by ``coef``."""

        rows = self._rows
        keep = None if coef.keep is None else coef.keep[:, rows]
        carry = None if coef.carry is None else coef.carry[:, rows]
        gain = coef.gain[:, rows]

        def linear(i: int, h: Tensor) -> Tensor:
            x, g = self._pairs.get()[i]
            out = _scaled_rows_matmul(h, self._weights[i], keep)
            if carry is not None:
                out = out + _scaled_rows_matmul(h, self._moments[i], carry)
            return torch.baddbmm(out, (h @ x.mT) * gain, g)

        return linear


def _scaled_rows_matmul(h: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
    """``diag(scale) @ h @ w``, scaling whichever of ``h`` and the product is narrower."""
    if scale is None:
        return h @ w
    if h.shape[-1] <= w.shape[-1]:
        return (h * scale[..., None]) @ w
    return (h @ w) * scale[..., None]


__all__ = ["ClosedFormReader", "LazyPairs", "surprise_pairs"]
