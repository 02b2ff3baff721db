"""The closed-form kernel's state between calls: the fast weights and momentum at the current
chunk start and the unfinished chunk's tokens (docs/memory.md, "Chunk-parallel training"), and
the two parts of a rule the kernel calls (the loss gradient, the retrieval)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from memforge.engine.window import WindowHistory
from memforge.interfaces import ChunkReader, MemoryNetwork


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
        window: a windowed objective's weights ``gamma`` ``[N, r]``, or ``None`` (no window, or
            all 1).
    """

    keys: Tensor
    values: Tensor
    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None
    side: Tensor | None = None
    window: Tensor | None = None


class FastWeightState(NamedTuple):
    """Memory state between calls of :func:`memory_scan`.

    Attributes:
        weights: ``M`` at the start of the current (possibly partial) chunk, one
            ``[N, d_in_i, d_out_i]`` tensor per matrix of the network.
        momentum: ``S`` at the start of the current chunk, same shapes; ``()`` when momentum is
            off (``S`` is then always zero).
        pending: the tokens of the current chunk seen so far.
        history: for an objective with a window ``c > 1``, the last ``min(c - 1, tokens so
            far)`` pairs before the current chunk (:mod:`memforge.engine.window`); ``None``
            without a window.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: PendingChunk
    history: WindowHistory | None = None


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
    side_enabled: bool = False, key_width: int | None = None, window: int = 1,
    window_enabled: bool = False,
) -> FastWeightState:
    """The state at the start of ``batch`` sequences: ``M_0`` per sequence, ``S_0 = 0``, no pending.

    The weights are the network's initial weights repeated to ``[batch * H, d_in, d_out]``
    (sequence-major, head-minor, i.e. ``n = b * H + h``) and stay connected to the parameters, so
    outer gradients reach them. ``momentum_enabled`` / ``decay_enabled`` / ``side_enabled`` fix
    whether later calls pass ``momentum`` / ``log_keep`` / ``side``. ``key_width``: the keys'
    width when the network's input is not its first matrix's (a feature map first, like
    ``atlas.poly_mlp``); default that matrix's ``d_in``. ``window``: the objective's window
    ``c`` (a state with ``c > 1`` carries the pairs before each chunk); ``window_enabled``:
    later calls pass the window weights ``gamma`` (with ``c > 1`` only).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
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
        window=empty if window_enabled else None,
    )
    history = None
    if window > 1:
        history = WindowHistory(pending.keys, pending.values, pending.side, pending.window)
    elif window_enabled:
        raise ValueError("window_enabled needs window > 1 (fold a window of one's weights into lr)")
    return FastWeightState(weights, momentum, pending, history)


__all__ = ["FastWeightState", "LossGradient", "PendingChunk", "Retrieval", "initial_state"]
