"""Slow, obviously-correct references for the Titans memory update: the oracle for fast kernels.

Both functions walk the sequence one token at a time, straight from the equations of Titans §3
(docs/memory.md, "The update rule" and "Chunk-parallel training")::

    u_t = grad_W loss(M_g(k_t), v_t; side_t)   # g = t-1 (token_recurrence) or the chunk start t'
    S_t = eta_t * S_{t-1} - theta_t * u_t
    M_t = exp(log_keep_t) * M_{t-1} + S_t

The surprise ``u_t`` comes from ``torch.autograd.grad`` of ``objective.loss`` through
``network.forward`` with plain matmuls (``linear = lambda i, h: h @ W[i]``) and
``create_graph=True``. They therefore share nothing with a kernel's hand-written backward, and
outer gradients (initial weights, queries, keys, values, gates) flow through them too.

Writing a kernel of your own? Compare it with these in float64 on small random inputs: outputs,
final weights and the gradients of some scalar of both w.r.t. every input. They cost one autograd
call per token, so keep ``T`` to a few dozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from memforge.interfaces import MemoryNetwork

#: Which weights a query reads: the chunk-start ``M_{t'}``, ``M_{t-1}`` or ``M_t``.
Read = Literal["chunk_start", "before_write", "after_write"]
READS: tuple[str, ...] = ("chunk_start", "before_write", "after_write")


class LossFn(Protocol):
    """The part of an objective the references need: the per-token inner loss."""

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """Per-token loss ``[N, t]`` of ``prediction`` against ``target`` (``[N, t, d]``), with
        the tokens' side input ``[N, t]`` (or ``None``)."""
        ...


class ReferenceResult(NamedTuple):
    """What a reference returns.

    Attributes:
        outputs: the read-out of every query, ``[N, T, d_value]``.
        weights: ``M_T``, the weights after the last token, one ``[N, d_in, d_out]`` per matrix.
        momentum: ``S_T``, same shapes (zeros when momentum is off).
    """

    outputs: Tensor
    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]


def token_recurrence(
    network: MemoryNetwork,
    objective: LossFn,
    read: Read,
    weights: Sequence[Tensor],
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None = None,
    log_keep: Tensor | None = None,
    side: Tensor | None = None,
) -> ReferenceResult:
    """The fully sequential recurrence: token ``t``'s surprise is taken at ``M_{t-1}``.

    Args:
        network: the memory network, run functionally through ``network.forward``.
        objective: gives the per-token ``loss(prediction, target, side)``.
        read: ``"before_write"`` reads ``M_{t-1}``, ``"after_write"`` reads ``M_t``;
            ``"chunk_start"`` is ``"before_write"`` here (every chunk is one token).
        weights: ``M_0``, one ``[N, d_in, d_out]`` tensor per matrix (e.g. ``initial_state``'s).
        queries: ``[N, T, d_key]``.
        keys: ``[N, T, d_key]``.
        values: ``[N, T, d_value]``.
        lr: ``theta`` ``[N, T]``.
        momentum: ``eta`` ``[N, T]``, or ``None`` for ``eta = 0``.
        log_keep: ``log keep`` ``[N, T]``, or ``None`` for ``keep = 1``.
        side: the objective's side input ``[N, T]``, or ``None``.

    Returns:
        :class:`ReferenceResult` with the outputs and ``M_T``, ``S_T``.
    """
    return _walk(network, objective, read, weights, queries, keys, values, lr, momentum, log_keep,
                 side, 1)


def chunk_start_reference(
    network: MemoryNetwork,
    objective: LossFn,
    read: Read,
    weights: Sequence[Tensor],
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None = None,
    log_keep: Tensor | None = None,
    side: Tensor | None = None,
    *,
    chunk_size: int,
) -> ReferenceResult:
    """Titans' chunked training semantics: every surprise is taken at the chunk-start weights.

    Chunks are ``[0, b), [b, 2b), ...`` from the start of the sequence; for token ``t`` the
    gradient is taken at ``M_{t'}`` with ``t' = t - t % b``, while ``eta`` and ``keep`` still act
    token by token. ``read="chunk_start"`` reads ``M_{t'}`` for every query of the chunk. Other
    arguments and the result are as in :func:`token_recurrence`; ``chunk_size=1`` equals it.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return _walk(network, objective, read, weights, queries, keys, values, lr, momentum, log_keep,
                 side, chunk_size)


def _walk(
    network: MemoryNetwork,
    objective: LossFn,
    read: Read,
    weights: Sequence[Tensor],
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None,
    chunk_size: int,
) -> ReferenceResult:
    """The token loop shared by both references (``chunk_size=1``: gradient at ``M_{t-1}``)."""
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    memory = list(weights)
    moments = [torch.zeros_like(w) for w in memory]
    frozen = memory
    outputs = []
    for t in range(keys.shape[1]):
        if t % chunk_size == 0:
            frozen = list(memory)
        query = queries[:, t : t + 1]
        if read != "after_write":
            outputs.append(_read(network, frozen if read == "chunk_start" else memory, query))
        token_side = None if side is None else side[:, t : t + 1]
        grads = _surprise(network, objective, frozen, keys[:, t : t + 1], values[:, t : t + 1],
                          token_side)
        theta = lr[:, t, None, None]
        eta = 0.0 if momentum is None else momentum[:, t, None, None]
        keep = 1.0 if log_keep is None else log_keep[:, t, None, None].exp()
        moments = [eta * s - theta * u for s, u in zip(moments, grads, strict=True)]
        memory = [keep * m + s for m, s in zip(memory, moments, strict=True)]
        if read == "after_write":
            outputs.append(_read(network, memory, query))
    return ReferenceResult(torch.cat(outputs, 1), tuple(memory), tuple(moments))


def _read(network: MemoryNetwork, weights: Sequence[Tensor], query: Tensor) -> Tensor:
    """``M(q)`` with the weights ``weights``, plain matmuls."""
    return network.forward(query, lambda i, h: h @ weights[i])[0]


def _surprise(
    network: MemoryNetwork,
    objective: LossFn,
    weights: Sequence[Tensor],
    key: Tensor,
    value: Tensor,
    side: Tensor | None,
) -> tuple[Tensor, ...]:
    """``grad_W loss(M_W(k), v)`` per sequence, by autograd (differentiable itself)."""
    with torch.enable_grad():
        # Weights that need no outer gradient still need one here: take a fresh leaf.
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        prediction = network.forward(key, lambda i, h: h @ leaves[i])[0]
        # Sequences are independent, so the sum's gradient is every sequence's own gradient.
        loss = objective.loss(prediction, value, side).sum()
        return torch.autograd.grad(loss, leaves, create_graph=True)
