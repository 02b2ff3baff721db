"""What the fast-weight memory layer records while inspected (docs/inspect.md).

Per token ``t`` and head, for the ``T`` tokens of one ``forward`` call:

* ``step_size``, ``momentum``: the gates ``theta_t``, ``eta_t`` exactly as the executor received
  them (the same tensors; a gate that is off is not recorded).
* ``decay``: the fraction of the memory forgotten at the token, ``1 - exp(log_keep_t)`` (Titans'
  ``alpha_t``), from the retention's log-decay (not recorded without decay).
* ``surprise``: ``||u_t||_F``, the norm of the token's gradient of the inner loss at the
  chunk-start weights ``M_{t'}`` (docs/memory.md, "The exact chunk kernel"). Over every matrix
  of the memory network: ``sqrt(sum_i ||x_i||^2 ||g_i||^2)``, since each ``u_t`` is an outer
  product ``x_i^T g_i``.
* ``state_norm``: ``||M_t||_F`` over every matrix, the exact per-token weights after token ``t``
  has written (not the chunk-start weights a chunk-start read uses).
* ``read_output``: the head's share of the layer's output, ``[B, H, T, D]`` (its slice of the
  output projection applied to its normalised, gated read; the shares sum to the output).

Surprise and state norms are not kept by the executor, so they are replayed after the layer's own
result, without gradients, from detached copies of its inputs: the same executor fed one token
at a time with the state carried, which equals feeding the whole call (the executors' split
invariant). The replay is ``O(T * chunk_size)`` work per call: meant for inspection, never for
training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.engine.chunk_reads import surprise_pairs
from memforge.interfaces import MemoryRecorder

if TYPE_CHECKING:
    from memforge.engine.executors import RuleInputs
    from memforge.engine.layer import FastWeightMemoryLayer

#: The series the fast-weight memory layer emits (memforge.interfaces.INSPECT_SERIES).
SERIES: tuple[str, ...] = ("surprise", "step_size", "momentum", "decay", "state_norm",
                           "read_output")


def record_forward(layer: FastWeightMemoryLayer, recorder: MemoryRecorder, x: Tensor, fast: Any,
                   inputs: RuleInputs, read: Tensor) -> None:
    """Record one ``forward`` call of ``layer``: ``x`` ``[B, T, D]`` its input, ``fast`` the
    executor state it started from, ``inputs`` the rule inputs of the call (``[B * H, T, ...]``)
    and ``read`` ``[B * H, T, d]`` its raw reads."""
    batch = x.shape[0]

    def per_head(t: Tensor) -> Tensor:
        return t.detach().unflatten(0, (batch, layer.heads))

    with torch.no_grad():
        if inputs.lr is not None:
            recorder.record("step_size", per_head(inputs.lr))
        if inputs.momentum is not None:
            recorder.record("momentum", per_head(inputs.momentum))
        if inputs.log_keep is not None:
            recorder.record("decay", per_head(-torch.expm1(inputs.log_keep)))
        surprise, norms = _replay(layer, _detached(fast), _detached(inputs))
        recorder.record("surprise", per_head(surprise))
        recorder.record("state_norm", per_head(norms))
        recorder.record("read_output", head_shares(layer, read.detach(), x.detach()))


def head_shares(layer: FastWeightMemoryLayer, read: Tensor, x: Tensor) -> Tensor:
    """Each head's share of the layer output, ``[B, H, T, D]``; summed over heads it is the output
    (the output projection is linear in the heads' normalised, gated reads)."""
    batch = x.shape[0]
    normed = layer.out_norm(read.unflatten(0, (batch, layer.heads)))             # [B, H, T, d]
    gate = F.silu(layer.out_gate(x)).unflatten(-1, (layer.heads, layer.head_dim))  # [B, T, H, d]
    weight = layer.out_proj.weight.unflatten(1, (layer.heads, layer.head_dim))     # [D, H, d]
    return torch.einsum("bhtd,bthd,ehd->bhte", normed, gate, weight)


def _replay(layer: FastWeightMemoryLayer, fast: Any, inputs: RuleInputs) -> tuple[Tensor, Tensor]:
    """Per-token surprise norms and post-write weight norms ``[B * H, T]`` (see module docstring)."""
    executor, rule = layer.executor, layer.rule
    surprise, norms = [], []
    for t in range(inputs.keys.shape[1]):
        one = type(inputs)(*(None if f is None else f[:, t : t + 1] for f in inputs))
        # fast.weights are always the chunk-start weights: the ones the gradient is taken at.
        pairs = surprise_pairs(layer.memory, layer.objective, fast.weights, one.keys, one.values,
                                one.side)
        surprise.append(sum(x.square().sum(-1) * g.square().sum(-1) for x, g in pairs).sqrt())
        _, fast = executor.scan(rule, fast, one)
        weights = executor.current_weights(rule, fast)
        norms.append(sum(w.square().sum((-2, -1)) for w in weights).sqrt()[:, None])
    return torch.cat(surprise, 1), torch.cat(norms, 1)


def _detached(tree: Any) -> Any:
    """``tree`` (tensors, tuples/NamedTuples of them, ``None``, plain values) with every tensor
    detached: the replay must not reach the model's graph."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, tuple):
        leaves = [_detached(leaf) for leaf in tree]
        return type(tree)(*leaves) if hasattr(tree, "_fields") else tuple(leaves)
    return tree
