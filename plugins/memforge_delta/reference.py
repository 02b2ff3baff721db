"""Slow references for the delta rule, sharing nothing with the WY kernel in ``ops.py``.

* :func:`token_loop` walks the sequence one token at a time, straight from the equation
  (docs/delta.md, "The rule"); by default in float64. It is the oracle of the tests.
* :func:`chunkwise_rowwise` is the chunkwise algorithm as the DeltaNet and Gated DeltaNet papers
  describe it: inside each chunk the inverse of the unit lower-triangular system is built by
  forward substitution, one row at a time, then the chunks are scanned. It is the benchmark's
  comparator for the WY kernel (``benchmarks/bench_delta.py``).

Both take the ops' arguments, with ``g=None`` meaning DeltaNet, and return
``(outputs [B, H, T, d_v], final_state [B, H, d_k, d_v])``. Neither validates its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    initial_state: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The token recurrence, one token per step, computed in ``dtype``::

        S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T,   o_t = S_t^T q_t

    with ``gamma_t = exp(g_t)`` (1 when ``g`` is ``None``). Differentiable in every input.
    """
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    batch, heads, tokens, d_k = q.shape
    state = (torch.zeros(batch, heads, d_k, v.shape[-1], dtype=dtype, device=q.device)
             if initial_state is None else initial_state.to(dtype))
    outputs = []
    for t in range(tokens):
        gamma = 1.0 if g is None else torch.exp(g[:, :, t].to(dtype))[..., None, None]
        k_t, v_t, q_t, beta_t = k[:, :, t], v[:, :, t], q[:, :, t], beta[:, :, t, None, None]
        prediction = torch.einsum("bhkv,bhk->bhv", gamma * state, k_t)  # (gamma S)^T k_t
        state = gamma * state + beta_t * k_t[..., :, None] * (v_t - prediction)[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    if not outputs:
        return v.new_zeros(batch, heads, 0, v.shape[-1]), state
    return torch.stack(outputs, 2), state


def chunkwise_rowwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The chunkwise delta rule as the papers write it, in the inputs' dtype.

    Per chunk of ``C`` tokens, with ``G`` the cumulative log decay inside the chunk and
    ``Gamma[t, i] = exp(G_t - G_i)`` for ``i <= t``: ``N = -strictlower(beta * Gamma * K K^T)``,
    ``X = (I - N)^{-1}`` by forward substitution row by row (``X[i, :i] = N[i, :i] +
    sum_j N[i, j] X[j, :i]``), ``U' = X beta V``, ``W = X beta exp(G) K``; then per chunk
    ``U = U' - W S``, ``O = exp(G) Q S + (Gamma * Q K^T) U`` and
    ``S <- exp(G_C) S + (exp(G_C - G) K)^T U``. ``T`` need not be a multiple of ``C`` (the tail is
    padded with ``beta = 0``, ``g = 0``). Needs finite ``g``: the ratios are differences of
    cumulative sums, as in the papers.
    """
    batch, heads, tokens, d_k = q.shape
    d_v = v.shape[-1]
    state = (q.new_zeros(batch, heads, d_k, d_v) if initial_state is None
             else initial_state.to(q.dtype))
    if tokens == 0:
        return v.new_zeros(batch, heads, 0, d_v), state
    size = min(chunk_size, tokens)
    chunks = -(-tokens // size)
    pad = chunks * size - tokens
    g = torch.zeros_like(beta) if g is None else g
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(batch, heads, chunks, size, -1) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)).reshape(batch, heads, chunks, size) for x in (beta, g))

    cumulative = g.cumsum(-1)
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    gamma = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    inverse = -(k_beta @ k.transpose(-1, -2) * gamma).tril(-1)
    for i in range(1, size):
        # Clones keep the rows that autograd saved intact under the in-place row update.
        inverse[..., i, :i] = inverse[..., i, :i].clone() + (
            inverse[..., i, :, None].clone() * inverse[..., :, :i].clone()).sum(-2)
    inverse = inverse + torch.eye(size, dtype=q.dtype, device=q.device)
    pseudo_values = inverse @ (v * beta[..., None])
    wy_weights = inverse @ (k_beta * cumulative.exp()[..., None])

    outputs = []
    for c in range(chunks):
        q_c, k_c, g_c = q[:, :, c], k[:, :, c], cumulative[:, :, c]
        u_c = pseudo_values[:, :, c] - wy_weights[:, :, c] @ state
        reads = (q_c * g_c.exp()[..., None]) @ state
        outputs.append(reads + (q_c @ k_c.transpose(-1, -2) * gamma[:, :, c]) @ u_c)
        to_end = (g_c[..., -1:] - g_c).exp()[..., None]
        state = state * g_c[..., -1].exp()[..., None, None] + (k_c * to_end).transpose(-1, -2) @ u_c
    return torch.cat(outputs, 2)[:, :, :tokens], state
