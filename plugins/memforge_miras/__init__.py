"""The built-in plugin ``miras``: Moneta, Yaad and Memora (Behrouz, Razaviyayn, Zhong, Mirrokni
2025, "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention,
and Online Optimization", arXiv 2504.13173) on memforge's engine.

Components (docs/zoo.md, "MIRAS"):

* memory ``miras.mlp``: the MIRAS memory ``x + LN(GELU(x W1) W2)``, hidden 4d, per head;
* objectives ``miras.lp`` (Moneta's ℓp, p = 3, smooth surrogates), ``miras.huber`` (Yaad's Huber,
  threshold ``delta_t`` per token and head as the objective's side input), ``miras.l2``;
* retentions ``miras.lq`` (Moneta's ℓq normalisation, q = 4, at chunk ends), ``miras.l2_decay``
  (Yaad's scalar decay), ``miras.kl`` (Memora's softmax onto a scaled simplex, at chunk ends);
* optimizer ``miras.gd`` (plain GD, learned per-token step, no momentum); projection
  ``miras.conv_qkv``; retrieval ``miras.chunk_start``;
* memory layers ``miras.moneta``, ``miras.yaad``, ``miras.memora``: the engine's fast-weight
  memory layer built from the spec's six rule kinds; the presets give each the paper's parts.
  Yaad runs on the closed-form executor (tier chunk-start), Moneta and Memora on the sequential
  one (rule-specific at chunk sizes above 1, token-exact at 1).

Presets ``miras.{moneta,yaad,memora}_{lmm,mac,mag,mal}`` and their ``_tiny`` sizes put each
layer in every integration of the ``titans`` plugin, named by registry name only.
``memforge_miras.reference`` holds the float64 token loops the layers are tested against.
"""

from __future__ import annotations

from memforge import BuildContext, ComponentSpec, hookimpl
from memforge.engine import LAYER_PARTS
from memforge_miras import configs as c

MIRAS = ("Behrouz, Razaviyayn, Zhong, Mirrokni 2025, It's All Connected: A Journey Through "
         "Test-Time Memorization, Attentional Bias, Retention, and Online Optimization")


def _mlp(config: c.MemoryConfig, ctx: BuildContext):
    from memforge.engine.networks import MLPMemory

    return MLPMemory(ctx.heads, ctx.head_dim, 2, expansion=4, activation="gelu", residual=True,
                     norm=True)


def _lp(config: c.LpObjectiveConfig, ctx: BuildContext):
    from memforge_miras.rules import LpObjective

    return LpObjective(p=config.p, surrogate=config.surrogate, sharpness=config.sharpness,
                       eps=config.eps)


def _huber(config: c.HuberObjectiveConfig, ctx: BuildContext):
    from memforge_miras.rules import HuberObjective

    return HuberObjective(ctx.dim, ctx.heads, ctx.head_dim, delta_init=config.delta_init,
                          l1_step=config.l1_step, sharpness=config.sharpness)


def _l2(config: c.L2ObjectiveConfig, ctx: BuildContext):
    from memforge.engine.rules import L2Objective

    return L2Objective()


def _lq(config: c.LqRetentionConfig, ctx: BuildContext):
    from memforge_miras.rules import LqRetention

    return LqRetention(ctx.dim, ctx.heads, q=config.q, link=config.link, init=config.init,
                       max_decay=config.max_decay, dual_init=config.dual_init)


def _l2_decay(config: c.DecayConfig, ctx: BuildContext):
    from memforge.engine.rules import AdaptiveDecay

    return AdaptiveDecay(ctx.dim, ctx.heads, init=config.init, max_decay=config.max_decay)


def _kl(config: c.KLRetentionConfig, ctx: BuildContext):
    from memforge_miras.rules import KLRetention

    return KLRetention(ctx.dim, ctx.heads, scale=config.scale, init=config.init,
                       max_decay=config.max_decay)


def _gd(config: c.GDConfig, ctx: BuildContext):
    from memforge.engine.rules import GatedStep

    return GatedStep(ctx.dim, ctx.heads, max_lr=config.max_lr, lr_init=config.lr_init,
                     momentum=False)


def _conv_qkv(config: c.ProjectionConfig, ctx: BuildContext):
    from memforge.engine.projection import QKVProjection

    return QKVProjection(ctx.dim, ctx.heads, ctx.head_dim, conv_kernel=config.conv_kernel)


def _chunk_start(config: c.ChunkStartConfig, ctx: BuildContext):
    from memforge.engine.rules import ReadAtChunkStart

    return ReadAtChunkStart()


def _layer(config: c.LayerConfig, ctx: BuildContext):
    from memforge.engine.layer import FastWeightMemoryLayer

    return FastWeightMemoryLayer.from_context(ctx, chunk_size=config.chunk_size)


@hookimpl
def memforge_register_components():
    def spec(kind, name, config_cls, factory, summary, requires=()):
        return ComponentSpec(kind=kind, name=name, config_cls=config_cls, factory=factory,
                             summary=summary, requires=requires, paper=MIRAS)

    return [
        spec("memory", "miras.mlp", c.MemoryConfig, _mlp,
             "MIRAS memory: x + LN(GELU(x W1) W2), hidden 4d, per head"),
        spec("objective", "miras.lp", c.LpObjectiveConfig, _lp,
             "Moneta's l_p loss ||M(k) - v||_p^p (p = 3) with smooth surrogates"),
        spec("objective", "miras.huber", c.HuberObjectiveConfig, _huber,
             "Yaad's Huber loss, threshold delta_t per token and head from x (a capped step above it)"),
        spec("objective", "miras.l2", c.L2ObjectiveConfig, _l2,
             "Memora's l2 loss 0.5 ||M(k) - v||^2"),
        spec("retention", "miras.lq", c.LqRetentionConfig, _lq,
             "Moneta's l_q retention: decayed dual A, W = its l_q link at chunk ends"),
        spec("retention", "miras.l2_decay", c.DecayConfig, _l2_decay,
             "Yaad's l2 retention: a scalar decay per token and head (log space)"),
        spec("retention", "miras.kl", c.KLRetentionConfig, _kl,
             "Memora's KL retention: decayed logits L, W = c softmax(L) at chunk ends"),
        spec("optimizer", "miras.gd", c.GDConfig, _gd,
             "plain gradient descent, learned step per token and head, no momentum"),
        spec("projection", "miras.conv_qkv", c.ProjectionConfig, _conv_qkv,
             "q/k/v: linear, causal depthwise conv (4), SiLU, l2-norm q/k"),
        spec("retrieval", "miras.chunk_start", c.ChunkStartConfig, _chunk_start,
             "read with the chunk-start weights (what chunk-end projections allow)"),
        spec("memory_layer", "miras.moneta", c.LayerConfig, _layer,
             "Moneta: l_p loss, l_q retention at chunk ends, GD (sequential executor)",
             requires=LAYER_PARTS),
        spec("memory_layer", "miras.yaad", c.LayerConfig, _layer,
             "Yaad: Huber loss with per-token delta, scalar decay, GD (closed-form executor)",
             requires=LAYER_PARTS),
        spec("memory_layer", "miras.memora", c.LayerConfig, _layer,
             "Memora: l2 loss, KL retention (softmax simplex) at chunk ends, GD (sequential)",
             requires=LAYER_PARTS),
    ]


@hookimpl
def memforge_register_presets():
    from memforge_miras.presets import PRESETS

    return PRESETS
