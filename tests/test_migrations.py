"""Older specs keep loading: stored files of the schema-1 and schema-2 presets, hand-written
ones, shorthands, and the weights of models saved with a schema-2 spec.

``tests/data/specs/schema1/`` and ``schema2/`` hold ``memforge show PRESET --format toml`` of the
presets as memforge wrote them before schema 2 and 3; each must load to today's preset of the
same name (schema 1 through both migrations). ``tests/data/models/schema2_lmm_micro`` (a saved
model) and ``tests/data/checkpoints/schema2_lmm_micro`` (a training run) were written by a
schema-2 memforge, with the logits the model gave then.
"""

import shutil
from pathlib import Path

import attrs
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memforge
from memforge.errors import SpecError
from memforge.io import read_spec_dict
from memforge.migrations import migrate, migrate_state_dict
from memforge.plugins import load_plugins
from memforge.spec import SCHEMA_VERSION, ComponentChoice, from_dict, spec_id, to_dict
from memforge.testing.strategies import configs

REGISTRY = load_plugins(autoload=False)
DATA = Path(__file__).parent / "data"
SCHEMA1 = DATA / "specs" / "schema1"
SCHEMA2 = DATA / "specs" / "schema2"
FILES = sorted(SCHEMA1.glob("*.toml"))
FILES2 = sorted(SCHEMA2.glob("*.toml"))
MODEL2 = DATA / "models" / "schema2_lmm_micro"
RUN2 = DATA / "checkpoints" / "schema2_lmm_micro"


def test_there_are_stored_schema1_and_schema2_files():
    assert len(FILES) >= 5
    assert len(FILES2) >= 10


