"""The built-in plugin ``ttt``: TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at
Test Time): RNNs with Expressive Hidden States", arXiv 2407.04620) on memforge's engine.

Components (docs/zoo.md, "TTT"):

* memory: ``ttt.linear`` (``x + LN(x W + b)``) and ``ttt.mlp`` (``x + LN(GELU(x W1 + b1) W2 +
  b2)``), inner biases as fast weights, the per-head affine layer norm as outer parameters;
* objective ``ttt.l2`` (``0.5 ||f(k) - v||^2``), optimizer ``ttt.learned_step`` (TTT's learned
  per-token, per-head step, no momentum), retention ``ttt.no_retention`` (full retention),
  retrieval ``ttt.after_write`` (token ``t`` reads ``W_t``), projection ``ttt.qkv``;
* memory_layer ``ttt.layer``: the engine's fast-weight memory layer built from those six kinds,
  mini-batch (chunk) 16 by default; it runs on the closed-form chunk executor (tier chunk-start,
  token-exact at chunk size 1).

Presets ``ttt.{linear,mlp}_{lmm,mac,mag,mal}`` and their ``_tiny`` sizes put the layer in every
integration of the ``titans`` plugin, named by registry name only. Every part the layer needs is
registered here, so a TTT layer builds with the ``titans`` plugin blocked (its presets use the
``titans`` integrations and so need it). ``memforge_ttt.reference`` holds the float64 token loop
the layer is tested against.
"""

from __future__ import annotations

from memforge import BuildContext, ComponentSpec, hookimpl
from memforge.engine import LAYER_PARTS
from memforge_ttt import configs as c

TTT = "Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States"


def _linear(config: c.LinearNetworkConfig, ctx: BuildContext):
    from memforge_ttt.networks import TTTLinear

    return TTTLinear(ctx.heads, ctx.head_dim, init_std=config.init_std, norm_eps=config.norm_eps)


def _mlp(config: c.MLPNetworkConfig, ctx: BuildContext):
    from memforge_ttt.networks import TTTMLP

    return TTTMLP(ctx.heads, ctx.head_dim, expansion=config.expansion, init_std=config.init_std,
                  norm_eps=config.norm_eps)


def _l2(config: c.ObjectiveConfig, ctx: BuildContext):
    from memforge.engine.rules import L2Objective

    return L2Objective()


def _learned_step(config: c.LearnedStepConfig, ctx: BuildContext):
    from memforge_ttt.rules import LearnedStep

    return LearnedStep(ctx.dim, ctx.heads, ctx.head_dim, base_lr=config.base_lr)


def _no_retention(config: c.NoRetentionConfig, ctx: BuildContext):
    from memforge.engine.rules import NoForgetting

    return NoForgetting()


def _after_write(config: c.AfterWriteConfig, ctx: BuildContext):
    from memforge.engine.rules import ReadAfterWrite

    return ReadAfterWrite()


def _qkv(config: c.ProjectionConfig, ctx: BuildContext):
    from memforge_ttt.rules import TTTProjection

    return TTTProjection(ctx.dim, ctx.heads, ctx.head_dim, conv_kernel=config.conv_kernel)




def _layer(config: c.LayerConfig, ctx: BuildContext):
    from memforge.engine.layer import FastWeightMemoryLayer

    return FastWeightMemoryLayer.from_context(ctx, chunk_size=config.chunk_size)


@hookimpl
def memforge_register_components():
    def spec(kind, name, config_cls, factory, summary, requires=()):
        return ComponentSpec(kind=kind, name=name, config_cls=config_cls, factory=factory,
                             summary=summary, requires=requires, paper=TTT)

    return [
        spec("memory", "ttt.linear", c.LinearNetworkConfig, _linear,
             "TTT-Linear: x + LN(x W + b), inner bias, affine per-head LN"),
        spec("memory", "ttt.mlp", c.MLPNetworkConfig, _mlp,
             "TTT-MLP: x + LN(GELU(x W1 + b1) W2 + b2), hidden 4d"),
        spec("objective", "ttt.l2", c.ObjectiveConfig, _l2,
             "TTT's reconstruction loss 0.5 ||f(k) - v||^2"),
        spec("optimizer", "ttt.learned_step", c.LearnedStepConfig, _learned_step,
             "TTT's learned step base_lr / d * sigmoid(x w + b) per token and head, no momentum"),
        spec("retention", "ttt.no_retention", c.NoRetentionConfig, _no_retention,
             "full retention (TTT forgets nothing)"),
        spec("retrieval", "ttt.after_write", c.AfterWriteConfig, _after_write,
             "token t reads W_t, after its own step (TTT's dual form)"),
        spec("projection", "ttt.qkv", c.ProjectionConfig, _qkv,
             "q/k/v: per-head linear maps, causal conv on q and k, no norm"),
        spec("memory_layer", "ttt.layer", c.LayerConfig, _layer,
             "TTT layer: mini-batch test-time training of the memory network",
             requires=LAYER_PARTS),
    ]


@hookimpl
def memforge_register_presets():
    from memforge_ttt.presets import PRESETS

    return PRESETS
