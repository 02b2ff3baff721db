"""The built-in plugin ``titans``: the neural long-term memory and its integrations.

Components (each an ablation axis of Titans Table 5):

* memory: ``titans.mlp`` (deep MLP), ``titans.linear`` (matrix memory);
* objective: ``titans.l2`` (the associative loss);
* optimizer: ``titans.momentum``, ``titans.sgd`` (no momentum);
* retention: ``titans.adaptive_decay``, ``titans.constant_decay``, ``titans.no_forgetting``;
* retrieval: ``titans.chunk_start``, ``titans.before_write``, ``titans.after_write``;
* projection: ``titans.conv_qkv``, ``titans.plain_qkv`` (without convolution);
* memory_layer: ``titans.neural_memory``, the Titans layer built from the six kinds above;
* integration: ``titans.lmm`` (memory alone), ``titans.mac``, ``titans.mag``, ``titans.mal``,
  each taking whatever memory layer the spec chooses (MAC one that ``ReadsMemory``).

The objective, optimizer, retention, retrieval and projection modules are the core's generic
ones (:mod:`memforge.engine.rules`, :mod:`memforge.engine.projection`), registered here under the
Titans names. With ``titans.linear``, ``titans.sgd``, ``titans.no_forgetting`` and chunk size 1
the layer is exactly the delta rule (DeltaNet). This plugin can be blocked
(``MEMFORGE_BLOCK=titans``) to run a spec set against the baselines only. Heavy imports stay
inside the factories.
"""

from __future__ import annotations

from memforge import hookimpl
from memforge.engine import LAYER_PARTS
from memforge.interfaces import BuildContext
from memforge.registry import ComponentRegistry, ComponentSpec
from memforge.spec import ModelSpec, used_kinds
from memforge_titans import configs as c
from memforge_titans.lmm import LMMIntegrationConfig
from memforge_titans.mac import MACIntegrationConfig
from memforge_titans.mag import MAGIntegrationConfig
from memforge_titans.mal import MALIntegrationConfig


def _mlp(config: c.MLPMemoryConfig, ctx: BuildContext):
    from memforge.engine.networks import MLPMemory

    return MLPMemory(ctx.heads, ctx.head_dim, config.depth, expansion=config.expansion,
                     activation=config.activation, residual=config.residual, norm=config.norm)


def _linear(config: c.LinearMemoryConfig, ctx: BuildContext):
    from memforge.engine.networks import MLPMemory

    return MLPMemory(ctx.heads, ctx.head_dim, 1, residual=False, norm=False)


def _l2(config: c.L2ObjectiveConfig, ctx: BuildContext):
    from memforge.engine.rules import L2Objective

    return L2Objective()


def _momentum(config: c.MomentumConfig, ctx: BuildContext):
    from memforge.engine.rules import GatedStep

    return GatedStep(ctx.dim, ctx.heads, max_lr=config.max_lr, lr_init=config.lr_init,
                     momentum=True, momentum_init=config.momentum_init)


def _sgd(config: c.SGDConfig, ctx: BuildContext):
    from memforge.engine.rules import GatedStep

    return GatedStep(ctx.dim, ctx.heads, max_lr=config.max_lr, lr_init=config.lr_init,
                     momentum=False)


def _adaptive(config: c.AdaptiveDecayConfig, ctx: BuildContext):
    from memforge.engine.rules import AdaptiveDecay

    return AdaptiveDecay(ctx.dim, ctx.heads, init=config.init, max_decay=config.max_decay)


def _constant(config: c.ConstantDecayConfig, ctx: BuildContext):
    from memforge.engine.rules import ConstantDecay

    return ConstantDecay(ctx.heads, alpha=config.alpha)


def _no_forgetting(config: c.NoForgettingConfig, ctx: BuildContext):
    from memforge.engine.rules import NoForgetting

    return NoForgetting()


def _reader(name: str):
    def factory(config: c.RetrievalConfig, ctx: BuildContext):
        from memforge.engine import rules

        return getattr(rules, name)()

    return factory


