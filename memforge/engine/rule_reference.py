"""The slow reference for any learning rule: a float64 token loop written from the semantics
(docs/memory.md, "The sequential executor"), the oracle of every executor's fast path.

For token ``t`` of the chunk that starts at ``t'`` (chunks ``[0, b), [b, 2b), ...``)::

    G_t = W_{t'}                      (keep_t * W_{t-1} with decay_before_gradient, b = 1)
    u_t = grad_G sum_{i=max(0, t-c+1)}^{t} gamma_i * loss(M_G(k_i), v_i; side_i)
    S_t = eta_t S_{t-1} + theta_t u_t (theta_t u_t without momentum)
    W_t = keep_t W_{t-1} - transform(S_t)     (a "token" transform; identity otherwise)
    W_t = project(W_t, W_0)                   (a "token" projection)

and, when token ``t`` ends its chunk (or the sequence), with ``K`` the chunk's product of
``keep``: ``W_t = K W_{t'} - transform(K W_{t'} - W_t)`` for a ``"chunk_end"`` transform, then
``W_t = project(W_t, W_0)`` for a ``"chunk_end"`` projection. Query ``t`` reads ``W_{t'}``,
``W_{t-1}`` or ``W_t`` through the rule's retrieval (a ``"chunk_end"`` part allows ``W_{t'}``
only).

A *mirror* projection (``mirror = True``) maps a dual state ``D`` instead: ``D_0`` is the start
passed in (for a layer, the network's initial weights, which hold the dual's start), the steps
and the chunk-end transform above move ``D`` (``D_t = keep_t D_{t-1} - transform(S_t)``), and
the weights are ``project(D, D_0)``: from the start, after every token (``"token"``) or at chunk
ends (``"chunk_end"``).

Every ``u_t`` is ``torch.autograd.grad`` of the summed loss through ``network.forward`` with
plain matmuls and ``create_graph=True``: nothing is shared with an executor's batched pairs,
closed-form coefficients or a network's hand-written backward, and outer gradients flow through
it. One autograd call per token: keep ``T`` to a few dozen, and pass float64 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from memforge.interfaces import MemoryNetwork, ProjectsWeights, TransformsUpdate

if TYPE_CHECKING:
    from memforge.engine.executors import LearningRule, RuleInputs


class RuleReferenceResult(NamedTuple):
    """What :func:`rule_reference` returns.

    Attributes:
        outputs: the read-out of every query, ``[N, T, d_value]``.
        weights: the weights after the last token, one ``[N, d_in, d_out]`` per matrix (an
            unfinished last chunk counts as ending there: its ``"chunk_end"`` parts applied).
        momentum: ``S_T``, same shapes (zeros without momentum).
    """

    outputs: Tensor
    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]


def rule_reference(rule: LearningRule, weights: Sequence[Tensor], inputs: RuleInputs
                   ) -> RuleReferenceResult:
    """Run ``rule`` over ``inputs`` from the weights ``weights`` (``[N, d_in, d_out]`` each, e.g.
    an executor's initial state's), one token at a time; see the module docstring."""
    network, objective, size = rule.network, rule.objective, rule.chunk_size
    optimizer, retention = rule.optimizer, rule.retention
    transform_at = optimizer.applies_at if isinstance(optimizer, TransformsUpdate) else None
    project_at = retention.applies_at if isinstance(retention, ProjectsWeights) else None
    window = int(getattr(objective, "window", 1))
    decay_first = bool(getattr(retention, "decay_before_gradient", False))
    mirror = project_at is not None and bool(getattr(retention, "mirror", False))
    if decay_first and size != 1:
        raise ValueError("decay_before_gradient is defined here at chunk_size 1 only")
    queries, keys, values, lr, momentum, log_keep, side, gamma = inputs
    steps = keys.shape[1]
    initial = tuple(weights)
    # `memory` is W, what gradients and reads use; `moved` is what the steps move (D or W).
    moved = initial
    memory = tuple(retention.project(initial, initial)) if mirror else initial
    moments = tuple(torch.zeros_like(w) for w in initial)
    start = moved_start = memory
    outputs = []
    for t in range(steps):
        if t % size == 0:
            start, moved_start = memory, moved
        keep = None if log_keep is None else log_keep[:, t, None, None].exp()
        at = tuple(keep * w for w in memory) if decay_first and keep is not None else start
        first = max(0, t - window + 1)
        grads = _gradient(network, objective, at, keys[:, first : t + 1], values[:, first : t + 1],
                          None if side is None else side[:, first : t + 1],
                          None if gamma is None else gamma[:, first : t + 1])
        theta = lr[:, t, None, None]
        if momentum is None:
            moments = tuple(theta * u for u in grads)
        else:
            eta = momentum[:, t, None, None]
            moments = tuple(eta * s + theta * u for s, u in zip(moments, grads, strict=True))
        applied = moments
        if transform_at == "token":
            applied = tuple(optimizer.transform(s) for s in moments)
        previous = memory
        kept = moved if keep is None else tuple(keep * w for w in moved)
        moved = memory = tuple(w - d for w, d in zip(kept, applied, strict=True))
        if project_at == "token":
            memory = tuple(retention.project(moved, initial))
            moved = moved if mirror else memory
        reader = _TokenReader(network, start, previous, memory,
                              exact="chunk_end" not in (transform_at, project_at))
        outputs.append(rule.retrieval(reader, queries[:, t : t + 1]))
        if t % size == size - 1 or t == steps - 1:
            if transform_at == "chunk_end":
                kept = moved_start
                if log_keep is not None:
                    product = log_keep[:, t - t % size : t + 1].exp().prod(1)[:, None, None]
                    kept = tuple(product * w for w in moved_start)
                moved = memory = tuple(k - optimizer.transform(k - w)
                                       for k, w in zip(kept, moved, strict=True))
            if mirror or project_at == "chunk_end":
                memory = tuple(retention.project(moved, initial))
                moved = moved if mirror else memory
    out = torch.cat(outputs, 1) if outputs else queries.new_zeros(keys.shape[0], 0, values.shape[2])
    return RuleReferenceResult(out, memory, moments)


def _gradient(network: MemoryNetwork, objective: object, weights: tuple[Tensor, ...], keys: Tensor,
              values: Tensor, side: Tensor | None, gamma: Tensor | None) -> tuple[Tensor, ...]:
    """``grad_W sum_i gamma_i loss(M_W(k_i), v_i; side_i)`` per sequence, by autograd."""
    with torch.enable_grad():
        # Weights that need no outer gradient still need one here: take a fresh leaf.
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        prediction = network.forward(keys, lambda i, h: h @ leaves[i])[0]
        losses = objective.loss(prediction, values, side)
        if gamma is not None:
            losses = losses * gamma
        # Sequences are independent, so the sum's gradient is every sequence's own gradient.
        return torch.autograd.grad(losses.sum(), leaves, create_graph=True)


class _TokenReader:
    """A one-token :class:`memforge.interfaces.ChunkReader`: the chunk-start weights, those
    before the token's write and those after it."""

    def __init__(self, network: MemoryNetwork, start: tuple[Tensor, ...],
                 before: tuple[Tensor, ...], after: tuple[Tensor, ...], *, exact: bool) -> None:
        self._network, self._start, self._before, self._after = network, start, before, after
        self._exact = exact

    def _read(self, weights: tuple[Tensor, ...], query: Tensor) -> Tensor:
        return self._network.forward(query, lambda i, h: h @ weights[i])[0]

    def at_chunk_start(self, queries: Tensor) -> Tensor:
        """The query read with the chunk-start weights."""
        return self._read(self._start, queries)

    def before_write(self, queries: Tensor) -> Tensor:
        """The query read with the weights before the token's write."""
        self._check()
        return self._read(self._before, queries)

    def after_write(self, queries: Tensor) -> Tensor:
        """The query read with the weights after the token's write."""
        self._check()
        return self._read(self._after, queries)

    def _check(self) -> None:
        if not self._exact:
            raise ValueError("a rule with a chunk_end transform or projection reads at the chunk "
                             "start only")
