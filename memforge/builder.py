"""Turns a :class:`~memforge.spec.ModelSpec` into a plain ``torch.nn.Module``.

For each block the builder picks the spec's integration for that layer (:meth:`ModelSpec.choice`)
and calls its factory with a :class:`~memforge.interfaces.BuildContext` whose ``build(kind)``
builds the spec's choice of another kind for the same layer (a memory layer's factory builds its
own parts the same way). A component may build only the kinds its
:class:`~memforge.registry.ComponentSpec` declares; one that declares none may build any, and the
kinds it left unused are refused once it is built. Factories turn configs into flat constructor
arguments; no module ever sees a config object.

Before building, :func:`check_size` estimates the parameter count (the model's blocks built once
each on PyTorch's ``meta`` device, which allocates nothing) and refuses a model beyond
:data:`MAX_PARAMETERS` or larger than the memory left on the machine. While building, every
component is checked to behave like its kind (:mod:`memforge.conformance`), so a factory that
returns the wrong thing fails here, naming the component.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from memforge.conformance import check_component
from memforge.errors import InputError, MemforgeError, SpecError
from memforge.interfaces import MEMORY_KINDS, BuildContext, DescribesRule, RuleDescription
from memforge.linear import Linear
from memforge.model import MemforgeModel
from memforge.registry import ComponentRegistry, ComponentSpec
from memforge.resources import available_memory, format_bytes, format_count
from memforge.spec import ComponentChoice, ModelSpec, check_spec, layer_use, unused_problems

#: The most parameters :func:`build_model` builds: 10 billion, 40 GB of float32 weights and about
#: 160 GB to train with AdamW, beyond any single accelerator. A larger count is nearly always a
#: typo in a size (``dim``, ``vocab_size``, an expansion factor); pass ``max_parameters=None`` to
#: :func:`build_model` to build one anyway.
MAX_PARAMETERS = 10_000_000_000


@attrs.define
class BuildRecord:
    """What one model build has seen so far.

    Attributes:
        checked: the ``(kind, impl)`` pairs whose behaviour was (or will be) checked, each once
            per model.
        parameters: parameters of every component built, by ``"kind 'impl'"``, summed over layers
            (a component's own, without those of the parts it built).
        built: the kinds built in each layer.
        defer: hold the checks in ``pending`` until :meth:`run_checks`, so that they run where the
            model will run (after it moved to its device and dtype), not on the CPU it is built on.
        pending: the deferred checks.
    """

    checked: set[tuple[str, str]] = attrs.field(factory=set)
    parameters: dict[str, int] = attrs.field(factory=dict)
    built: dict[int, set[str]] = attrs.field(factory=dict)
    defer: bool = False
    pending: list[tuple[str, str, nn.Module, BuildContext]] = attrs.field(factory=list)

    def check(self, kind: str, impl: str, module: nn.Module, ctx: BuildContext) -> None:
        """Check ``module`` now (or later, when deferring), unless its component was checked."""
        if (kind, impl) in self.checked:
            return
        self.checked.add((kind, impl))
        if self.defer:
            self.pending.append((kind, impl, module, ctx))
        else:
            check_component(kind, impl, module, ctx)

    def run_checks(self, device: torch.device | None = None) -> None:
        """Run the deferred checks; parameterless modules get their input on ``device``."""
        for kind, impl, module, ctx in self.pending:
            check_component(kind, impl, module, ctx, device=device)
        self.pending.clear()


def _context(spec: ModelSpec, registry: ComponentRegistry, layer: int,
             record: BuildRecord | None = None,
             owner: ComponentSpec | None = None) -> BuildContext:
    """The build context of block ``layer`` for ``owner``'s factory; ``ctx.build(kind)`` builds
    the spec's choice of ``kind`` for that layer (with a context of its own).

    ``owner``, when given, may build only the memory kinds it declares, unless it is an
    integration that declares no kinds at all (written before declarations existed).
    """
    record = BuildRecord() if record is None else record

    def build(kind: str) -> nn.Module:
        if (owner is not None and kind in MEMORY_KINDS
                and (owner.declares_kinds or owner.kind != "integration")
                and kind not in (*owner.requires, *owner.optional)):
            raise SpecError(f"{owner.kind} {owner.name!r} built a {kind} component it does not "
                            f"declare; add {kind!r} to the requires or optional of its "
                            f"ComponentSpec")
        choice = spec.choice(kind, layer)
        if choice is None:
            raise SpecError(f"layer {layer} needs a {kind} component but the spec has none; "
                            f"add a [{kind}] table")
        record.built.setdefault(layer, set()).add(kind)
        component = registry.component(kind, choice.impl)
        return build_component(kind, choice, _context(spec, registry, layer, record, component),
                               registry, record)

    context = BuildContext(
        dim=spec.dim,
        heads=spec.heads,
        head_dim=spec.dim // spec.heads,
        layer_index=layer,
        num_layers=spec.num_layers,
        vocab_size=spec.vocab_size,
        build=build,
        component_name=lambda kind: getattr(spec.choice(kind, layer), "impl", None),
    )
    return context


def build_component(
    kind: str, choice: ComponentChoice, ctx: BuildContext, registry: ComponentRegistry,
    record: BuildRecord | None = None,
) -> nn.Module:
    """Build one component and check that it behaves like its kind.

    A factory's ``ValueError`` becomes a :class:`SpecError` naming the component, and so does a
    module that fails :func:`memforge.conformance.check_component`. With ``record`` given, a
    ``(kind, impl)`` pair already checked is not checked again, and the parameters are counted.
    """
    component = registry.component(kind, choice.impl)
    counted = sum(record.parameters.values()) if record is not None else 0
    try:
        module = component.factory(choice.config, ctx)
    except MemforgeError:
        raise
    except ValueError as exc:
        raise SpecError(f"{kind} {choice.impl!r} (layer {ctx.layer_index}): {exc}") from None
    if record is None:
        check_component(kind, choice.impl, module, ctx)
    else:
        record.check(kind, choice.impl, module, ctx)
    if record is not None and kind != "integration":
        # Only the component's own parameters: its parts (built through ctx.build while its
        # factory ran, e.g. a memory layer's memory network) are counted under their own names.
        own = parameter_count(module) - (sum(record.parameters.values()) - counted)
        label = f"{kind} {choice.impl!r}"
        record.parameters[label] = record.parameters.get(label, 0) + own
    return module


def build_block(spec: ModelSpec, layer: int, registry: ComponentRegistry,
                record: BuildRecord | None = None) -> nn.Module:
    """The block for layer ``layer``: the spec's integration there, built with its parts."""
    record = BuildRecord() if record is None else record
    choice = spec.choice("integration", layer)
    record.built.setdefault(layer, set()).add("integration")
    ctx = _context(spec, registry, layer, record, registry.component("integration", choice.impl))
    return build_component("integration", choice, ctx, registry, record)


def build_layer_component(spec: ModelSpec, kind: str, layer: int,
                          registry: ComponentRegistry | None = None) -> nn.Module:
    """Build the spec's choice of ``kind`` for block ``layer`` alone, as :func:`build_model` builds
    it there: with that block's :class:`~memforge.BuildContext` (its parts are the spec's choices)
    and checked against its kind's shapes (:mod:`memforge.conformance`).

    Raises :class:`SpecError` when the spec has no ``kind`` in that layer.
    """
    from memforge.plugins import default_registry

    return _context(spec, registry or default_registry(), layer).build(kind)


def check_built_kinds(spec: ModelSpec, registry: ComponentRegistry, record: BuildRecord) -> None:
    """Refuse kinds the spec sets that a layer built by a component declaring no kinds left
    unused (declared layers were checked with the spec)."""
    uses = {layer: layer_use(spec, registry, layer) for layer in range(spec.num_layers)}
    if not any(use.open for use in uses.values()):
        return
    used = {layer: frozenset(record.built.get(layer, ())) if use.open
            else frozenset(use.components) for layer, use in uses.items()}
    problems = unused_problems(spec, registry, used)
    if problems:
        raise SpecError("invalid spec: " + "; ".join(problems))


def estimate_parameters(
    spec: ModelSpec, registry: ComponentRegistry | None = None
) -> tuple[int, dict[str, int]] | None:
    """The parameter count of ``spec``'s model without allocating it, and its largest parts.

    Returns ``(count, parts)`` with ``parts`` mapping ``"embedding and head"`` and each built
    component (``"memory 'titans.mlp'"``) to its parameters over all layers; ``None`` when the
    count is unknown. Embedding and output head are ``2 * vocab_size * dim``; each distinct block
    (layers with the same choices share one) is built once on the ``meta`` device and counted. A
    factory that cannot build on ``meta`` (it computes with tensor values) makes the estimate
    unknown; its real build still runs.
    """
    from memforge.plugins import default_registry

    registry = registry or default_registry()
    head = 2 * spec.vocab_size * spec.dim + spec.dim  # embedding, head, final norm
    parts = {"embedding and head": head}
    if head > MAX_PARAMETERS:
        return head, parts  # already too large: no need to build anything
    count = head
    layers: dict[tuple[tuple[str, ComponentChoice], ...], list[int]] = {}
    for layer in range(spec.num_layers):
        layers.setdefault(tuple(spec.layer_choices(layer).items()), []).append(layer)
    for same in layers.values():
        repeats = len(same)
        record = BuildRecord()
        try:
            with torch.device("meta"):
                block = build_block(spec, same[0], registry, record)
        except MemforgeError:
            raise
        except Exception:  # a plugin that needs real values to build; build for real
            return None
        count += repeats * parameter_count(block)
        for label, number in record.parameters.items():
            parts[label] = parts.get(label, 0) + repeats * number
    return count, parts


def check_size(
    spec: ModelSpec,
    registry: ComponentRegistry | None = None,
    *,
    dtype: torch.dtype | None = None,
    copies: int = 1,
    max_parameters: int | None = MAX_PARAMETERS,
) -> int | None:
    """Refuse a model too large to build here; returns its estimated parameter count.

    Args:
        spec: the model.
        registry: where its components come from (default: the process-wide registry).
        dtype: the parameters' dtype (default float32).
        copies: how many parameter-sized tensors the job holds (training with AdamW: 4, the
            weights, their gradients and two moments).
        max_parameters: the cap (:data:`MAX_PARAMETERS`); ``None`` for no cap.

    Raises:
        SpecError: beyond the cap, or needing more memory than the CPU has available (the model
            is built there before it moves to any device), with the figures, the largest part
            and the fix.
    """
    estimate = estimate_parameters(spec, registry)
    if estimate is None:
        return None
    count, parts = estimate
    largest = max(parts, key=parts.__getitem__)
    where = (f"{format_count(parts[largest])} of them in the {largest}"
             + (f" (vocab_size={spec.vocab_size}, dim={spec.dim})" if largest == "embedding and head"
                else f" (dim={spec.dim}, num_layers={spec.num_layers}; check its settings)"))
    if max_parameters is not None and count > max_parameters:
        raise SpecError(f"the model would have {format_count(count)} parameters, {where}: more "
                        f"than the {format_count(max_parameters)} memforge builds; look for a "
                        f"typo in the sizes or make them smaller (build_model(..., "
                        f"max_parameters=None) lifts the cap)")
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    needed = count * element * copies
    available = available_memory("cpu")
    if available is not None and needed > available:
        what = "its weights" if copies == 1 else f"its weights and {copies - 1} more copies of them"
        raise SpecError(f"the model would have {format_count(count)} parameters, {where}: "
                        f"{format_bytes(needed)} for {what}, more than the "
                        f"{format_bytes(available)} of memory available; make it smaller")
    return count


def _placement(device: Any, dtype: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """``build_model``'s device and dtype, checked before anything is built."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InputError(f"build_model: device {device!r} is not a torch device; use 'cpu', "
                             f"'cuda' or a torch.device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("build_model: device 'cuda' but CUDA is not available here; use 'cpu'")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"build_model: dtype must be a floating torch dtype such as "
                         f"torch.float32 or torch.bfloat16, got {dtype!r}")
    return device, dtype


def build_model(
    spec: ModelSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    registry: ComponentRegistry | None = None,
    max_parameters: int | None = MAX_PARAMETERS,
) -> MemforgeModel:
    """Validate ``spec`` and build its model on ``device`` in ``dtype`` (default: CPU, float32).

    Every check (core and plugin ``memforge_validate_spec`` hooks) runs before anything is built
    and all problems are raised together as one :class:`SpecError`; so does the size check
    (:func:`check_size`, at most ``max_parameters``). Each component is checked to behave like
    its kind as it is built.
    """
    from memforge.plugins import default_registry

    registry = registry or default_registry()
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"build_model needs a ModelSpec, got {type(spec).__name__}; "
                        f"use memforge.preset(NAME) or memforge.load_spec(PATH)")
    device, dtype = _placement(device, dtype)
    check_spec(spec, registry)
    check_size(spec, registry, dtype=dtype, max_parameters=max_parameters)
    embedding = nn.Embedding(spec.vocab_size, spec.dim)
    nn.init.normal_(embedding.weight, std=0.02)
    record = BuildRecord(defer=True)
    blocks = [build_block(spec, layer, registry, record) for layer in range(spec.num_layers)]
    check_built_kinds(spec, registry, record)
    head = Linear(spec.dim, spec.vocab_size, bias=False)
    nn.init.normal_(head.weight, std=0.02)
    model = MemforgeModel(embedding, blocks, nn.RMSNorm(spec.dim), head, spec)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    record.run_checks(device)
    if registry.pm is not None:
        registry.pm.hook.memforge_model_built(model=model, spec=spec)
    return model


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_layout(spec: ModelSpec, model: MemforgeModel,
                 registry: ComponentRegistry | None = None) -> list[dict[str, Any]]:
    """One row per block: index, integration, memory layer (``""`` without one) and the memory
    parts it is built from (``"memory 'titans.mlp', objective 'titans.l2', ..."``), the rule the
    memory layer describes (a :class:`~memforge.interfaces.RuleDescription`, or ``None`` for a
    block without a memory layer that has :class:`~memforge.interfaces.DescribesRule`), the
    block's module class and its parameter count."""
    from memforge.plugins import default_registry

    registry = registry or default_registry()
    rows = []
    for index, block in enumerate(model.blocks):
        used = layer_use(spec, registry, index).components
        memory_layer = spec.choice("memory_layer", index) if "memory_layer" in used else None
        parts = [f"{kind} {spec.choice(kind, index).impl!r}" for kind in MEMORY_KINDS
                 if kind in used and kind != "memory_layer"]
        rows.append({"layer": index, "integration": spec.choice("integration", index).impl,
                     "memory_layer": memory_layer.impl if memory_layer else "",
                     "memory_parts": ", ".join(parts), "rule": _described_rule(block),
                     "module": type(block).__name__, "parameters": parameter_count(block)})
    return rows


def _described_rule(block: nn.Module) -> RuleDescription | None:
    """The rule of the first submodule of ``block`` that describes one (its memory layer)."""
    for module in block.modules():
        if isinstance(module, DescribesRule):
            return module.describe_rule()
    return None