def _conv_qkv(config: c.ConvProjectionConfig, ctx: BuildContext):
    from memforge.engine.projection import QKVProjection

    return QKVProjection(ctx.dim, ctx.heads, ctx.head_dim, conv_kernel=config.conv_kernel)


def _plain_qkv(config: c.PlainProjectionConfig, ctx: BuildContext):
    from memforge.engine.projection import QKVProjection

    return QKVProjection(ctx.dim, ctx.heads, ctx.head_dim, conv_kernel=0)


def _neural_memory(config: c.NeuralMemoryConfig, ctx: BuildContext):
    from memforge.engine.layer import FastWeightMemoryLayer

    return FastWeightMemoryLayer.from_context(ctx, chunk_size=config.chunk_size)


def _lmm(config: LMMIntegrationConfig, ctx: BuildContext):
    from memforge_titans.lmm import MemoryBlock

    return MemoryBlock(ctx.dim, ctx.build("memory_layer"), ctx.build("feedforward"),
                       persistent_tokens=config.persistent_tokens)


def _mac(config: MACIntegrationConfig, ctx: BuildContext):
    from memforge_titans.mac import MACBlock, check_parts

    attention, memory = ctx.build("attention"), ctx.build("memory_layer")
    check_parts(attention, memory, f"titans.mac (layer {ctx.layer_index})")
    return MACBlock(ctx.dim, ctx.heads, attention, memory, ctx.build("feedforward"),
                    segment_len=config.segment_len)


def _mag(config: MAGIntegrationConfig, ctx: BuildContext):
    from memforge_titans.mag import MAGBlock

    return MAGBlock(ctx.dim, ctx.build("attention"), ctx.build("memory_layer"),
                    ctx.build("feedforward"))


def _mal(config: MALIntegrationConfig, ctx: BuildContext):
    from memforge_titans.mal import MALBlock

    return MALBlock(ctx.dim, ctx.build("memory_layer"), ctx.build("attention"),
                    ctx.build("feedforward"))


TITANS = "Behrouz, Zhong, Mirrokni 2025, Titans: Learning to Memorize at Test Time"


@hookimpl
def memforge_register_components():
    def spec(kind, name, config_cls, factory, summary, requires=()):
        return ComponentSpec(kind=kind, name=name, config_cls=config_cls, factory=factory,
                             summary=summary, requires=requires, paper=TITANS)

    return [
        spec("memory", "titans.mlp", c.MLPMemoryConfig, _mlp, "deep MLP memory (L_M >= 1)"),
        spec("memory", "titans.linear", c.LinearMemoryConfig, _linear,
             "linear matrix memory (delta-rule state)"),
        spec("objective", "titans.l2", c.L2ObjectiveConfig, _l2,
             "l2 associative loss 0.5 ||M(k) - v||^2"),
        spec("optimizer", "titans.momentum", c.MomentumConfig, _momentum,
             "gradient step with data-dependent step size and momentum"),
        spec("optimizer", "titans.sgd", c.SGDConfig, _sgd,
             "plain gradient step with data-dependent step size (no momentum)"),
        spec("retention", "titans.adaptive_decay", c.AdaptiveDecayConfig, _adaptive,
             "data-dependent forgetting gate alpha_t (log-space keep)"),
        spec("retention", "titans.constant_decay", c.ConstantDecayConfig, _constant,
             "the same alpha for every token"),
        spec("retention", "titans.no_forgetting", c.NoForgettingConfig, _no_forgetting,
             "no decay (alpha = 0)"),
        spec("retrieval", "titans.chunk_start", c.RetrievalConfig, _reader("ReadAtChunkStart"),
             "read with the chunk-start weights (fastest)"),
        spec("retrieval", "titans.before_write", c.RetrievalConfig, _reader("ReadBeforeWrite"),
             "read M_{t-1} exactly, before the token's own write"),
        spec("retrieval", "titans.after_write", c.RetrievalConfig, _reader("ReadAfterWrite"),
             "read M_t exactly, after the token's own write (TTT order)"),
        spec("projection", "titans.conv_qkv", c.ConvProjectionConfig, _conv_qkv,
             "q/k/v: linear, causal depthwise conv, SiLU, l2-norm q/k"),
        spec("projection", "titans.plain_qkv", c.PlainProjectionConfig, _plain_qkv,
             "q/k/v: linear, SiLU, l2-norm q/k (no convolution)"),
        spec("memory_layer", "titans.neural_memory", c.NeuralMemoryConfig, _neural_memory,
             "Titans neural memory: chunked test-time update of the memory network",
             requires=LAYER_PARTS),
        spec("integration", "titans.lmm", LMMIntegrationConfig, _lmm,
             "memory as the token mixer, no attention (Titans LMM)",
             requires=("memory_layer", "feedforward")),
        spec("integration", "titans.mac", MACIntegrationConfig, _mac,
             "memory as context: segment attention over [persistent | retrieved | segment]",
             requires=("attention", "memory_layer", "feedforward")),
        spec("integration", "titans.mag", MAGIntegrationConfig, _mag,
             "memory as a gate on sliding-window attention",
             requires=("attention", "memory_layer", "feedforward")),
        spec("integration", "titans.mal", MALIntegrationConfig, _mal,
             "memory layer, then sliding-window attention",
             requires=("memory_layer", "attention", "feedforward")),
    ]


