"""Settings of the ``miras`` plugin's components (docs/zoo.md, "MIRAS"; frozen attrs, every field
defaulted). Defaults are the MIRAS paper's (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv
2504.13173) where it states them; a comment names the choice where it does not."""

from __future__ import annotations

import attrs

from memforge import option

#: The steps ``miras.huber`` offers above its threshold (docs/zoo.md, "MIRAS": Yaad's switch).
L1_STEPS = ("sign", "tanh", "normalised")

#: The range of the ℓp exponent: p = 1 is ℓ1 (through the smooth surrogates), p = 2 is ℓ2; above
#: 4 the paper's ablation already degrades ("p = 4 worst") and the gradient grows as |e|^(p-1).
P_RANGE = (1.0, 4.0)
#: The range of the ℓq exponent of Moneta's link (``miras.lq``): q = 2 is no normalisation
#: (W = A); the paper uses 4.
Q_RANGE = (2.0, 8.0)
#: Where Moneta's dual starts: the link's inverse of the memory's drawn weights, or the draw.
DUAL_INITS = ("inverse", "draw")
#: How far from 3 ``q`` must be for the ``"scale"`` link's inverse, whose factor
#: ``||W||_q^((q-2)/(3-q))`` under- or overflows as ``q`` nears 3.
SCALE_INVERSE_GAP = 0.25


def scale_inverse_refusal(q: float, link: str, dual_init: str) -> str | None:
    """Why Moneta's dual cannot start at the link's inverse with these settings, or ``None``."""
    if dual_init == "inverse" and link == "scale" and abs(q - 3.0) < SCALE_INVERSE_GAP:
        return (f"the 'scale' link has no usable inverse at q={q:g} (none at q = 3); set "
                f"dual_init='draw', link='p_norm', or q at least {SCALE_INVERSE_GAP} away from 3")
    return None


@attrs.frozen(kw_only=True)
class MemoryConfig:
    """``miras.mlp``: the MIRAS memory ``x + LN(GELU(x W1) W2)`` per head, hidden width 4d (the
    paper's 2-layer MLP, expansion 4, residual and layer norm); no settings."""


@attrs.frozen(kw_only=True)
class LpObjectiveConfig:
    """``miras.lp``: Moneta's ℓp attentional bias ``||M(k) - v||_p^p`` with smooth surrogates."""

    p: float = option(3.0, ge=P_RANGE[0], le=P_RANGE[1], typical=(1.0, 4.0),
                      help="the exponent p of the l_p loss (Moneta: 3; p = 2 is the l2 loss)")
    surrogate: str = option("tanh", choices=("tanh", "sqrt"),
                            help="smooth Sign: 'tanh' is the paper's tanh(a e), 'sqrt' is "
                                 "e / sqrt(e^2 + eps) (the exact gradient of sum (e^2 + eps)^(p/2))")
    # The paper gives the surrogates' forms, not their constants.
    sharpness: float = option(10.0, gt=0, le=1e4, typical=(1.0, 100.0),
                              help="a in Sign(e) ~ tanh(a e) (the 'tanh' surrogate)")
    eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-2),
                        help="eps in |e| ~ sqrt(e^2 + eps)")


@attrs.frozen(kw_only=True)
class HuberObjectiveConfig:
    """``miras.huber``: Yaad's Huber bias, the threshold ``delta_t`` per token and head from a gate
    on the layer input (``delta_t = sqrt(d) * softplus(x w + b)``, ``d`` the head width)."""

    # The paper makes delta_t data-dependent without giving its start. A fresh MIRAS memory's error
    # norm is about sqrt(d) (its layer-normed output alone has that norm), so 1 starts the
    # threshold in the middle of the errors and both branches are taken from the first step.
    delta_init: float = option(1.0, gt=0, le=100.0, typical=(0.1, 10.0),
                               help="initial threshold delta, in units of sqrt(head width)")
    # docs/zoo.md, "MIRAS": Yaad's switch. The paper's first Huber variant steps sign(e) (the
    # component's default, so specs saved before the option keep their meaning); tanh is MIRAS'
    # own smooth Sign; normalised is its third variant, the Huber loss of the error norm, the
    # only one of the three with which Yaad learned MQAR (49% and 53% for two of three seeds at
    # the Yaad presets' steps, where sign stayed at 3%), which the Yaad presets choose.
    l1_step: str = option("sign", choices=L1_STEPS,
                          help="the step above the threshold: 'sign' delta sign(e), 'tanh' "
                               "delta tanh(a e), 'normalised' delta e / ||e||")
    # As miras.lp's sharpness: the paper gives the tanh surrogate's form, not its constant.
    sharpness: float = option(10.0, gt=0, le=1e4, typical=(1.0, 100.0),
                              help="a in tanh(a e) (the 'tanh' step)")


@attrs.frozen(kw_only=True)
class L2ObjectiveConfig:
    """``miras.l2``: Memora's ℓ2 attentional bias ``0.5 ||M(k) - v||^2``; no settings."""


