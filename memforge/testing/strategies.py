"""Hypothesis strategies for component configs and model specs.

Hypothesis is imported here, never at run time by the library. Numeric fields made with
:func:`memforge.option` carry their bounds in the field metadata, which these strategies read
(``st.builds`` cannot infer ``ge``/``le`` validators), and draw from the field's ``typical`` range
where it declares one: a step size of 1e-300 or an expansion that rounds a width to zero passes a
field's own bounds but no sensible model has it.

:func:`model_specs` draws only specs that pass every check, core and plugin
(``memforge_validate_spec``). One check needs the built parts: whether some executor runs each
memory layer's rule; ``buildable=True`` also builds the blocks (on the meta device) and draws
only specs that pass it, for tests that build what they draw.
"""

from __future__ import annotations

import math

import attrs
from hypothesis import strategies as st

from memforge.builder import estimate_parameters
from memforge.errors import SpecError
from memforge.registry import ComponentRegistry
from memforge.spec import ComponentChoice, ModelSpec, check_spec

#: The smallest model width drawn: SwiGLU rounds its hidden width to a multiple of 8, so a
#: narrower model needs a multiplier above the typical range to have any hidden unit.
MIN_DIM = 8


def _number_range(meta: dict, integer: bool) -> tuple[float, float, bool, bool]:
    """``(low, high, exclude_low, exclude_high)`` to draw from: the typical range inside the bounds."""
    low, high = meta.get("ge", meta.get("gt")), meta.get("le", meta.get("lt"))
    exclude_low, exclude_high = meta.get("gt") is not None, meta.get("lt") is not None
    typical = meta.get("typical")
    if typical is not None:
        if low is None or typical[0] > low:
            low, exclude_low = typical[0], False
        if high is None or typical[1] < high:
            high, exclude_high = typical[1], False
    if low is None:
        low, exclude_low = (0 if integer else -10.0), False
    if high is None:
        # Keep drawn sizes small: these specs get built and run in tests.
        high, exclude_high = (low + 8 if integer else max(10.0, low + 10.0)), False
    return low, high, exclude_low, exclude_high


def _field_strategy(field: attrs.Attribute) -> st.SearchStrategy:
    meta = field.metadata
    default = field.default
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        low, high, exclude_low, exclude_high = _number_range(meta, integer=True)
        low = math.ceil(low) + (1 if exclude_low and low == math.ceil(low) else 0)
        high = math.floor(high) - (1 if exclude_high and high == math.floor(high) else 0)
        return st.integers(min_value=low, max_value=max(low, min(high, low + 8)))
    if isinstance(default, float):
        low, high, exclude_low, exclude_high = _number_range(meta, integer=False)
        return st.floats(min_value=float(low), max_value=float(high), exclude_min=exclude_low,
                         exclude_max=exclude_high, allow_nan=False, allow_infinity=False)
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
    draw: st.DrawFn, registry: ComponentRegistry, *, max_dim_per_head: int = 8, max_layers: int = 3,
    buildable: bool = False,
) -> ModelSpec:
    """Any :class:`ModelSpec` that passes every check of ``registry`` (its plugins' included),
    and with ``buildable`` whose blocks build, executors included (about 70 ms a draw).

    The integration is drawn first, then a component for each kind it requires and, at random,
    each kind it may use, each with a drawn config, and so on for what those require (a memory
    layer's parts). Sometimes one layer gets its own choice of one of those kinds. Head widths are
    even (rotary attention needs it) and at most ``2 * max_dim_per_head``; the model width is at
    least :data:`MIN_DIM`.
    """
    integration = draw(st.sampled_from(registry.names("integration")))
    heads = draw(st.integers(1, 4))
    num_layers = draw(st.integers(1, max_layers))
    half_width = draw(st.integers(max(1, math.ceil(MIN_DIM / (2 * heads))),
                                  max(max_dim_per_head, math.ceil(MIN_DIM / (2 * heads)))))

    def choose(kind: str) -> tuple[ComponentChoice, list[str]]:
        name = integration if kind == "integration" else draw(st.sampled_from(registry.names(kind)))
        component = registry.component(kind, name)
        then = [*component.requires, *(k for k in component.optional if draw(st.booleans()))]
        return ComponentChoice(name, draw(configs(component.config_cls))), then

    choices: dict[str, ComponentChoice] = {}
    pending = ["integration", "attention", "feedforward"]
    while pending:
        kind = pending.pop(0)
        if kind not in choices:
            choices[kind], then = choose(kind)
            pending.extend(then)
    layers = {}
    if num_layers > 1 and draw(st.booleans()):
        kind = draw(st.sampled_from(sorted(choices)))
        layers = {draw(st.integers(0, num_layers - 1)): {kind: choose(kind)[0]}}
    spec = ModelSpec(
        vocab_size=draw(st.integers(2, 300)),
        dim=heads * half_width * 2,
        num_layers=num_layers,
        heads=heads,
        layers=layers,
        **choices,
    )
    try:
        check_spec(spec, registry)
        if buildable:  # a rule no executor runs is refused only once its parts are built
            estimate_parameters(spec, registry)
    except SpecError:
        # A cross-component rule refused this combination: draw another.
        from hypothesis import reject

        reject()
    return spec
