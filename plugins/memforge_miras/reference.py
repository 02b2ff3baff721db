"""Float64 token loops of the MIRAS rules, written from the paper's equations in their tier's
semantics (docs/zoo.md, "MIRAS"): the oracle the layers are tested against.

:func:`rule_reference` walks the sequence one token at a time. With chunks ``[0, b), [b, 2b),
...`` from the start of the sequence and ``W0`` the weights at the start of token ``t``'s chunk::

    u_t = grad_W loss(M_{W0}(k_t), v_t; side_t)     # by autograd of objective.loss, per token
    A_t = keep_t A_{t-1} - theta_t u_t              # plain GD, no momentum (MIRAS)
    W   = project(A)                                # at chunk ends, for a mirror retention
                                                    # (Moneta's l_q, Memora's KL); W = A otherwise

``A`` is the dual a mirror retention accumulates (``A_0`` = the network's initial weights, read
through ``W_0 = project(A_0)``); without a projection ``A`` is ``W`` itself and the reads can be
exact (``before_write``: ``W_{t-1}``, ``after_write``: ``W_t``). :func:`layer_reference` runs a
whole memory layer: its projection and gates, this loop, and the layer's output stage.

Nothing here comes from an executor: the gradient of every token is its own ``autograd.grad``
through ``network.forward`` with plain matmuls (``create_graph=True``, so outer gradients flow).
Keep ``T`` to a few dozen tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from memforge.interfaces import MemoryNetwork, ProjectsWeights

#: The reads the loop offers.
READS = ("chunk_start", "before_write", "after_write")


class ReferenceState(NamedTuple):
    """Where :func:`rule_reference` stopped.

    Attributes:
        weights: ``W`` at the start of the current (possibly unfinished) chunk, one
            ``[N, d_in, d_out]`` per matrix.
        dual: ``A`` at the start of the current chunk (``weights`` without a projection).
        keys, values: the current chunk's tokens so far, ``[N, r, d]``.
        lr, log_keep, side: their ``theta``, ``log keep`` and side input, ``[N, r]`` (the last
            two ``None`` when the rule has none).
    """

    weights: tuple[Tensor, ...]
    dual: tuple[Tensor, ...]
    keys: Tensor
    values: Tensor
    lr: Tensor
    log_keep: Tensor | None
    side: Tensor | None


def start_state(network: MemoryNetwork, retention: Any, inputs: Sequence[Tensor | None]
                ) -> ReferenceState:
    """The state before any token: ``A_0`` the network's initial weights for every sequence,
    ``W_0 = project(A_0)`` (``A_0`` itself without a projection). ``inputs`` are a call's
    ``(keys, values, lr, log_keep, side)``, for the pending fields' widths and which are ``None``."""
    dual = _initial(network, inputs[0].shape[0])
    empty = tuple(None if x is None else x[:, :0] for x in inputs)
    return ReferenceState(_project(retention, dual, dual), dual, *empty)


