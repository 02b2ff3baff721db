"""Fixed-shape single-token decoding of the memory kernel, for compiled generation.

:func:`memforge.engine.chunked.memory_scan` takes any call; in a decoding step there the unfinished
chunk is a set of tensors that grow by one row per token, so every step has new shapes and a
compiled step would recompile for each. Here the unfinished chunk lives in buffers of the full
chunk size, and a step writes its token's row in place: every step of a decode has the same
shapes, and two compiled graphs serve them all, one for a step inside a chunk and one for a step
that completes it (and so also moves the weights).

The arithmetic is :func:`memory_scan`'s. A token's surprise is taken at the chunk-start weights,
so it is computed once: when the token arrives, kept per row as the ``(input, gradient)`` pair of
every matrix, or, for a rule that reads only at the chunk start, for the whole chunk when it
completes. Reads go through the scan's reader, and the coefficients come from the scan's
coefficient bank (an exact read at row ``r`` takes the chunk-end coefficients of the rows
up to ``r``, see :class:`_RowBank`). Rows after the current one still hold the previous chunk's
(finite) values: a read masks them out, and a chunk-end update happens only once every row has
been written.

A windowed objective (window ``c > 1``, :mod:`memforge.engine.chunk_window`) keeps the ``c - 1``
pairs before the chunk in buffers of their own (right-aligned; at the sequence start the missing
ones have a weight of exactly 0) and the surprise pairs as ``c - 1 + b`` rows, the history's
first; a completed chunk shifts its last rows into the history and, for exact reads,
re-evaluates the history's pairs at the new chunk-start weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from memforge.engine.chunk_coefficients import (
    CoefficientBank,
    EndCoefficients,
    ReadCoefficients,
    advance,
)
from memforge.engine.chunk_reads import ClosedFormReader, surprise_pairs
from memforge.engine.chunk_state import FastWeightState, LossGradient, Retrieval
from memforge.engine.chunk_window import WindowedBank
from memforge.engine.window import WindowHistory, window_mix
from memforge.interfaces import MemoryNetwork


class StaticChunk(NamedTuple):
    """The memory state of a fixed-shape decode; a step changes it in place.

    Attributes:
        weights: ``M`` at the start of the current chunk, ``[N, d_in_i, d_out_i]`` per matrix.
        moments: ``S`` at the start of the current chunk (``()`` without momentum).
        lr: ``theta`` of the chunk's rows ``[N, b]``.
        momentum: ``eta`` ``[N, b]``, or ``None`` without momentum.
        log_keep: ``log keep`` ``[N, b]``, or ``None`` without retention decay.
        side: the objective's side input ``[N, b]``, or ``None`` when it takes none.
        keys: the rows' keys ``[N, b, d_key]``.
        values: the rows' values ``[N, b, d_value]``.
        inputs: per matrix, the input of each row's surprise ``[N, b, d_in_i]`` (kept up to date
            only for a retrieval rule that reads within the chunk; see :func:`static_chunk_step`);
            with a window, ``[N, c - 1 + b, d_in_i]``, the history's pairs first.
        grads: per matrix, the back-propagated error of each row's surprise ``[N, b, d_out_i]``
            (``[N, c - 1 + b, d_out_i]`` with a window).
        row: the row the next token writes (a 0-d long tensor: the tokens of the chunk so far).
        window: the window weights ``gamma`` of the chunk's rows ``[N, b]``, or ``None``.
        history: with a window ``c > 1``, the ``c - 1`` pairs before the chunk (right-aligned
            buffers); ``None`` without.
        seen: how many of the history's rows hold pairs (a 0-d long tensor, ``<= c - 1``: fewer
            at the sequence start); ``None`` without a window.
    """

    weights: tuple[Tensor, ...]
    moments: tuple[Tensor, ...]
    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None
    side: Tensor | None
    keys: Tensor
    values: Tensor
    inputs: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    row: Tensor
    window: Tensor | None = None
    history: WindowHistory | None = None
    seen: Tensor | None = None


class _StoredPairs(NamedTuple):
    """The surprise pairs of the chunk's rows, in the form the reader and the update take."""

    pairs: list[tuple[Tensor, Tensor]]

    def get(self) -> list[tuple[Tensor, Tensor]]:
        return self.pairs


