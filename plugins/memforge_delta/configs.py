"""Settings of the ``delta`` plugin's memory layers (docs/delta.md, "The memory layers")."""

from __future__ import annotations

import attrs

from memforge import option


@attrs.frozen(kw_only=True)
class _LayerConfig:
    """The settings both delta layers share. Neither config derives from the other, so a gated
    config is never accepted where an ungated one is expected (its decay fields would be ignored)."""

    chunk_size: int = option(64, ge=1, le=4096, typical=(1, 128),
                             help="tokens per chunk of the WY kernel (the result is the same at "
                                  "every size: only speed changes)")
    conv_size: int = option(4, ge=1, le=64, typical=(1, 8),
                            help="taps of the causal depthwise convolution on q, k, v (1: none "
                                 "across tokens)")
    norm_eps: float = option(1e-6, gt=0, le=1.0, typical=(1e-8, 1e-3),
                             help="epsilon of the per-head output RMSNorm")


@attrs.frozen(kw_only=True)
class DeltaNetConfig(_LayerConfig):
    """``delta.deltanet``: the delta rule with no decay (DeltaNet)."""


@attrs.frozen(kw_only=True)
class GatedDeltaNetConfig(_LayerConfig):
    """``delta.gated_deltanet``: the delta rule taken at the decayed state (Gated DeltaNet)."""

    decay_min: float = option(1.0, gt=0, typical=(0.1, 4.0),
                              help="smallest initial decay rate A (per head, drawn uniformly "
                                   "in [decay_min, decay_max])")
    decay_max: float = option(16.0, gt=0, typical=(1.0, 32.0),
                              help="largest initial decay rate A (Mamba2 and GDN: 16)")
    dt_min: float = option(0.001, gt=0, lt=1.0, typical=(1e-4, 0.01),
                           help="smallest initial time step softplus(dt_bias) (log-uniform)")
    dt_max: float = option(0.1, gt=0, lt=1.0, typical=(0.01, 0.5),
                           help="largest initial time step softplus(dt_bias) (log-uniform)")

    def __attrs_post_init__(self) -> None:
        _check_ranges(self)


@attrs.frozen(kw_only=True)
class GatedDecayConfig:
    """``delta.gated_decay``: GDN's decay gate as a retention (gradient at the decayed state)."""

    decay_min: float = option(1.0, gt=0, typical=(0.1, 4.0),
                              help="smallest initial decay rate A (per head, drawn uniformly "
                                   "in [decay_min, decay_max])")
    decay_max: float = option(16.0, gt=0, typical=(1.0, 32.0),
                              help="largest initial decay rate A (Mamba2 and GDN: 16)")
    dt_min: float = option(0.001, gt=0, lt=1.0, typical=(1e-4, 0.01),
                           help="smallest initial time step softplus(dt_bias) (log-uniform)")
    dt_max: float = option(0.1, gt=0, lt=1.0, typical=(0.01, 0.5),
                           help="largest initial time step softplus(dt_bias) (log-uniform)")

    def __attrs_post_init__(self) -> None:
        _check_ranges(self)


@attrs.frozen(kw_only=True)
class EngineLayerConfig:
    """``delta.engine``: the engine's fast-weight memory layer built from the spec's parts."""

    chunk_size: int = option(64, ge=1, le=4096, typical=(1, 128),
                             help="tokens per chunk of the executor (on the WY executor the "
                                  "result is the same at every size: only speed changes)")


def _check_ranges(config: GatedDeltaNetConfig | GatedDecayConfig) -> None:
    """The initial decay-rate and time-step ranges are ordered."""
    if config.decay_min > config.decay_max:
        raise ValueError(f"decay_min={config.decay_min:g} must be <= "
                         f"decay_max={config.decay_max:g}")
    if config.dt_min > config.dt_max:
        raise ValueError(f"dt_min={config.dt_min:g} must be <= dt_max={config.dt_max:g}")
