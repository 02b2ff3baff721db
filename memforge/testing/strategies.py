"""Hypothesis strategies for component configs and model specs.

Hypothesis is imported here, never at run time by the library. Numeric fields made with
:func:`memforge.option` carry their bounds in the field metadata, which these strategies read
(``st.builds`` cannot infer ``ge``/``le`` validators).
"""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from memforge.interfaces import KINDS
from memforge.registry import ComponentRegistry
from memforge.spec import ComponentChoice, ModelSpec


def _field_strategy(field: attrs.Attribute) -> st.SearchStrategy:
    meta = field.metadata
    default = field.default
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    if isinstance(default, bool):
        return st.booleans()
    low = meta.get("ge", meta.get("gt"))
    high = meta.get("le", meta.get("lt"))
    if isinstance(default, int):
        low = int(low if low is not None else 0) + (1 if meta.get("gt") is not None else 0)
        # Keep drawn sizes small: these specs get built and run in tests.
        high = int(high) - (1 if meta.get("lt") is not None else 0) if high is not None else low + 8
        return st.integers(min_value=low, max_value=max(low, min(high, low + 8)))
    if isinstance(default, float):
        return st.floats(
            min_value=float(low) if low is not None else -10.0,
            max_value=float(high) if high is not None else 10.0,
            exclude_min=meta.get("gt") is not None,
            exclude_max=meta.get("lt") is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    return st.just(default)


@st.composite
def configs(draw: st.DrawFn, config_cls: type) -> object:
    """Any valid instance of a component config class (cross-field rules are respected)."""
    values = {f.name: draw(_field_strategy(f)) for f in attrs.fields(config_cls)}
    try:
        return config_cls(**values)
    except (TypeError, ValueError):
        # A cross-field rule (e.g. lr_init < max_lr) refused the draw; the defaults are always
        # valid, and rejecting instead would starve hypothesis on configs with such rules.
        return config_cls()


@st.composite
def model_specs(
    draw: st.DrawFn, registry: ComponentRegistry, *, max_dim_per_head: int = 8, max_layers: int = 3
) -> ModelSpec:
    """Any valid :class:`ModelSpec` the registry can resolve: integration first, then the kinds it
    requires (plus attention and feed-forward, always present), each with a drawn config."""
    integration = draw(st.sampled_from(registry.names("integration")))
    requires = set(registry.component("integration", integration).requires)
    heads = draw(st.integers(1, 4))
    num_layers = draw(st.integers(1, max_layers))
    choices = {}
    for kind in KINDS:
        if kind in requires or kind in ("attention", "feedforward", "integration"):
            name = integration if kind == "integration" else draw(st.sampled_from(registry.names(kind)))
            config_cls = registry.component(kind, name).config_cls
            choices[kind] = ComponentChoice(name, draw(configs(config_cls)))
    memory_layers = None
    if set(requires) & {"memory"} and draw(st.booleans()):
        memory_layers = tuple(draw(st.sets(st.integers(0, num_layers - 1), min_size=1)))
    return ModelSpec(
        vocab_size=draw(st.integers(2, 300)),
        dim=heads * draw(st.integers(1, max_dim_per_head)) * 2,
        num_layers=num_layers,
        heads=heads,
        memory_layers=memory_layers,
        **choices,
    )
