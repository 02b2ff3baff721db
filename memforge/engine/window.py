"""A windowed objective's parts shared by the executors (docs/memory.md, "The sequential
executor"): the pairs carried from before a chunk and the matrix that mixes pairs into steps.

With window ``c`` and window weights ``gamma`` (one per pair), token ``t``'s step uses
``u_t = sum_{i=t-c+1..t} gamma_i x_i^T g_i``: the gradients of the last ``c`` pairs at the
chunk-start weights. A chunk's ``b`` tokens reach back at most ``c - 1`` pairs before it, which
every executor carries (:class:`WindowHistory`) and re-evaluates at each chunk's start weights;
``u = mix @ pairs`` with the banded :func:`window_mix`, so any per-token coefficient ``C`` over
the chunk's tokens becomes ``C @ mix`` over its pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class WindowHistory(NamedTuple):
    """The last ``min(c - 1, tokens so far)`` pairs before the current chunk (``c`` = window),
    which a windowed objective re-evaluates at every chunk's start weights.

    Attributes:
        keys: ``[N, h, d_key]``.
        values: ``[N, h, d_value]``.
        side: the objective's side input ``[N, h]``, or ``None`` when it takes none.
        window: the pairs' window weights ``gamma`` ``[N, h]``, or ``None`` (all 1).
    """

    keys: Tensor
    values: Tensor
    side: Tensor | None
    window: Tensor | None


def join_time(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """``first`` then ``second`` along time (dimension 1); ``None`` when ``second`` is (an
    optional input stays off), ``second`` itself when ``first`` holds no tokens."""
    if second is None:
        return None
    return torch.cat((first, second), 1) if first.shape[1] else second


def window_mix(reach: int, size: int, window: int, gamma: Tensor | None,
               valid: Tensor | None, like: Tensor) -> Tensor:
    """``[..., size, reach + size]``: entry ``[t, p]`` is ``gamma_p`` when pair ``p`` lies in token
    ``t``'s window, else 0, so that ``u_t = sum_p mix[t, p] x_p^T g_p``.

    Pairs are the ``reach`` before the chunk followed by the chunk's ``size`` (token ``t`` is pair
    ``reach + t``); pair ``p`` is in token ``t``'s window when ``t + reach - window < p <=
    t + reach``. ``gamma`` ``[..., reach + size]`` weighs the pairs (``None``: all 1); ``valid``
    ``[..., reach + size]`` (bool, ``None``: all) zeroes pairs that do not exist (before the
    sequence start). Without either the result is the ``[size, reach + size]`` band, which
    broadcasts. ``like`` gives the dtype and device.
    """
    token = torch.arange(size, device=like.device)[:, None] + reach
    pair = torch.arange(reach + size, device=like.device)[None, :]
    band = ((pair <= token) & (pair > token - window)).to(like.dtype)
    weights = gamma
    if valid is not None:
        weights = valid.to(like.dtype) if gamma is None else gamma * valid
    return band if weights is None else band * weights[..., None, :]


__all__ = ["WindowHistory", "join_time", "window_mix"]
