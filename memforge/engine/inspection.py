"""What the Titans memory layer records while inspected (docs/inspect.md).

Per token ``t`` and head, for the ``T`` tokens of one ``forward`` call:

* ``step_size``, ``momentum``, ``decay``: the gates ``theta_t``, ``eta_t``, ``alpha_t`` exactly as
  the kernel received them (the same tensors; a gate that is off is not recorded).
* ``surprise``: ``||u_t||_F``, the norm of the token's gradient of the inner loss at the weights the
  kernel took it at, the chunk-start weights ``M_{t'}`` (docs/memory.md, "The exact chunk kernel").
  Over every matrix of the memory network: ``sqrt(sum_i ||x_i||^2 ||g_i||^2)``, since each
  ``u_t`` is an outer product ``x_i^T g_i``.
* ``state_norm``: ``||M_t||_F`` over every matrix, the exact per-token weights after token ``t``
  has written (not the chunk-start weights a chunk-start read uses).
* ``read_output``: the head's share of the layer's output, ``[B, H, T, D]`` (its slice of the
  output projection applied to its normalised, gated read; the shares sum to the output).

Surprise and state norms are not kept by the kernel, so they are replayed after the layer's own
result, without gradients, from detached copies of its inputs: the same kernel fed one token at a
time with the state carried, which equals feeding the whole call (the kernel's split invariant).
The replay is ``O(T * chunk_size)`` work per call: meant for inspection, never for training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.engine.chunked import (
    FastWeightState,
    PendingChunk,
    _surprise_pairs,
    current_weights,
    memory_scan,
)
from memforge.interfaces import MemoryRecorder

if TYPE_CHECKING:
    from memforge.engine.layer import NeuralMemoryLayer

#: The series the Titans layer emits (memforge.interfaces.INSPECT_SERIES).
SERIES: tuple[str, ...] = ("surprise", "step_size", "momentum", "decay", "state_norm",
                           "read_output")


def record_forward(layer: NeuralMemoryLayer, recorder: MemoryRecorder, x: Tensor,
                   fast: FastWeightState, flat: list[Tensor],
                   gates: tuple[Tensor, Tensor | None, Tensor | None], read: Tensor) -> None:
    """Record one ``forward`` call of ``layer``: ``x`` ``[B, T, D]`` its input, ``fast`` the state
    it started from, ``flat`` its ``q, k, v`` ``[B * H, T, d]``, ``gates`` its ``theta, eta,
    alpha`` ``[B * H, T]`` and ``read`` ``[B * H, T, d]`` its raw reads."""
    batch = x.shape[0]

    def per_head(t: Tensor) -> Tensor:
        return t.detach().unflatten(0, (batch, layer.heads))

    with torch.no_grad():
        for name, gate in zip(("step_size", "momentum", "decay"), gates, strict=True):
            if gate is not None:
                recorder.record(name, per_head(gate))
        q, k, v = (t.detach() for t in flat)
        surprise, norms = _replay(layer, _detached(fast), q, k, v,
                                  *(None if g is None else g.detach() for g in gates))
        recorder.record("surprise", per_head(surprise))
        recorder.record("state_norm", per_head(norms))
        recorder.record("read_output", head_shares(layer, read.detach(), x.detach()))


def head_shares(layer: NeuralMemoryLayer, read: Tensor, x: Tensor) -> Tensor:
    """Each head's share of the layer output, ``[B, H, T, D]``; summed over heads it is the output
    (the output projection is linear in the heads' normalised, gated reads)."""
    batch = x.shape[0]
    normed = layer.out_norm(read.unflatten(0, (batch, layer.heads)))             # [B, H, T, d]
    gate = F.silu(layer.out_gate(x)).unflatten(-1, (layer.heads, layer.head_dim))  # [B, T, H, d]
    weight = layer.out_proj.weight.unflatten(1, (layer.heads, layer.head_dim))     # [D, H, d]
    return torch.einsum("bhtd,bthd,ehd->bhte", normed, gate, weight)


def _replay(layer: NeuralMemoryLayer, fast: FastWeightState, q: Tensor, k: Tensor, v: Tensor,
            lr: Tensor, momentum: Tensor | None, decay: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-token surprise norms and post-write weight norms ``[B * H, T]`` (see module docstring)."""
    surprise, norms = [], []
    for t in range(k.shape[1]):
        one = slice(t, t + 1)
        # fast.weights are always the chunk-start weights: the ones the kernel took u_t at.
        pairs = _surprise_pairs(layer.memory, layer.surprise, fast.weights, k[:, one], v[:, one])
        surprise.append(sum(x.square().sum(-1) * g.square().sum(-1) for x, g in pairs).sqrt())
        _, fast = memory_scan(layer.memory, layer.surprise, layer.retrieval, fast, q[:, one],
                              k[:, one], v[:, one], lr=lr[:, one],
                              momentum=None if momentum is None else momentum[:, one],
                              decay=None if decay is None else decay[:, one],
                              chunk_size=layer.chunk_size)
        weights = current_weights(layer.memory, layer.surprise, fast)
        norms.append(sum(w.square().sum((-2, -1)) for w in weights).sqrt()[:, None])
    return torch.cat(surprise, 1), torch.cat(norms, 1)


def _detached(fast: FastWeightState) -> FastWeightState:
    """``fast`` with every tensor detached (the replay must not reach the model's graph)."""
    pending = PendingChunk(*(None if f is None else f.detach() for f in fast.pending))
    return FastWeightState(tuple(w.detach() for w in fast.weights),
                           tuple(m.detach() for m in fast.momentum), pending)
