"""The attention test oracle: slow, obviously correct attention with an explicit full mask.

:func:`dense_masked_attention` builds its mask entry by entry and writes the softmax out, so it
shares no code with :mod:`memforge_baselines.attention_paths`; :func:`reference_attention` runs a
:class:`~memforge_baselines.attention.CausalSelfAttention` module's projections through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memforge_baselines.attention import CausalSelfAttention

__all__ = ["dense_masked_attention", "reference_attention"]


def dense_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
) -> Tensor:
    """Slow, obviously correct attention with an explicit full mask: the test oracle.

    Queries ``q`` ``[B, H, T, d]`` are the last ``T`` positions of the keys ``k``/values ``v``
    ``[B, H, S, d]`` (``S >= T``; the first ``S - T`` are earlier tokens). The mask is built entry
    by entry in Python and the softmax is written out (no SDPA), so it shares no code with
    :mod:`memforge_baselines.attention_paths`. ``prefix_k``/``prefix_v`` ``[B or 1, H, P, d]`` are
    visible to every query.
    """
    T, S = q.shape[2], k.shape[2]
    allowed = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        query_pos = S - T + i
        for key_pos in range(S):
            in_window = window is None or query_pos - key_pos < window
            allowed[i, key_pos] = key_pos <= query_pos and in_window
    if prefix_k is not None:
        shape = (q.shape[0], q.shape[1], *prefix_k.shape[2:])
        k = torch.cat([prefix_k.expand(shape), k], dim=2)
        v = torch.cat([prefix_v.expand(shape), v], dim=2)
        allowed = torch.cat([torch.ones(T, prefix_k.shape[2], dtype=torch.bool), allowed], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def reference_attention(module: CausalSelfAttention, x: Tensor) -> Tensor:
    """``module``'s output on whole sequences ``x`` ``[B, T, D]`` (from position 0), the slow way.

    Uses the module's projections, rotary and persistent tokens, but attention through
    :func:`dense_masked_attention` instead of the blocked / masked SDPA paths.
    """
    q, k, v = module.project_qkv(x, torch.arange(x.shape[1], device=x.device))
    prefix = module.persistent_kv()
    pk, pv = prefix if prefix is not None else (None, None)
    return module.output(dense_masked_attention(q, k, v, module.window, pk, pv))
