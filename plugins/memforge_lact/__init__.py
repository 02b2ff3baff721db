"""The built-in plugin ``lact``: large-chunk test-time training (LaCT; docs/zoo.md, "LaCT").

Components:

* memory_layer ``lact.layer``: SwiGLU fast weights per head, trained once per chunk of 2048
  tokens (any size) by gradient descent on a dot-product loss with learned per-token steps,
  optional momentum and Muon, and weight renormalisation; its own fast path of large batched
  matmuls (:mod:`memforge_lact.ops`). It uses none of the Titans memory's sub-kinds and goes into
  every integration by registry name (``titans.lmm``, ``titans.mac``, ``titans.mag``,
  ``titans.mal``).
* memory_layer ``lact.continuum``: a continuum memory (Nested Learning), a chain of fast-weight
  MLPs whose levels update at their own periods.
* integration ``lact.block``: the paper's block, sliding-window attention beside the memory.

Presets ``lact.lact``, ``lact.lmm``, ``lact.mac``, ``lact.mag``, ``lact.mal``,
``lact.continuum_lmm`` and their ``_tiny`` sizes. ``memforge_lact.reference`` and
``memforge_lact.continuum_reference`` hold the float64 token loops the layers are tested against.
"""

from __future__ import annotations

from memforge import BuildContext, ComponentSpec, hookimpl
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec, used_kinds
from memforge_lact.configs import ContinuumConfig, LaCTBlockConfig, LaCTLayerConfig

NESTED = "Behrouz, Razaviyayn, Zhong, Mirrokni 2025, Nested Learning (HOPE), arXiv 2512.24695"
LACT = "Zhang, Bi, Hong, et al. 2025, Test-Time Training Done Right (LaCT), arXiv 2505.23884"


def _layer(config: LaCTLayerConfig, ctx: BuildContext):
    from memforge_lact.layer import LaCTLayer

    return LaCTLayer(ctx.dim, ctx.heads, chunk_size=config.chunk_size, expansion=config.expansion,
                     base_lr=config.base_lr, momentum=config.momentum,
                     muon=config.muon_coefficients if config.muon else None,
                     renormalize=config.renormalize, output_scale=config.output_scale,
                     norm_eps=config.norm_eps)


def _continuum(config: ContinuumConfig, ctx: BuildContext):
    from memforge_lact.continuum import ContinuumLayer

    periods = tuple(config.chunk_size * config.ratio**level for level in range(config.levels))
    return ContinuumLayer(ctx.dim, ctx.heads, periods=periods, expansion=config.expansion,
                          base_lr=config.base_lr, renormalize=config.renormalize,
                          norm_eps=config.norm_eps)


def _block(config: LaCTBlockConfig, ctx: BuildContext):
    from memforge_lact.block import LaCTBlock

    return LaCTBlock(ctx.dim, ctx.build("attention"), ctx.build("memory_layer"),
                     ctx.build("feedforward"))


@hookimpl
def memforge_register_components():
    return [
        ComponentSpec(kind="memory_layer", name="lact.layer", config_cls=LaCTLayerConfig,
                      factory=_layer, paper=LACT,
                      summary="LaCT: SwiGLU fast weights trained per large chunk (dot-product "
                              "loss, momentum, optional Muon, renormalisation)"),
        ComponentSpec(kind="memory_layer", name="lact.continuum", config_cls=ContinuumConfig,
                      factory=_continuum, paper=NESTED,
                      summary="continuum memory: a chain of fast-weight MLPs, level l updating "
                              "every chunk_size * ratio^l tokens"),
        ComponentSpec(kind="integration", name="lact.block", config_cls=LaCTBlockConfig,
                      factory=_block, paper=LACT,
                      requires=("attention", "memory_layer", "feedforward"),
                      summary="LaCT block: sliding-window attention + memory layer, then the "
                              "feed-forward"),
    ]


@hookimpl
def memforge_validate_spec(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Sizes the LaCT layer cannot work with, in any layer that uses it, found before building."""
    problems: list[str] = []
    head_dim = spec.dim // spec.heads
    for layer in range(spec.num_layers):
        if "memory_layer" not in used_kinds(spec, registry, layer):
            continue
        choice = spec.choice("memory_layer", layer)
        if choice is None or not isinstance(choice.config, LaCTLayerConfig | ContinuumConfig):
            continue
        config = choice.config
        if round(head_dim * config.expansion) < 1:
            problems.append(f"memory_layer.expansion={config.expansion:g} gives {choice.impl} a hidden "
                            f"width of 0 at head width {head_dim} (dim / heads); use "
                            f"memory_layer.expansion >= {1 / head_dim:.4g}")
        integration = spec.choice("integration", layer)
        segment = getattr(integration.config, "segment_len", None)
        if integration.impl == "titans.mac" and segment is not None and segment % config.chunk_size:
            divisors = [d for d in range(1, segment + 1) if segment % d == 0]
            problems.append(f"titans.mac's 'segment_len'={segment} must be a multiple of "
                            f"{choice.impl}'s 'chunk_size'={config.chunk_size}; choose "
                            f"memory_layer.chunk_size among {divisors}")
    return list(dict.fromkeys(problems))


@hookimpl
def memforge_register_presets():
    from memforge_lact.presets import PRESETS

    return PRESETS
