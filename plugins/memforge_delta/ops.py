"""DeltaNet and Gated DeltaNet as functional ops, token-exact through the WY chunked kernel.

The rule (docs/delta.md, "The rule"), per batch element and head, with the state ``S`` of shape
``[d_k, d_v]``, the decay ``gamma_t = exp(g_t)`` (``g = 0`` for DeltaNet)::

    S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T     o_t = S_t^T q_t

i.e. one gradient step of size ``beta_t`` on ``0.5 * ||S^T k_t - v_t||^2`` taken at the *decayed*
state ``gamma_t S_{t-1}``; reads come after the write. Both ops compute it exactly, at any chunk
size, through the WY form of docs/delta.md ("The chunked form"): a chunk's pseudo-values solve a
unit lower-triangular system, all chunks at once, and the loop over chunks carries only ``S``.
The kernel is the core's (:mod:`memforge.engine.wy`, which the engine's ``wy`` executor also
runs); these ops validate their inputs and call it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memforge.engine.wy import wy_scan
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
    """The core WY kernel (:func:`memforge.engine.wy.wy_scan`) on validated ``[B, H, T, d]``
    inputs, in its ``[B * H, T, d]`` layout."""
    batch, heads, tokens, d_k = q.shape
    d_v = v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(batch, heads, d_k, d_v)
    if tokens == 0:
        return v.new_zeros(batch, heads, 0, d_v, dtype=out_dtype), state

    def flat(x: Tensor) -> Tensor:
        return x.reshape(batch * heads, *x.shape[2:])

    outputs, state = wy_scan(flat(q), flat(k), flat(v), flat(beta), None if g is None else flat(g),
                             flat(state), chunk_size)
    return (outputs.reshape(batch, heads, tokens, d_v).to(out_dtype),
            state.reshape(batch, heads, d_k, d_v))
