"""Settings of the ``lact`` plugin's components (docs/zoo.md, "LaCT"); defaults and their sources
are the public LaCT code's (``lact_llm``), except where a help text says otherwise."""

from __future__ import annotations

import attrs

from memforge import option
from memforge_lact.ops import MUON_COEFFICIENTS


@attrs.frozen(kw_only=True)
class LaCTLayerConfig:
    """The LaCT memory layer (``lact.layer``): SwiGLU fast weights trained per large chunk."""

    chunk_size: int = option(2048, ge=1, le=1 << 20, typical=(16, 4096),
                             help="tokens per test-time-training chunk (the paper: 2048 and up; "
                                  "the queries of a chunk read the weights from before its update)")
    expansion: float = option(1.0, gt=0, le=16, typical=(0.5, 4.0),
                              help="hidden width of the SwiGLU fast weights as a multiple of the "
                                   "head width (the code's inter_multi)")
    base_lr: float = option(1e-3, gt=0, le=10.0, typical=(1e-4, 0.1),
                            help="initial per-token step eta: softplus(x W + softplus^-1(base_lr))")
    momentum: bool = option(True, help="momentum with a learned gate, averaged over each chunk")
    muon: bool = option(False, help="Newton-Schulz orthogonalisation of each chunk's update (Muon)")
    muon_coefficients: str = option("schedule", choices=tuple(MUON_COEFFICIENTS),
                                    help="Muon's quintic coefficients: the LaCT code's schedule of "
                                         "five, or ATLAS' fixed (3.4445, -4.7750, 2.0315)")
    renormalize: bool = option(True, help="rescale each output row of each fast weight to its "
                                          "norm at the sequence start after every update")
    output_scale: bool = option(True, help="a learned per-head SiLU scale of the normalised read "
                                           "(the code's learnable_ttt_scale)")
    norm_eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-3),
                             help="epsilon of the per-head output RMSNorm")


@attrs.frozen(kw_only=True)
class ContinuumConfig:
    """The continuum memory (``lact.continuum``): a chain of ``levels`` fast-weight SwiGLU MLPs,
    level ``l`` updating every ``chunk_size * ratio^(l-1)`` tokens (Nested Learning's example
    spectrum 16, 256, 4096 by default)."""

    chunk_size: int = option(16, ge=1, le=65536, typical=(1, 256),
                             help="period of the fastest level, in tokens (its queries read the "
                                  "weights from before its block's update)")
    ratio: int = option(16, ge=2, le=64, typical=(2, 16),
                        help="each level's period as a multiple of the one before")
    levels: int = option(3, ge=1, le=8, typical=(2, 4), help="memory MLPs in the chain")
    expansion: float = option(1.0, gt=0, le=16, typical=(0.5, 4.0),
                              help="hidden width of each level's SwiGLU as a multiple of the "
                                   "head width")
    base_lr: float = option(1e-3, gt=0, le=10.0, typical=(1e-4, 0.1),
                            help="initial per-token step eta of each level")
    renormalize: bool = option(True, help="rescale each output row of a level to its initial norm "
                                          "after each of its updates")
    norm_eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-3),
                             help="epsilon of the per-head output RMSNorm")


@attrs.frozen(kw_only=True)
class LaCTBlockConfig:
    """The LaCT block (``lact.block``): sliding-window attention beside the LaCT memory, summed,
    then the feed-forward; its attention and memory layer are the spec's."""
