"""The two ways :class:`~memforge_baselines.attention.CausalSelfAttention` computes attention
over ``[persistent | cache | new]``: one dense masked call (:func:`dense_attention`), and for a
sliding window longer inputs in blocks of the window (:func:`blockwise_window_attention`, linear in
the length). Both take rotated ``q, k, v`` ``[B, H, T, d]``; the module chooses between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.nn import attend, causal_mask

__all__ = ["blockwise_window_attention", "dense_attention"]


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor | None,
    cache_v: Tensor | None,
    prefix: tuple[Tensor, Tensor] | None,
    window: int | None,
) -> Tensor:
    """Queries attend to ``[persistent | cache | new]`` under one ``[T, P + t + T]`` mask."""
    B, T = q.shape[0], q.shape[2]
    cached = 0
    if cache_k is not None:
        cached = cache_k.shape[2]
        k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
    if prefix is None and cached == 0:
        # Plain causal attention (T <= window here): SDPA's own causal flag enables the
        # fused flash kernels on GPU.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    P = 0
    if prefix is not None:
        pk, pv = prefix
        P = pk.shape[2]
        k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    mask = causal_mask(T, cached + T, window=window, prefix=P, device=q.device)
    return attend(q, k, v, mask)

def blockwise_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor | None,
    cache_v: Tensor | None,
    prefix: tuple[Tensor, Tensor] | None,
    window: int,
) -> Tensor:
    """Sliding-window attention in ``O(T * (w + P))``: blocks of ``w`` queries, one SDPA call.

    Keys are laid out as ``[lead | new | right pad]``, cut into blocks of ``w``. The lead block
    is the cache left-padded with zeros to exactly ``w`` keys, so query block ``b`` always
    attends to key blocks ``b`` (the one before it: the lead block for ``b = 0``) and ``b + 1``
    (its own). Within that ``2w`` span query ``r`` sees keys ``r + 1 .. r + w``, i.e. its own
    position and the ``w - 1`` before it. The left padding is masked out; the right padding
    needs no mask for real queries (it is in their future) and gives padded queries a
    visible key, so no row is ever fully masked. Padded query rows are dropped at the end.
    """
    B, H, T, d = q.shape
    w = window
    nb = -(-T // w)
    pad = nb * w - T
    cached = 0 if cache_k is None else cache_k.shape[2]

    def layout(new: Tensor, old: Tensor | None) -> Tensor:
        # [B, H, T, d] -> [B, H, nb, 2w, d]: for each query block, its previous and own keys.
        lead = new.new_zeros(B, H, w - cached, d)
        parts = [lead, new] if old is None else [lead, old, new]
        blocks = F.pad(torch.cat(parts, dim=2), (0, 0, 0, pad)).unflatten(2, (nb + 1, w))
        return torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], dim=3)

    kb, vb = layout(k, cache_k), layout(v, cache_v)
    r = torch.arange(w, device=q.device)[:, None]
    s = torch.arange(2 * w, device=q.device)[None, :]
    mask = ((s > r) & (s <= r + w)).expand(nb, w, 2 * w).clone()
    mask[0, :, : w - cached] = False  # lead-block padding: no token there
    if prefix is not None:
        pk, pv = prefix
        P = pk.shape[2]
        kb = torch.cat([pk[:, :, None].expand(B, H, nb, P, d), kb], dim=3)
        vb = torch.cat([pv[:, :, None].expand(B, H, nb, P, d), vb], dim=3)
        mask = torch.cat([mask.new_ones(nb, w, P), mask], dim=2)
    # Fold blocks into the head axis: 4-D inputs keep SDPA's fused (memory-efficient) kernels
    # eligible on GPU. Index h * nb + b of the folded axis is head h, block b.
    qb = F.pad(q, (0, 0, 0, pad)).reshape(B, H * nb, w, d)
    o = attend(
        qb,
        kb.flatten(1, 2),
        vb.flatten(1, 2),
        mask.repeat(H, 1, 1),
    )
    return o.reshape(B, H, nb * w, d)[:, :, :T]
