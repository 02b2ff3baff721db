"""A float64 token loop of the whole delta memory layer, written from the equations.

It reads a :class:`~memforge_delta.layer.DeltaLayer`'s parameters and computes its output one
token at a time (docs/delta.md, "The memory layers"), sharing none of the layer's code paths: the
convolution is a sum over taps, the norms and gates are written out, and the recurrence is
:func:`memforge_delta.reference.token_loop`. It is the tests' oracle for the layer (its
``reference_forward``, outputs and gradients into every parameter); it does not validate its
inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memforge_delta.layer import L2_EPS, DeltaLayer, DeltaState
from memforge_delta.reference import token_loop

DT = torch.float64


def _l2norm(x: Tensor) -> Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(L2_EPS)


def _softplus(x: Tensor) -> Tensor:
    return torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)


def layer_token_loop(layer: DeltaLayer, x: Tensor, state: DeltaState | None = None
                     ) -> tuple[Tensor, DeltaState]:
    """``layer(x, state)`` token by token in float64: ``(y [B, T, D], DeltaState)``."""
    p = {name: t.to(DT) for name, t in layer.named_parameters()}  # gradients flow, for the kit
    x = x.to(DT)
    batch, steps, dim = x.shape
    heads, d, taps = layer.heads, layer.head_dim, layer.conv_size
    channels = 3 * dim
    if state is None:
        history = torch.zeros(batch, taps - 1, channels, dtype=DT)
        memory = None
    else:
        history, memory = state.conv.to(DT).transpose(1, 2), state.memory.to(DT)
    projected = torch.cat([history, x @ p["qkv.weight"].T], dim=1)        # [B, K-1+T, 3D]
    taps_weight = p["conv.weight"][:, 0]                                  # [3D, K]
    rows = []
    for t in range(steps):
        window = projected[:, t:t + taps]                                 # [B, K, 3D], oldest first
        conv = sum(window[:, j] * taps_weight[:, j] for j in range(taps))
        rows.append(conv * torch.sigmoid(conv))                           # SiLU
    mixed = torch.stack(rows, 1).reshape(batch, steps, 3, heads, d)
    q, k, v = (mixed[:, :, i].transpose(1, 2) for i in range(3))          # [B, H, T, d]
    q, k = _l2norm(q), _l2norm(k)
    beta = torch.sigmoid(x @ p["beta_proj.weight"].T).transpose(1, 2)     # [B, H, T]
    g = None
    if layer.gated:
        rate = _softplus(x @ p["decay_proj.weight"].T + p["dt_bias"])
        g = (-torch.exp(p["A_log"]) * rate).transpose(1, 2)
    o, memory = token_loop(q, k, v, beta, g, memory, dtype=DT)            # [B, H, T, d]
    o = o.transpose(1, 2)                                                 # [B, T, H, d]
    normed = o / torch.sqrt((o * o).mean(-1, keepdim=True) + layer.out_norm.eps)
    normed = (normed * p["out_norm.weight"]).reshape(batch, steps, dim)
    gate = x @ p["out_gate.weight"].T
    y = (normed * gate * torch.sigmoid(gate)) @ p["out_proj.weight"].T
    cache = projected[:, projected.shape[1] - (taps - 1):].transpose(1, 2)
    return y, DeltaState(memory, cache)
