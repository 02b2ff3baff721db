"""The exact chunk-parallel Titans memory kernel (docs/memory.md, "The exact chunk kernel").

Semantics, per sequence and head (``N = B * H`` of them), for token ``t`` in the chunk that starts
at ``t'`` (chunks are ``[0, b), [b, 2b), ...`` counted from the start of the sequence)::

    u_t = grad_W loss(M_{t'}(k_t), v_t; side_t)  # surprise, at the chunk-start weights
    S_t = eta_t * S_{t-1} - theta_t * u_t        # momentum (eta = 0 when it is off)
    M_t = keep_t * M_{t-1} + S_t                 # retention, keep_t = exp(log_keep_t) (1 when off)

applied to every fast-weight matrix separately (docs/memory.md, "The update rule"). The retention
arrives in log space and stays there: full forgetting is a large negative ``log_keep`` with a
finite gradient, never ``log 0``. Inside a chunk the recurrences are linear, so with
``E_l = prod_{j<=l} eta_j``, ``A_l = prod_{j<=l} keep_j``, ``Q[i, j] = E_i / E_j`` and
``P[l, i] = A_l / A_i`` (both causal) the state after chunk position ``l`` is::

    M_l = A_l M_0 + c_l S_0 - sum_j W[l, j] u_j,   c = P @ E,   W = (P @ Q) * theta[None, :]
    S_l = E_l S_0 - sum_j theta_j Q[l, j] u_j

Every ``u_j`` is an outer product ``x_j^T g_j`` (matrix input times back-propagated error), so each
weighted sum is one batched matmul ``X^T @ (w * G)``; no per-token weight copy is ever built. The
products come from segment sums in log space (no ``-inf - -inf``). Exact per-token reads use the
same coefficients in the TTT dual form (see :class:`_ChunkReader`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.engine.derived_backward import with_backward
from memforge.interfaces import ChunkReader, LinearFn, MemoryNetwork


class PendingChunk(NamedTuple):
    """The ``r`` tokens already seen of the current, unfinished chunk (``r`` may be 0).

    Their writes are recomputed in the next call, from the same chunk-start weights, so that
    feeding a sequence in pieces equals feeding it whole.

    Attributes:
        keys: ``[N, r, d_key]``.
        values: ``[N, r, d_value]``.
        lr: step sizes ``theta`` ``[N, r]``.
        momentum: ``eta`` ``[N, r]``, or ``None`` when momentum is off.
        log_keep: ``log keep`` ``[N, r]`` (``<= 0``), or ``None`` without retention decay.
        side: the objective's side input ``[N, r]``, or ``None`` when it takes none.
    """

    keys: Tensor
    values: Tensor
    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None
    side: Tensor | None = None


class FastWeightState(NamedTuple):
    """Memory state between calls of :func:`memory_scan`.

    Attributes:
        weights: ``M`` at the start of the current (possibly partial) chunk, one
            ``[N, d_in_i, d_out_i]`` tensor per matrix of the network.
        momentum: ``S`` at the start of the current chunk, same shapes; ``()`` when momentum is
            off (``S`` is then always zero).
        pending: the tokens of the current chunk seen so far.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: PendingChunk


class LossGradient(Protocol):
    """The part of an objective the kernel needs: the gradient of the inner loss."""

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """``d loss / d prediction`` per token, shaped like ``prediction`` (``side`` ``[N, t]``
        or ``None``)."""
        ...


class Retrieval(Protocol):
    """A retrieval rule: ``retrieval(reader, queries [N, t, d_key]) -> [N, t, d_value]``, ``t <= b``."""

    def __call__(self, reader: ChunkReader, queries: Tensor) -> Tensor: ...


