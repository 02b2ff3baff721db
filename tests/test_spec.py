"""Specs: round trips through dict/TOML/JSON, overrides, spec_id, and clear errors."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memforge
from memforge.errors import SpecError
from memforge.io import dumps_spec, read_spec_dict
from memforge.plugins import load_plugins
from memforge.spec import check_spec, from_dict, spec_id, to_dict
from memforge.testing.strategies import model_specs

REGISTRY = load_plugins(autoload=False)


@given(model_specs(REGISTRY))
def test_dict_round_trip(spec):
    assert from_dict(to_dict(spec), REGISTRY) == spec


@given(model_specs(REGISTRY))
def test_drawn_specs_pass_every_check_and_build(spec):
    """The strategy draws only specs that every plugin accepts, and every one of them builds, but
    for a learning rule mixed from parts that no executor can run: that is known only from the
    built parts' capabilities, so it is refused at build time, in one line naming the executors
    (docs/memory.md, "Executors")."""
    check_spec(spec, REGISTRY)
    try:
        model = memforge.build_model(spec, registry=REGISTRY)
    except SpecError as refused:
        message = str(refused)
        assert "\n" not in message and "run the rule" in message, message
        return
    tokens = torch.arange(3).remainder(spec.vocab_size)[None]
    assert torch.isfinite(model(tokens).logits).all()


@given(model_specs(REGISTRY), st.sampled_from(["toml", "json"]))
def test_file_round_trip(tmp_path_factory, spec, fmt):
    path = tmp_path_factory.mktemp("spec") / f"model.{fmt}"
    memforge.save_spec(spec, path)
    assert memforge.load_spec(path, REGISTRY) == spec
    assert spec_id(memforge.load_spec(path, REGISTRY)) == spec_id(spec)


@given(model_specs(REGISTRY))
def test_empty_override_is_identity(spec):
    assert memforge.override(spec, [], REGISTRY) == spec


def test_every_preset_round_trips_and_builds():
    for name in memforge.presets():
        spec = memforge.preset(name)
        assert from_dict(json.loads(dumps_spec(spec, "json"))) == spec
        if name.endswith("_tiny"):
            memforge.build_model(spec)


def test_override_sets_field_and_switches_component():
    spec = memforge.preset("titans.lmm_tiny")
    deeper = memforge.override(spec, ["memory.depth=3"])
    assert deeper.memory.config.depth == 3 and deeper != spec
    switched = memforge.override(spec, ["optimizer=titans.sgd", "optimizer.max_lr=0.05"])
    assert switched.optimizer.impl == "titans.sgd"
    assert switched.optimizer.config.max_lr == 0.05
    layers = memforge.override(spec, ["memory_layers=[1]"])
    assert [layers.choice("integration", i).impl for i in (0, 1)] == [
        "baseline.transformer", "titans.lmm"]


def test_switching_component_resets_its_settings():
    spec = memforge.override(memforge.preset("titans.lmm_tiny"), ["memory.depth=4"])
    switched = memforge.override(spec, ["memory=titans.linear"])
    assert switched.memory.impl == "titans.linear"
    back = memforge.override(switched, ["memory=titans.mlp"])
    assert back.memory.config.depth == 2  # defaults again, not the old depth


#: A spec with every field written out, and its id: the id names run directories, so a change of
#: the hashing (or of the canonical form) would orphan every stored run. Every schema changes the
#: canonical form (its schema_version; schema 2 the memory_layer table, schema 3 the split of
#: surprise), so ids made by an older schema differ; an older file and its migration have the
#: same id (both load to the same spec).
GOLDEN_SPEC = {
    "schema_version": 3, "vocab_size": 64, "dim": 32, "num_layers": 2, "heads": 2,
    "attention": {"impl": "baseline.causal", "persistent_tokens": 0, "rope_base": 10000.0},
    "feedforward": {"impl": "baseline.swiglu", "multiplier": 2.6666666666666665},
    "integration": {"impl": "baseline.transformer"},
}
GOLDEN_ID = "d2ed5e446e"


def test_spec_id_golden_value():
    spec = from_dict(GOLDEN_SPEC, REGISTRY)
    assert to_dict(spec) == GOLDEN_SPEC  # the canonical form itself is unchanged
    assert spec_id(spec) == GOLDEN_ID
    for older in (1, 2):
        assert spec_id(from_dict({**GOLDEN_SPEC, "schema_version": older}, REGISTRY)) == GOLDEN_ID


def test_spec_id_is_stable_and_sensitive():
    spec = memforge.preset("titans.lmm_tiny")
    assert spec_id(spec) == spec_id(memforge.preset("titans.lmm_tiny"))
    assert len(spec_id(spec)) == 10
    assert spec_id(memforge.override(spec, ["memory.depth=3"])) != spec_id(spec)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("memory.dept=3", r"unknown key memory\.'dept'; did you mean 'depth'\?"),
        ("memory.depth=0", r"memory: 'depth' must be >= 1, got 0"),
        ("memory.depth=two", r"'depth' must be an integer, got 'two'"),
        ("memmory.depth=3", r"did you mean 'memory'"),
        ("optimizer=titans.momentun", r"did you mean 'titans.momentum'"),
        ("surprise=titans.gradient", r"^override 'surprise': the kind 'surprise' was split .* "
                                     r"write optimizer=titans.sgd$"),
        ("forgetting=titans.no_forgetting", r"^override 'forgetting': the kind 'forgetting' is "
                                            r"called 'retention' .* write "
                                            r"retention=titans.no_forgetting$"),
        ("heads=5", r"'heads'=5 must divide 'dim'=32"),
        ("memory_layers=[7]", r"out of range for num_layers=2"),
        ("nonsense", r"must look like 'key=value'"),
    ],
)
def test_bad_overrides_name_the_problem(assignment, message):
    with pytest.raises(SpecError, match=message):
        memforge.override(memforge.preset("titans.lmm_tiny"), [assignment])


def test_missing_required_kind_is_reported():
    data = to_dict(memforge.preset("titans.lmm_tiny"))
    del data["memory"]
    with pytest.raises(SpecError, match="memory_layer 'titans.neural_memory' needs a memory component"):
        from_dict(data)


def test_memory_layers_without_memory_integration_is_reported():
    with pytest.raises(SpecError, match="carries no memory"):
        memforge.override(memforge.preset("baseline.transformer_tiny"), ["memory_layers=[0]"])


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "future.toml"
    text = dumps_spec(memforge.preset("titans.lmm_tiny")).replace("schema_version = 3", "schema_version = 9")
    path.write_text(text)
    with pytest.raises(SpecError, match=r"future.toml: spec has schema_version 9.*upgrade memforge"):
        memforge.load_spec(path)


def test_unknown_top_level_key_is_refused(tmp_path):
    path = tmp_path / "typo.json"
    data = to_dict(memforge.preset("titans.lmm_tiny"))
    data["num_layer"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"typo.json: unknown key 'num_layer'; did you mean 'num_layers'"):
        memforge.load_spec(path)


def test_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("dim = = 3\n")
    with pytest.raises(SpecError, match=r"broken.toml: not valid TOML"):
        read_spec_dict(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="use a .toml or .json file"):
        memforge.load_spec(tmp_path / "model.yaml")
    with pytest.raises(SpecError, match="no such spec file"):
        memforge.load_spec(tmp_path / "absent.toml")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    spec = memforge.preset("titans.lmm_tiny")
    path = memforge.save_spec(spec, tmp_path / "model.toml")
    assert [p.name for p in tmp_path.iterdir()] == ["model.toml"]
    assert memforge.load_spec(path) == spec


def test_preset_keyword_overrides():
    spec = memforge.preset("titans.lmm_tiny", memory={"depth": 3}, optimizer="titans.sgd",
                           **{"memory_layer.chunk_size": 4})
    assert spec.memory.config.depth == 3
    assert spec.optimizer.impl == "titans.sgd"
    assert spec.memory_layer.config.chunk_size == 4


def test_switching_to_an_integration_without_memory_drops_the_memory_tables():
    memoryless = ["integration=baseline.transformer",
                  *(f"{kind}=none" for kind in memforge.interfaces.MEMORY_KINDS)]
    spec = memforge.override(memforge.preset("titans.lmm_tiny"), memoryless)
    assert spec.memory is None and spec.integration.impl == "baseline.transformer"
    memforge.build_model(spec)


def test_unused_memory_tables_are_refused_naming_both():
    with pytest.raises(SpecError, match=r"integration 'baseline.transformer' uses no memory "
                                        r"component, but the spec sets \[memory\] 'titans.mlp'"):
        memforge.override(memforge.preset("baseline.transformer_tiny"), ["memory=titans.mlp"])


def test_an_optional_kind_an_integration_declares_is_accepted():
    """A third-party integration may declare kinds it uses only when the spec has them."""
    import attrs

    from memforge.plugins import as_module, load_plugins

    transformer = REGISTRY.component("integration", "baseline.transformer")

    @attrs.frozen
    class NoConfig:
        """No settings."""

    def factory(config, ctx):
        return transformer.factory(transformer.config_cls(), ctx)

    component = memforge.ComponentSpec(kind="integration", name="lab.maybe_memory", config_cls=NoConfig,
                                       factory=factory, summary="uses memory if given",
                                       requires=transformer.requires, optional=("memory",))

    @memforge.hookimpl
    def memforge_register_components():
        return [component]

    registry = load_plugins(autoload=False, extra=[as_module(
        "lab", memforge_register_components=memforge_register_components)])
    base = memforge.override(memforge.preset("baseline.transformer_tiny"),
                             ["integration=lab.maybe_memory"], registry)
    with_memory = memforge.override(base, ["memory=titans.mlp"], registry)
    assert with_memory.memory.impl == "titans.mlp"
    with pytest.raises(SpecError, match=r"uses no optimizer component"):
        memforge.override(base, ["optimizer=titans.momentum"], registry)


def test_an_integration_declaring_no_kinds_is_exempt_from_the_unused_check():
    """Integrations written before ``optional`` existed declare nothing: any kind may be set."""
    import attrs

    from memforge.plugins import as_module, load_plugins

    transformer = REGISTRY.component("integration", "baseline.transformer")

    @attrs.frozen
    class NoConfig:
        """No settings."""

    def factory(config, ctx):
        ctx.build("memory")  # an undeclared build, as such a plugin may do
        return transformer.factory(transformer.config_cls(), ctx)

    component = memforge.ComponentSpec(kind="integration", name="legacy.block", config_cls=NoConfig,
                                       factory=factory, summary="declares nothing")

    @memforge.hookimpl
    def memforge_register_components():
        return [component]

    registry = load_plugins(autoload=False, extra=[as_module(
        "legacy", memforge_register_components=memforge_register_components)])
    spec = memforge.override(memforge.preset("baseline.transformer_tiny"),
                             ["integration=legacy.block", "memory=titans.mlp"], registry)
    assert spec.memory.impl == "titans.mlp"
    model = memforge.build_model(spec, registry=registry)
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, spec.vocab_size)


# --------------------------------------------------------------------------------------------
# Per-layer choices


def test_per_layer_tables_choose_a_kind_for_some_layers():
    spec = memforge.override(memforge.preset("titans.lmm_tiny"),
                             ["num_layers=3", "layer.0,1.memory.depth=3", "layer.2.memory=titans.linear"])
    assert [spec.choice("memory", i).impl for i in range(3)] == ["titans.mlp"] * 2 + ["titans.linear"]
    assert [spec.choice("memory", i).config.depth for i in range(2)] == [3, 3]
    assert spec.memory.config.depth == 2  # the model-wide choice is untouched
    data = to_dict(spec)
    assert data["layer"]["2"] == {"memory": {"impl": "titans.linear"}}
    assert from_dict(data, REGISTRY) == spec
    back = memforge.override(spec, ["layer.2.memory=none"])  # layer 2 uses the model-wide one again
    assert back.choice("memory", 2) == spec.memory
    model = memforge.build_model(spec)
    assert [len(b.memory.memory.initial_weights()) for b in model.blocks] == [3, 3, 1]


def test_a_layer_range_in_toml_and_json(tmp_path):
    text = dumps_spec(memforge.override(memforge.preset("titans.lmm_tiny"), ["num_layers=4"]))
    text += '\n[layer."1-3".memory_layer]\nimpl = "titans.neural_memory"\nchunk_size = 2\n'
    path = tmp_path / "ranged.toml"
    path.write_text(text)
    spec = memforge.load_spec(path, REGISTRY)
    assert [spec.choice("memory_layer", i).config.chunk_size for i in range(4)] == [8, 2, 2, 2]
    memforge.save_spec(spec, tmp_path / "ranged.json")
    assert memforge.load_spec(tmp_path / "ranged.json", REGISTRY) == spec


def test_a_hybrid_written_either_way_builds_the_same_blocks():
    mag = memforge.preset("titans.mag_tiny")
    memory_tables = {k: v for k, v in to_dict(mag).items() if k in memforge.interfaces.MEMORY_KINDS}
    transformer_first = {**to_dict(memforge.preset("baseline.swa_tiny")), **memory_tables,
                         "layer": {"1": {"integration": {"impl": "titans.mag"}}}}
    transformer_first["attention"] = to_dict(mag)["attention"]
    spec = from_dict(transformer_first, REGISTRY)
    model = memforge.build_model(spec)
    assert [type(b).__name__ for b in model.blocks] == ["TransformerBlock", "MAGBlock"]
    hybrid = memforge.preset("titans.mag_hybrid_tiny")
    assert [type(b).__name__ for b in memforge.build_model(hybrid).blocks] == [
        "TransformerBlock", "MAGBlock"]


@pytest.mark.parametrize(("assignments", "message"), [
    (["layer.5.memory.depth=3"],
     r"\[layer.5\] does not exist: num_layers=2 has layers 0..1; fix the layer index or num_layers"),
    (["layer.x.memory.depth=3"], r"\[layer.x\]: layers are written as an index \(1\), a comma list"),
    (["layer.1.memroy.depth=3"], r"per-layer paths are layer.<layers>.<kind>"),
    (["layer.1.memory.dept=3"], r"unknown key layer.1.memory.'dept'; did you mean 'depth'"),
    (["layer.1.attention.window=4"], r"unknown key layer.1.attention.'window'"),
    (["layer.1.attention=baseline.causal"],
     r"\[layer.1.attention\] 'baseline.causal' is set but layer 1's integration 'titans.lmm' "
     r"does not use it"),
])
def test_bad_per_layer_overrides_name_the_problem(assignments, message):
    with pytest.raises(SpecError, match=message):
        memforge.override(memforge.preset("titans.lmm_tiny"), assignments)


def test_a_per_layer_table_for_a_kind_its_layer_does_not_use_names_both():
    with pytest.raises(SpecError, match=r"\[layer.0.memory\] 'titans.mlp' is set but layer 0's "
                                        r"integration 'baseline.transformer' does not use it; "
                                        r"remove the \[layer.0.memory\] table"):
        memforge.override(memforge.preset("titans.mag_hybrid_tiny"), ["layer.0.memory.depth=3"])


def test_a_layer_whose_integration_needs_missing_kinds_is_named():
    with pytest.raises(SpecError, match=r"layer 1: integration 'titans.mag' needs a memory_layer "
                                        r"component; add a \[memory_layer\] table"):
        memforge.override(memforge.preset("baseline.swa_tiny"), ["layer.1.integration=titans.mag"])


def test_a_kind_set_twice_for_a_layer_is_refused():
    data = to_dict(memforge.preset("titans.lmm_tiny"))
    data["layer"] = {"0": {"memory": {"impl": "titans.linear"}}, "0,1": {"memory": "titans.mlp"}}
    with pytest.raises(SpecError, match=r"\[layer.0.memory\] is set twice"):
        from_dict(data, REGISTRY)


def test_show_prints_each_layers_integration_and_memory_layer(capsys):
    from memforge.cli import main

    assert main(["show", "titans.mag_hybrid_tiny"]) == 0
    out = capsys.readouterr().out
    assert '[layer.0.integration]\nimpl = "baseline.transformer"' in out
    rows = [line.split() for line in out.splitlines() if "Block" in line]
    assert [[cell for cell in row if cell not in "│┃"][:4] for row in rows] == [
        ["0", "baseline.transformer", "-", "TransformerBlock"],
        ["1", "titans.mag", "titans.neural_memory", "MAGBlock"]]
    assert ("layer 1: titans.neural_memory built from memory 'titans.mlp', objective "
            "'titans.l2', optimizer 'titans.momentum', retention 'titans.adaptive_decay', "
            "retrieval 'titans.chunk_start', projection 'titans.conv_qkv'") in out
