"""The closed-form kernel's coefficients: how a chunk's gates (step sizes, momentum, log-decay)
weigh its tokens' gradients, at the chunk end and per token (docs/memory.md, "The exact chunk
kernel"), and the chunk-end update that applies them.

With ``E_l = prod_{j<=l} eta_j``, ``A_l = prod_{j<=l} keep_j`` (``Q[i, j] = E_i / E_j``,
``P[l, i] = A_l / A_i``, both causal) the state after chunk position ``l`` is
``M_l = A_l M_0 + c_l S_0 - sum_j W[l, j] u_j`` with ``c = P @ E`` and
``W = (P @ Q) * theta[None, :]``. The products come from segment sums in log space.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.engine.chunk_state import PendingChunk


class EndCoefficients(NamedTuple):
    """How one chunk moves the state from its start to its end (``[N]`` / ``[N, b]`` each).

    ``M_b = keep * M_0 + carry * S_0 + X^T (gain * G)``,
    ``S_b = momentum_keep * S_0 + X^T (momentum_gain * G)``; ``None`` factors are 1 (no decay)
    or absent (no momentum). Gains carry the minus sign of the descent step (``gain = -W[b]``),
    so the matmuls need no ``alpha=-1`` (whose backward costs a full-size multiply per operand).
    """

    keep: Tensor | None
    carry: Tensor | None
    gain: Tensor
    momentum_keep: Tensor | None
    momentum_gain: Tensor | None


class ReadCoefficients(NamedTuple):
    """Per-token state ``M_l = keep_l M_0 + carry_l S_0 + sum_j gain[l, j] u_j`` (``[N, b(, b)]``)."""

    keep: Tensor | None
    carry: Tensor | None
    gain: Tensor


class _cached:  # noqa: N801 - used as a decorator, like functools.cached_property
    """``functools.cached_property`` without its lock.

    Python 3.11's version takes an ``RLock`` on every first access, which ``torch.compile``
    cannot trace; a bank is never shared between threads, so the lock buys nothing here.
    """

    def __init__(self, compute: Any) -> None:
        self._compute, self._name = compute, compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, bank: Any, owner: type | None = None) -> Any:
        if bank is None:
            return self
        value = self._compute(bank)
        bank.__dict__[self._name] = value  # shadows this (non-data) descriptor from now on
        return value


class CoefficientBank:
    """All chunks' coefficients, computed vectorised over chunks and unbound once.

    Everything is built on first use, the gates' logs included: the end-of-chunk coefficients
    when a chunk completes, the ``b x b`` per-token ones when a retrieval rule first asks for an
    exact read. A decoding step that does neither (chunk-start reads inside a chunk) builds nothing.

    Args:
        gates: ``theta``, ``eta`` (or ``None``: no momentum) and ``log keep`` (or ``None``: no
            decay), each ``[N, L]``, as the ``lr``, ``momentum`` and ``log_keep`` of a
            :class:`PendingChunk`.
        chunk_size: ``b``, a divisor of ``L``.
    """

    def __init__(self, gates: PendingChunk, chunk_size: int) -> None:
        self._gates, self._chunk_size = gates, chunk_size
        self._eta_matrix: Tensor | None = None
        self._end: list[EndCoefficients] | None = None
        self._read: ReadCoefficients | None = None
        self._after: list[ReadCoefficients] | None = None
        self._before: list[ReadCoefficients] | None = None

    @_cached
    def step(self) -> Tensor:
        """``-theta`` ``[N, C, b]``: the sign of a descent step."""
        return -self._gates.lr.unflatten(1, (-1, self._chunk_size))

    @_cached
    def log_eta(self) -> Tensor | None:
        """``log eta`` ``[N, C, b]``, or ``None`` without momentum."""
        return _log_gate(self._gates.momentum, self._chunk_size)

    @_cached
    def log_keep(self) -> Tensor | None:
        """``log keep`` ``[N, C, b]`` clamped at ``log(tiny)``, or ``None`` without decay.

        The clamp keeps a retention that returns ``-inf`` (forget everything) away from
        ``-inf - -inf`` in the segment sums; below it the kept fraction is under ``tiny`` anyway.
        """
        log_keep = self._gates.log_keep
        if log_keep is None:
            return None
        floor = math.log(torch.finfo(log_keep.dtype).tiny)
        return log_keep.clamp_min(floor).unflatten(1, (-1, self._chunk_size))

    def end(self, index: int) -> EndCoefficients:
        """The chunk-end coefficients of chunk ``index``."""
        if self._end is None:
            self._end = _unbind_fields(self._end_coefficients(), self.step.shape[1])
        return self._end[index]

    @property
    def eta_matrix(self) -> Tensor | None:
        """``Q`` (momentum products) for exact reads; ``None`` without momentum."""
        if self._eta_matrix is None and self.log_eta is not None:
            self._eta_matrix = _decay_matrix(self.log_eta)
        return self._eta_matrix

    def after_write(self, index: int) -> ReadCoefficients:
        """Coefficients of ``M_l`` (after token ``l`` writes) for chunk ``index``."""
        if self._after is None:
            self._after = _unbind_fields(self._read_coefficients(), self.step.shape[1])
        return self._after[index]

    def before_write(self, index: int) -> ReadCoefficients:
        """Coefficients of ``M_{l-1}`` (before token ``l`` writes) for chunk ``index``."""
        if self._before is None:
            keep, carry, gain = self._read_coefficients()
            shifted = ReadCoefficients(
                keep=None if keep is None else F.pad(keep[..., :-1], (1, 0), value=1.0),
                carry=None if carry is None else F.pad(carry[..., :-1], (1, 0)),
                gain=F.pad(gain[..., :-1, :], (0, 0, 1, 0)),
            )
            self._before = _unbind_fields(shifted, self.step.shape[1])
        return self._before[index]

    def _end_coefficients(self) -> EndCoefficients:
        """Last rows of the read coefficients: ``O(b)`` scans and one fused ``b x b`` sum, no matmul."""
        step, log_eta, log_keep = self.step, self.log_eta, self.log_keep
        keep = None if log_keep is None else log_keep.sum(-1).exp()
        # tail[i] = A_b / A_i, the decay a write at position i still suffers by the chunk end.
        log_tail = None if log_keep is None else _suffix_sums(log_keep)
        if log_eta is None:
            gain = step if log_tail is None else step * log_tail.exp()
            return EndCoefficients(keep, None, gain, None, None)
        momentum = log_eta.cumsum(-1).exp()  # E_l
        carry = (momentum if log_tail is None else log_tail.exp() * momentum).sum(-1)
        momentum_keep = log_eta.sum(-1).exp()
        momentum_gain = step * _suffix_sums(log_eta).exp()  # -theta_j E_b / E_j
        return EndCoefficients(keep, carry, step * _spread(log_eta, log_tail), momentum_keep,
                                momentum_gain)

    def _read_coefficients(self) -> ReadCoefficients:
        """Per-token (after-write) coefficients for every chunk, ``[N, C, b(, b)]``, built once."""
        if self._read is None:
            self._read = self._build_read_coefficients()
        return self._read

    def _build_read_coefficients(self) -> ReadCoefficients:
        """See :meth:`_read_coefficients`."""
        step, log_eta, log_keep, eta_matrix = self.step, self.log_eta, self.log_keep, self.eta_matrix
        keep = None if log_keep is None else log_keep.cumsum(-1).exp()
        decay_matrix = None if log_keep is None else _decay_matrix(log_keep)
        carry = None
        if eta_matrix is None:
            mix = _causal_ones(step) if decay_matrix is None else decay_matrix
        elif decay_matrix is None:
            mix = eta_matrix.cumsum(-2)
            carry = log_eta.cumsum(-1).exp().cumsum(-1)
        else:
            mix = decay_matrix @ eta_matrix
            carry = (decay_matrix @ log_eta.cumsum(-1).exp()[..., None]).squeeze(-1)
        return ReadCoefficients(keep, carry, mix * step[..., None, :])


def _decay_matrix(log_gate: Tensor) -> Tensor:
    """``[..., b] -> [..., b, b]``, entry ``[i, j] = prod_{j<m<=i} gate_m`` (0 above the diagonal)."""
    return _segment_sums(log_gate).exp()


def _spread(log_eta: Tensor, log_tail: Tensor | None) -> Tensor:
    """``[..., b]``: entry ``j`` is ``sum_{l >= j} tail_l prod_{j<m<=l} eta_m`` (``tail = 1`` if ``None``).

    The momentum that a write at ``j`` adds to the weights by the chunk end, per unit of step.
    Summed over the ``l`` of a ``[j, l]`` layout (the transpose of :func:`_decay_matrix`), so the
    reduction runs along contiguous memory.
    """
    exponent = _segment_sums(log_eta).mT  # [j, l] = sum_{j<m<=l} log eta_m, -inf for l < j
    if log_tail is not None:
        exponent = exponent + log_tail[..., None, :]
    return exponent.exp().sum(-1)


#: Device types without float64 tensors.
_NO_FLOAT64 = frozenset({"mps"})


def _segment_sums(log_gate: Tensor) -> Tensor:
    """``[..., b] -> [..., b, b]``, entry ``[i, j] = sum_{j<m<=i} log_gate_m``, ``-inf`` above the diagonal.

    Taken as differences of cumulative sums in float64 (an ``O(b)`` scan, then element-wise work
    that fuses when compiled). A clamped gate of 0 adds about -87 per token, so in float32 such a
    difference would carry an error of about ``|sum| * 6e-8``: up to 3e-4 relative at ``b = 64``
    (``tests/test_titans_kernel.py`` catches that). The ``-inf`` entries make ``exp`` exactly 0
    there, with a gradient of exactly 0. Devices without float64 (Apple's MPS) keep the gate's
    dtype and that error.
    """
    wide = log_gate.dtype if log_gate.device.type in _NO_FLOAT64 else torch.float64
    sums = log_gate.to(wide).cumsum(-1)
    size = log_gate.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=log_gate.device).tril()
    return (sums[..., :, None] - sums[..., None, :]).to(log_gate.dtype).masked_fill(~causal, float("-inf"))


def _suffix_sums(log_gate: Tensor) -> Tensor:
    """``[..., b] -> [..., b]``: entry ``i`` is ``sum_{m > i} log_gate_m`` (an exclusive suffix sum)."""
    reversed_sums = log_gate.flip(-1)[..., :-1].cumsum(-1)
    return F.pad(reversed_sums, (1, 0)).flip(-1)


def _causal_ones(like: Tensor) -> Tensor:
    """The ``[b, b]`` lower-triangular all-ones matrix, in ``like``'s dtype and device."""
    size = like.shape[-1]
    return torch.ones(size, size, dtype=like.dtype, device=like.device).tril()


def _log_gate(gate: Tensor | None, chunk_size: int) -> Tensor | None:
    """``log(gate)`` clamped at the dtype's tiny, as ``[N, C, b]`` (``[N, L]`` in, ``b`` divides ``L``)."""
    if gate is None:
        return None
    return gate.clamp_min(torch.finfo(gate.dtype).tiny).log().unflatten(1, (-1, chunk_size))


def _unbind_fields(fields: tuple, chunks: int) -> list[Any]:
    """Split every ``[N, C, ...]`` field of a NamedTuple into ``C`` per-chunk NamedTuples."""
    parts = [(None,) * chunks if f is None else f.unbind(1) for f in fields]
    return [type(fields)(*row) for row in zip(*parts, strict=True)]


def advance(
    weights: tuple[Tensor, ...],
    moments: tuple[Tensor, ...],
    pairs: list[tuple[Tensor, Tensor]],
    coef: EndCoefficients,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(M_0, S_0) -> (M_b, S_b)`` for one chunk: one weighted ``X^T @ G`` matmul per matrix."""
    new_weights = []
    for i, (w, (x, g)) in enumerate(zip(weights, pairs, strict=True)):
        base = w if coef.keep is None else w * coef.keep[:, None, None]
        if coef.carry is not None:
            # Not addcmul: its backward multiplies both gradients by value=1, two full-size passes.
            base = base + moments[i] * coef.carry[:, None, None]
        new_weights.append(_add_weighted_outer(base, x, g, coef.gain))
    if coef.momentum_keep is None:
        return tuple(new_weights), moments
    new_moments = tuple(
        _add_weighted_outer(s * coef.momentum_keep[:, None, None], x, g, coef.momentum_gain)
        for s, (x, g) in zip(moments, pairs, strict=True)
    )
    return tuple(new_weights), new_moments


def _add_weighted_outer(base: Tensor, x: Tensor, g: Tensor, gain: Tensor) -> Tensor:
    """``base + sum_j gain_j x_j^T g_j`` as one matmul, scaling the narrower of ``x`` and ``g``.

    Eagerly one ``baddbmm``. Compiled, a plain ``bmm`` plus an addition instead: Inductor fuses the
    addition with the element-wise work that makes ``base``, where an extern ``baddbmm`` would
    first copy the fused ``base`` into its output.
    """
    left, right = ((x * gain[..., None]).mT, g) if x.shape[-1] <= g.shape[-1] else (x.mT, g * gain[..., None])
    if torch.compiler.is_compiling():
        return base + torch.bmm(left, right)
    return torch.baddbmm(base, left, right)


__all__ = ["CoefficientBank", "EndCoefficients", "ReadCoefficients", "advance"]