class _NoPairs(NamedTuple):
    """The pairs of a chunk whose retrieval rule promised to read only at the chunk start."""

    retrieval: Any

    def get(self) -> list[tuple[Tensor, Tensor]]:
        raise RuntimeError(f"{type(self.retrieval).__name__} declares reads_within_chunk = False "
                           f"but asked for an exact read within a chunk; set it to True (or drop it)")


def static_chunk(
    network: MemoryNetwork, objective: LossGradient, state: FastWeightState, chunk_size: int,
    window: int = 1,
) -> StaticChunk:
    """A :class:`StaticChunk` holding ``state`` (from :func:`memory_scan`, same ``chunk_size`` and
    ``window``).

    Every tensor is a fresh copy: the decode writes its buffers in place and must never change the
    caller's state. The pending tokens' surprise pairs are computed here, once.
    """
    pending, weights = state.pending, state.weights
    n, done = weights[0].shape[0], pending.keys.shape[1]
    if done >= chunk_size:
        raise ValueError(f"the state has {done} pending tokens, so chunk_size must be larger "
                         f"(got {chunk_size}); continue a state with the chunk_size that made it")
    if (window > 1) != (state.history is not None):
        made = "a window > 1" if state.history is not None else "window 1"
        raise ValueError(f"window={window} does not fit the state (made with {made}); decode "
                         "with the rule that made it")
    if state.history is not None:
        return _windowed_static_chunk(network, objective, state, chunk_size, window)

    def rows(filled: Tensor, width: tuple[int, ...]) -> Tensor:
        buffer = filled.new_zeros(n, chunk_size, *width)
        buffer[:, :done] = filled
        return buffer

    pairs = surprise_pairs(network, objective, weights, pending.keys, pending.values,
                            pending.side) if done else [
        (w.new_zeros(n, 0, w.shape[1]), w.new_zeros(n, 0, w.shape[2])) for w in weights]
    return StaticChunk(
        weights=tuple(w.clone() for w in weights),
        moments=tuple(s.clone() for s in state.momentum),
        lr=rows(pending.lr, ()),
        momentum=None if pending.momentum is None else rows(pending.momentum, ()),
        log_keep=None if pending.log_keep is None else rows(pending.log_keep, ()),
        side=None if pending.side is None else rows(pending.side, ()),
        keys=rows(pending.keys, pending.keys.shape[2:]),
        values=rows(pending.values, pending.values.shape[2:]),
        inputs=tuple(rows(x, x.shape[2:]) for x, _ in pairs),
        grads=tuple(rows(g, g.shape[2:]) for _, g in pairs),
        row=torch.tensor(done, device=weights[0].device),
    )