@hookimpl
def memforge_validate_spec(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Sizes and combinations the titans components cannot work with, in any layer that uses
    them, found before anything is built."""
    problems: list[str] = []
    head_dim = spec.dim // spec.heads
    for layer in range(spec.num_layers):
        used = used_kinds(spec, registry, layer)
        memory, integration = spec.choice("memory", layer), spec.choice("integration", layer)
        memory_layer, attention = spec.choice("memory_layer", layer), spec.choice("attention", layer)
        if ("memory" in used and memory.impl == "titans.mlp"
                and isinstance(memory.config, c.MLPMemoryConfig)):
            config = memory.config
            if config.depth >= 2 and round(head_dim * config.expansion) < 1:
                problems.append(f"memory.expansion={config.expansion:g} gives titans.mlp a hidden "
                                f"width of 0 at head width {head_dim} (dim / heads); use "
                                f"memory.expansion >= {1 / head_dim:.4g}")
        if integration.impl != "titans.mac":
            continue
        if attention.impl == "baseline.sliding_window":
            problems.append("titans.mac attends inside each segment (integration.segment_len "
                            "bounds the span), so it takes full attention, not a sliding window: "
                            "set attention=baseline.causal")
        # Chunks must not straddle segments, so a segment starts with no half-written chunk: for
        # every memory layer built on the engine (any plugin's), whose cycle is its chunk size. A
        # layer of its own may report another cycle (a token-exact one reports 1) and checks
        # itself.
        chunk = getattr(getattr(memory_layer, "config", None), "chunk_size", None)
        on_engine = (memory_layer is not None and memory_layer.impl in registry.names("memory_layer")
                     and set(LAYER_PARTS) <= set(registry.component("memory_layer",
                                                                    memory_layer.impl).requires))
        if (on_engine and isinstance(chunk, int) and chunk >= 1
                and isinstance(integration.config, MACIntegrationConfig)):
            segment = integration.config.segment_len
            if segment % chunk:
                divisors = [d for d in range(1, segment + 1) if segment % d == 0]
                problems.append(f"titans.mac's 'segment_len'={segment} must be a multiple of "
                                f"{memory_layer.impl}'s 'chunk_size'={chunk}; choose "
                                f"memory_layer.chunk_size among {divisors}")
    return list(dict.fromkeys(problems))


@hookimpl
def memforge_register_presets():
    from memforge_titans.presets import PRESETS

    return PRESETS