@attrs.frozen(kw_only=True)
class _Decay:
    """The scalar decay every MIRAS retention has, ``alpha_t = max_decay * sigmoid(x w + b)``,
    ``keep_t = 1 - alpha_t``. No config derives from another, so one retention's config is never
    accepted for another's."""

    init: float = option(0.02, gt=0, lt=1, typical=(1e-3, 0.1), help="initial alpha")
    max_decay: float = option(1.0, gt=0, le=1, typical=(0.2, 1.0), help="upper bound of alpha")

    def __attrs_post_init__(self) -> None:
        if self.init >= self.max_decay:
            raise ValueError(f"'init'={self.init} must be < 'max_decay'={self.max_decay}")


@attrs.frozen(kw_only=True)
class DecayConfig(_Decay):
    """``miras.l2_decay``: Yaad's ℓ2 retention, the scalar decay alone (log space)."""


@attrs.frozen(kw_only=True)
class LqRetentionConfig(_Decay):
    """``miras.lq``: Moneta's ℓq retention, ``A_t = keep_t A_{t-1} - theta_t grad``,
    ``W = f(A)`` with the ℓq link ``f`` at chunk ends (the paper's parallel form)."""

    q: float = option(4.0, ge=Q_RANGE[0], le=Q_RANGE[1], typical=(2.0, 6.0),
                      help="the exponent q of the l_q normalisation (Moneta: 4; q = 2 is none)")
    # docs/zoo.md, "MIRAS": the transcribed W = A / ||A||_q^(q-2) grows as A decays when q > 3
    # (16K random tokens: weight norms near 1e6); the p-norm link shares its denominator and
    # shrinks with A.
    link: str = option("p_norm", choices=("p_norm", "scale"),
                       help="W from the dual A: 'p_norm' sign(A)|A|^(q-1) / ||A||_q^(q-2), "
                            "'scale' A / ||A||_q^(q-2)")
    # docs/zoo.md, "MIRAS": the paper does not say where A starts; started at the memory's
    # Gaussian draw, the p-norm link at q = 4 shrank the small preset's memory 29-fold, and
    # writes did not move a fresh memory's reads toward their values.
    dual_init: str = option("inverse", choices=DUAL_INITS,
                            help="where A starts: 'inverse' the link's inverse of the memory's "
                                 "drawn weights (the memory starts at the draw), 'draw' the draw")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        refusal = scale_inverse_refusal(self.q, self.link, self.dual_init)
        if refusal:
            raise ValueError(refusal)


@attrs.frozen(kw_only=True)
class KLRetentionConfig(_Decay):
    """``miras.kl``: Memora's KL retention, ``W = c * softmax(L)`` with
    ``L_t = keep_t L_{t-1} - theta_t grad``: every column of every matrix on the simplex scaled
    by ``c``."""

    # The paper leaves c open; 1 keeps every output a convex combination of the inputs.
    scale: float = option(1.0, gt=0, le=1e3, typical=(0.1, 10.0),
                          help="c, the l1 norm of every column of the memory's matrices")


@attrs.frozen(kw_only=True)
class GDConfig:
    """``miras.gd``: plain gradient descent, ``theta_t = max_lr * sigmoid(x w + b)`` per token and
    head, no momentum (all three MIRAS models)."""

    # As titans.sgd: the loss is summed over features, and theta <= 0.01 stayed finite over 8K
    # float32 tokens in the titans presets.
    max_lr: float = option(0.01, gt=0, le=1, typical=(1e-3, 0.1),
                           help="upper bound of the step size theta")
    lr_init: float = option(0.005, gt=0, lt=1, typical=(1e-4, 1e-2), help="initial step size theta")

    def __attrs_post_init__(self) -> None:
        if self.lr_init >= self.max_lr:
            raise ValueError(f"'lr_init'={self.lr_init} must be < 'max_lr'={self.max_lr}")


@attrs.frozen(kw_only=True)
class ProjectionConfig:
    """``miras.conv_qkv``: the MIRAS block's q/k/v (linear, short causal convolution, SiLU,
    ℓ2-normalised q and k)."""

    conv_kernel: int = option(4, ge=1, le=256, typical=(1, 8),
                              help="depthwise convolution width (MIRAS: 4)")


@attrs.frozen(kw_only=True)
class ChunkStartConfig:
    """``miras.chunk_start``: every token reads the weights at the start of its chunk; no settings."""


@attrs.frozen(kw_only=True)
class LayerConfig:
    """``miras.moneta``, ``miras.yaad``, ``miras.memora``: the engine's fast-weight memory layer."""

    # MIRAS §5.3: "b usually is 16 or 64"; 16 is the finer of the two.
    chunk_size: int = option(16, ge=1, le=4096, typical=(1, 64),
                             help="tokens whose gradients are taken at the same chunk-start weights")