def static_chunk_step(
    network: MemoryNetwork,
    objective: LossGradient,
    retrieval: Retrieval,
    chunk: StaticChunk,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None = None,
    gamma: Tensor | None = None,
    *,
    completes: bool,
    window: int = 1,
) -> Tensor:
    """Write one token into ``chunk`` (in place) and read its query; returns ``[N, 1, d_value]``.

    ``query``/``key``/``value`` are ``[N, 1, d]`` and the gates ``[N, 1]``, as one token of
    :func:`memory_scan`'s inputs. ``completes`` says that this token fills the chunk's last row:
    the step then also moves ``(M, S)`` to the chunk end and starts the next chunk at row 0. It is
    a Python bool, not read from ``chunk.row``, so a compiled step branches without reading a
    tensor (one graph per value). ``gamma`` ``[N, 1]`` and ``window`` as in :func:`memory_scan`
    (for a chunk made with ``window > 1``).

    A token's surprise pair is computed as it arrives, for exact reads of the rows so far; with a
    retrieval rule that declares ``reads_within_chunk = False`` (chunk-start reads), the whole
    chunk's pairs are computed at once when it completes, from the stored keys and values.
    """
    if chunk.history is not None:
        return _windowed_step(network, objective, retrieval, chunk,
                              (query, key, value, lr, momentum, log_keep, side, gamma),
                              completes=completes, window=window)
    row = chunk.row.view(1)
    for buffer, new in ((chunk.lr, lr), (chunk.momentum, momentum), (chunk.log_keep, log_keep),
                        (chunk.side, side), (chunk.keys, key), (chunk.values, value)):
        if buffer is not None:
            buffer.index_copy_(1, row, new)
    stored = _StoredPairs(list(zip(chunk.inputs, chunk.grads, strict=True)))
    if getattr(retrieval, "reads_within_chunk", True):
        new_pairs = surprise_pairs(network, objective, chunk.weights, key, value, side)
        for inputs, grads, (x, g) in zip(chunk.inputs, chunk.grads, new_pairs, strict=True):
            inputs.index_copy_(1, row, x)
            grads.index_copy_(1, row, g)
        pairs: _StoredPairs | _NoPairs = stored
    else:
        pairs = _NoPairs(retrieval)
    bank = _RowBank(chunk)
    reader = ClosedFormReader(network, chunk.weights, chunk.moments, pairs, bank, 0, slice(None))
    out = retrieval(reader, query)
    if completes:
        if pairs is not stored:
            pairs = _StoredPairs(surprise_pairs(network, objective, chunk.weights, chunk.keys,
                                                 chunk.values, chunk.side))
        weights, moments = advance(chunk.weights, chunk.moments, pairs.get(), bank.end(0))
        for old, new in zip(chunk.weights + chunk.moments, weights + moments, strict=True):
            old.copy_(new)
        chunk.row.zero_()
    else:
        chunk.row.add_(1)
    return out


def _windowed_static_chunk(network: MemoryNetwork, objective: LossGradient,
                           state: FastWeightState, chunk_size: int, window: int) -> StaticChunk:
    """:func:`static_chunk` for a windowed objective (see the module docstring)."""
    pending, history, weights = state.pending, state.history, state.weights
    n, done, reach, lag = weights[0].shape[0], pending.keys.shape[1], window - 1, history.keys.shape[1]

    def rows(filled: Tensor | None, size: int, at: slice) -> Tensor | None:
        if filled is None:
            return None
        buffer = filled.new_zeros(n, size, *filled.shape[2:])
        buffer[:, at] = filled
        return buffer

    def chunk_rows(filled: Tensor | None) -> Tensor | None:
        return rows(filled, chunk_size, slice(0, done))

    carried = WindowHistory(*(rows(x, reach, slice(reach - lag, reach)) for x in history))
    chunk = StaticChunk(
        weights=tuple(w.clone() for w in weights),
        moments=tuple(s.clone() for s in state.momentum),
        lr=chunk_rows(pending.lr), momentum=chunk_rows(pending.momentum),
        log_keep=chunk_rows(pending.log_keep), side=chunk_rows(pending.side),
        keys=chunk_rows(pending.keys), values=chunk_rows(pending.values),
        inputs=(), grads=(), row=torch.tensor(done, device=weights[0].device),
        window=chunk_rows(pending.window), history=carried,
        seen=torch.tensor(lag, device=weights[0].device))
    pairs = _window_pairs(network, objective, chunk, done)
    return chunk._replace(inputs=tuple(x for x, _ in pairs), grads=tuple(g for _, g in pairs))