def initial_state(
    network: MemoryNetwork, batch: int, *, momentum_enabled: bool, decay_enabled: bool,
    side_enabled: bool = False, key_width: int | None = None,
) -> FastWeightState:
    """The state at the start of ``batch`` sequences: ``M_0`` per sequence, ``S_0 = 0``, no pending.

    The weights are the network's initial weights repeated to ``[batch * H, d_in, d_out]``
    (sequence-major, head-minor, i.e. ``n = b * H + h``) and stay connected to the parameters, so
    outer gradients reach them. ``momentum_enabled`` / ``decay_enabled`` / ``side_enabled`` fix
    whether later calls pass ``momentum`` / ``log_keep`` / ``side``. ``key_width``: the keys'
    width when the network's input is not its first matrix's (a feature map first, like
    ``atlas.poly_mlp``); default that matrix's ``d_in``.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    initial = tuple(network.initial_weights())
    weights = tuple(w.repeat(batch, 1, 1) for w in initial)
    momentum = tuple(torch.zeros_like(w) for w in weights) if momentum_enabled else ()
    n, d_value = weights[0].shape[0], weights[-1].shape[2]
    d_key = weights[0].shape[1] if key_width is None else key_width
    empty = weights[0].new_zeros(n, 0)
    pending = PendingChunk(
        keys=weights[0].new_zeros(n, 0, d_key),
        values=weights[0].new_zeros(n, 0, d_value),
        lr=empty,
        momentum=empty if momentum_enabled else None,
        log_keep=empty if decay_enabled else None,
        side=empty if side_enabled else None,
    )
    return FastWeightState(weights, momentum, pending)


def memory_scan(
    network: MemoryNetwork,
    objective: LossGradient,
    retrieval: Retrieval,
    state: FastWeightState,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None = None,
    *,
    chunk_size: int,
    compiled: bool = False,
) -> tuple[Tensor, FastWeightState]:
    """Write ``T`` tokens into the memory and read ``T`` queries, chunk-parallel and exact.

    Args:
        network: the memory network (its ``forward`` / ``backward`` give the surprise).
        objective: gives ``loss_grad(prediction, target, side)``, the inner loss's gradient.
        retrieval: called once per chunk as ``retrieval(reader, chunk_queries)``; ``reader`` offers
            ``at_chunk_start`` / ``before_write`` / ``after_write`` (a ``ChunkReader``). It sees
            this call's queries of that chunk only (``<= chunk_size`` rows; the first chunk's
            rows start after the pending tokens), and the reader aligns them with their
            positions in the chunk.
        state: from :func:`initial_state` or a previous call with the same ``chunk_size``.
        queries: ``[N, T, d_key]``.
        keys: ``[N, T, d_key]``.
        values: ``[N, T, d_value]``.
        lr: ``theta >= 0`` ``[N, T]``.
        momentum: ``eta`` in ``[0, 1]`` ``[N, T]``, or ``None`` for none (exactly ``eta = 0``).
        log_keep: ``log keep <= 0`` ``[N, T]`` (``log(1 - alpha)`` in Titans' terms), or ``None``
            for none (exactly ``keep = 1``).
        side: the objective's per-token side input ``[N, T]``, handed to ``loss_grad`` with each
            chunk's rows, or ``None`` for none.
        chunk_size: ``b >= 1``; chunk boundaries are multiples of ``b`` from the sequence start.
        compiled: run every chunk that this call reads whole through :func:`compiled_chunk_step`
            (``torch.compile`` of :func:`chunk_step`, one graph per chunk shape, reused by every
            chunk) instead of the eager, vectorised-over-chunks path. Same results up to float
            rounding; the first call per shape pays the compilation.

    Returns:
        ``(outputs [N, T, d_value], new_state)``. Calls may end mid-chunk: the partial chunk's
        tokens are visible to exact reads and :func:`current_weights`, and stay pending.

    ``eta`` is clamped to ``>= tiny`` (of the dtype) before its log, and ``log_keep`` to
    ``>= log(tiny)``, so ``eta = 0`` and full forgetting are exact up to that tiny number and give
    finite gradients (zero below the clamp, where the true one is below ``tiny`` too).
    """
    _check_scan_inputs(network, state, queries, keys, values, lr, momentum, log_keep, side,
                       chunk_size)
    n, steps = keys.shape[0], keys.shape[1]
    if steps == 0:
        return queries.new_zeros(n, 0, state.pending.values.shape[2]), state
    pending = state.pending
    done = pending.keys.shape[1]
    total = done + steps
    full, partial = divmod(total, chunk_size)
    stream = PendingChunk(
        keys=torch.cat((pending.keys, keys), 1) if done else keys,
        values=torch.cat((pending.values, values), 1) if done else values,
        lr=torch.cat((pending.lr, lr), 1) if done else lr,
        momentum=_join_gate(pending.momentum, momentum),
        log_keep=_join_gate(pending.log_keep, log_keep),
        side=_join_gate(pending.side, side),
    )
    # Complete chunks share one vectorised bank; an unfinished last chunk gets its own, sized to
    # its tokens. Nothing is padded: a decoding step with r pending tokens costs O(r) surprise
    # rows and O(r^2) coefficients, not O(b) and O(b^2).
    def halves(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``x`` split into its complete chunks and the unfinished rest."""
        return (None, None) if x is None else x.split((full * chunk_size, partial), dim=1)

    complete, unfinished = (PendingChunk(*fields) for fields in zip(*map(halves, stream), strict=True))
    pieces: list[tuple[_CoefficientBank, int, Tensor, Tensor]] = []
    side_chunks: list[Tensor | None] = []
    if full:
        bank = _CoefficientBank(complete, chunk_size)
        key_chunks = _split_chunks(complete.keys, chunk_size)
        value_chunks = _split_chunks(complete.values, chunk_size)
        pieces += [(bank, i, key_chunks[i], value_chunks[i]) for i in range(full)]
        side_chunks += ([None] * full if complete.side is None
                        else list(complete.side.unflatten(1, (-1, chunk_size)).unbind(1)))
    if partial:
        pieces.append((_CoefficientBank(unfinished, partial), 0, unfinished.keys, unfinished.values))
        side_chunks.append(unfinished.side)
    # This call's queries per chunk, unpadded: the first chunk starts `done` rows in, the last
    # may end early. Padding them to whole chunks would multiply the read cost of decoding by b.
    first = min(chunk_size - done, steps)
    rest = [chunk_size] * ((steps - first) // chunk_size)
    sizes = [first, *rest] + ([steps - first - sum(rest)] if steps - first - sum(rest) else [])
    query_chunks = queries.split(sizes, dim=1)
    weights, moments = state.weights, state.momentum
    # The chunks the compiled step takes, copied chunk-major once (see _compiled_step_inputs).
    step_inputs = _compiled_step_inputs(complete, queries, done, chunk_size) if compiled else {}
    outputs: list[Tensor] = []
    for index, (bank, local, chunk_keys, chunk_values) in enumerate(pieces):
        if index in step_inputs:
            chunk, chunk_queries = step_inputs[index]
            out, weights, moments = compiled_chunk_step()(
                network, objective, retrieval, weights, moments, chunk, chunk_queries)
            outputs.append(out)
            continue
        pairs = _LazyPairs(network, objective, weights, chunk_keys, chunk_values,
                           side_chunks[index])
        offset = done if index == 0 else 0
        rows = slice(offset, offset + query_chunks[index].shape[1])
        reader = _ChunkReader(network, weights, moments, pairs, bank, local, rows)
        outputs.append(retrieval(reader, query_chunks[index]))
        if index < full:  # the unfinished chunk stays pending
            weights, moments = _advance(weights, moments, pairs.get(), bank.end(local))
    # A copy, not a view: a carried state must not keep the whole call's inputs alive.
    new_pending = PendingChunk(*(None if x is None else x.clone() for x in unfinished))
    joined = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)  # decoding: no copy
    return joined, FastWeightState(weights, moments, new_pending)


def chunk_step(
    network: MemoryNetwork,
    objective: LossGradient,
    retrieval: Retrieval,
    weights: tuple[Tensor, ...],
    moments: tuple[Tensor, ...],
    chunk: PendingChunk,
    queries: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One whole chunk: read its ``b`` queries, then move ``(M, S)`` from its start to its end.

    ``chunk`` holds the chunk's ``b`` keys, values and gates (``[N, b, .]`` / ``[N, b]``); returns
    ``(outputs [N, b, d_value], weights, moments)``. The same arithmetic as one step of
    :func:`memory_scan`'s loop, with the coefficients built for this chunk alone: written for
    ``torch.compile`` (no Python state that outlives the call), which fuses the element-wise work
    between the matmuls. :func:`memory_scan` with ``compiled=True`` runs it per chunk.
    """
    bank = _CoefficientBank(chunk, queries.shape[1])
    pairs = _LazyPairs(network, objective, weights, chunk.keys, chunk.values, chunk.side)
    reader = _ChunkReader(network, weights, moments, pairs, bank, 0, slice(0, queries.shape[1]))
    outputs = retrieval(reader, queries)
    return (outputs, *_advance(weights, moments, pairs.get(), bank.end(0)))


@functools.cache
def compiled_chunk_step() -> Any:
    """``torch.compile(chunk_step)``, made once per process and shared by every layer.

    ``dynamic=False``: chunks have one shape per configuration, so static shapes cost one
    compilation per (shape, dtype, device, grad mode) and give the best kernels; layers of the same
    configuration share their graphs. Past torch's recompile limit (8 by default) further shapes
    run eagerly, with torch's warning. Graph breaks in a plugin's network or retrieval are allowed
    (they only cost speed), hence no ``fullgraph``.

    ``inplace_buffers`` is off for this graph: with it, Inductor (torch 2.13, CPU) wrote a buffer in
    place that the backward still read, and the queries' gradient of an exact read came out wrong
    (depth-2 memory with decay; ``tests/test_titans_compiled.py`` caught it, ``aot_eager`` was exact).
    """
    return torch.compile(chunk_step, dynamic=False, options=INDUCTOR_OPTIONS)


#: Inductor options of :func:`compiled_chunk_step` (see there why).
INDUCTOR_OPTIONS: dict[str, Any] = {"inplace_buffers": False}


def current_weights(
    network: MemoryNetwork, objective: LossGradient, state: FastWeightState
) -> tuple[Tensor, ...]:
    """Materialise ``M`` at the current position, i.e. after the pending tokens have written.

    Equals ``state.weights`` when no token is pending. Useful to read "the memory so far"; costs
    one surprise computation over the pending tokens.
    """
    pending = state.pending
    done = pending.keys.shape[1]
    if done == 0:
        return state.weights
    bank = _CoefficientBank(pending, done)  # the pending tokens as one chunk of `done`
    pairs = _surprise_pairs(network, objective, state.weights, pending.keys, pending.values,
                            pending.side)
    return _advance(state.weights, state.momentum, pairs, bank.end(0))[0]


# --------------------------------------------------------------------------------------------
# Coefficients


class _EndCoefficients(NamedTuple):
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


class _ReadCoefficients(NamedTuple):
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


class _CoefficientBank:
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
        self._end: list[_EndCoefficients] | None = None
        self._read: _ReadCoefficients | None = None
        self._after: list[_ReadCoefficients] | None = None
        self._before: list[_ReadCoefficients] | None = None

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

    def end(self, index: int) -> _EndCoefficients:
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

    def after_write(self, index: int) -> _ReadCoefficients:
        """Coefficients of ``M_l`` (after token ``l`` writes) for chunk ``index``."""
        if self._after is None:
            self._after = _unbind_fields(self._read_coefficients(), self.step.shape[1])
        return self._after[index]

    def before_write(self, index: int) -> _ReadCoefficients:
        """Coefficients of ``M_{l-1}`` (before token ``l`` writes) for chunk ``index``."""
        if self._before is None:
            keep, carry, gain = self._read_coefficients()
            shifted = _ReadCoefficients(
                keep=None if keep is None else F.pad(keep[..., :-1], (1, 0), value=1.0),
                carry=None if carry is None else F.pad(carry[..., :-1], (1, 0)),
                gain=F.pad(gain[..., :-1, :], (0, 0, 1, 0)),
            )
            self._before = _unbind_fields(shifted, self.step.shape[1])
        return self._before[index]

    def _end_coefficients(self) -> _EndCoefficients:
        """Last rows of the read coefficients: ``O(b)`` scans and one fused ``b x b`` sum, no matmul."""
        step, log_eta, log_keep = self.step, self.log_eta, self.log_keep
        keep = None if log_keep is None else log_keep.sum(-1).exp()
        # tail[i] = A_b / A_i, the decay a write at position i still suffers by the chunk end.
        log_tail = None if log_keep is None else _suffix_sums(log_keep)
        if log_eta is None:
            gain = step if log_tail is None else step * log_tail.exp()
            return _EndCoefficients(keep, None, gain, None, None)
        momentum = log_eta.cumsum(-1).exp()  # E_l
        carry = (momentum if log_tail is None else log_tail.exp() * momentum).sum(-1)
        momentum_keep = log_eta.sum(-1).exp()
        momentum_gain = step * _suffix_sums(log_eta).exp()  # -theta_j E_b / E_j
        return _EndCoefficients(keep, carry, step * _spread(log_eta, log_tail), momentum_keep,
                                momentum_gain)

    def _read_coefficients(self) -> _ReadCoefficients:
        """Per-token (after-write) coefficients for every chunk, ``[N, C, b(, b)]``, built once."""
        if self._read is None:
            self._read = self._build_read_coefficients()
        return self._read

    def _build_read_coefficients(self) -> _ReadCoefficients:
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
        return _ReadCoefficients(keep, carry, mix * step[..., None, :])


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


# --------------------------------------------------------------------------------------------
# Per-chunk work


def _surprise_pairs(
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


class _LazyPairs:
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
        """``(inputs_i, grads_i)`` per matrix, see :func:`_surprise_pairs`."""
        if self._pairs is None:
            self._pairs = _surprise_pairs(*self._args)
        return self._pairs


def _advance(
    weights: tuple[Tensor, ...],
    moments: tuple[Tensor, ...],
    pairs: list[tuple[Tensor, Tensor]],
    coef: _EndCoefficients,
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


class _ChunkReader:
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
        pairs: _LazyPairs,
        bank: _CoefficientBank,
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

    def _exact(self, coef: _ReadCoefficients) -> LinearFn:
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


# --------------------------------------------------------------------------------------------
# Plumbing


def _split_chunks(x: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """Split ``[N, C * b, d]`` into ``C x [N, b, d]``.

    Unbound once: slicing a chunk per loop step makes backward traffic quadratic
    (docs/memory.md, "The exact chunk kernel").
    """
    return x.unflatten(1, (-1, chunk_size)).unbind(1)


def _compiled_step_inputs(
    complete: PendingChunk, queries: Tensor, done: int, chunk_size: int
) -> dict[int, tuple[PendingChunk, Tensor]]:
    """``{chunk index: (chunk, queries)}`` for the complete chunks a call reads whole.

    A call that starts ``done > 0`` tokens into a chunk reads fewer queries of that chunk than it
    has tokens: that chunk stays with the eager loop (a graph per decoding position would cost
    more than it saves), and every later complete chunk comes here. Each field is made contiguous
    chunk-major in one copy, so every chunk has the same strides at any sequence length (a
    compiled graph is specialised on strides; views into the whole sequence would recompile per
    length).
    """
    first = 1 if done else 0
    count = complete.keys.shape[1] // chunk_size - first
    if count <= 0:
        return {}
    offset = chunk_size - done if done else 0  # where this call's queries of chunk `first` start

    def chunks(x: Tensor | None, start: int) -> list[Tensor | None]:
        if x is None:
            return [None] * count
        x = x[:, start : start + count * chunk_size].unflatten(1, (count, chunk_size))
        return list(x.transpose(0, 1).contiguous().unbind(0))

    fields = [chunks(x, first * chunk_size) for x in complete]
    rows = zip(*fields, chunks(queries, offset), strict=True)
    return {first + i: (PendingChunk(*row[:-1]), row[-1]) for i, row in enumerate(rows)}


def _join_gate(pending: Tensor | None, gate: Tensor | None) -> Tensor | None:
    """The pending tokens' gate followed by this call's (``None`` stays ``None``)."""
    if gate is None:
        return None
    return torch.cat((pending, gate), 1) if pending.shape[1] else gate


def _check_scan_inputs(
    network: MemoryNetwork,
    state: FastWeightState,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None,
    chunk_size: int,
) -> None:
    """Raise a ValueError naming the first input whose shape or kind is not what is expected."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for name, x in (("queries", queries), ("keys", keys), ("values", values)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [N, T, d], got shape {tuple(x.shape)}")
    n, steps = keys.shape[0], keys.shape[1]
    for name, x in (("queries", queries), ("values", values)):
        if x.shape[:2] != keys.shape[:2]:
            raise ValueError(
                f"{name} must share [N, T] = {(n, steps)} with keys, got {tuple(x.shape[:2])}"
            )
    for name, x in (("lr", lr), ("momentum", momentum), ("log_keep", log_keep), ("side", side)):
        if x is not None and tuple(x.shape) != (n, steps):
            raise ValueError(f"{name} must be [N, T] = {(n, steps)}, got {tuple(x.shape)}")
    pending = state.pending
    if state.weights[0].shape[0] != n:
        raise ValueError(f"state holds N = {state.weights[0].shape[0]} memories, inputs have {n}")
    d_key, d_value = pending.keys.shape[2], state.weights[-1].shape[2]
    if keys.shape[2] != d_key or queries.shape[2] != d_key:
        raise ValueError(
            f"queries and keys must have d_key = {d_key} features, got "
            f"{queries.shape[2]} and {keys.shape[2]}"
        )
    if values.shape[2] != d_value:
        raise ValueError(f"values must have d_value = {d_value} features, got {values.shape[2]}")
    if (momentum is None) != (pending.momentum is None) or (momentum is None) == bool(
        state.momentum
    ):
        raise ValueError(
            "momentum must be given exactly when the state was made with momentum_enabled=True"
        )
    if (log_keep is None) != (pending.log_keep is None):
        raise ValueError("log_keep must be given exactly when the state was made with "
                         "decay_enabled=True")
    if (side is None) != (pending.side is None):
        raise ValueError("side must be given exactly when the state was made with side_enabled=True")
    if pending.keys.shape[1] >= chunk_size:
        raise ValueError(
            f"the state has {pending.keys.shape[1]} pending tokens, so chunk_size must be larger "
            f"(got {chunk_size}); a state must be continued with the chunk_size that made it"
        )
    if len(network.initial_weights()) != len(state.weights):
        raise ValueError(
            f"state has {len(state.weights)} weight matrices, the network "
            f"{len(network.initial_weights())}"
        )
