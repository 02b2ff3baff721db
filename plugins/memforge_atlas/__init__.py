"""The built-in plugin ``atlas``: ATLAS' memory family (Behrouz et al. 2025, "ATLAS: Learning to
Optimally Memorize the Context at Test Time", arXiv 2505.23735) on memforge's engine.

Components (docs/zoo.md, "ATLAS"):

* memory ``atlas.poly_mlp``: the polynomial feature map ``phi_p`` on keys and queries (learned
  coefficients from ``1 / i!``), then an MLP (a matrix at depth 1), residual and norm;
* objective ``atlas.omega`` (the Omega rule: a gated window of the last ``c`` pairs, ``c = 1``
  the online rule) and ``atlas.dot`` (the negative dot product, DeepTransformers' Hebbian write);
* optimizer ``atlas.muon`` (momentum, then 5 Newton-Schulz steps at every token) and ``atlas.gd``
  (gradient descent with momentum, no Newton-Schulz: Muon's ablation);
* memory_layer ``atlas.omeganet``, ``atlas.deep_transformer`` and ``atlas.atlas``: the engine's
  fast-weight layer built from the spec's projection, memory, objective, optimizer, retention and
  retrieval (their presets choose OmegaNet's, DeepTransformers' and Atlas' parts). The engine
  picks the executor: a window of one with gradient descent runs on the closed form, a window
  longer than one or Muon on the sequential executor.

Presets ``atlas.{omeganet,deep_transformer,atlas}_{lmm,mac,mag,mal}`` and their ``_tiny`` sizes.
``memforge_atlas.reference`` holds the float64 token loop the layers are tested against.
"""

from __future__ import annotations

from memforge import BuildContext, ComponentSpec, hookimpl
from memforge.engine import LAYER_PARTS
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec
from memforge_atlas import configs as c

ATLAS = ("Behrouz, Li, Kacham, Daliri, Deng, Zhong, Razaviyayn, Mirrokni 2025, ATLAS: Learning "
         "to Optimally Memorize the Context at Test Time")
MUON = "Jordan et al. 2024, Muon: An optimizer for hidden layers in neural networks"


def _poly_mlp(config: c.PolyMLPConfig, ctx: BuildContext):
    from memforge_atlas.network import PolyMLPMemory

    return PolyMLPMemory(ctx.heads, ctx.head_dim, degree=config.degree, depth=config.depth,
                         expansion=config.expansion, activation=config.activation,
                         residual=config.residual, norm=config.norm)


def _omega(config: c.OmegaConfig, ctx: BuildContext):
    from memforge_atlas.rules import OmegaObjective

    return OmegaObjective(ctx.dim, ctx.heads, window=config.window, gated=config.gated,
                          gamma_init=config.gamma_init)


def _dot(config: c.DotConfig, ctx: BuildContext):
    from memforge_atlas.rules import DotObjective

    return DotObjective()


def _muon(config: c.MuonConfig, ctx: BuildContext):
    from memforge_atlas.rules import Muon

    return Muon(ctx.dim, ctx.heads, max_lr=config.max_lr, lr_init=config.lr_init,
                momentum_init=config.momentum_init, scale=config.scale, steps=config.steps)


def _gd(config: c.GDConfig, ctx: BuildContext):
    from memforge.engine.rules import GatedStep

    return GatedStep(ctx.dim, ctx.heads, max_lr=config.max_lr, lr_init=config.lr_init,
                     momentum=config.momentum, momentum_init=config.momentum_init)




def _layer(config: c.AtlasLayerConfig, ctx: BuildContext):
    from memforge.engine.layer import FastWeightMemoryLayer

    return FastWeightMemoryLayer.from_context(ctx, chunk_size=config.chunk_size,
                                              executor=config.executor)


@hookimpl
def memforge_register_components():
    def spec(kind, name, config_cls, factory, summary, paper=ATLAS, requires=()):
        return ComponentSpec(kind=kind, name=name, config_cls=config_cls, factory=factory,
                             summary=summary, requires=requires, paper=paper)

    def layer(name, summary):
        return spec("memory_layer", name, c.AtlasLayerConfig, _layer, summary,
                    requires=LAYER_PARTS)

    return [
        spec("memory", "atlas.poly_mlp", c.PolyMLPConfig, _poly_mlp,
             "polynomial feature map phi_p on keys and queries, then an MLP memory"),
        spec("objective", "atlas.omega", c.OmegaConfig, _omega,
             "Omega rule: l2 loss over a gated window of the last c pairs"),
        spec("objective", "atlas.dot", c.DotConfig, _dot,
             "negative dot product -<M(k), v> (Hebbian write)"),
        spec("optimizer", "atlas.muon", c.MuonConfig, _muon,
             "momentum orthogonalised by 5 Newton-Schulz steps at every token", paper=MUON),
        spec("optimizer", "atlas.gd", c.GDConfig, _gd,
             "gradient descent with momentum, no Newton-Schulz (Muon's ablation)"),
        layer("atlas.omeganet", "OmegaNet: Omega rule, polynomial features, gradient descent"),
        layer("atlas.deep_transformer",
              "DeepTransformers: deep memory, dot-product (Hebbian) objective, features"),
        layer("atlas.atlas", "Atlas: Omega rule, polynomial features, deep memory, Muon"),
    ]


@hookimpl
def memforge_validate_spec(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """The Omega window against the chunk, the feature width, Muon on vectors
    (:mod:`memforge_atlas.validation`)."""
    from memforge_atlas.validation import spec_problems

    return spec_problems(spec, registry)


@hookimpl
def memforge_register_presets():
    from memforge_atlas.presets import PRESETS

    return PRESETS