def _windowed_step(network: MemoryNetwork, objective: LossGradient, retrieval: Retrieval,
                   chunk: StaticChunk, token: tuple[Tensor | None, ...], *, completes: bool,
                   window: int) -> Tensor:
    """:func:`static_chunk_step` for a windowed objective (see the module docstring)."""
    query, key, value, lr, momentum, log_keep, side, gamma = token
    history, reach = chunk.history, window - 1
    row = chunk.row.view(1)
    for buffer, new in ((chunk.lr, lr), (chunk.momentum, momentum), (chunk.log_keep, log_keep),
                        (chunk.side, side), (chunk.keys, key), (chunk.values, value),
                        (chunk.window, gamma)):
        if buffer is not None:
            buffer.index_copy_(1, row, new)
    stored = _StoredPairs(list(zip(chunk.inputs, chunk.grads, strict=True)))
    within = getattr(retrieval, "reads_within_chunk", True)
    if within:
        new_pairs = surprise_pairs(network, objective, chunk.weights, key, value, side)
        for inputs, grads, (x, g) in zip(chunk.inputs, chunk.grads, new_pairs, strict=True):
            inputs.index_copy_(1, row + reach, x)
            grads.index_copy_(1, row + reach, g)
        pairs: _StoredPairs | _NoPairs = stored
    else:
        pairs = _NoPairs(retrieval)
    bank = WindowedBank(_RowBank(chunk), [_static_mix(chunk, window)])
    reader = ClosedFormReader(network, chunk.weights, chunk.moments, pairs, bank, 0, slice(None))
    out = retrieval(reader, query)
    if completes:
        if pairs is not stored:
            pairs = _StoredPairs(_window_pairs(network, objective, chunk, chunk.lr.shape[1]))
        weights, moments = advance(chunk.weights, chunk.moments, pairs.get(), bank.end(0))
        for old, new in zip(chunk.weights + chunk.moments, weights + moments, strict=True):
            old.copy_(new)
        chunk_fields = (chunk.keys, chunk.values, chunk.side, chunk.window)
        for old, rows in zip(history, chunk_fields, strict=True):
            if old is not None:
                old.copy_(torch.cat((old, rows), 1)[:, -reach:])
        chunk.seen.add_(chunk.lr.shape[1]).clamp_max_(reach)
        chunk.row.zero_()
        if within:  # the history's pairs at the new chunk-start weights, for exact reads
            fresh = _window_pairs(network, objective, chunk, 0)
            for inputs, grads, (x, g) in zip(chunk.inputs, chunk.grads, fresh, strict=True):
                inputs[:, :reach].copy_(x[:, :reach])
                grads[:, :reach].copy_(g[:, :reach])
    else:
        chunk.row.add_(1)
    return out


def _window_valid(chunk: StaticChunk, written: int | None = None) -> Tensor:
    """``[c - 1 + b]``: whether each pair row holds a pair (the history's first rows may not;
    with ``written``, only the chunk's first ``written`` rows count)."""
    reach, size = chunk.history.keys.shape[1], chunk.lr.shape[1]
    rows = torch.arange(reach + size, device=chunk.lr.device)
    valid = rows >= reach - chunk.seen
    return valid if written is None else valid & (rows < reach + written)


def _window_pairs(network: MemoryNetwork, objective: LossGradient, chunk: StaticChunk,
                  written: int) -> list[tuple[Tensor, Tensor]]:
    """The surprise pairs of the history's and the chunk's first ``written`` rows at the
    chunk-start weights; rows that hold no pair are exactly 0 (whatever the network makes of a
    zero key)."""
    history = chunk.history

    def joined(old: Tensor | None, new: Tensor | None) -> Tensor | None:
        return None if new is None else torch.cat((old, new), 1)

    pairs = surprise_pairs(network, objective, chunk.weights, joined(history.keys, chunk.keys),
                           joined(history.values, chunk.values), joined(history.side, chunk.side))
    valid = _window_valid(chunk, written)[None, :, None]
    return [(torch.where(valid, x, 0.0), torch.where(valid, g, 0.0)) for x, g in pairs]


