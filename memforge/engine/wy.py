"""The WY (UT-transform) chunked kernel of the delta rule at the decayed state (docs/delta.md,
"The chunked form"): token-exact at every chunk size.

Per sequence and head (``N`` of them, kernel layout ``[N, T, d]``), with the state ``S``
``[d_k, d_v]`` and the decay ``gamma_t = exp(g_t)`` (``g = None``: no decay)::

    S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T     o_t = S_t^T q_t

one gradient step of size ``beta_t`` on ``0.5 * ||S^T k_t - v_t||^2`` at the decayed state, read
after the write (DeltaNet; Gated DeltaNet with ``g``). A chunk's pseudo-values solve a unit
lower-triangular system, all chunks at once; the loop over chunks carries only ``S``.

:func:`wy_write` runs the writes and keeps what reads need (:class:`WYWrite`), :func:`wy_read`
reads any queries after their token's write, and :func:`wy_scan` does both. The public
functional ops are ``memforge_delta.ops``; the engine runs the kernel through
:class:`memforge.engine.wy_executor.WYExecutor`. Inputs are not validated here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge.engine.triangular import unit_lower_inverse

__all__ = ["WYWrite", "segment_sums", "wy_read", "wy_scan", "wy_write"]


class WYWrite(NamedTuple):
    """The writes of one scan, chunked (``n`` chunks of ``C`` tokens, the last one padded).

    Attributes:
        keys: ``[N, n, C, d_k]``.
        starts: the state at every chunk start ``[N, n, d_k, d_v]``.
        updates: the pseudo-values ``U`` ``[N, n, C, d_v]``: ``S_t = e^{G_t} S_0 + sum_{i<=t}
            D_{ti} k_i u_i^T`` inside a chunk.
        decay: ``D`` ``[N, n, C, C]``, ``D[t, i] = exp(G_t - G_i)`` (0 above the diagonal), or
            ``None`` without decay.
        to_start: ``exp(G_t)`` ``[N, n, C, 1]``, or ``None`` without decay.
        tokens: the real (unpadded) tokens ``T``.
        state: the state after every token ``[N, d_k, d_v]``.
    """

    keys: Tensor
    starts: Tensor
    updates: Tensor
    decay: Tensor | None
    to_start: Tensor | None
    tokens: int
    state: Tensor


def segment_sums(g: Tensor) -> Tensor:
    """``[..., C] -> [..., C, C]``: entry ``[t, i] = sum_{i < j <= t} g_j``, ``-inf`` above the diagonal.

    Masked formulation rather than differences of cumulative sums: each entry adds only its own
    terms, all ``<= 0``, so it carries a relative error of at most ``(t - i)`` roundings with no
    cancellation, in the gate's own dtype. A difference ``G_t - G_i`` cancels: after one large
    decay (``g = -1e4``) the float32 error of every later entry would be about ``1e4 * 6e-8``, and
    ``g = -inf`` would give ``-inf - -inf = NaN``. Here ``-inf`` stays ``-inf``, its ``exp`` is 0 and
    so is the gradient through it. The ``C x C`` cumulative sum costs less than the ``C x C x d``
    products that use it.
    """
    size = g.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=g.device).tril()
    terms = torch.where(causal.tril(-1), g[..., :, None], 0.0)  # [j, i] = g_j for j > i
    return terms.cumsum(-2).masked_fill(~causal, float("-inf"))


def wy_write(keys: Tensor, values: Tensor, beta: Tensor, g: Tensor | None, state: Tensor,
             chunk_size: int) -> WYWrite:
    """Write ``T`` tokens into ``state``.

    Args:
        keys: ``[N, T, d_k]``.
        values: ``[N, T, d_v]``.
        beta: step sizes ``[N, T]``.
        g: log-decays ``[N, T]`` (``<= 0``, ``-inf`` allowed), or ``None`` for no decay.
        state: ``S_0`` ``[N, d_k, d_v]``.
        chunk_size: tokens per chunk (any ``T`` works; the result is the same at every size).

    Returns:
        The chunked writes and the final state (:class:`WYWrite`).
    """
    n_seq, tokens, d_k = keys.shape
    d_v = values.shape[-1]
    if tokens == 0:
        return WYWrite(keys.new_zeros(n_seq, 0, 1, d_k), state.new_zeros(n_seq, 0, d_k, d_v),
                       values.new_zeros(n_seq, 0, 1, d_v), None, None, 0, state)
    size = min(chunk_size, tokens)
    chunks = -(-tokens // size)
    pad = chunks * size - tokens
    if pad:
        # Padding is exact. A padded token has beta = 0 and g = 0 (and zero k, v), so its
        # pseudo-value u = beta (...) is exactly 0: its row of the triangular system is the unit
        # row with a zero right-hand side, and it adds exactly 0 to S and to every later u. Its
        # decay exp(0) = 1 multiplies nothing away. Padded tokens come after every real token, so
        # by causality no real output sees them; their own outputs are cut off by the read.
        keys, values = (F.pad(x, (0, 0, 0, pad)) for x in (keys, values))
        beta = F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))

    # [N, T, d] -> [N, n, C, d], a view of contiguous inputs.
    def chunked(x: Tensor) -> Tensor:
        return x.reshape(n_seq, chunks, size, -1)

    k, v = chunked(keys), chunked(values)
    beta = chunked(beta[..., None])  # [N, n, C, 1]
    decay: Tensor | None = None  # D, all ones on and below the diagonal without a gate
    to_start = chunk_decay = None
    k_decayed = rhs_k = k
    if g is not None:
        log_decay = chunked(g[..., None])[..., 0]  # [N, n, C]
        decay = segment_sums(log_decay).exp()  # D[t, i] = exp(G_t - G_i), 0 above the diagonal
        to_start = log_decay.cumsum(-1).exp()[..., None]  # exp(G_t), [N, n, C, 1]
        rhs_k = to_start * k
        k_decayed = decay[..., -1, :, None] * k  # exp(G_C - G_i) k_i, the chunk-end weights
        chunk_decay = to_start[..., -1:, :]  # exp(G_C), [N, n, 1, 1]

    # (I + strictlower(beta * (D o K K^T))) [U', W] = beta * [V, exp(G) K], for every chunk at once,
    # through the blocked inverse (docs/delta.md, "Why a blocked inverse").
    products = k @ k.transpose(-1, -2)
    inverse = unit_lower_inverse(beta * (products if decay is None else decay * products))
    solved = inverse @ (beta * torch.cat((v, rhs_k), -1))
    pseudo_values, wy_weights = solved.split((d_v, d_k), -1)

    # The only sequential part: U = U' - W S and S <- exp(G_C) S + (exp(G_C - G) K)^T U per chunk.
    # unbind (not indexing) so that the backward stacks the chunks' gradients once.
    starts, updates = [], []
    for u_c, w_c, kd_c, decay_c in zip(pseudo_values.unbind(1), wy_weights.unbind(1),
                                       k_decayed.transpose(-1, -2).unbind(1),
                                       chunk_decay.unbind(1) if chunk_decay is not None
                                       else [None] * chunks, strict=True):
        starts.append(state)
        u_c = torch.baddbmm(u_c, w_c, state, alpha=-1)
        updates.append(u_c)
        state = torch.baddbmm(state if decay_c is None else decay_c * state, kd_c, u_c)
    return WYWrite(k, torch.stack(starts, 1), torch.stack(updates, 1), decay, to_start, tokens,
                   state)


def wy_read(write: WYWrite, queries: Tensor) -> Tensor:
    """Read ``queries`` ``[N, T, d_k]`` (one per token of ``write``) after their token's write:
    ``o_t = S_t^T q_t``, ``[N, T, d_v]``. Every chunk at once:
    ``O = exp(G) Q S_start + (D o Q K^T) U``."""
    n_seq, chunks, size, _ = write.keys.shape
    d_v = write.updates.shape[-1]
    if not chunks:
        return queries.new_zeros(n_seq, 0, d_v)
    pad = chunks * size - write.tokens
    q = F.pad(queries, (0, 0, 0, pad)).reshape(n_seq, chunks, size, -1)
    scores = q @ write.keys.transpose(-1, -2)
    scores = scores.tril() if write.decay is None else write.decay * scores
    reads = q if write.to_start is None else write.to_start * q
    outputs = reads @ write.starts + scores @ write.updates
    return outputs.reshape(n_seq, chunks * size, d_v)[:, :write.tokens]


def wy_scan(queries: Tensor, keys: Tensor, values: Tensor, beta: Tensor, g: Tensor | None,
            state: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Write ``T`` tokens and read each query after its token's write (:func:`wy_write`,
    :func:`wy_read`): ``(outputs [N, T, d_v], final state [N, d_k, d_v])``."""
    write = wy_write(keys, values, beta, g, state, chunk_size)
    return wy_read(write, queries), write.state