@pytest.mark.parametrize("path", FILES + FILES2, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_a_stored_older_preset_loads_as_todays_preset(path: Path):
    assert read_spec_dict(path)["schema_version"] == int(path.parent.name[-1])
    spec = memforge.load_spec(path, REGISTRY)
    preset = memforge.preset(path.stem)
    assert spec == preset
    assert spec.schema_version == SCHEMA_VERSION == 3
    assert spec_id(spec) == spec_id(preset)  # the id of a migrated file is its spec's id


def test_a_migrated_spec_saves_in_schema_3_and_round_trips(tmp_path):
    spec = memforge.load_spec(SCHEMA1 / "titans.mag_hybrid_tiny.toml", REGISTRY)
    saved = memforge.save_spec(spec, tmp_path / "spec.json")
    data = read_spec_dict(saved)
    assert data["schema_version"] == 3 and "memory_layers" not in data
    assert "surprise" not in data and "forgetting" not in data
    assert data["objective"] == {"impl": "titans.l2"}
    assert data["optimizer"] == {"impl": "titans.momentum", "max_lr": 0.01, "lr_init": 0.005,
                                 "momentum_init": 0.9}
    assert data["retention"] == {"impl": "titans.adaptive_decay", "init": 0.02, "max_decay": 1.0}
    assert data["memory_layer"] == {"impl": "titans.neural_memory", "chunk_size": 8}
    assert data["layer"] == {"0": {"integration": {"impl": "baseline.transformer"}}}
    assert memforge.load_spec(saved, REGISTRY) == spec


def test_a_migrated_model_computes_what_the_schema1_model_computed():
    """The memory layer moved in the spec, not in the model: same parameters, same logits."""
    tokens = torch.arange(24).remainder(64)[None]
    outputs = []
    for spec in (memforge.load_spec(SCHEMA1 / "titans.mac_tiny.toml", REGISTRY),
                 memforge.preset("titans.mac_tiny")):
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(memforge.build_model(spec, registry=REGISTRY)(tokens).logits)
    assert torch.equal(*outputs)


def test_a_schema1_table_without_chunk_size_keeps_its_integrations_default():
    base = to_dict(memforge.preset("titans.mac_tiny"))
    data = {**base, "schema_version": 1, "integration": {"impl": "titans.mac", "segment_len": 16}}
    del data["memory_layer"]
    assert from_dict(data, REGISTRY).memory_layer.config.chunk_size == 16  # MAC's schema-1 default
    data["integration"] = {"impl": "titans.lmm"}
    assert from_dict(data, REGISTRY).memory_layer.config.chunk_size == 64


def test_migration_is_a_pure_function_of_the_dict():
    data = {"schema_version": 1, "integration": {"impl": "titans.lmm", "chunk_size": 4}}
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    migrated = migrate(data, 1)
    assert data == before
    assert migrated["integration"] == {"impl": "titans.lmm"}
    assert migrated["memory_layer"] == {"impl": "titans.neural_memory", "chunk_size": 4}
    assert migrate(migrated, 3) == migrated
    assert migrated["schema_version"] == 3


def _schema2(name: str = "titans.lmm_tiny") -> dict:
    return read_spec_dict(SCHEMA2 / f"{name}.toml")


def test_schema2_gradient_surprise_becomes_l2_and_sgd_with_its_settings():
    data = _schema2()
    data["surprise"] = {"impl": "titans.gradient", "max_lr": 0.05, "lr_init": 0.001}
    data["forgetting"] = {"impl": "titans.constant_decay", "alpha": 0.1}
    spec = from_dict(data, REGISTRY)
    assert spec.objective.impl == "titans.l2"
    assert (spec.optimizer.impl, spec.optimizer.config.max_lr, spec.optimizer.config.lr_init) == (
        "titans.sgd", 0.05, 0.001)
    assert (spec.retention.impl, spec.retention.config.alpha) == ("titans.constant_decay", 0.1)
    assert spec == memforge.override(memforge.preset("titans.lmm_tiny"), [
        "optimizer=titans.sgd", "optimizer.max_lr=0.05", "optimizer.lr_init=0.001",
        "retention=titans.constant_decay", "retention.alpha=0.1"], REGISTRY)


def test_schema2_per_layer_tables_are_split_too():
    data = _schema2()
    data["layer"] = {"1": {"surprise": "titans.gradient",
                           "forgetting": {"impl": "titans.no_forgetting"}}}
    spec = from_dict(data, REGISTRY)
    assert spec.choice("optimizer", 0).impl == "titans.momentum"
    assert spec.choice("optimizer", 1).impl == "titans.sgd"
    assert spec.choice("objective", 1).impl == "titans.l2"
    assert spec.choice("retention", 1).impl == "titans.no_forgetting"
    assert to_dict(spec)["layer"]["1"]["optimizer"] == {"impl": "titans.sgd", "max_lr": 0.01,
                                                        "lr_init": 0.005}


def test_the_schema2_migration_is_a_pure_function_of_the_dict():
    data = _schema2()
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    migrated = migrate(data, 2)
    assert data == before
    assert set(migrated) - set(data) == {"objective", "optimizer", "retention"}
    assert set(data) - set(migrated) == {"surprise", "forgetting"}
    assert migrate(migrated, 3) == migrated


#: Today's optimizers and the schema-2 surprise component each was written as.
_AS_SURPRISE = {"titans.momentum": "titans.momentum", "titans.sgd": "titans.gradient"}


@settings(deadline=None, max_examples=25)
@given(data=st.data(), optimizer=st.sampled_from(sorted(_AS_SURPRISE)),
       retention=st.sampled_from(["titans.adaptive_decay", "titans.constant_decay",
                                  "titans.no_forgetting"]),
       per_layer=st.booleans())
def test_any_schema3_rule_written_in_schema2_migrates_back_to_itself(data, optimizer, retention,
                                                                     per_layer):
    """A rule written the schema-2 way (surprise = the optimizer's old name with its settings,
    forgetting = the retention), model-wide or in a per-layer table, migrates to that rule."""
    choices = {kind: ComponentChoice(name, data.draw(configs(
        REGISTRY.component(kind, name).config_cls))) for kind, name in (
        ("optimizer", optimizer), ("retention", retention))}
    base = memforge.preset("titans.lmm_tiny")
    spec = attrs.evolve(base, layers={1: choices}) if per_layer else attrs.evolve(base, **choices)
    old = {**to_dict(spec), "schema_version": 2}
    tables = old["layer"]["1"] if per_layer else old
    tables.pop("objective", None)  # schema 2 had no objective: the surprise component carried it
    step = tables.pop("optimizer")
    tables["surprise"] = {**step, "impl": _AS_SURPRISE[step["impl"]]}
    tables["forgetting"] = tables.pop("retention")
    migrated = from_dict(old, REGISTRY)
    for layer in range(spec.num_layers):
        assert migrated.layer_choices(layer) == spec.layer_choices(layer)
    assert migrated.choices() == spec.choices()


def test_another_plugins_surprise_component_cannot_be_split_automatically():
    data = _schema2()
    data["surprise"] = {"impl": "lab.huber", "delta": 1.0}
    with pytest.raises(SpecError, match=r"^the spec's \[surprise\] 'lab.huber' cannot be split into "
                                        r"the schema-3 kinds objective and optimizer automatically"):
        from_dict(data, REGISTRY)


def test_a_schema2_file_setting_the_old_and_the_new_kind_is_refused():
    data = {**_schema2(), "retention": {"impl": "titans.no_forgetting"}}
    with pytest.raises(SpecError, match=r"sets both \[forgetting\] \(schema 2\) and \[retention\]"):
        from_dict(data, REGISTRY)


def test_a_schema2_file_without_its_version_is_told_to_add_it():
    data = _schema2()
    del data["schema_version"]
    with pytest.raises(SpecError, match=r"^'surprise': the kind 'surprise' was split into "
                                        r"'objective' .*; a schema-2 file\? add schema_version = 2$"):
        from_dict(data, REGISTRY)


@pytest.mark.parametrize(("table", "message"), [
    ({"surprise": {"impl": "titans.momentum"}},
     r"^'surprise': .* write optimizer=titans.momentum or optimizer=titans.sgd$"),
    ({"forgetting": {"impl": "titans.no_forgetting"}},
     r"^'forgetting': the kind 'forgetting' is called 'retention' since spec schema 3 .*"
     r"write retention$"),
    ({"layer": {"1": {"forgetting": "titans.no_forgetting"}}},
     r"^'layer.1.forgetting': .* write layer.1.retention$"),
])
def test_a_schema3_spec_naming_an_old_kind_is_told_what_replaced_it(table, message):
    data = {**to_dict(memforge.preset("titans.lmm_tiny")), **table}
    with pytest.raises(SpecError, match=message):
        from_dict(data, REGISTRY)


@pytest.mark.parametrize(("assignment", "instead"), [
    ("surprise=titans.gradient", "optimizer=titans.sgd"),
    ("surprise=titans.momentum", "optimizer=titans.momentum"),
    ("surprise=none", "objective=none and optimizer=none"),
    ("surprise.max_lr=0.05", "optimizer.max_lr=0.05"),
    ("forgetting=titans.constant_decay", "retention=titans.constant_decay"),
    ("forgetting.init=0.1", "retention.init=0.1"),
    ("layer.1.surprise=titans.gradient", "layer.1.optimizer=titans.sgd"),
    ("layer.0,1.forgetting.max_decay=0.5", "layer.0,1.retention.max_decay=0.5"),
])
def test_an_override_naming_an_old_kind_names_its_replacement(assignment, instead):
    path = assignment.split("=")[0]
    with pytest.raises(SpecError) as caught:
        memforge.override(memforge.preset("titans.lmm_tiny"), [assignment], REGISTRY)
    message = str(caught.value)
    old = "surprise" if "surprise" in path else "forgetting"
    assert message.startswith(f"override '{path}': the kind '{old}' ")
    assert message.endswith(f"write {instead}") and "\n" not in message


def test_memory_layers_is_still_read_as_a_shorthand():
    spec = memforge.override(memforge.preset("titans.mag_tiny"), ["num_layers=4", "memory_layers=[1, 3]"])
    assert [spec.choice("integration", i).impl for i in range(4)] == [
        "baseline.transformer", "titans.mag", "baseline.transformer", "titans.mag"]
    everywhere = memforge.override(spec, ["memory_layers=[0, 1, 2, 3]"])
    assert everywhere == memforge.override(memforge.preset("titans.mag_tiny"), ["num_layers=4"])


@pytest.mark.parametrize(("value", "message"), [
    ("[7]", r"'memory_layers' \[7\] out of range for num_layers=2; use indices 0..1"),
    ("[]", "'memory_layers' is empty, so integration 'titans.lmm' would be in no block"),
    ("abc", "'memory_layers' must be a list of layer indices, got 'abc'"),
])
def test_a_bad_memory_layers_names_the_fix(value, message):
    with pytest.raises(SpecError, match=message):
        memforge.override(memforge.preset("titans.lmm_tiny"), [f"memory_layers={value}"])


def test_a_schema1_file_without_its_version_is_told_to_add_it():
    data = read_spec_dict(SCHEMA1 / "titans.mac_tiny.toml")
    del data["schema_version"]
    with pytest.raises(SpecError, match=r"^'surprise': the kind 'surprise' was split .*; a "
                                        r"schema-1 file\? add schema_version = 1$"):
        from_dict(data, REGISTRY)
    assert from_dict({**data, "schema_version": 1}, REGISTRY) == memforge.preset("titans.mac_tiny")
    data = to_dict(memforge.preset("titans.mac_tiny"))
    del data["schema_version"]
    data["integration"]["segment_lenn"] = 16  # an ordinary typo in a schema-3 file: no hint
    with pytest.raises(SpecError, match=r"segment_lenn(?!.*schema-)"):
        from_dict(data, REGISTRY)


# -- weights saved with a schema-2 spec ------------------------------------------------------------
def _expected() -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(DATA / "models" / "schema2_lmm_micro.expected.safetensors")


def test_the_weights_of_a_schema2_model_are_renamed_with_the_kinds():
    stored = safetensors.torch.load_file(MODEL2 / "model.safetensors")
    assert any(".surprise." in key for key in stored) and any(".forgetting." in key for key in stored)
    renamed = migrate_state_dict(stored, 2)
    assert not any(".surprise." in key or ".forgetting." in key for key in renamed)
    assert renamed["blocks.0.memory.optimizer.momentum_gate.proj.bias"] is stored[
        "blocks.0.memory.surprise.momentum_gate.proj.bias"]
    assert renamed["blocks.0.memory.retention.gate.proj.weight"] is stored[
        "blocks.0.memory.forgetting.gate.proj.weight"]
    assert migrate_state_dict(renamed, 3) == renamed and migrate_state_dict(renamed, None) == renamed
    model = memforge.build_model(memforge.load_spec(MODEL2 / "spec.toml", REGISTRY), registry=REGISTRY)
    assert set(renamed) == set(model.state_dict())


@pytest.mark.parametrize("source", [MODEL2, RUN2], ids=["saved-model", "training-run"])
def test_a_schema2_model_loads_and_computes_what_it_computed(source: Path):
    model = memforge.load_model(source)
    assert model.spec.optimizer.impl == "titans.momentum" and model.spec.schema_version == 3
    expected = _expected()
    with torch.no_grad():
        logits = model(expected["tokens"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_a_schema2_run_resumes_training(tmp_path):
    from memforge.cli import main

    run = tmp_path / "run"
    shutil.copytree(RUN2, run)
    assert main(["train", "--spec", str(RUN2 / "spec.toml"), "--task", "mqar",
                 "--task-option", "vocab_size=32", "--task-option", "seq_len=16",
                 "--task-option", "num_pairs=2", "--steps", "4", "--batch-size", "4",
                 "--warmup", "0", "--eval-every", "2", "--eval-batches", "1", "--out", str(run),
                 "--resume", "--no-progress"]) == 0
    assert memforge.training.load_checkpoint(run).step == 4
