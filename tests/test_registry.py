"""Registry assembly: namespacing, collisions, order independence, look-ups with suggestions."""

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import memforge
from memforge.errors import PluginError, UnknownNameError
from memforge.plugins import as_module, load_plugins
from memforge.registry import ComponentRegistry, ComponentSpec, PresetSpec


@attrs.frozen
class EmptyConfig:
    """No settings."""


def _component(name: str, kind: str = "feedforward") -> ComponentSpec:
    return ComponentSpec(kind=kind, name=name, config_cls=EmptyConfig, factory=lambda c, ctx: None,
                         summary=f"test component {name}")


def _plugin(name: str, *components: str):
    @memforge.hookimpl
    def memforge_register_components():
        return [_component(c) for c in components]

    return as_module(name, memforge_register_components=memforge_register_components)


def test_builtin_registry_has_every_kind():
    registry = load_plugins(autoload=False)
    for kind in memforge.KINDS:
        assert registry.names(kind), f"no built-in {kind} component"


@given(st.permutations(["alpha", "beta", "gamma"]))
def test_registry_is_independent_of_registration_order(order):
    plugins = {"alpha": _plugin("alpha", "alpha.a", "alpha.b"), "beta": _plugin("beta", "beta.a"),
               "gamma": _plugin("gamma", "gamma.z")}
    reference = load_plugins(extra=[plugins[n] for n in ("alpha", "beta", "gamma")], autoload=False)
    shuffled = load_plugins(extra=[plugins[n] for n in order], autoload=False)
    assert shuffled == reference
    assert shuffled.names() == reference.names()


def test_duplicate_component_name_is_an_error():
    with pytest.raises(PluginError, match=r"'one\.x' is registered twice"):
        ComponentRegistry({"one": [_component("one.x"), _component("one.x")]}, {})


def test_component_must_be_namespaced_by_its_plugin():
    with pytest.raises(PluginError, match=r"must be 'mylab\.<name>'"):
        ComponentRegistry({"mylab": [_component("other.x")]}, {})


def test_duplicate_preset_is_an_error():
    preset = PresetSpec(name="p.x", summary="s", build=lambda: None)
    with pytest.raises(PluginError, match="registered twice"):
        ComponentRegistry({}, {"p": [preset, preset]})


def test_sized_presets_build_each_size_with_its_name_and_summary():
    small, tiny = memforge.sized_presets("p.model", "a model", lambda size: f"spec {size}")
    assert (small.name, small.summary, small.build()) == ("p.model", "a model, small", "spec small")
    assert (tiny.name, tiny.summary, tiny.build()) == ("p.model_tiny", "a model, tiny", "spec tiny")


def test_unknown_component_lists_close_matches():
    registry = load_plugins(autoload=False)
    with pytest.raises(UnknownNameError) as info:
        registry.component("memory", "titans.mpl")
    message = str(info.value)
    assert "did you mean 'titans.mlp'" in message
    assert "titans.linear" in message  # the names available for that kind


def test_a_component_of_a_kind_schema_3_replaced_is_refused_naming_the_replacement():
    with pytest.raises(PluginError, match=r"^unknown component kind 'surprise'; available: .*; "
                                          r"'surprise' was replaced by 'objective' and "
                                          r"'optimizer' in spec schema 3$"):
        _component("lab.l2", kind="surprise")
    with pytest.raises(UnknownNameError, match=r"'forgetting' was replaced by 'retention'"):
        load_plugins(autoload=False).names("forgetting")


def test_component_of_another_kind_says_so():
    registry = load_plugins(autoload=False)
    with pytest.raises(UnknownNameError, match="is a memory component, not an optimizer"):
        registry.component("optimizer", "titans.mlp")


def test_unknown_preset_lists_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'titans.lmm'"):
        memforge.preset("titans.lm")


def test_names_filter_by_pattern():
    registry = load_plugins(autoload=False)
    assert registry.names("retrieval", "titans.*_write") == ["titans.after_write", "titans.before_write"]


def test_config_fields_are_not_private_or_reserved():
    """attrs.evolve addresses fields by alias (attrs #1062) and 'impl' is the dict form's key."""
    for component in load_plugins(autoload=False).components():
        for field in attrs.fields(component.config_cls):
            assert not field.name.startswith("_"), (component.name, field.name)
            assert field.name != "impl", component.name
        component.config_cls()  # every config is valid with its defaults
