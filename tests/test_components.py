"""Every registered component builds, behaves like its kind and runs forward/backward at tiny size.

Parametrised over the registry itself (timm's habit), so a newly registered component is tested
without anyone writing a test for it. The kind checks are behavioural (a call on a tiny input,
the declared methods, the shapes returned): the Protocols only name ``forward`` for six of the
eight kinds, so ``isinstance(nn.Identity(), FeedForward)`` would pass.
"""

import attrs
import pytest
import torch
from torch import nn

import memforge
from memforge.builder import BuildRecord, _context, build_model
from memforge.conformance import check_component
from memforge.errors import SpecError
from memforge.plugins import as_module, load_plugins

REGISTRY = load_plugins(autoload=False)
#: The preset each kind is exercised in: memory parts in the LMM, attention parts in a Transformer.
BASE = {"attention": "baseline.transformer_tiny", "feedforward": "baseline.transformer_tiny"}


#: Every tiny preset, by name.
TINY = {name: memforge.preset(name) for name in memforge.presets() if name.endswith("_tiny")}


def _base_for(component) -> memforge.ModelSpec:
    """A tiny preset in which ``component`` takes part: the first that already chooses it (its own
    plugin's, where the default host could not run it: a retention that decays before the
    gradient needs a single-matrix memory), else the kind's default host."""
    for spec in TINY.values():
        if any(getattr(spec.choice(component.kind, layer), "impl", None) == component.name
               for layer in range(spec.num_layers)):
            return spec
    if component.kind == "integration" and not component.uses & set(memforge.interfaces.MEMORY_KINDS):
        return memforge.preset("baseline.transformer_tiny")
    return memforge.preset(BASE.get(component.kind, "titans.lmm_tiny"))


def _spec_with(component) -> memforge.ModelSpec:
    """The base preset with ``component`` switched in; the memory parts a memory layer does not
    use are dropped (a spec may not set kinds its layers ignore)."""
    changes = [f"{component.kind}={component.name}"]
    if component.kind == "memory_layer":
        changes += [f"{kind}=none" for kind in memforge.interfaces.MEMORY_KINDS
                    if kind != "memory_layer" and kind not in component.uses]
        # A layer whose default chunk is longer than the 67 test tokens (lact.layer: 2048) runs
        # at 64, so its write gates reach the loss too.
        if getattr(component.config_cls(), "chunk_size", 0) > 64:
            changes.append("memory_layer.chunk_size=64")
    return memforge.override(_base_for(component), changes)


@pytest.mark.parametrize("component", REGISTRY.components(), ids=lambda c: c.name)
def test_component_builds_and_trains(component):
    spec = _spec_with(component)
    model = memforge.build_model(spec)
    generator = torch.Generator().manual_seed(0)
    # Longer than the default chunk (64), so the memory's gates influence the loss too.
    tokens = torch.randint(0, spec.vocab_size, (2, 67), generator=generator)
    out = model(tokens)
    assert out.logits.shape == (2, 67, spec.vocab_size)
    assert torch.isfinite(out.logits).all()
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("component", REGISTRY.components(), ids=lambda c: c.name)
def test_every_component_behaves_like_its_kind(component):
    """The built module passes its kind's behavioural check (it is called on a tiny input)."""
    spec = _spec_with(component)
    ctx = _context(spec, REGISTRY, 0)
    module = ctx.build(component.kind)
    check_component(component.kind, component.name, module, ctx)


class _WrongWidth(nn.Module):
    """Maps ``[B, T, D]`` to ``[B, T, 2D]``: a forward, but not of any kind's shape."""

    def forward(self, x, *rest):
        out = torch.cat([x, x], dim=-1)
        return (out, None) if rest else out