def _initial(network: MemoryNetwork, n: int) -> tuple[Tensor, ...]:
    """The initial weights ``[H, d_in, d_out]`` repeated for ``n = B * H`` sequences and heads."""
    return tuple(w.repeat(n // w.shape[0], 1, 1) for w in network.initial_weights())


def _project(retention: Any, dual: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(retention.project(dual, initial)) if isinstance(retention, ProjectsWeights) else dual


def rule_reference(network: MemoryNetwork, objective: Any, retention: Any, queries: Tensor,
                   keys: Tensor, values: Tensor, lr: Tensor, log_keep: Tensor | None,
                   side: Tensor | None, *, chunk_size: int, read: str = "chunk_start",
                   state: ReferenceState | None = None) -> tuple[Tensor, ReferenceState]:
    """The MIRAS update token by token (module docstring); returns every query's read
    ``[N, T, d_value]`` and where it stopped.

    Args:
        network: the memory network, run through ``network.forward`` with plain matmuls.
        objective: gives ``loss(prediction, target, side)`` per token.
        retention: its ``project`` is applied at chunk ends when it ``ProjectsWeights`` (mirror
            form, ``applies_at = "chunk_end"``); its decay comes in as ``log_keep``.
        queries, keys: ``[N, T, d_key]``.
        values: ``[N, T, d_value]``.
        lr: ``theta`` ``[N, T]``.
        log_keep: ``log keep`` ``[N, T]`` or ``None`` (keep = 1).
        side: the objective's side input ``[N, T]`` or ``None``.
        chunk_size: ``b >= 1``.
        read: one of :data:`READS`; a projecting rule reads at the chunk start only.
        state: where an earlier call stopped (:func:`start_state` when ``None``); its pending
            tokens are written again from their chunk's start, without reads.
    """
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    projects = isinstance(retention, ProjectsWeights)
    if projects and (retention.applies_at != "chunk_end" or not getattr(retention, "mirror", False)):
        raise ValueError("the MIRAS reference runs mirror projections applied at chunk ends")
    if projects and read != "chunk_start":
        raise ValueError("a rule projected at chunk ends reads at the chunk start only")
    new = (keys, values, lr, log_keep, side)
    if state is None:
        state = start_state(network, retention, new)
    initial = _initial(network, keys.shape[0])
    done = state.keys.shape[1]
    every = [None if old is None else torch.cat((old, x), 1) for old, x in zip(state[2:], new, strict=True)]
    all_keys, all_values, all_lr, all_log_keep, all_side = every
    start, start_dual, dual = state.weights, state.dual, state.dual
    outputs = []
    for t in range(all_keys.shape[1]):
        if t % chunk_size == 0 and t:
            start, start_dual = _project(retention, dual, initial), dual
        query = queries[:, t - done : t - done + 1] if t >= done else None
        if query is not None and read == "chunk_start":
            outputs.append(_read(network, start, query))
        elif query is not None and read == "before_write":
            outputs.append(_read(network, dual, query))
        grads = _gradient(network, objective, start, all_keys[:, t : t + 1],
                          all_values[:, t : t + 1], None if all_side is None else all_side[:, t : t + 1])
        theta = all_lr[:, t, None, None]
        keep = 1.0 if all_log_keep is None else all_log_keep[:, t, None, None].exp()
        dual = tuple(keep * a - theta * u for a, u in zip(dual, grads, strict=True))
        if query is not None and read == "after_write":
            outputs.append(_read(network, dual, query))
    total = all_keys.shape[1]
    rest = total % chunk_size
    if total and not rest:
        start, start_dual = _project(retention, dual, initial), dual
    out = torch.cat(outputs, 1) if outputs else queries.new_zeros(*queries.shape[:2], values.shape[-1])
    pending = tuple(None if x is None else x[:, total - rest :] for x in every)
    return out, ReferenceState(start, start_dual, *pending)


def final_weights(network: MemoryNetwork, objective: Any, retention: Any, state: ReferenceState,
                  *, chunk_size: int) -> tuple[Tensor, ...]:
    """The weights after every token ``state`` has seen, its unfinished chunk projected as if it
    ended there (what ``read_state`` gives)."""
    if state.keys.shape[1] == 0:
        return state.weights
    n = state.keys.shape[0]
    none = state.keys.new_zeros(n, 0, state.keys.shape[-1])
    _, end = rule_reference(network, objective, retention, none, none, state.values[:, :0],
                            state.lr[:, :0], None if state.log_keep is None else state.log_keep[:, :0],
                            None if state.side is None else state.side[:, :0],
                            chunk_size=state.keys.shape[1], state=state)
    return end.weights


def _read(network: MemoryNetwork, weights: Sequence[Tensor], query: Tensor) -> Tensor:
    """``M_W(q)`` with plain matmuls."""
    return network.forward(query, lambda i, h: h @ weights[i])[0]


def _gradient(network: MemoryNetwork, objective: Any, weights: Sequence[Tensor], key: Tensor,
              value: Tensor, side: Tensor | None) -> tuple[Tensor, ...]:
    """``grad_W loss(M_W(k), v; side)`` per sequence, by autograd (differentiable itself)."""
    with torch.enable_grad():
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        prediction = network.forward(key, lambda i, h: h @ leaves[i])[0]
        # Sequences are independent: the sum's gradient is every sequence's own.
        loss = objective.loss(prediction, value, side).sum()
        return torch.autograd.grad(loss, leaves, create_graph=True)


def _heads_first(gate: Tensor) -> Tensor:
    """``[B, T, H] -> [B * H, T]``, sequence-major and head-minor like the kernels."""
    return gate.permute(0, 2, 1).flatten(0, 1)


class LayerReferenceState(NamedTuple):
    """Where :func:`layer_reference` stopped: the rule's state and the projection's cache."""

    rule: ReferenceState
    projection: Any


_READS = {"at_chunk_start": "chunk_start", "before_write": "before_write", "after_write": "after_write"}


def layer_reference(layer: Any, x: Tensor, state: Any = None) -> tuple[Tensor, LayerReferenceState]:
    """A MIRAS memory layer (``FastWeightMemoryLayer``) on ``x`` ``[B, T, D]``, token by token:
    its own projection and gates, :func:`rule_reference` with its own parts, then its output stage
    (per-head RMS norm, SiLU gate from ``x``, output projection). The conformance kit's
    ``reference``.

    ``state`` is ``None``, a :class:`LayerReferenceState`, or the layer's own state (the
    executor's chunk-start weights, its unprojected state ``dual`` where it keeps one, the pending
    tokens of the unfinished chunk, and the projection's cache).
    """
    if state is None or isinstance(state, LayerReferenceState):
        rule_state, cache = (None, None) if state is None else state
    else:
        fast, pending = state.fast, state.fast.pending
        rule_state = ReferenceState(tuple(fast.weights), tuple(getattr(fast, "dual", ()) or fast.weights),
                                    pending.keys, pending.values, pending.lr, pending.log_keep,
                                    pending.side)
        cache = state.projection
    q, k, v, cache = layer.projection(x, cache)
    log_keep, side = layer.retention(x), layer.objective(x).side
    reads = getattr(type(layer.retrieval), "reads", ("at_chunk_start",))
    read, rule_state = rule_reference(
        layer.memory, layer.objective, layer.retention, *(t.flatten(0, 1) for t in (q, k, v)),
        _heads_first(layer.optimizer(x).lr), None if log_keep is None else _heads_first(log_keep),
        None if side is None else _heads_first(side), chunk_size=layer.chunk_size,
        read=_READS[reads[0]], state=rule_state)
    return layer.output(read.to(x.dtype), x), LayerReferenceState(rule_state, cache)
