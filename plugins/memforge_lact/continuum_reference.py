"""The continuum memory layer one token at a time, in float64, from the equations (docs/zoo.md,
"Continuum memory").

Written independently of :mod:`memforge_lact.continuum`'s block path: the levels' weights in the
paper's orientation (``W0, W2`` ``[h, d]``, ``W1`` ``[d, h]``), the chain ``h_l = h_{l-1} +
W1 (silu(W0 h_{l-1}) * (W2 h_{l-1}))``, one autograd call per token and level for the gradient
of ``eta_{l,t} <M(k_t), v_t>`` at the weights the token reads with, added to the level's gathered
gradient, and each level applied (then renormalised) when the tokens seen reach a multiple of its
period. It takes and returns the layer's :class:`~memforge_lact.continuum.ContinuumState` and
lets gradients flow into every parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memforge_lact.continuum import QK_EPS, ContinuumLayer, ContinuumState
from memforge_lact.ops import RENORM_EPS

F64 = torch.float64


def _silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def _memory(levels: list[list[Tensor]], x: Tensor) -> Tensor:
    """``M(x)`` for ``x`` ``[B, H, d]`` and per-level ``[W0, W1, W2]`` (each ``[B, H, ...]``)."""
    for w0, w1, w2 in levels:
        hidden = _silu(torch.einsum("bhjd,bhd->bhj", w0, x)) * torch.einsum("bhjd,bhd->bhj", w2, x)
        x = x + torch.einsum("bhdj,bhj->bhd", w1, hidden)
    return x


def _paper(w02: Tensor, w1: Tensor, hid: int) -> list[Tensor]:
    return [w02[..., :hid].transpose(-1, -2), w1.transpose(-1, -2), w02[..., hid:].transpose(-1, -2)]


def _stored(level: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.cat([level[0], level[2]], -2).transpose(-1, -2), level[1].transpose(-1, -2)


def continuum_token_loop(layer: ContinuumLayer, x: Tensor, state: ContinuumState | None = None
                         ) -> tuple[Tensor, ContinuumState]:
    """``layer(x, state)`` token by token in float64: ``(y [B, T, D], state)``."""
    batch, steps, _ = x.shape
    heads, d, hid, c = layer.heads, layer.head_dim, layer.hidden, layer.chunk_size
    x = x.to(F64)
    initial = [_paper(w02.to(F64), w1.to(F64), hid) for w02, w1 in zip(layer.w02, layer.w1, strict=True)]
    row_norms = [[w.pow(2).sum(-1, keepdim=True).sqrt() for w in level] for level in initial]
    if state is None:
        levels = [[w.expand(batch, -1, -1, -1) for w in level] for level in initial]
        gathered = [[torch.zeros_like(w) for w in level] for level in levels]
        block: list[tuple[Tensor, Tensor, Tensor]] = []
        seen = 0
    else:
        levels = [_paper(a.to(F64), b.to(F64), hid) for a, b in state.weights]
        gathered = [_paper(a.to(F64), b.to(F64), hid) for a, b in state.gathered]
        block = [(state.keys[:, :, i].to(F64), state.values[:, :, i].to(F64), state.lr[:, :, i].to(F64))
                 for i in range(state.keys.shape[2])]
        seen = state.blocks * c
    outer = torch.is_grad_enabled()

    def gradient(k: Tensor, v: Tensor, lr: Tensor, index: int) -> list[Tensor]:
        """``eta_{l,t} d<M(k), v>/dW_l`` at the current weights, for one token of every sequence."""
        with torch.enable_grad():
            leaves = [[w if outer and w.requires_grad else w.detach().requires_grad_(True) for w in level]
                      for level in levels]
            score = (_memory(leaves, k) * v).sum()
            grads = torch.autograd.grad(score, leaves[index], create_graph=outer)
        return [lr[:, :, index, None, None] * g for g in grads]

    wqkv = layer.qkv.weight.to(F64)
    outputs = []
    for t in range(steps):
        xt = x[:, t]
        q, k, v = _silu(xt @ wqkv.T).reshape(batch, 3, heads, d).unbind(1)
        q = q / (q.pow(2).sum(-1, keepdim=True).sqrt() + QK_EPS)
        k = k / (k.pow(2).sum(-1, keepdim=True).sqrt() + QK_EPS)
        z = xt @ layer.lr_proj.weight.to(F64).T + layer.lr_proj.bias.to(F64) + layer.lr_offset
        lr = torch.log1p(torch.exp(z)).reshape(batch, heads, len(layer.periods))
        if len(block) == c:          # the token after a block: its gradients land now
            for index in range(len(levels)):
                for kb, vb, lb in block:
                    gathered[index] = [g + u for g, u in zip(gathered[index],
                                                             gradient(kb, vb, lb, index), strict=True)]
            seen += c
            block = []
            for index, period in enumerate(layer.periods):
                if seen % period == 0:
                    moved = [w + g for w, g in zip(levels[index], gathered[index], strict=True)]
                    if layer.renormalize:
                        moved = [w / (w.pow(2).sum(-1, keepdim=True).sqrt() + RENORM_EPS) * n
                                 for w, n in zip(moved, row_norms[index], strict=True)]
                    levels[index] = moved
                    gathered[index] = [torch.zeros_like(g) for g in gathered[index]]
        o = _memory(levels, q)
        block.append((k, v, lr))
        normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.out_norm.eps)
        normed = normed * layer.out_norm.weight.to(F64)
        outputs.append(normed.reshape(batch, heads * d) @ layer.out_proj.weight.to(F64).T)
    y = torch.stack(outputs, 1) if outputs else x.new_zeros(batch, 0, layer.dim)

    def stacked(i: int, width: int) -> Tensor:
        if not block:
            return x.new_zeros(batch, heads, 0, width)
        return torch.stack([token[i] for token in block], 2)

    return y, ContinuumState(tuple(_stored(level) for level in levels),
                             tuple(_stored(level) for level in gathered),
                             stacked(0, d), stacked(1, d), stacked(2, len(layer.periods)),
                             (seen // c) % (layer.periods[-1] // c))


__all__ = ["continuum_token_loop"]
