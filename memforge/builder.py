"""Turns a :class:`~memforge.spec.ModelSpec` into a plain ``torch.nn.Module``.

For each block the builder picks the spec's integration (for layers in ``memory_layers``) or the
plain attention block :data:`FALLBACK_INTEGRATION`, and calls its factory with a
:class:`~memforge.interfaces.BuildContext` whose ``build(kind)`` builds the spec's other
components for that layer. Factories turn configs into flat constructor arguments; no module ever
sees a config object.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memforge.errors import MemforgeError, SpecError
from memforge.interfaces import BuildContext
from memforge.linear import Linear
from memforge.model import MemforgeModel
from memforge.registry import ComponentRegistry
from memforge.spec import ComponentChoice, ModelSpec, check_spec

#: The integration used for blocks outside ``memory_layers``: attention + feed-forward.
FALLBACK_INTEGRATION = "baseline.transformer"


def _context(spec: ModelSpec, registry: ComponentRegistry, layer: int) -> BuildContext:
    def build(kind: str) -> nn.Module:
        choice = getattr(spec, kind, None)
        if choice is None:
            raise SpecError(f"layer {layer} needs a {kind} component but the spec has none; "
                            f"add a [{kind}] table")
        return build_component(kind, choice, context, registry)

    context = BuildContext(
        dim=spec.dim,
        heads=spec.heads,
        head_dim=spec.dim // spec.heads,
        layer_index=layer,
        num_layers=spec.num_layers,
        vocab_size=spec.vocab_size,
        build=build,
    )
    return context


def build_component(
    kind: str, choice: ComponentChoice, ctx: BuildContext, registry: ComponentRegistry
) -> nn.Module:
    """Build one component; a factory's ``ValueError`` becomes a :class:`SpecError` naming it."""
    component = registry.component(kind, choice.impl)
    try:
        return component.factory(choice.config, ctx)
    except MemforgeError:
        raise
    except ValueError as exc:
        raise SpecError(f"{kind} {choice.impl!r} (layer {ctx.layer_index}): {exc}") from None


def build_block(spec: ModelSpec, layer: int, registry: ComponentRegistry) -> nn.Module:
    """The block for layer ``layer``: the spec's integration, or a plain attention block."""
    ctx = _context(spec, registry, layer)
    if spec.has_memory_at(layer):
        return build_component("integration", spec.integration, ctx, registry)
    fallback = registry.component("integration", FALLBACK_INTEGRATION)
    return build_component("integration", ComponentChoice(fallback.name, fallback.config_cls()),
                           ctx, registry)


def build_model(
    spec: ModelSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    registry: ComponentRegistry | None = None,
) -> MemforgeModel:
    """Validate ``spec`` and build its model on ``device`` in ``dtype`` (default: CPU, float32).

    Every check (core and plugin ``memforge_validate_spec`` hooks) runs before anything is built
    and all problems are raised together as one :class:`SpecError`.
    """
    from memforge.plugins import default_registry

    registry = registry or default_registry()
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"build_model needs a ModelSpec, got {type(spec).__name__}; "
                        f"use memforge.preset(NAME) or memforge.load_spec(PATH)")
    check_spec(spec, registry)
    embedding = nn.Embedding(spec.vocab_size, spec.dim)
    nn.init.normal_(embedding.weight, std=0.02)
    blocks = [build_block(spec, layer, registry) for layer in range(spec.num_layers)]
    head = Linear(spec.dim, spec.vocab_size, bias=False)
    nn.init.normal_(head.weight, std=0.02)
    model = MemforgeModel(embedding, blocks, nn.RMSNorm(spec.dim), head, spec)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if registry.pm is not None:
        registry.pm.hook.memforge_model_built(model=model, spec=spec)
    return model


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_layout(spec: ModelSpec, model: MemforgeModel) -> list[dict[str, Any]]:
    """One row per block: index, integration name, module class and parameter count."""
    rows = []
    for index, block in enumerate(model.blocks):
        impl = spec.integration.impl if spec.has_memory_at(index) else FALLBACK_INTEGRATION
        rows.append({"layer": index, "integration": impl, "module": type(block).__name__,
                     "parameters": parameter_count(block)})
    return rows
