"""Spec checks of the ``delta`` plugin's engine parts (``memforge_validate_spec``), run before
anything is built (docs/delta.md, "The engine layer").

* ``titans.mac`` reads the memory at segment starts: ``delta.engine``'s chunks must not straddle
  two segments (its ``chunk_size`` divides ``segment_len``), as for every engine layer.
* A rule no executor runs: in a ``delta.engine`` layer (any parts), and in any layer that builds
  an engine rule from the spec's parts with ``delta.gated_decay`` (whose gradient at the decayed
  state only the ``wy`` executor runs at every chunk size, the sequential one at chunk size 1),
  the rule's parts are built alone (no layer, no projection) and the engine's executor
  selection refuses such a rule in its own words.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memforge import BuildContext, ModelSpec, SpecError
from memforge.engine.executors import LearningRule, select_executor
from memforge.spec import used_kinds

#: The kinds of a learning rule, in LearningRule's order.
RULE_KINDS = ("memory", "objective", "optimizer", "retention", "retrieval")


def check_spec(spec: ModelSpec, registry: Any) -> list[str]:
    """Every problem of ``spec``'s use of the delta engine parts, one line each (``registry``:
    the ``ComponentRegistry`` the hook is given)."""
    problems: list[str] = []
    refused: dict[tuple[str, str], list[int]] = {}   # (layer impl, reason) -> layers
    for layer in range(spec.num_layers):
        used = used_kinds(spec, registry, layer)
        memory_layer = spec.choice("memory_layer", layer)
        if memory_layer is None or "memory_layer" not in used:
            continue
        chunk = getattr(memory_layer.config, "chunk_size", None)
        retention = spec.choice("retention", layer)
        builds_rule = set(RULE_KINDS) <= set(registry.component("memory_layer",
                                                                memory_layer.impl).requires)
        gated = retention is not None and retention.impl == "delta.gated_decay"
        if builds_rule and isinstance(chunk, int) and (gated or memory_layer.impl == "delta.engine"):
            # A layer config's `executor` setting (as atlas' layers have) is the one it asks for.
            requested = getattr(memory_layer.config, "executor", "auto")
            why = _executor_refusal(spec, registry, layer, chunk, requested)
            if why is not None:
                what = f"{memory_layer.impl} with retention delta.gated_decay" if gated else \
                    memory_layer.impl
                refused.setdefault((what, why), []).append(layer)
    for (what, why), layers in refused.items():
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
        problems.append(f"{what} ({where}): {why}")
    return list(dict.fromkeys(problems))


def _executor_refusal(spec: ModelSpec, registry: Any, layer: int, chunk: int,
                      requested: str) -> str | None:
    """Why no executor (or not the ``requested`` one) runs the layer's rule
    (``select_executor``'s message), or ``None``."""

    def build(kind: str) -> nn.Module:
        choice = spec.choice(kind, layer)
        return registry.component(kind, choice.impl).factory(choice.config, context)

    head_dim = spec.dim // spec.heads
    context = BuildContext(dim=spec.dim, heads=spec.heads, head_dim=head_dim, layer_index=layer,
                           num_layers=spec.num_layers, vocab_size=spec.vocab_size, build=build)
    rule = LearningRule(*(build(kind) for kind in RULE_KINDS), chunk)
    try:
        select_executor(rule, requested)
    except SpecError as error:
        return str(error)
    return None
