"""The MLP fast-weight memory ``M`` of Titans, used functionally by the memory kernels.

:class:`MLPMemory` implements :class:`memforge.interfaces.MemoryNetwork`. It holds only the
*initial* fast weights (outer parameters, one set per head); the kernels copy them per sequence
and update the copies at test time. Every matrix is applied through the kernel's ``linear``
callback, and :meth:`MLPMemory.backward` is a hand-written, exact back-propagation through the
element-wise parts (activation, parameter-free layer norm, residual), built from differentiable
torch ops so that outer gradients still flow through it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.interfaces import LinearFn

#: Activations the memory supports, by name.
ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "relu")

_LN_EPS = 1e-5


class MLPTape(NamedTuple):
    """What :meth:`MLPMemory.forward` keeps for :meth:`MLPMemory.backward`.

    Attributes:
        inputs: the input of every matrix, ``[N, t, d_in_i]``.
        preacts: the pre-activation after every matrix but the last, ``[N, t, hidden]``.
        normed: the layer-normed output ``LN(f(x))`` when ``norm`` is on, else ``None``.
        inv_std: ``1 / sqrt(var + eps)`` of the normed output, ``[N, t, 1]``, or ``None``.
    """

    inputs: tuple[Tensor, ...]
    preacts: tuple[Tensor, ...]
    normed: Tensor | None
    inv_std: Tensor | None


def _activation(name: str, a: Tensor) -> Tensor:
    """Apply the activation ``name`` element-wise."""
    if name == "gelu":
        return F.gelu(a)
    if name == "silu":
        return F.silu(a)
    return F.relu(a)


def _activation_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """``grad * act'(a)``, the exact derivative of :func:`_activation` at the pre-activation ``a``.

    GELU and ReLU use aten's fused backward kernels (one op instead of a dozen, and they have
    exact derivatives of their own, so outer gradients still flow); ``silu_backward`` has no
    derivative in aten, so SiLU's is spelled out.
    """
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0.0)
    s = torch.sigmoid(a)
    return grad * (s * (1.0 + a * (1.0 - s)))


def _layer_norm(y: Tensor) -> tuple[Tensor, Tensor]:
    """Parameter-free layer norm over the last dim; returns ``(normed, 1 / std)``."""
    centred = y - y.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.square().mean(-1, keepdim=True) + _LN_EPS)
    return centred * inv_std, inv_std


def _layer_norm_backward(grad: Tensor, normed: Tensor, inv_std: Tensor) -> Tensor:
    """Exact gradient through :func:`_layer_norm` (eps included) w.r.t. its input."""
    mean_grad = grad.mean(-1, keepdim=True)
    mean_proj = (grad * normed).mean(-1, keepdim=True)
    return (grad - mean_grad - normed * mean_proj) * inv_std


class MLPMemory(nn.Module):
    """A per-head MLP memory ``M: R^d -> R^d`` without biases (Titans §3.1).

    ``depth == 1`` is the linear (matrix) memory ``f(x) = x W``. ``depth >= 2`` is
    ``f(x) = act(... act(x W_0) W_1 ...) W_{depth-1}`` with widths ``d -> h -> ... -> h -> d`` and
    ``h = round(d * expansion)``. The output is then

    * ``f(x)``                    with ``residual=False, norm=False``;
    * ``x + f(x)``                with ``residual=True,  norm=False``;
    * ``x + LN(f(x))``            with ``residual=True,  norm=True`` (the TTT / MIRAS form);
    * ``LN(f(x))``                with ``residual=False, norm=True``.

    ``LN`` is a layer norm over the feature dim with no affine parameters (``eps = 1e-5``): an
    affine LN would add outer parameters that the test-time update never touches, and a
    parameter-free one keeps every fast weight a matrix read through ``linear``.

    Initial weights are ``[heads, d_in, d_out]`` parameters. The linear memory starts at zero:
    an empty memory that reads 0 (or the identity with the residual) until something is written,
    like the zero state of linear attention and DeltaNet; its outer gradient is still non-zero.
    Deeper memories start from ``N(0, 1/d_in)``: all-zero matrices would make every hidden unit's
    inner gradient zero, so the inner layers could never move.

    ``linear_map`` (the declared capability of :class:`memforge.interfaces.MemoryNetwork`) is
    ``True`` exactly for ``depth == 1`` without residual or norm: ``M(x) = x W``, what the
    token-exact WY executor runs.

    Args:
        heads: number of heads ``H``; each owns its own initial weights.
        dim: per-head key/value width ``d``.
        depth: number of matrices, ``>= 1``.
        expansion: hidden width factor for ``depth >= 2``.
        activation: ``"gelu"`` (exact erf form), ``"silu"`` or ``"relu"``.
        residual: add the input to the output.
        norm: layer-norm ``f(x)`` (parameter-free) before the residual.
    """

    def __init__(
        self,
        heads: int,
        dim: int,
        depth: int,
        expansion: float = 4.0,
        activation: str = "gelu",
        residual: bool = True,
        norm: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("heads", heads)
        _check_positive_int("dim", dim)
        _check_positive_int("depth", depth)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        hidden = round(dim * expansion)
        if depth >= 2 and (not expansion > 0 or hidden < 1):
            raise ValueError(
                f"expansion must give a hidden width >= 1 (round(dim * expansion)), got "
                f"expansion={expansion!r} with dim={dim}"
            )
        self.heads = heads
        self.dim = dim
        self.depth = depth
        self.hidden = hidden if depth >= 2 else dim
        self.activation = activation
        self.residual = bool(residual)
        self.norm = bool(norm)
        #: Declared capability: the network is the single matrix ``x W`` (docs/memory.md).
        self.linear_map = depth == 1 and not self.residual and not self.norm
        widths = [dim] + [self.hidden] * (depth - 1) + [dim]
        self.weights = nn.ParameterList(
            nn.Parameter(_initial_matrix(heads, d_in, d_out, linear=depth == 1))
            for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def initial_weights(self) -> tuple[Tensor, ...]:
        """The learned initial fast weights, one ``[H, d_in_i, d_out_i]`` tensor per matrix."""
        return tuple(self.weights)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, MLPTape]:
        """Run ``M`` on ``x`` ``[N, t, d]``; returns ``(y [N, t, d], tape)``.

        ``linear(i, h)`` applies matrix ``i``; the kernels choose which weights that means.
        """
        inputs: list[Tensor] = []
        preacts: list[Tensor] = []
        h = x
        for i in range(self.depth):
            inputs.append(h)
            h = linear(i, h)
            if i < self.depth - 1:
                preacts.append(h)
                h = _activation(self.activation, h)
        normed = inv_std = None
        if self.norm:
            normed, inv_std = _layer_norm(h)
            h = normed
        y = x + h if self.residual else h
        return y, MLPTape(tuple(inputs), tuple(preacts), normed, inv_std)

    def backward(
        self, tape: MLPTape, grad_output: Tensor, linear_transposed: LinearFn
    ) -> list[tuple[Tensor, Tensor]]:
        """Back-propagate ``grad_output`` ``[N, t, d]`` to every matrix, token by token in parallel.

        Returns ``[(inputs_i, grads_i)]`` such that token ``t``'s gradient w.r.t. matrix ``i`` is
        ``inputs_i[:, t, :, None] * grads_i[:, t, None, :]``. The residual's own path leads to
        ``x``, not to any weight, so it contributes nothing here.
        """
        grad = grad_output
        if tape.normed is not None:
            grad = _layer_norm_backward(grad, tape.normed, tape.inv_std)
        grads: list[Tensor] = [grad]
        for i in range(self.depth - 1, 0, -1):
            grad = _activation_backward(
                self.activation, linear_transposed(i, grad), tape.preacts[i - 1]
            )
            grads.append(grad)
        grads.reverse()
        return list(zip(tape.inputs, grads, strict=True))

    def extra_repr(self) -> str:
        """Shape and options, for ``print(module)``."""
        return (
            f"heads={self.heads}, dim={self.dim}, depth={self.depth}, hidden={self.hidden}, "
            f"activation={self.activation!r}, residual={self.residual}, norm={self.norm}"
        )


def _check_positive_int(name: str, value: int) -> None:
    """Raise a ValueError unless ``value`` is an int ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _initial_matrix(heads: int, d_in: int, d_out: int, *, linear: bool) -> Tensor:
    """Initial value of one matrix: zeros for the linear memory, else ``N(0, 1/d_in)``."""
    if linear:
        return torch.zeros(heads, d_in, d_out)
    return torch.randn(heads, d_in, d_out) / math.sqrt(d_in)
