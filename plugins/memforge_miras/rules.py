"""The MIRAS learning rules' own parts (docs/zoo.md, "MIRAS"): Moneta's ℓp objective and ℓq
retention, Yaad's Huber objective, Memora's KL retention.

Each is a plain ``nn.Module`` satisfying one Protocol of :mod:`memforge.interfaces`
(``Objective``, or ``Retention`` with ``ProjectsWeights``); the plugin registers them. The parts
MIRAS shares with other rules (the ℓ2 objective, the scalar decay, gradient descent with a gated
step) are the core's, :mod:`memforge.engine.rules`.

Moneta's and Memora's retentions are *mirror maps* (``mirror = True``): the state that
accumulates the decayed gradient steps linearly is a dual ``A`` (Memora: the logits ``L``), and
the weights the memory reads and takes its gradients at are ``W = project(A)``:

* Moneta: ``A_t = keep_t A_{t-1} - theta_t grad_W l_p(W_{t-1})``, ``W_t = f(A_t)`` with the ℓq
  link ``f(A) = sign(A) |A|^(q-1) / ||A||_q^(q-2)`` (or, as the paper's formula is transcribed,
  ``A / ||A||_q^(q-2)``: :func:`lq_normalise`);
* Memora: ``L_t = keep_t L_{t-1} - theta_t grad_W l_2(W_{t-1})``, ``W_t = c softmax(L_t)``, which
  is the paper's ``W_t = c softmax(keep_t log W_{t-1} - theta_t grad)`` because ``log W`` and ``L``
  differ by a constant per softmax slice, and softmax ignores it.

Both apply the map at chunk ends (``applies_at = "chunk_end"``), as the paper's parallel form does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.engine.rules import AdaptiveDecay
from memforge.interfaces import ObjectiveInputs
from memforge.linear import Linear
from memforge_miras.configs import DUAL_INITS, L1_STEPS, scale_inverse_refusal


# -- objectives ----------------------------------------------------------------------------------
def lp_gradient(error: Tensor, p: float, surrogate: str, sharpness: float, eps: float) -> Tensor:
    """The smoothed gradient of ``sum_i |e_i|^p``: ``p * Sign(e) * |e|^(p-1)`` with
    ``|e| ~ sqrt(e^2 + eps)`` and ``Sign(e) ~ tanh(sharpness * e)`` (``"tanh"``, MIRAS' surrogate)
    or ``e / sqrt(e^2 + eps)`` (``"sqrt"``: then it is exactly the gradient of
    ``sum_i (e_i^2 + eps)^(p/2)``)."""
    smooth_sq = error.square() + eps
    if surrogate == "tanh":
        return p * torch.tanh(sharpness * error) * smooth_sq.pow((p - 1.0) / 2.0)
    return p * error * smooth_sq.pow(p / 2.0 - 1.0)


class _SurrogateLp(torch.autograd.Function):
    """``sum_i (e_i^2 + eps)^(p/2) - eps^(p/2)`` whose backward is :func:`lp_gradient`, so
    autograd of :meth:`LpObjective.loss` gives :meth:`LpObjective.loss_grad` for either surrogate
    (the ``tanh`` gradient has no closed-form antiderivative). The backward is made of
    differentiable ops, so second-order (outer) gradients flow through it."""

    @staticmethod
    def forward(ctx, error: Tensor, p: float, surrogate: str, sharpness: float, eps: float) -> Tensor:
        ctx.save_for_backward(error)
        ctx.settings = (p, surrogate, sharpness, eps)
        return ((error.square() + eps).pow(p / 2.0) - eps ** (p / 2.0)).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (error,) = ctx.saved_tensors
        return grad[..., None] * lp_gradient(error, *ctx.settings), None, None, None, None


class LpObjective(nn.Module):
    """Moneta's attentional bias ``||M(k) - v||_p^p`` with MIRAS' smooth surrogates.

    :meth:`loss_grad` is :func:`lp_gradient` of the error ``e = M(k) - v``; :meth:`loss` reports
    the smoothed loss ``sum_i (e_i^2 + eps)^(p/2) - eps^(p/2)`` and back-propagates exactly
    :meth:`loss_grad` (docs/zoo.md, "MIRAS": the surrogates). No per-token inputs.

    Args:
        p: the exponent, ``>= 1``.
        surrogate: ``"tanh"`` (the paper's) or ``"sqrt"``.
        sharpness: ``a`` of ``tanh(a e)``.
        eps: ``eps`` of ``sqrt(e^2 + eps)``.
    """

    window = 1
    squared_error = False

    def __init__(self, *, p: float, surrogate: str, sharpness: float, eps: float) -> None:
        super().__init__()
        if not p >= 1.0:
            raise ValueError(f"p must be >= 1, got {p}")
        if surrogate not in ("tanh", "sqrt"):
            raise ValueError(f"surrogate must be 'tanh' or 'sqrt', got {surrogate!r}")
        self.p, self.surrogate, self.sharpness, self.eps = float(p), surrogate, float(sharpness), float(eps)

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """Per-token smoothed ``||prediction - target||_p^p``, ``[..., t]``."""
        return _SurrogateLp.apply(prediction - target, self.p, self.surrogate, self.sharpness,
                                  self.eps)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None = None) -> Tensor:
        """The surrogate gradient with respect to the prediction (:func:`lp_gradient`)."""
        return lp_gradient(prediction - target, self.p, self.surrogate, self.sharpness, self.eps)

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """No per-token inputs."""
        return ObjectiveInputs(None, None)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, surrogate={self.surrogate!r}, sharpness={self.sharpness:g}, eps={self.eps:g}"


def _log_cosh(x: Tensor) -> Tensor:
    """``log cosh x`` without overflow; its autograd gradient is ``tanh x``."""
    return x.abs() + F.softplus(-2.0 * x.abs()) - math.log(2.0)


class HuberObjective(nn.Module):
    """Yaad's attentional bias: Huber with a threshold ``delta_t`` per token and head.

    With ``e = M(k) - v``, token by token: the ℓ2 step ``e`` when ``||e||_2 <= delta_t``, else
    ``delta_t`` times a bounded step ``s(e)`` (MIRAS, Yaad: ``W_t = a_t W_{t-1} - eta_t grad l_2``
    if ``||M(k_t) - v_t|| <= delta_t``, else ``a_t W_{t-1} - eta_t delta_t grad l_1``). ``s`` is
    ``l1_step`` (docs/zoo.md, "MIRAS": Yaad's switch), each with the loss whose gradient it is
    (``0.5 ||e||^2`` below the threshold):

    * ``"sign"``: ``sign(e)``, the paper's ℓ1 step; loss ``delta (||e||_1 - delta / 2)``. Flat in
      ``e``: no outer gradient reaches the error through it.
    * ``"tanh"``: ``tanh(a e)``, MIRAS' smooth ``Sign`` (``a`` = ``sharpness``, as ``miras.lp``);
      loss ``delta (sum_i log cosh(a e_i) / a - delta / 2)``.
    * ``"normalised"``: ``e / ||e||_2``, MIRAS' third Huber variant ``H(||e||_2)``, loss
      ``delta (||e||_2 - delta / 2)``: the ℓ2 step's direction with its length capped at
      ``delta``, continuous at the threshold.

    ``delta_t = sqrt(d) * softplus(x w + b)`` comes from the layer input (the side input of
    :class:`memforge.interfaces.ObjectiveInputs`), in units of ``sqrt(d)``: the error norm of a
    fresh MIRAS memory, whose layer-normed output alone has norm ``sqrt(d)``.

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        head_dim: per-head width ``d``.
        delta_init: ``delta / sqrt(d)`` at zero input (``softplus(b)``).
        l1_step: the step above the threshold, one of :data:`L1_STEPS`.
        sharpness: ``a`` of the ``"tanh"`` step.
    """

    window = 1
    squared_error = False

    def __init__(self, dim: int, heads: int, head_dim: int, *, delta_init: float,
                 l1_step: str = "sign", sharpness: float = 10.0) -> None:
        super().__init__()
        if not delta_init > 0:
            raise ValueError(f"delta_init must be > 0, got {delta_init}")
        if l1_step not in L1_STEPS:
            raise ValueError(f"l1_step must be one of {L1_STEPS}, got {l1_step!r}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {sharpness}")
        self.l1_step, self.sharpness = l1_step, float(sharpness)
        self.unit = math.sqrt(head_dim)
        self.delta_gate = Linear(dim, heads)
        nn.init.normal_(self.delta_gate.weight, std=0.02)
        # softplus(b) = delta_init.
        nn.init.constant_(self.delta_gate.bias, delta_init + math.log(-math.expm1(-delta_init)))

    @staticmethod
    def _branches(error: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Where the ℓ2 branch applies (``||e||^2 <= delta^2``, ``[..., t]``), and ``||e||``
        where it does not (1 where it does, so that neither branch divides by a zero norm nor
        sends a NaN through ``torch.where``'s backward, even where ``delta^2`` underflows)."""
        square = error.square().sum(-1)
        quadratic = square <= delta.square()
        return quadratic, torch.where(quadratic, torch.ones_like(square), square).sqrt()

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """Per-token Huber loss ``[..., t]``; ``side`` is ``delta`` ``[..., t]``."""
        error, delta = prediction - target, _delta(side)
        quadratic, norm = self._branches(error, delta)
        if self.l1_step == "sign":
            above = error.abs().sum(-1)
        elif self.l1_step == "tanh":
            above = _log_cosh(self.sharpness * error).sum(-1) / self.sharpness
        else:
            above = norm
        return torch.where(quadratic, 0.5 * error.square().sum(-1), delta * (above - 0.5 * delta))

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """``e`` or ``delta * s(e)`` per token (the branch by ``||e||`` against ``delta``)."""
        error, delta = prediction - target, _delta(side)
        quadratic, norm = self._branches(error, delta)
        if self.l1_step == "sign":
            step = torch.sign(error)
        elif self.l1_step == "tanh":
            step = torch.tanh(self.sharpness * error)
        else:
            step = error / norm[..., None]
        return torch.where(quadratic[..., None], error, delta[..., None] * step)

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """``delta`` ``[B, T, H]`` for the layer input ``x`` ``[B, T, D]``."""
        return ObjectiveInputs(self.unit * F.softplus(self.delta_gate(x)), None)

    def extra_repr(self) -> str:
        sharpness = f", sharpness={self.sharpness:g}" if self.l1_step == "tanh" else ""
        return f"l1_step={self.l1_step!r}{sharpness}"


def _delta(side: Tensor | None) -> Tensor:
    if side is None:
        raise ValueError("miras.huber needs its threshold delta as the side input; pass the "
                         "side of its forward(x)")
    return side


# -- retentions ----------------------------------------------------------------------------------
class LqRetention(nn.Module):
    """Moneta's ℓq retention: a scalar decay per token and head (``keep_t``, log space) on the
    dual ``A``, and the ℓq link ``W = f(A)`` (per matrix, sequence and head, :func:`lq_normalise`)
    at chunk ends. ``q = 2`` is no normalisation (``W = A``).

    ``dual_init`` is where the dual starts (``initial_dual``): ``"inverse"``, the link's inverse
    of the network's drawn weights (:func:`lq_inverse`), so the memory starts at the draw; or
    ``"draw"``, the draw itself, so the memory starts at its link (at ``q = 4`` a Gaussian draw
    shrinks more the larger the matrix: 29-fold for ``miras.moneta_lmm``'s ``32 x 128``).

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        q: the exponent, ``>= 2``.
        link: ``"p_norm"`` or ``"scale"`` (:func:`lq_normalise`).
        init: initial ``alpha = 1 - keep``.
        max_decay: upper bound of ``alpha``.
        dual_init: ``"inverse"`` or ``"draw"``.
    """

    applies_at = "chunk_end"
    mirror = True
    decay_before_gradient = False

    def __init__(self, dim: int, heads: int, *, q: float, link: str, init: float,
                 max_decay: float, dual_init: str = "inverse") -> None:
        super().__init__()
        if not q >= 2.0:
            raise ValueError(f"q must be >= 2, got {q}")
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        if dual_init not in DUAL_INITS:
            raise ValueError(f"dual_init must be one of {DUAL_INITS}, got {dual_init!r}")
        refusal = scale_inverse_refusal(q, link, dual_init)
        if refusal:
            raise ValueError(refusal)
        self.q, self.link, self.dual_init = float(q), link, dual_init
        self.decay = AdaptiveDecay(dim, heads, init=init, max_decay=max_decay)

    def initial_dual(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The dual to start from for the network's drawn ``weights``: their :func:`lq_inverse`
        (``"inverse"``) or themselves (``"draw"``)."""
        if self.dual_init == "draw":
            return weights
        return tuple(lq_inverse(w, self.q, self.link) for w in weights)

    def forward(self, x: Tensor) -> Tensor:
        """``log_keep`` ``[B, T, H]`` for ``x`` ``[B, T, D]``."""
        return self.decay(x)

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The link of every matrix ``A`` ``[N, d_in, d_out]``."""
        return tuple(lq_normalise(a, self.q, self.link) for a in weights)

    def extra_repr(self) -> str:
        return f"q={self.q:g}, link={self.link!r}, dual_init={self.dual_init!r}"


#: The ℓq links :func:`lq_normalise` offers.
LINKS = ("p_norm", "scale")


def lq_normalise(a: Tensor, q: float, link: str) -> Tensor:
    """Moneta's map from the dual ``A`` to the weights, over each ``[d_in, d_out]`` matrix:

    * ``"p_norm"``: ``sign(A) |A|^(q-1) / ||A||_q^(q-2)``, the gradient of ``0.5 ||A||_q^2`` (the
      link of the p-norm algorithms, whose denominator the paper's formula has). Homogeneous of
      degree 1: decaying ``A`` decays ``W``, and ``||W||_(q/(q-1)) = ||A||_q``.
    * ``"scale"``: ``A / ||A||_q^(q-2)``, the paper's formula as docs/zoo.md transcribes it.
      Homogeneous of degree ``3 - q``: for ``q > 3`` a decaying ``A`` makes ``W`` grow.

    The norm is floored at ``1e-6`` so an all-zero state maps to itself instead of 0/0.
    """
    if q == 2.0:
        return a
    norm = _matrix_norm(a, q)
    if link == "scale":
        return a / norm.pow(q - 2.0)
    return torch.sign(a) * a.abs().pow(q - 1.0) / norm.pow(q - 2.0)


def _matrix_norm(x: Tensor, r: float) -> Tensor:
    """``||x||_r`` over each ``[d_in, d_out]`` matrix, floored at ``1e-6``, ``[..., 1, 1]``."""
    return x.abs().pow(r).sum((-2, -1), keepdim=True).pow(1.0 / r).clamp_min(1e-6)


def lq_inverse(w: Tensor, q: float, link: str) -> Tensor:
    """The dual ``A`` whose :func:`lq_normalise` is ``w``, over each ``[d_in, d_out]`` matrix:

    * ``"p_norm"``: the p-norm link of the conjugate exponent ``q* = q / (q - 1)``,
      ``sign(W) |W|^(q*-1) / ||W||_q*^(q*-2)`` (the gradients of ``0.5 ||.||_q^2`` and
      ``0.5 ||.||_q*^2`` are inverse maps);
    * ``"scale"``: ``W ||W||_q^((q-2)/(3-q))`` (``A`` and ``W`` are parallel, and
      ``||W||_q = ||A||_q^(3-q)``); undefined at ``q = 3``.

    It inverts :func:`lq_normalise` where that map's floor (``||A||_q >= 1e-6``) does not bind:
    for the p-norm link wherever ``||W||_q* >= 1e-6`` (the two norms are equal, floored alike);
    for the scale link ``||A||_q = ||W||_q^(1/(3-q))`` under- or overflows as ``q`` nears 3
    (hence :data:`memforge_miras.configs.SCALE_INVERSE_GAP`) or for extreme ``||W||``. Its
    gradient is infinite at zero entries: it is meant for initial weights, without gradients.
    """
    if q == 2.0:
        return w
    if link == "scale":
        return w * _matrix_norm(w, q).pow((q - 2.0) / (3.0 - q))
    return lq_normalise(w, q / (q - 1.0), "p_norm")


class KLRetention(nn.Module):
    """Memora's KL retention: a scalar decay per token and head on the logits ``L`` (log space),
    and ``W = c * softmax(L)`` at chunk ends, the softmax over each column (the inputs of one
    output unit) of every matrix, so every output is ``c`` times a convex combination of its
    inputs and ``W >= 0``, ``||W[:, j]||_1 = c``.

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        scale: ``c``.
        init: initial ``alpha = 1 - keep``.
        max_decay: upper bound of ``alpha``.
    """

    applies_at = "chunk_end"
    mirror = True
    decay_before_gradient = False

    def __init__(self, dim: int, heads: int, *, scale: float, init: float, max_decay: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.decay = AdaptiveDecay(dim, heads, init=init, max_decay=max_decay)

    def forward(self, x: Tensor) -> Tensor:
        """``log_keep`` ``[B, T, H]`` for ``x`` ``[B, T, D]``."""
        return self.decay(x)

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``c * softmax(L, over d_in)`` for every matrix of logits ``L`` ``[N, d_in, d_out]``."""
        return tuple(self.scale * torch.softmax(logits, dim=-2) for logits in weights)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"
