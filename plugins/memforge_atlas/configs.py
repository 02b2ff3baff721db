"""Settings of the ``atlas`` plugin's components (docs/zoo.md, "ATLAS"; frozen attrs, every field
defaulted). Where the paper leaves a value open the default says where it came from."""

from __future__ import annotations

import attrs

from memforge import option

ACTIVATIONS = ("gelu", "silu", "relu")
EXECUTORS = ("auto", "closed_form", "sequential")


@attrs.frozen(kw_only=True)
class PolyMLPConfig:
    """``atlas.poly_mlp``: the polynomial feature map ``phi_p``, then an MLP memory."""

    degree: int = option(2, ge=1, le=8, typical=(1, 3),
                         help="polynomial degree p of the feature map on keys and queries (the "
                              "paper does not state the one it used)")
    # The first fast-weight matrix has C(d + p, p) rows per sequence and head: at head width 32,
    # p = 2 gives 561, p = 3 gives 6545 (a 6545 x hidden matrix per sequence and head).
    max_width: int = option(1024, ge=1, le=65536, typical=(64, 4096),
                            help="largest feature width C(head width + degree, degree) accepted "
                                 "(the first matrix's rows per sequence and head)")
    depth: int = option(1, ge=1, le=8, typical=(1, 3),
                        help="matrices of the MLP after the feature map (1: a matrix memory on "
                             "the features)")
    expansion: float = option(4.0, gt=0, le=16, typical=(1.0, 4.0),
                              help="hidden width as a multiple of the head width (depth >= 2; "
                                   "ATLAS App. E: 4)")
    activation: str = option("gelu", choices=ACTIVATIONS,
                             help="hidden non-linearity (ATLAS App. E: GELU)")
    residual: bool = option(True, help="add the raw key to the output (ATLAS App. E)")
    norm: bool = option(True, help="parameter-free layer norm of the MLP's output before the "
                                   "residual (per token; the paper normalises at chunk ends)")


@attrs.frozen(kw_only=True)
class OmegaConfig:
    """``atlas.omega``: the Omega rule, a gated window of the last ``c`` pairs."""

    # ATLAS Fig. 5 sweeps c in {2, 4, 8, 16}; the headline runs' c is not stated.
    window: int = option(4, ge=1, le=4096, typical=(1, 16),
                         help="c: pairs each step sums, the token's and the c - 1 before it "
                              "(1: the online delta rule); at most max(memory_layer.chunk_size, 16) + 1")
    gated: bool = option(True, help="learn a gate gamma in [0, 1] per pair (in-context pruning); "
                                    "false weighs every pair 1")
    gamma_init: float = option(0.9, gt=0, lt=1, typical=(0.5, 0.99),
                               help="gamma at zero input")


@attrs.frozen(kw_only=True)
class DotConfig:
    """``atlas.dot``: the negative dot product (Hebbian write); no settings."""


@attrs.frozen(kw_only=True)
class MuonConfig:
    """``atlas.muon``: momentum orthogonalised by Newton-Schulz at every token."""

    # Newton-Schulz removes the update's scale, so theta only weighs a token against the
    # momentum it joins; any bound works, 1 keeps theta in the same range as eta.
    max_lr: float = option(1.0, gt=0, le=1, typical=(0.1, 1.0),
                           help="upper bound of the step weight theta")
    lr_init: float = option(0.5, gt=0, lt=1, typical=(0.05, 0.9), help="initial theta")
    momentum_init: float = option(0.9, gt=0, lt=1, typical=(0.5, 0.99), help="initial momentum eta")
    # A step's singular values are about `scale`; with a decay alpha the weights settle near
    # scale / alpha in spectral norm (0.02 / 0.02 = 1 with titans.adaptive_decay's default).
    scale: float = option(0.02, gt=0, le=1, typical=(0.005, 0.1),
                          help="size of every orthogonalised step (Muon's learning rate)")
    steps: int = option(5, ge=1, le=20, typical=(3, 8),
                        help="Newton-Schulz iterations (Muon, ATLAS: 5)")

    def __attrs_post_init__(self) -> None:
        if self.lr_init >= self.max_lr:
            raise ValueError(f"'lr_init'={self.lr_init} must be < 'max_lr'={self.max_lr}")


@attrs.frozen(kw_only=True)
class GDConfig:
    """``atlas.gd``: gradient descent with optional momentum, no Newton-Schulz (Muon's ablation)."""

    max_lr: float = option(0.01, gt=0, le=1, typical=(1e-3, 0.1),
                           help="upper bound of the step size theta (titans' bound)")
    lr_init: float = option(0.005, gt=0, lt=1, typical=(1e-4, 1e-2), help="initial step size theta")
    momentum: bool = option(True, help="carry past updates (false: plain gradient descent)")
    momentum_init: float = option(0.9, gt=0, lt=1, typical=(0.5, 0.99), help="initial momentum eta")

    def __attrs_post_init__(self) -> None:
        if self.lr_init >= self.max_lr:
            raise ValueError(f"'lr_init'={self.lr_init} must be < 'max_lr'={self.max_lr}")


@attrs.frozen(kw_only=True)
class AtlasLayerConfig:
    """The ATLAS memory layers (``atlas.omeganet``, ``atlas.deep_transformer``, ``atlas.atlas``):
    the engine's fast-weight layer built from the spec's projection, memory, objective,
    optimizer, retention and retrieval."""

    # MIRAS/ATLAS: "b usually is 16 or 64".
    chunk_size: int = option(16, ge=1, le=4096, typical=(1, 64),
                             help="tokens whose gradients use the same chunk-start weights")
    executor: str = option("auto", choices=EXECUTORS,
                           help="which executor runs the rule (auto: the fastest that can)")