#: Impostors per kind, each with why it must be refused.
IMPOSTORS = [
    (kind, maker, reason)
    for kind in memforge.KINDS
    for maker, reason in [
        (lambda: nn.Identity(), "identity"),
        (lambda: nn.Linear(4, 4), "linear of the wrong width"),
        (lambda: _WrongWidth(), "wrong output width"),
        (lambda: "not a module", "a string"),
        (lambda: None, "None"),
    ]
    # An identity map is a valid (if useless) feed-forward layer: [B, T, D] -> [B, T, D].
    if not (kind == "feedforward" and reason == "identity")
]


def _registry_with(kind: str, factory) -> memforge.ComponentSpec:
    @attrs.frozen
    class NoConfig:
        """No settings."""

    # Declared like the parts they stand in for, so the spec is valid and the build reaches them.
    requires = {"integration": ("attention", "feedforward"),
                "memory_layer": ("projection", "memory", "objective", "optimizer", "retention",
                                 "retrieval"),
                }.get(kind, ())
    component = memforge.ComponentSpec(kind=kind, name="impostor.thing", config_cls=NoConfig,
                                       factory=factory, summary="returns the wrong thing",
                                       requires=requires)

    @memforge.hookimpl
    def memforge_register_components():
        return [component]

    return load_plugins(autoload=False, extra=[as_module("impostor", memforge_register_components=
                                                         memforge_register_components)])


@pytest.mark.parametrize(("kind", "maker", "reason"), IMPOSTORS,
                         ids=[f"{kind}-{reason.replace(' ', '_')}" for kind, _, reason in IMPOSTORS])
def test_factory_returning_the_wrong_thing_fails_at_build_naming_it(kind, maker, reason):
    registry = _registry_with(kind, lambda config, ctx: maker())
    base = "baseline.transformer_tiny" if kind in ("attention", "feedforward", "integration") \
        else "titans.lmm_tiny"
    spec = memforge.override(memforge.preset(base), [f"{kind}=impostor.thing"], registry)
    with pytest.raises(SpecError, match=rf"^{kind} 'impostor.thing' \(layer 0\): .*fix the factory") as info:
        build_model(spec, registry=registry)
    assert "\n" not in str(info.value)


def test_each_component_is_checked_once_per_model():
    record = BuildRecord()
    spec = memforge.preset("titans.mag_tiny")
    for layer in range(spec.num_layers):
        memforge.builder.build_block(spec, layer, REGISTRY, record)
    assert record.checked == {(kind, choice.impl) for kind, choice in spec.choices().items()}


def test_checks_and_estimate_leave_the_random_stream_alone(monkeypatch):
    """Building with the kind checks and the size estimate initialises the same weights."""
    spec = memforge.preset("titans.mac_tiny")
    torch.manual_seed(3)
    checked = build_model(spec).state_dict()
    monkeypatch.setattr(memforge.builder, "check_component", lambda *args, **kwargs: None)
    monkeypatch.setattr(memforge.builder, "check_size", lambda *args, **kwargs: None)
    torch.manual_seed(3)
    plain = build_model(spec).state_dict()
    assert all(torch.equal(checked[k], plain[k]) for k in plain)


def test_integration_building_an_undeclared_kind_is_named():
    """ctx.build of a kind the integration does not declare is an error naming the fix."""
    transformer = REGISTRY.component("integration", "baseline.transformer")

    def factory(config, ctx):
        ctx.build("memory")

    @attrs.frozen
    class NoConfig:
        """No settings."""

    component = memforge.ComponentSpec(kind="integration", name="sneaky.block", config_cls=NoConfig,
                                       factory=factory, summary="builds memory it never declared",
                                       requires=transformer.requires)

    @memforge.hookimpl
    def memforge_register_components():
        return [component]

    registry = load_plugins(autoload=False, extra=[as_module(
        "sneaky", memforge_register_components=memforge_register_components)])
    spec = memforge.override(memforge.preset("baseline.transformer_tiny"), ["integration=sneaky.block"],
                             registry)
    with pytest.raises(SpecError, match=r"'sneaky.block' built a memory component it does not "
                                        r"declare; add 'memory' to the requires or optional"):
        build_model(spec, registry=registry)