def _static_mix(chunk: StaticChunk, window: int) -> Tensor:
    """The chunk's ``[N, b, c - 1 + b]`` window mix (:func:`memforge.engine.window.window_mix`)."""
    history = chunk.history
    gamma = None if chunk.window is None else torch.cat((history.window, chunk.window), 1)
    return window_mix(window - 1, chunk.lr.shape[1], window, gamma, _window_valid(chunk),
                      chunk.lr)


class _Gates(NamedTuple):
    """Gates ``[N, b]`` in the form :class:`CoefficientBank` reads them."""

    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None


class _RowBank:
    """The coefficients of a static step: the exact reads of its one row, and the chunk end.

    The state after the first ``k`` rows of a chunk is the end state of a chunk whose other rows
    write nothing and change nothing: ``theta = 0``, ``log keep = 0`` and ``eta = 0`` (``eta = 1``
    would carry the momentum on into ``M`` row after row). So a read takes the chunk-end
    coefficients of the gates with the rows from ``k`` on neutralised, as ``[N, 1(, b)]`` read
    coefficients: ``O(b^2)`` element-wise work and no ``b x b`` matrix product, where the bank's
    per-token coefficients would build every row. (``eta = 0`` is the dtype's tiny after the log
    clamp, so the masked rows leave ``1e-38`` of themselves in float32.) The momentum-end
    coefficients of a masked chunk are not the momentum after ``k`` rows, and are never used.
    """

    def __init__(self, chunk: StaticChunk) -> None:
        self._chunk, self._size = chunk, chunk.lr.shape[1]

    def after_write(self, index: int) -> ReadCoefficients:
        """``M_l`` for the step's row ``l`` (``index`` is always 0: one chunk)."""
        return self._state_after(self._chunk.row + 1)

    def before_write(self, index: int) -> ReadCoefficients:
        """``M_{l-1}`` for the step's row ``l``."""
        return self._state_after(self._chunk.row)

    def end(self, index: int) -> EndCoefficients:
        """The chunk-end coefficients, every row written."""
        return CoefficientBank(self._chunk, self._size).end(0)

    def _state_after(self, count: Tensor) -> ReadCoefficients:
        chunk = self._chunk
        written = torch.arange(self._size, device=chunk.lr.device) < count
        masked = _Gates(*(None if gate is None else torch.where(written, gate, 0.0)
                          for gate in (chunk.lr, chunk.momentum, chunk.log_keep)))
        end = CoefficientBank(masked, self._size).end(0)
        return ReadCoefficients(keep=None if end.keep is None else end.keep[:, None],
                                 carry=None if end.carry is None else end.carry[:, None],
                                 gain=end.gain[:, None, :])


def copy_into(buffer: Any, new: Any) -> None:
    """Copy ``new`` into ``buffer`` in place, leaf by leaf (tensors, tuples of them, ``None``).

    For caches a component returns afresh each call (e.g. a projection's convolution history):
    the decode keeps one set of buffers, so the new values must land in them.
    """
    if isinstance(buffer, Tensor) and isinstance(new, Tensor) and buffer.shape == new.shape:
        buffer.copy_(new)
    elif isinstance(buffer, tuple) and isinstance(new, tuple) and len(buffer) == len(new):
        for old_leaf, new_leaf in zip(buffer, new, strict=True):
            copy_into(old_leaf, new_leaf)
    elif not (buffer is None and new is None):
        raise ValueError(f"a fixed-shape decode needs caches that keep their structure and shapes "
                         f"from step to step; got {_describe(buffer)} then {_describe(new)}")


def clone_tree(tree: Any) -> Any:
    """A copy of ``tree`` (tensors, tuples/NamedTuples of them, ``None``) with every tensor cloned."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, tuple):
        leaves = [clone_tree(leaf) for leaf in tree]
        return type(tree)(*leaves) if hasattr(tree, "_fields") else tuple(leaves)
    if tree is None:
        return None
    raise ValueError(f"a fixed-shape decode can hold tensors, tuples of them and None, got "
                     f"{type(tree).__name__}")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor {list(x.shape)}"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)}"
    return type(x).__name__
