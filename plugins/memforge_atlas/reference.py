"""A float64 token loop of the ATLAS rules, written from their equations (docs/zoo.md, "ATLAS").

The chunk-start tier, token by token. Chunks are ``[0, b), [b, 2b), ...`` from the sequence start;
``W0`` is the weights at the start of token ``t``'s chunk::

    u_t = sum_{i = max(0, t - c + 1)}^{t} gamma_i * grad_W loss(M_{W0}(k_i), v_i)
    S_t = eta_t * S_{t-1} + theta_t * u_t          (S_t = theta_t * u_t without momentum)
    W_t = keep_t * W_{t-1} - transform(S_t)        (transform: Muon's, else the identity)

and query ``t`` reads ``W0``, ``W_{t-1}`` or ``W_t`` as the retrieval rule asks. Every gradient is
``torch.autograd.grad`` of the objective's ``loss`` through the network's ``forward`` with plain
matmuls (never its ``backward`` or ``loss_grad``), one call per token, with ``create_graph`` so
outer gradients flow; nothing is shared with an executor. At chunk size 1 this is the token-exact
recurrence. A call may start from where another stopped (:class:`RuleState`: the chunk-start
weights and momentum, the unfinished chunk's tokens, the window's pairs from before it), or from
the engine's own carried state, so a sequence split anywhere is checked too. It does not validate
its inputs; keep ``T`` to a few dozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge_atlas.newton_schulz import COEFFICIENTS, EPS
from memforge_atlas.rules import Muon

DT = torch.float64


class _Reader:
    """The three reads of one token (a :class:`memforge.interfaces.ChunkReader` for one query)."""

    def __init__(self, network: Any, start: Sequence[Tensor], before: Sequence[Tensor],
                 after: Sequence[Tensor]) -> None:
        self._network, self._weights = network, {"start": start, "before": before, "after": after}

    def _read(self, which: str, queries: Tensor) -> Tensor:
        weights = self._weights[which]
        return self._network.forward(queries, lambda i, h: h @ weights[i])[0]

    def at_chunk_start(self, queries: Tensor) -> Tensor:
        return self._read("start", queries)

    def before_write(self, queries: Tensor) -> Tensor:
        return self._read("before", queries)

    def after_write(self, queries: Tensor) -> Tensor:
        return self._read("after", queries)


def _gradient(network: Any, objective: Any, weights: Sequence[Tensor], keys: Tensor,
              values: Tensor, gamma: Tensor) -> tuple[Tensor, ...]:
    """``grad_W sum_i gamma_i loss(M_W(k_i), v_i)`` per sequence (``keys`` ``[N, c, d]``)."""
    with torch.enable_grad():
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        prediction = network.forward(keys, lambda i, h: h @ leaves[i])[0]
        # Sequences are independent: the sum's gradient is each sequence's own.
        loss = (gamma * objective.loss(prediction, values, None)).sum()
        return torch.autograd.grad(loss, leaves, create_graph=True)


class Tokens(NamedTuple):
    """Per-token rule inputs ``[N, r, d]`` / ``[N, r]`` (``None``: the input is off)."""

    keys: Tensor
    values: Tensor
    lr: Tensor | None
    momentum: Tensor | None
    log_keep: Tensor | None
    gamma: Tensor | None


class RuleState(NamedTuple):
    """Where :func:`rule_reference` stopped.

    Attributes:
        weights: ``W`` at the start of the current chunk, ``[N, d_in, d_out]`` per matrix.
        momentum: ``S`` at the start of the current chunk (zeros without momentum).
        pending: the current chunk's tokens so far.
        history: the ``min(c - 1, seen)`` pairs before the current chunk (``lr``, ``momentum``
            and ``log_keep`` unused).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: Tokens
    history: Tokens


