"""The built-in plugin ``delta``: DeltaNet and Gated DeltaNet, token-exact through the WY kernel.

Components (docs/delta.md):

* memory_layer: ``delta.deltanet`` and ``delta.gated_deltanet``, the Gated DeltaNet layer (short
  convolution, SiLU, l2-normalised q and k, per-head step and decay, output norm and gate) with
  and without its decay. They use none of the Titans memory's sub-kinds, and go into every
  integration by registry name (``titans.lmm``, ``titans.mac``, ``titans.mag``, ``titans.mal``).
* memory_layer: ``delta.engine``, the engine's fast-weight memory layer
  (:class:`memforge.engine.layer.FastWeightMemoryLayer`) built from the spec's projection,
  memory, objective, optimizer, retention and retrieval; the engine picks its executor.
* retention: ``delta.gated_decay``, GDN's decay gate with the gradient at the decayed state. With
  a linear memory, the l2 objective, plain gradient steps and reads after the write, the engine
  runs the rule token-exactly on the WY executor (preset ``delta.engine_gdn_lmm``).

Presets ``delta.deltanet_lmm``, ``delta.gdn_lmm``, ``delta.gdn_mac``, ``delta.gdn_mag``,
``delta.gdn_mal``, ``delta.gdn_hybrid``, ``delta.engine_gdn_lmm`` and their ``_tiny`` sizes.

Functional ops::

    from memforge_delta.ops import delta_rule, gated_delta_rule
    outputs, state = gated_delta_rule(q, k, v, beta, g)            # [B, H, T, d_v], [B, H, d_k, d_v]
    more, state = gated_delta_rule(q2, k2, v2, beta2, g2, state)    # continue the same sequences

``memforge_delta.reference`` holds the slow references they are tested against, and
``memforge_delta.layer_reference`` the float64 token loop of the whole layer.
"""

from __future__ import annotations

from memforge import BuildContext, ComponentSpec, hookimpl
from memforge.engine import LAYER_PARTS
from memforge_delta.configs import (
    DeltaNetConfig,
    EngineLayerConfig,
    GatedDecayConfig,
    GatedDeltaNetConfig,
)
from memforge_delta.ops import delta_rule, gated_delta_rule

__all__ = ["delta_rule", "gated_delta_rule"]

DELTANET = "Yang, Wang, Zhang, Shen, Kim 2024, Parallelizing Linear Transformers with the Delta Rule"
GDN = "Yang, Kautz, Hatamizadeh 2025, Gated Delta Networks: Improving Mamba2 with Delta Rule"


def _deltanet(config: DeltaNetConfig, ctx: BuildContext):
    from memforge_delta.layer import DeltaLayer

    return DeltaLayer(ctx.dim, ctx.heads, gated=False, kernel_chunk=config.chunk_size,
                      conv_size=config.conv_size, norm_eps=config.norm_eps)


def _gated_deltanet(config: GatedDeltaNetConfig, ctx: BuildContext):
    from memforge_delta.layer import DeltaLayer

    return DeltaLayer(ctx.dim, ctx.heads, gated=True, kernel_chunk=config.chunk_size,
                      conv_size=config.conv_size, norm_eps=config.norm_eps,
                      decay_range=(config.decay_min, config.decay_max),
                      dt_range=(config.dt_min, config.dt_max))


def _gated_decay(config: GatedDecayConfig, ctx: BuildContext):
    from memforge_delta.retention import GatedDecay

    return GatedDecay(ctx.dim, ctx.heads, decay_range=(config.decay_min, config.decay_max),
                      dt_range=(config.dt_min, config.dt_max))


def _engine(config: EngineLayerConfig, ctx: BuildContext):
    from memforge.engine.layer import FastWeightMemoryLayer

    return FastWeightMemoryLayer.from_context(ctx, chunk_size=config.chunk_size)


@hookimpl
def memforge_register_components():
    return [
        ComponentSpec(kind="memory_layer", name="delta.deltanet", config_cls=DeltaNetConfig,
                      factory=_deltanet, paper=DELTANET,
                      summary="DeltaNet: delta rule, token-exact WY kernel, conv + output gate"),
        ComponentSpec(kind="memory_layer", name="delta.gated_deltanet",
                      config_cls=GatedDeltaNetConfig, factory=_gated_deltanet, paper=GDN,
                      summary="Gated DeltaNet: delta rule at the decayed state, token-exact WY "
                              "kernel"),
        ComponentSpec(kind="memory_layer", name="delta.engine", config_cls=EngineLayerConfig,
                      factory=_engine, paper=GDN,
                      summary="the engine's memory layer from the spec's parts (executor picked "
                              "per rule: wy for the gated delta rule)",
                      requires=LAYER_PARTS),
        ComponentSpec(kind="retention", name="delta.gated_decay", config_cls=GatedDecayConfig,
                      factory=_gated_decay, paper=GDN,
                      summary="GDN decay gate, log space, gradient at the decayed state"),
    ]


@hookimpl
def memforge_validate_spec(spec, registry):
    from memforge_delta.checks import check_spec

    return check_spec(spec, registry)


@hookimpl
def memforge_register_presets():
    from memforge_delta.presets import PRESETS

    return PRESETS
