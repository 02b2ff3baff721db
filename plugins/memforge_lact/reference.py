"""The LaCT layer one token at a time, in float64, from the equations (docs/zoo.md, "LaCT").

Written independently of the fast path (:mod:`memforge_lact.ops`): the fast weights are kept in
the paper's orientation (``W0, W2`` ``[h, d]``, ``W1`` ``[d, h]``, ``f_W(x) = W1 (silu(W0 x) *
(W2 x))``), every token's gradient of ``eta_{m,t} <f_W(k_t), v_t>`` comes from plain autograd at
the chunk-start weights and is summed token by token, and the chunk's update (momentum with the
chunk-mean gate, Newton-Schulz, renormalisation of each row to its norm at the sequence start)
runs when the token after the chunk arrives. It takes and returns the layer's own
:class:`~memforge_lact.layer.LaCTState` (pending tokens included), and lets gradients flow into
every parameter (``create_graph``), so the conformance kit compares outputs and outer gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memforge_lact.layer import QK_EPS, LaCTLayer, LaCTState
from memforge_lact.ops import MUON_COEFFICIENTS, MUON_EPS, RENORM_EPS

F64 = torch.float64


def _silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def _swiglu(w0: Tensor, w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """``f_W(x)`` for per-(sequence, head) weights ``[B, H, ...]`` and ``x`` ``[B, H, d]``."""
    gate = torch.einsum("bhjd,bhd->bhj", w0, x)
    up = torch.einsum("bhjd,bhd->bhj", w2, x)
    return torch.einsum("bhdj,bhj->bhd", w1, _silu(gate) * up)


def _orthogonalise(g: Tensor, coefficients) -> Tensor:
    """Newton-Schulz on each matrix of ``g`` ``[B, H, m, n]``: ``X = G / |G|_F``, then
    ``X <- a X + b (X X^T) X + c (X X^T)^2 X``, on the side with fewer rows."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if tall else g
    x = x / (x.pow(2).sum((-2, -1), keepdim=True).sqrt() + MUON_EPS)
    for a, b, c in coefficients:
        gram = x @ x.transpose(-1, -2)
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.transpose(-1, -2) if tall else x


