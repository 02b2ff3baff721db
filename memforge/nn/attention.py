"""Attention helpers every attention component and integration can compose.

Masks, softmax attention through ``scaled_dot_product_attention``, the one-query attention of a
fixed-shape decode, and the persistent-token and static-decoding helpers that work on any
component with the attention capabilities of :mod:`memforge.interfaces`
(:class:`~memforge.interfaces.ComposesAttention`,
:class:`~memforge.interfaces.DecodesAttentionStatically`). A boolean attention mask is ``True``
where a query may attend to a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.capabilities import require
from memforge.errors import InputError
from memforge.interfaces import DecodesAttentionStatically

__all__ = ["attend", "attend_visible", "batch_persistent_kv", "causal_mask",
           "static_attention_buffers"]


def causal_mask(
    q_len: int,
    k_len: int,
    *,
    window: int | None = None,
    prefix: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask ``[q_len, prefix + k_len]`` for queries that are the last ``q_len`` of ``k_len``.

    Query ``i`` sits at key index ``k_len - q_len + i`` and sees key ``j`` iff ``j`` is not after it
    and, for a ``window``, fewer than ``window`` steps before it. The first ``prefix`` columns (the
    persistent keys, placed before the sequence keys) are visible to every query.
    """
    rel = torch.arange(k_len - q_len, k_len, device=device)[:, None] - torch.arange(k_len, device=device)
    mask = rel >= 0
    if window is not None:
        mask = mask & (rel < window)
    if prefix:
        mask = torch.cat([mask.new_ones(q_len, prefix), mask], dim=1)
    return mask


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + mask) v`` through ``scaled_dot_product_attention``.

    Args:
        q: ``[..., Tq, d]`` queries.
        k: ``[..., Tk, d]`` keys.
        v: ``[..., Tk, d_v]`` values.
        mask: boolean, broadcastable to ``[..., Tq, Tk]``, ``True`` = may attend; ``None`` = all
            visible. Give every query at least one visible key (a fully masked row is undefined).

    Returns:
        ``[..., Tq, d_v]``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_visible(q: Tensor, persistent: tuple[Tensor, Tensor] | None, keys: list[Tensor],
                   values: list[Tensor], visible: list[Tensor]) -> Tensor:
    """One decoding query ``q`` ``[B, H, 1, d]`` over fixed-shape key/value buffers.

    ``keys``/``values`` are lists of ``[B, H, n_i, d]`` pieces and ``visible`` their boolean row
    masks ``[n_i]`` (stale rows of a buffer are ``False``); the ``persistent`` keys and values
    ``[B, H, P, d]`` go first and are always visible.
    """
    if persistent is not None:
        keys, values = [persistent[0], *keys], [persistent[1], *values]
        visible = [visible[0].new_ones(persistent[0].shape[2]), *visible]
    return attend(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(visible)[None])


def batch_persistent_kv(attention: nn.Module, batch: int, dtype: torch.dtype
                        ) -> tuple[Tensor, Tensor] | None:
    """``attention.persistent_kv()`` expanded to ``batch`` sequences and stored contiguously in
    ``dtype``: what a fixed-shape decode keeps, since the parameters do not change while it runs."""
    prefix = attention.persistent_kv()
    if prefix is None:
        return None
    return tuple(p.expand(batch, -1, -1, -1).to(dtype).contiguous() for p in prefix)


def static_attention_buffers(attention: nn.Module, cache: object, batch: int, capacity: int) -> object:
    """``attention.static_decode_buffers(cache, batch, capacity)``, or an :class:`InputError` naming
    the attention component when it cannot decode with fixed shapes
    (:class:`~memforge.interfaces.DecodesAttentionStatically`); a block that holds any
    ``Attention`` calls this rather than assume the method."""
    require(attention, DecodesAttentionStatically, needed_by="fixed-shape (compiled) decoding",
            fix="use generate(..., compile=False)", error=InputError)
    return attention.static_decode_buffers(cache, batch, capacity)
