"""A slow float64 reference of mini-batch TTT, token by token from the paper's equations.

Written from TTT (Sun et al. 2024, arXiv 2407.04620, §2 and its "dual form") and not from the
engine: the network is spelled out here with plain tensor arithmetic (its own GELU and layer
norm), each token's gradient is one ``torch.autograd.grad`` call, and the weights of every token
are materialised. Per sequence and head, with the mini-batch (chunk) of ``b`` tokens starting at
``t'`` (multiples of ``b`` from the sequence start)::

    f(x; W) = x + LN(x W + b)                        (TTT-Linear)
            = x + LN(GELU(x W1 + b1) W2 + b2)        (TTT-MLP; LN affine per head)
    g_s     = grad_W 0.5 * ||f(k_s; W_{t'}) - v_s||^2    (every gradient at the mini-batch start)
    W_t     = W_{t'} - sum_{s = t'}^{t} eta_s g_s         (the dual form's per-token weights)
    z_t     = f(q_t; W_t)                                 (read after the token's own step)

and the next mini-batch starts from ``W`` after its last token. Outer gradients flow through
every step (``create_graph``), so the reference also checks the kernel's gradients. It costs one
autograd call per token: keep sequences to a few dozen tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class ReferenceState(NamedTuple):
    """Where a reference run stopped.

    Attributes:
        weights: the fast weights at the start of the current mini-batch, ``[N, d_in, d_out]`` each.
        keys: the current mini-batch's tokens so far ``[N, r, d]`` (``r < b``), and
        values: their values ``[N, r, d]``, and
        steps: their steps ``eta`` ``[N, r]``.
    """

    weights: tuple[Tensor, ...]
    keys: Tensor
    values: Tensor
    steps: Tensor


def _gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (TTT's code)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _norm(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """Layer norm of rows ``z`` ``[N, d]`` with per-row affine ``gamma``, ``beta`` ``[N, d]``."""
    centred = z - z.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + eps) * gamma + beta


def _apply(x: Tensor, weights: tuple[Tensor, ...], gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """``f(x; W)`` for one token per row: ``x`` ``[N, d]``, TTT-Linear (2 weights) or TTT-MLP (4)."""
    def affine(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("ni,nio->no", h, w) + b[:, 0]

    if len(weights) == 2:
        z = affine(x, *weights)
    else:
        z = affine(_gelu_tanh(affine(x, weights[0], weights[1])), weights[2], weights[3])
    return x + _norm(z, gamma, beta, eps)


def start_state(network: nn.Module, batch: int) -> ReferenceState:
    """The state before any token: the network's initial weights for ``batch`` sequences."""
    weights = tuple(w.to(torch.float64).repeat(batch, 1, 1) for w in network.initial_weights())
    n, d = weights[0].shape[0], weights[0].shape[1]
    empty = weights[0].new_zeros(n, 0, d)
    return ReferenceState(weights, empty, empty, weights[0].new_zeros(n, 0))


def ttt_reference(network: nn.Module, queries: Tensor, keys: Tensor, values: Tensor, steps: Tensor,
                  *, chunk_size: int, state: ReferenceState | None = None
                  ) -> tuple[Tensor, ReferenceState]:
    """Mini-batch TTT over ``T`` tokens, one at a time, in float64.

    Args:
        network: a :class:`~memforge_ttt.networks.TTTLinear` or
            :class:`~memforge_ttt.networks.TTTMLP` (its initial weights, norm and epsilon are read).
        queries, keys, values: ``[N, T, d]`` with ``N = B * H`` sequence-major, head-minor.
        steps: ``eta`` ``[N, T]``.
        chunk_size: the mini-batch size ``b``.
        state: where a previous call stopped (``None``: the start of the sequences).

    Returns:
        ``(outputs [N, T, d], state)``.
    """
    n = keys.shape[0]
    heads = network.norm_weight.shape[0]
    gamma = network.norm_weight.to(torch.float64).repeat(n // heads, 1)
    beta = network.norm_bias.to(torch.float64).repeat(n // heads, 1)
    eps = network.norm_eps
    state = state if state is not None else start_state(network, n // heads)
    graph = torch.is_grad_enabled()

    def gradient(start: tuple[Tensor, ...], k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        """Per-row gradient of ``0.5 ||f(k; W) - v||^2`` at the mini-batch-start weights."""
        with torch.enable_grad():
            at = start if graph else tuple(w.detach().requires_grad_(True) for w in start)
            loss = 0.5 * (_apply(k, at, gamma, beta, eps) - v).square().sum()
            grads = torch.autograd.grad(loss, at, create_graph=graph)
        return grads if graph else tuple(g.detach() for g in grads)

    start = state.weights
    all_keys = torch.cat((state.keys, keys.to(torch.float64)), 1)
    all_values = torch.cat((state.values, values.to(torch.float64)), 1)
    all_steps = torch.cat((state.steps, steps.to(torch.float64)), 1)
    queries = queries.to(torch.float64)
    done = state.keys.shape[1]
    current = start
    outputs = []
    for t in range(all_keys.shape[1]):
        if t and t % chunk_size == 0:  # the pending tokens start at a mini-batch start
            start = current  # a new mini-batch starts from the weights after the last one
        grads = gradient(start, all_keys[:, t], all_values[:, t])
        eta = all_steps[:, t, None, None]
        current = tuple(w - eta * g for w, g in zip(current, grads, strict=True))
        if t >= done:
            outputs.append(_apply(queries[:, t - done], current, gamma, beta, eps))
    total = all_keys.shape[1]
    rest = total % chunk_size
    if total and not rest:
        start = current
    out = torch.stack(outputs, 1) if outputs else queries.new_zeros(n, 0, values.shape[-1])
    keep = slice(total - rest, total)
    return out, ReferenceState(start, all_keys[:, keep], all_values[:, keep], all_steps[:, keep])


class LayerReferenceState(NamedTuple):
    """Where :func:`ttt_layer_reference` stopped: the rule's state and the projection's cache."""

    rule: ReferenceState
    projection: object


def ttt_layer_reference(layer: nn.Module, x: Tensor, state: object | None
                        ) -> tuple[Tensor, LayerReferenceState]:
    """The whole ``ttt.layer`` with :func:`ttt_reference` in place of the engine's executor: the
    layer's own projection, step and output stage around the token loop (the conformance kit's
    ``reference=``).

    ``state`` is ``None``, the layer's own state (the engine's: chunk-start weights plus the
    pending tokens of the unfinished mini-batch, and the projection's cache) or a
    :class:`LayerReferenceState` from an earlier call.
    """
    if state is None:
        rule_state, cache = None, None
    elif isinstance(state, LayerReferenceState):
        rule_state, cache = state
    else:
        pending = state.fast.pending
        rule_state = ReferenceState(tuple(state.fast.weights), pending.keys, pending.values,
                                    pending.lr)
        cache = state.projection
    q, k, v, cache = layer.projection(x, cache)
    steps = layer.optimizer(x).lr.permute(0, 2, 1).flatten(0, 1)  # [B, T, H] -> [B * H, T]
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    read, rule_state = ttt_reference(layer.memory, *flat, steps, chunk_size=layer.chunk_size,
                                     state=rule_state)
    return layer.output(read.to(x.dtype), x), LayerReferenceState(rule_state, cache)