def layer_token_loop(layer: LaCTLayer, x: Tensor, state: LaCTState | None = None
                     ) -> tuple[Tensor, LaCTState]:
    """``layer(x, state)`` token by token in float64: ``(y [B, T, D], state)``."""
    batch, steps, _ = x.shape
    heads, d, hid, c = layer.heads, layer.head_dim, layer.hidden, layer.chunk_size
    x = x.to(F64)
    w02, w1 = layer.w02.to(F64), layer.w1.to(F64)
    # The paper's orientation [H, rows, cols]: row j of W_m is output unit j.
    start = (w02[..., :hid].transpose(-1, -2), w1.transpose(-1, -2), w02[..., hid:].transpose(-1, -2))
    row_norms = [w.pow(2).sum(-1, keepdim=True).sqrt() for w in start]
    if state is None:
        weights = [w.expand(batch, -1, -1, -1) for w in start]
        momentum = [torch.zeros_like(w) for w in weights]
        chunk: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
    else:
        s02, s1 = (w.to(F64) for w in state.weights)
        weights = [s02[..., :hid].transpose(-1, -2), s1.transpose(-1, -2),
                   s02[..., hid:].transpose(-1, -2)]
        momentum = [torch.zeros_like(w) for w in weights]
        if state.momentum is not None:
            m02, m1 = (m.to(F64) for m in state.momentum)
            momentum = [m02[..., :hid].transpose(-1, -2), m1.transpose(-1, -2),
                        m02[..., hid:].transpose(-1, -2)]
        chunk = [(state.keys[:, :, i].to(F64), state.values[:, :, i].to(F64),
                  state.lr[:, :, i].to(F64), None if state.gate is None else state.gate[:, :, i].to(F64))
                 for i in range(state.keys.shape[2])]
    coefficients = None if layer.muon is None else MUON_COEFFICIENTS[layer.muon]

    def gradients(k: Tensor, v: Tensor, lr: Tensor, at: list[Tensor]) -> list[Tensor]:
        """``eta_m * d<f_W(k), v>/dW_m`` at the weights ``at``, for one token of every sequence."""
        outer = torch.is_grad_enabled()  # the kit also runs the reference under no_grad
        with torch.enable_grad():
            leaves = [w if outer and w.requires_grad else w.detach().requires_grad_(True) for w in at]
            score = (_swiglu(leaves[0], leaves[1], leaves[2], k) * v).sum()
            grads = torch.autograd.grad(score, leaves, create_graph=outer)
        return [lr[:, :, m, None, None] * grads[m] for m in range(3)]

    def update(weights: list[Tensor], momentum: list[Tensor], tokens) -> tuple[list, list]:
        summed = [torch.zeros_like(w) for w in weights]
        for k, v, lr, _ in tokens:
            summed = [s + g for s, g in zip(summed, gradients(k, v, lr, weights), strict=True)]
        if layer.use_momentum:
            mean = sum(gate for *_, gate in tokens) / len(tokens)
            summed = [mean[:, :, None, None] * m + s for m, s in zip(momentum, summed, strict=True)]
            momentum = summed
        if coefficients is not None:
            summed = [_orthogonalise(s, coefficients) for s in summed]
        weights = [w + s for w, s in zip(weights, summed, strict=True)]
        if layer.renormalize:
            weights = [w / (w.pow(2).sum(-1, keepdim=True).sqrt() + RENORM_EPS) * n
                       for w, n in zip(weights, row_norms, strict=True)]
        return weights, momentum

    wqkv = layer.qkv.weight.to(F64)
    outputs = []
    for t in range(steps):
        xt = x[:, t]
        q, k, v = (_silu(xt @ wqkv.T)).reshape(batch, 3, heads, d).unbind(1)
        q = q / (q.pow(2).sum(-1, keepdim=True).sqrt() + QK_EPS)
        k = k / (k.pow(2).sum(-1, keepdim=True).sqrt() + QK_EPS)
        z = xt @ layer.lr_proj.weight.to(F64).T + layer.lr_proj.bias.to(F64) + layer.lr_offset
        lr = torch.log1p(torch.exp(z)).reshape(batch, heads, 3)
        gate = None
        if layer.momentum_proj is not None:
            gate = torch.sigmoid(xt @ layer.momentum_proj.weight.to(F64).T
                                 + layer.momentum_proj.bias.to(F64))
        if len(chunk) == c:          # the token after a chunk: its update lands now
            weights, momentum = update(weights, momentum, chunk)
            chunk = []
        o = _swiglu(weights[0], weights[1], weights[2], q)             # [B, H, d]
        chunk.append((k, v, lr, gate))
        normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.out_norm.eps)
        normed = normed * layer.out_norm.weight.to(F64)
        if layer.scale_proj is not None:
            scale = xt @ layer.scale_proj.weight.to(F64).T + layer.scale_proj.bias.to(F64)
            normed = normed * _silu(scale)[..., None]
        outputs.append(normed.reshape(batch, heads * d) @ layer.out_proj.weight.to(F64).T)
    y = torch.stack(outputs, 1) if outputs else x.new_zeros(batch, 0, layer.dim)

    def stacked(i: int, width: tuple[int, ...]) -> Tensor:
        if not chunk:
            return x.new_zeros(batch, heads, 0, *width)
        return torch.stack([token[i] for token in chunk], 2)

    out_state = LaCTState(
        (torch.cat([weights[0], weights[2]], -2).transpose(-1, -2), weights[1].transpose(-1, -2)),
        (torch.cat([momentum[0], momentum[2]], -2).transpose(-1, -2), momentum[1].transpose(-1, -2))
        if layer.use_momentum else None,
        stacked(0, (d,)), stacked(1, (d,)), stacked(2, (3,)),
        stacked(3, ()) if layer.use_momentum else None)
    return y, out_state


__all__ = ["layer_token_loop"]
