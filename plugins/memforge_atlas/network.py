"""The memory network ``atlas.poly_mlp``: ATLAS' polynomial feature map, then an MLP.

``M(x) = x + LN(f(phi_p(x)))`` (each of the residual and the norm optional), with ``f`` an MLP of
``depth`` matrices ``C(d + p, p) -> h -> ... -> h -> d`` (``h = round(d * expansion)``; one matrix
``C(d + p, p) -> d`` at depth 1) and ``phi_p`` :class:`~memforge_atlas.features.PolynomialFeatures`.

The feature map is part of the network, not a projection: the kernels hand the network raw keys
and queries, the network lifts them and every fast-weight matrix still goes through the kernel's
``linear(i, h)``. So the map applies to keys and queries alike, with the same learned
coefficients, under every executor and read order, and the projection stays whichever the spec
chooses. Its coefficients are outer parameters; the test-time update never moves them
(docs/zoo.md, "ATLAS").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.interfaces import LinearFn
from memforge_atlas.features import PolynomialFeatures

ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "relu")
_LN_EPS = 1e-5


class PolyTape(NamedTuple):
    """What :meth:`PolyMLPMemory.forward` keeps for :meth:`PolyMLPMemory.backward`.

    Attributes:
        inputs: the input of every matrix ``[N, t, d_in_i]`` (the first is ``phi_p(x)``).
        preacts: the pre-activation after every matrix but the last ``[N, t, h]``.
        normed: ``LN(f)`` when the norm is on, else ``None``.
        inv_std: ``1 / std`` of the norm ``[N, t, 1]``, else ``None``.
    """

    inputs: tuple[Tensor, ...]
    preacts: tuple[Tensor, ...]
    normed: Tensor | None
    inv_std: Tensor | None


def _act(name: str, a: Tensor) -> Tensor:
    return F.gelu(a) if name == "gelu" else F.silu(a) if name == "silu" else F.relu(a)


def _act_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """``grad * act'(a)``, differentiable (outer gradients flow through it)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0.0)
    s = torch.sigmoid(a)
    return grad * (s * (1.0 + a * (1.0 - s)))


class PolyMLPMemory(nn.Module):
    """A per-head memory ``R^d -> R^d`` that reads its input through ``phi_p`` first.

    A :class:`memforge.interfaces.MemoryNetwork` with a hand-written, exact ``backward``.
    Initial weights are ``[H, d_in, d_out]`` parameters: zero at depth 1 (an empty associative
    memory, as linear attention starts), ``N(0, 1 / d_in)`` deeper (all-zero inner matrices
    would never receive an inner gradient).

    Args:
        heads: heads ``H``.
        dim: per-head key/value width ``d``.
        degree: polynomial degree ``p >= 1``.
        depth: matrices of the MLP, ``>= 1``.
        expansion: hidden width as a multiple of ``d`` (depth >= 2).
        activation: ``"gelu"``, ``"silu"`` or ``"relu"``.
        residual: add the raw input ``x`` to the output.
        norm: parameter-free layer norm of ``f`` before the residual.
    """

    def __init__(self, heads: int, dim: int, *, degree: int, depth: int, expansion: float = 4.0,
                 activation: str = "gelu", residual: bool = True, norm: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.features = PolynomialFeatures(heads, dim, degree)
        self.heads, self.dim, self.depth = heads, dim, depth
        self.hidden = max(1, round(dim * expansion)) if depth >= 2 else dim
        self.activation, self.residual, self.norm = activation, bool(residual), bool(norm)
        widths = [self.features.width] + [self.hidden] * (depth - 1) + [dim]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(heads, a, b) if depth == 1
                         else torch.randn(heads, a, b) / math.sqrt(a))
            for a, b in zip(widths[:-1], widths[1:], strict=True))

    def initial_weights(self) -> tuple[Tensor, ...]:
        """The learned initial fast weights, one ``[H, d_in_i, d_out_i]`` tensor per matrix."""
        return tuple(self.weights)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, PolyTape]:
        """``M(x)`` for ``x`` ``[N, t, d]``: ``(y [N, t, d], tape)``."""
        h = self.features(x)
        inputs: list[Tensor] = []
        preacts: list[Tensor] = []
        for i in range(self.depth):
            inputs.append(h)
            h = linear(i, h)
            if i < self.depth - 1:
                preacts.append(h)
                h = _act(self.activation, h)
        normed = inv_std = None
        if self.norm:
            centred = h - h.mean(-1, keepdim=True)
            inv_std = torch.rsqrt(centred.square().mean(-1, keepdim=True) + _LN_EPS)
            h = normed = centred * inv_std
        y = x + h if self.residual else h
        return y, PolyTape(tuple(inputs), tuple(preacts), normed, inv_std)

    def backward(self, tape: PolyTape, grad_output: Tensor, linear_transposed: LinearFn
                 ) -> list[tuple[Tensor, Tensor]]:
        """Every matrix's ``(inputs_i, grads_i)``: token ``t``'s gradient of matrix ``i`` is
        ``inputs_i[:, t, :, None] * grads_i[:, t, None, :]``. The residual reaches no weight."""
        grad = grad_output
        if tape.normed is not None:
            mean_grad = grad.mean(-1, keepdim=True)
            mean_proj = (grad * tape.normed).mean(-1, keepdim=True)
            grad = (grad - mean_grad - tape.normed * mean_proj) * tape.inv_std
        grads = [grad]
        for i in range(self.depth - 1, 0, -1):
            grad = _act_backward(self.activation, linear_transposed(i, grad), tape.preacts[i - 1])
            grads.append(grad)
        grads.reverse()
        return list(zip(tape.inputs, grads, strict=True))

    def extra_repr(self) -> str:
        """Shape and options, for ``print(module)``."""
        return (f"heads={self.heads}, dim={self.dim}, depth={self.depth}, hidden={self.hidden}, "
                f"activation={self.activation!r}, residual={self.residual}, norm={self.norm}")