def start_state(network: Any, batch: int, like: Tokens) -> RuleState:
    """The state before any token: the network's initial weights for ``batch`` sequences;
    ``like`` says which optional inputs are on."""
    weights = tuple(w.to(DT).repeat(batch, 1, 1) for w in network.initial_weights())
    return RuleState(weights, tuple(torch.zeros_like(w) for w in weights),
                     _empty(weights[0], like), _empty(weights[0], like))


def _empty(w: Tensor, like: Tokens) -> Tokens:
    n = w.shape[0]
    rows = [w.new_zeros(n, 0, like.keys.shape[-1]), w.new_zeros(n, 0, like.values.shape[-1])]
    return Tokens(*rows, *(None if g is None else w.new_zeros(n, 0) for g in like[2:]))


def _join(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    return None if second is None else torch.cat((first.to(DT), second.to(DT)), 1)


def rule_reference(network: Any, objective: Any, retrieval: Any,
                   transform: Callable[[Tensor], Tensor] | None, state: RuleState,
                   queries: Tensor, tokens: Tokens, *, window: int, chunk_size: int
                   ) -> tuple[Tensor, RuleState]:
    """Reads ``[N, T, d_value]`` of ``queries`` ``[N, T, d_key]`` while ``tokens`` write, from
    ``state`` (:func:`start_state` at the start of the sequences); returns the new state."""
    history, pending = state.history, state.pending
    lag, done, steps = history.keys.shape[1], pending.keys.shape[1], tokens.keys.shape[1]
    keys = torch.cat((history.keys, pending.keys, tokens.keys), 1).to(DT)
    values = torch.cat((history.values, pending.values, tokens.values), 1).to(DT)
    gamma = _join(_join(history.gamma, pending.gamma), tokens.gamma)
    stream = Tokens(*(_join(old, new) if new is not None else None
                      for old, new in zip(pending, tokens, strict=True)))
    start, start_moments = list(state.weights), list(state.momentum)
    memory, moments = start, start_moments
    outputs = []
    for j in range(done + steps):
        if j and j % chunk_size == 0:
            start, start_moments = memory, moments
        at = lag + j
        first = max(0, at - window + 1)
        weight = torch.ones_like(keys[:, first:at + 1, 0]) if gamma is None else gamma[:, first:at + 1]
        grads = _gradient(network, objective, start, keys[:, first:at + 1],
                          values[:, first:at + 1], weight)
        theta = stream.lr[:, j, None, None]
        if stream.momentum is None:
            moments = [theta * u for u in grads]
        else:
            eta = stream.momentum[:, j, None, None]
            moments = [eta * s + theta * u for s, u in zip(moments, grads, strict=True)]
        steps_taken = [transform(s) if transform is not None else s for s in moments]
        keep = 1.0 if stream.log_keep is None else stream.log_keep[:, j, None, None].exp()
        before = memory
        memory = [keep * w - d for w, d in zip(memory, steps_taken, strict=True)]
        if j >= done:
            outputs.append(retrieval(_Reader(network, start, before, memory),
                                     queries[:, j - done:j - done + 1].to(DT)))
    total = done + steps
    rest = total % chunk_size
    if rest == 0:
        start, start_moments = memory, moments
    begin = lag + total - rest                     # stream index of the current chunk's start
    keep_from = max(0, begin - (window - 1))
    new_history = Tokens(keys[:, keep_from:begin], values[:, keep_from:begin], None, None, None,
                         None if gamma is None else gamma[:, keep_from:begin])
    new_pending = Tokens(keys[:, begin:], values[:, begin:],
                         *(None if g is None else g[:, total - rest:] for g in stream[2:5]),
                         None if gamma is None else gamma[:, begin:])
    out = torch.cat(outputs, 1) if outputs else queries.new_zeros(*queries.shape[:2], values.shape[-1])
    return out, RuleState(tuple(start), tuple(start_moments), new_pending, new_history)


def newton_schulz_iterated(update: Tensor, steps: int) -> Tensor:
    """Muon's Newton-Schulz as its equations run it: ``X <- a X + (b A + c A^2) X`` with
    ``A = X X^T`` recomputed from ``X`` at every step, on the wide orientation, from
    ``X_0 = G / (||G|| + eps)`` (the fast path iterates on ``A`` instead)."""
    x = update / (update.norm(dim=(-2, -1), keepdim=True) + EPS)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def _transform(optimizer: Any) -> Callable[[Tensor], Tensor] | None:
    """The reference's update transform: :class:`Muon`'s from :func:`newton_schulz_iterated`,
    else the optimiser's own (``None`` without one)."""
    if isinstance(optimizer, Muon):
        return lambda s: optimizer.scale * newton_schulz_iterated(s, optimizer.steps)
    return getattr(optimizer, "transform", None)


def _heads_first(gate: Tensor | None) -> Tensor | None:
    """``[B, T, H] -> [B * H, T]`` (sequence-major, head-minor), in float64."""
    return None if gate is None else gate.permute(0, 2, 1).flatten(0, 1).to(DT)


class LayerState(NamedTuple):
    """Where :func:`layer_reference` stopped: the rule's state and the projection's cache."""

    rule: RuleState
    projection: Any


def _from_engine(fast: Any, like: Tokens) -> RuleState:
    """The engine's executor state (the closed form's or the sequential one's) as a
    :class:`RuleState`: the same chunk-start weights, momentum, pending tokens and window pairs."""
    pending = fast.pending
    weights = tuple(w.to(DT) for w in fast.weights)
    moments = tuple(s.to(DT) for s in fast.momentum) or tuple(torch.zeros_like(w) for w in weights)
    gamma = getattr(pending, "window", None)
    rows = Tokens(pending.keys, pending.values, pending.lr, pending.momentum, pending.log_keep,
                  gamma)
    history = getattr(fast, "history", None)
    past = (_empty(weights[0], like) if history is None
            else Tokens(history.keys, history.values, None, None, None, history.window))
    return RuleState(weights, moments, rows, past)


def layer_reference(layer: nn.Module, x: Tensor, state: Any = None) -> tuple[Tensor, LayerState]:
    """``layer(x, state)`` token by token in float64: the parts' per-token maps (projection,
    gates), :func:`rule_reference`, then the output norm, gate and projection written out.

    ``layer`` is an atlas memory layer (the engine's fast-weight layer); ``state`` is ``None``,
    the layer's own state, or a :class:`LayerState` from an earlier call (the conformance kit's
    ``reference=``).
    """
    x = x.to(DT)
    batch, steps, dim = x.shape
    cache = None if state is None else state.projection
    q, k, v, cache = layer.projection(x, cache)
    gates, inputs = layer.optimizer(x), layer.objective(x)
    tokens = Tokens(k.flatten(0, 1).to(DT), v.flatten(0, 1).to(DT), _heads_first(gates.lr),
                    _heads_first(gates.momentum), _heads_first(layer.retention(x)),
                    _heads_first(inputs.window))
    if state is None:
        rule_state = start_state(layer.memory, batch, tokens)
    elif isinstance(state, LayerState):
        rule_state = state.rule
    else:
        rule_state = _from_engine(state.fast, tokens)
    read, rule_state = rule_reference(
        layer.memory, layer.objective, layer.retrieval, _transform(layer.optimizer),
        rule_state, q.flatten(0, 1).to(DT), tokens,
        window=int(getattr(layer.objective, "window", 1)), chunk_size=layer.chunk_size)
    o = read.unflatten(0, (batch, layer.heads))                              # [B, H, T, d]
    norm = layer.out_norm
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + (norm.eps or torch.finfo(DT).eps))
    o = (o * norm.weight.to(DT)).transpose(1, 2).reshape(batch, steps, dim)
    gate = x @ layer.out_gate.weight.to(DT).T
    y = (o * F.silu(gate)) @ layer.out_proj.weight.to(DT).T
    return y, LayerState(rule_state, cache)
