"""A windowed objective on the closed-form kernel (docs/memory.md, "Executors").

Token ``t``'s step is ``u_t = sum_p mix[t, p] x_p^T g_p`` over the chunk's pairs and the
``reach = c - 1`` before it (:func:`memforge.engine.window.window_mix`), all at the chunk-start
weights. The kernel's recurrences are unchanged, so every coefficient it puts on a token's
gradient becomes one on the pairs by a right product with ``mix``: :class:`WindowedBank` wraps a
:class:`~memforge.engine.chunk_coefficients.CoefficientBank` that way, and the reader and the
chunk-end update take ``reach + b`` pairs where they took ``b``.

Every chunk of a call takes the same ``reach = c - 1`` (one gather for all of them): a pair
before the sequence start repeats the first pair and gets a weight of exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from memforge.engine.chunk_coefficients import EndCoefficients, ReadCoefficients
from memforge.engine.chunk_state import PendingChunk
from memforge.engine.window import WindowHistory, join_time, window_mix


class WindowedBank:
    """The coefficients of a bank (``CoefficientBank`` or the static decode's row bank) over
    each chunk's window pairs: token coefficients ``C`` become ``C @ mix``.

    Args:
        bank: gives ``end``, ``after_write`` and ``before_write`` per chunk index.
        mixes: per chunk index, its ``[N, b, reach + b]`` mix (or a ``[b, reach + b]`` one that
            broadcasts).
    """

    def __init__(self, bank: object, mixes: Sequence[Tensor]) -> None:
        self._bank, self._mixes = bank, mixes

    def end(self, index: int) -> EndCoefficients:
        """The chunk-end coefficients of chunk ``index`` over its pairs."""
        end, mix = self._bank.end(index), self._mixes[index]
        return end._replace(gain=_spread(end.gain, mix),
                            momentum_gain=None if end.momentum_gain is None
                            else _spread(end.momentum_gain, mix))

    def after_write(self, index: int) -> ReadCoefficients:
        """Coefficients of ``M_l`` (after token ``l`` writes) over the pairs."""
        read = self._bank.after_write(index)
        return read._replace(gain=read.gain @ self._mixes[index])

    def before_write(self, index: int) -> ReadCoefficients:
        """Coefficients of ``M_{l-1}`` (before token ``l`` writes) over the pairs."""
        read = self._bank.before_write(index)
        return read._replace(gain=read.gain @ self._mixes[index])


def _spread(gain: Tensor, mix: Tensor) -> Tensor:
    """``[N, b] -> [N, reach + b]``: per-token gains as per-pair ones."""
    return (gain[:, None, :] @ mix).squeeze(-2)


class WindowPieces(NamedTuple):
    """Chunks' pairs and mixes (``C`` chunks of ``b`` tokens each, ``R = reach + b`` pairs).

    Attributes:
        keys: ``C x [N, R, d_key]``.
        values: ``C x [N, R, d_value]``.
        side: ``C x [N, R]``, or ``C`` ``None``s.
        mixes: ``C x [N, b, R]``.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    side: tuple[Tensor | None, ...]
    mixes: tuple[Tensor, ...]


def window_pieces(history: WindowHistory, stream: PendingChunk, first: int, count: int,
                  size: int, window: int) -> WindowPieces:
    """The pairs and mixes of ``count`` chunks of ``size`` tokens, the first starting at token
    ``first`` of ``stream`` (which follows ``history`` directly).

    One gather per field: slicing a window per chunk would make every slice's backward fill a
    zero tensor as long as the call (quadratic in the length).
    """
    reach, lag = window - 1, history.keys.shape[1]
    like = stream.lr
    starts = lag + first + size * torch.arange(count, device=like.device)
    positions = starts[:, None] + torch.arange(-reach, size, device=like.device)   # [C, R]
    index = positions.clamp_min(0)

    def gather(old: Tensor | None, new: Tensor | None) -> tuple[Tensor | None, ...]:
        joined = join_time(old, new)
        return (None,) * count if joined is None else joined[:, index].unbind(1)

    gamma = gather(history.window, stream.window)
    valid = positions >= 0
    mixes = [window_mix(reach, size, window, g, valid[c], like) for c, g in enumerate(gamma)]
    return WindowPieces(gather(history.keys, stream.keys), gather(history.values, stream.values),
                        gather(history.side, stream.side), tuple(mixes))


def next_history(history: WindowHistory, stream: PendingChunk, end: int, window: int
                 ) -> WindowHistory:
    """The last ``min(window - 1, pairs so far)`` pairs before token ``end`` of ``stream``
    (copies: a carried state must not keep a call's inputs alive)."""
    lag = history.keys.shape[1]
    start = max(0, lag + end - (window - 1))

    def last(old: Tensor | None, new: Tensor | None) -> Tensor | None:
        if new is None:
            return None
        return torch.cat((old, new[:, :end]), 1)[:, start:].clone()

    return WindowHistory(last(history.keys, stream.keys), last(history.values, stream.values),
                         last(history.side, stream.side), last(history.window, stream.window))


def pending_pieces(history: WindowHistory, pending: PendingChunk, window: int
                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(keys, values, side, mix)`` of the pending tokens as one chunk after ``history``, with
    the history's own length as the reach (nothing invalid to mask)."""
    mix = window_mix(history.keys.shape[1], pending.keys.shape[1], window,
                     join_time(history.window, pending.window), None, pending.lr)
    return (join_time(history.keys, pending.keys), join_time(history.values, pending.values),
            join_time(history.side, pending.side), mix)


__all__ = ["WindowPieces", "WindowedBank", "next_history", "pending_pieces", "window_pieces"]
