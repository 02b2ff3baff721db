"""DeltaNet and Gated DeltaNet as functional ops, token-exact through the WY chunked kernel.

The rule (docs/delta.md, "The rule"), per batch element and head, with the state ``S`` of shape
``[d_k, d_v]``, the decay ``gamma_t = exp(g_t)`` (``g = 0`` for DeltaNet)::

    S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T     o_t = S_t^T q_t

i.e. one gradient step of size ``beta_t`` on ``0.5 * ||S^T k_t - v_t||^2`` taken at the *decayed*
state ``gamma_t S_{t-1}``; reads come after the write. Both ops compute it exactly, at any chunk
size, through the WY form of docs/delta.md ("The chunked form"): a chunk's pseudo-values solve a
unit lower-triangular system, all chunks at once, and the loop over chunks carries only ``S``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memforge_delta.triangular import unit_lower_inverse
from memforge_delta.validation import check_inputs

__all__ = ["delta_rule", "gated_delta_rule"]


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """DeltaNet: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = S_t^T q_t``.

    Exact at every chunk size (chunk size 1 is the token recurrence itself); ``q`` is used as
    given (no ``d_k ** -0.5`` scaling, unlike the FLA reference). Differentiable in every input.

    Args:
        q: queries ``[B, H, T, d_k]``.
        k: keys ``[B, H, T, d_k]`` (DeltaNet l2-normalises them; the op does not).
        v: values ``[B, H, T, d_v]``.
        beta: step sizes ``[B, H, T]`` in ``[0, 2]`` (see ``memforge_delta.validation``).
        initial_state: ``S_0`` ``[B, H, d_k, d_v]``; zeros when ``None``.
        chunk_size: tokens per chunk of the WY kernel; any ``T`` works (the last chunk is padded
            with tokens that provably change nothing).

    Returns:
        ``(outputs, final_state)``: ``[B, H, T, d_v]`` in the inputs' promoted dtype, and
        ``S_T`` ``[B, H, d_k, d_v]`` in the compute dtype (float32 for half-precision inputs, so
        a carried state keeps its precision).

    Raises:
        memforge.InputError: bad shapes, dtypes, devices, ``beta`` outside ``[0, 2]`` or
            ``chunk_size < 1``.
    """
    checked = check_inputs("delta_rule", q, k, v, beta, None, initial_state, chunk_size)
    return _wy_scan(*checked)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Gated DeltaNet: ``S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T``.

    ``gamma_t = exp(g_t)``; the delta step's gradient is taken at the decayed state
    ``gamma_t S_{t-1}``, so ``S_t = gamma_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``
    (the GDN paper's ``S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` with the
    state transposed to ``[d_k, d_v]``). Reads after the write: ``o_t = S_t^T q_t``. ``q`` is
    used as given. Decays stay in log space throughout: ``g = -inf`` (full forgetting) is exact,
    with finite values and gradients.

    Args:
        q, k, v, beta, initial_state, chunk_size: as in :func:`delta_rule`.
        g: log-decays ``[B, H, T]``, ``<= 0`` (``-inf`` allowed); ``g = 0`` is :func:`delta_rule`.

    Returns:
        ``(outputs, final_state)`` as in :func:`delta_rule`.

    Raises:
        memforge.InputError: as :func:`delta_rule`, and for ``g > 0`` (or NaN).
    """
    checked = check_inputs("gated_delta_rule", q, k, v, beta, g, initial_state, chunk_size)
    return _wy_scan(*checked)


def _segment_sums(g: Tensor) -> Tensor:
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


def _wy_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The WY chunked kernel on validated inputs (docs/delta.md, "The chunked form")."""
    batch, heads, tokens, d_k = q.shape
    d_v = v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(batch, heads, d_k, d_v)
    if tokens == 0:
        return v.new_zeros(batch, heads, 0, d_v, dtype=out_dtype), state
    size = min(chunk_size, tokens)
    chunks = -(-tokens // size)
    pad = chunks * size - tokens
    if pad:
        # Padding is exact. A padded token has beta = 0 and g = 0 (and zero q, k, v), so its
        # pseudo-value u = beta (...) is exactly 0: its row of the triangular system is the unit
        # row with a zero right-hand side, and it adds exactly 0 to S and to every later u. Its
        # decay exp(0) = 1 multiplies nothing away. Padded tokens come after every real token, so
        # by causality no real output sees them; their own outputs are cut off below.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))

    # [B, H, T, d] -> [B*H, n, C, d], a view of contiguous inputs.
    def chunked(x: Tensor) -> Tensor:
        return x.reshape(batch * heads, chunks, size, -1)

    q, k, v = chunked(q), chunked(k), chunked(v)
    beta = chunked(beta[..., None])  # [BH, n, C, 1]
    decay: Tensor | None = None  # D, all ones on and below the diagonal without a gate
    to_start = chunk_decay = None
    k_decayed = rhs_k = k
    if g is not None:
        log_decay = chunked(g[..., None])[..., 0]  # [BH, n, C]
        decay = _segment_sums(log_decay).exp()  # D[t, i] = exp(G_t - G_i), 0 above the diagonal
        to_start = log_decay.cumsum(-1).exp()[..., None]  # exp(G_t), [BH, n, C, 1]
        rhs_k = to_start * k
        k_decayed = decay[..., -1, :, None] * k  # exp(G_C - G_i) k_i, the chunk-end weights
        chunk_decay = to_start[..., -1:, :]  # exp(G_C), [BH, n, 1, 1]

    # (I + strictlower(beta * (D o K K^T))) [U', W] = beta * [V, exp(G) K], for every chunk at once,
    # through the blocked inverse (docs/delta.md, "Why a blocked inverse").
    products = k @ k.transpose(-1, -2)
    inverse = unit_lower_inverse(beta * (products if decay is None else decay * products))
    solved = inverse @ (beta * torch.cat((v, rhs_k), -1))
    pseudo_values, wy_weights = solved.split((d_v, d_k), -1)

    # The only sequential part: U = U' - W S and S <- exp(G_C) S + (exp(G_C - G) K)^T U per chunk.
    # unbind (not indexing) so that the backward stacks the chunks' gradients once.
    state = state.reshape(batch * heads, d_k, d_v)
    starts, updates = [], []
    for u_c, w_c, kd_c, decay_c in zip(pseudo_values.unbind(1), wy_weights.unbind(1),
                                       k_decayed.transpose(-1, -2).unbind(1),
                                       chunk_decay.unbind(1) if chunk_decay is not None
                                       else [None] * chunks, strict=True):
        starts.append(state)
        u_c = torch.baddbmm(u_c, w_c, state, alpha=-1)
        updates.append(u_c)
        state = torch.baddbmm(state if decay_c is None else decay_c * state, kd_c, u_c)

    # Reads, every chunk at once: O = exp(G) Q S_start + (D o Q K^T) U.
    scores = q @ k.transpose(-1, -2)
    scores = scores.tril() if decay is None else decay * scores
    reads = q if to_start is None else to_start * q
    outputs = reads @ torch.stack(starts, 1) + scores @ torch.stack(updates, 1)
    outputs = outputs.reshape(batch, heads, chunks * size, d_v)[:, :, :tokens]
    return outputs.to(out_dtype), state.reshape(batch, heads, d_k, d_v)
