"""Input checks of the delta-rule ops: every user mistake is one line that names the fix.

The checks run before any kernel work, so a bad shape never surfaces as a traceback from inside
the kernel's matrix products. The value checks (``beta`` in ``[0, 2]``, ``g <= 0``) are one
reduction each over ``[B, H, T]``, negligible next to the kernel's ``T * C * d`` work; like every
memforge value check they run on CPU tensors only, or where :mod:`memforge.checks` asks for them,
since reading a GPU tensor's values would sync the device on every call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from memforge import InputError, checks_values

#: The largest step for which one delta-rule update cannot amplify the state (see ``check_inputs``).
MAX_BETA = 2.0


class CheckedInputs(NamedTuple):
    """What :func:`check_inputs` hands the kernel: inputs in one compute dtype, plus the output dtype.

    Attributes:
        q, k, v, beta, g: the inputs cast to ``compute_dtype`` (``g`` is ``None`` for the ungated op).
        initial_state: ``[B, H, d_k, d_v]`` in ``compute_dtype``, or ``None``.
        chunk_size: the validated chunk size.
        out_dtype: the outputs' dtype, the promoted dtype of the inputs.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    initial_state: Tensor | None
    chunk_size: int
    out_dtype: torch.dtype


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int,
) -> CheckedInputs:
    """Validate the inputs of ``delta_rule`` / ``gated_delta_rule`` (``op`` names the caller).

    Only ``beta`` is bounded, not ``beta * ||k||^2``: one update multiplies the state by
    ``I - beta_t k_t k_t^T`` (after the decay), whose eigenvalue along ``k_t`` is
    ``1 - beta_t ||k_t||^2`` and 1 elsewhere, so the update is non-expansive exactly when
    ``0 <= beta_t ||k_t||^2 <= 2``. With the l2-normalised keys of DeltaNet and Gated DeltaNet that
    is ``beta`` in ``[0, 2]``. Keys of other norms are the caller's choice (the ops stay exact for
    them; only the long-run stability of the state is then the caller's business), so the ops do
    not look at key norms.

    Raises:
        InputError: naming the first problem found and how to fix it.
    """
    named = {"q": q, "k": k, "v": v, "beta": beta}
    if g is not None:
        named["g"] = g
    if initial_state is not None:
        named["initial_state"] = initial_state
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"{op}: {name} must have a floating dtype, got {t.dtype}; "
                             f"convert it with .float()")
    if len({t.device for t in named.values()}) > 1:
        raise InputError(f"{op}: all inputs must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named.items()))
    for name, t, rank, layout in (("q", q, 4, "[B, H, T, d_k]"), ("k", k, 4, "[B, H, T, d_k]"),
                                  ("v", v, 4, "[B, H, T, d_v]"), ("beta", beta, 3, "[B, H, T]")):
        if t.dim() != rank:
            raise InputError(f"{op}: {name} must be {layout}, got shape {_shape(t)}")
    if k.shape != q.shape:
        raise InputError(f"{op}: q and k must have the same shape [B, H, T, d_k], got q {_shape(q)} "
                         f"and k {_shape(k)}")
    batch, heads, tokens, d_k = q.shape
    d_v = v.shape[-1]
    if v.shape[:3] != q.shape[:3]:
        raise InputError(f"{op}: v must be [B, H, T, d_v] with the B, H, T of q {_shape(q)}, "
                         f"got {_shape(v)}")
    if beta.shape != q.shape[:3]:
        raise InputError(f"{op}: beta must be [B, H, T] = [{batch}, {heads}, {tokens}] like q, "
                         f"got {_shape(beta)}")
    if g is not None and g.shape != q.shape[:3]:
        raise InputError(f"{op}: g must be [B, H, T] = [{batch}, {heads}, {tokens}] like q, "
                         f"got {_shape(g)}")
    if initial_state is not None and initial_state.shape != (batch, heads, d_k, d_v):
        raise InputError(f"{op}: initial_state must be [B, H, d_k, d_v] = "
                         f"[{batch}, {heads}, {d_k}, {d_v}], got {_shape(initial_state)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"{op}: chunk_size must be an integer >= 1, got {chunk_size!r}")
    # Written so that NaN fails too (every comparison with NaN is False).
    if beta.numel() and checks_values(beta) and not bool(((beta >= 0) & (beta <= MAX_BETA)).all()):
        raise InputError(f"{op}: beta must lie in [0, {MAX_BETA:g}] (the update is a contraction "
                         f"only for beta * |k|^2 <= 2), got values from {beta.min().item():.4g} "
                         f"to {beta.max().item():.4g}; squash it, e.g. beta = torch.sigmoid(x)")
    if g is not None and g.numel() and checks_values(g) and not bool((g <= 0).all()):
        raise InputError(f"{op}: g is a log-decay, must be <= 0 (decay exp(g) <= 1), got a "
                         f"maximum of {g.max().item():.4g}; use e.g. g = -F.softplus(x) or "
                         f"F.logsigmoid(x)")

    out_dtype = q.dtype
    for t in named.values():
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    # Half-precision inputs run in float32: the state accumulates over the whole sequence, and
    # the triangular solve has no CPU kernel below float32.
    compute = torch.promote_types(out_dtype, torch.float32)

    return CheckedInputs(q.to(compute), k.to(compute), v.to(compute), beta.to(compute),
                         None if g is None else g.to(compute),
                         None if initial_state is None else initial_state.to(compute),
                         chunk_size, out_dtype)
