"""Schema-1 specs keep loading: stored files of the schema-1 presets, hand-written ones, shorthands.

``tests/data/specs/schema1/`` holds ``memforge show PRESET --format toml`` of the tiny presets as
memforge wrote them before schema 2; each must load to today's preset of the same name.
"""

from pathlib import Path

import pytest
import torch

import memforge
from memforge.errors import SpecError
from memforge.io import read_spec_dict
from memforge.migrations import migrate
from memforge.plugins import load_plugins
from memforge.spec import SCHEMA_VERSION, from_dict, spec_id, to_dict

REGISTRY = load_plugins(autoload=False)
SCHEMA1 = Path(__file__).parent / "data" / "specs" / "schema1"
FILES = sorted(SCHEMA1.glob("*.toml"))


def test_there_are_stored_schema1_files():
    assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_stored_schema1_preset_loads_as_todays_preset(path: Path):
    assert read_spec_dict(path)["schema_version"] == 1
    spec = memforge.load_spec(path, REGISTRY)
    preset = memforge.preset(path.stem)
    assert spec == preset
    assert spec.schema_version == SCHEMA_VERSION == 2
    assert spec_id(spec) == spec_id(preset)  # the id of a migrated file is its spec's id


def test_a_migrated_spec_saves_in_schema_2_and_round_trips(tmp_path):
    spec = memforge.load_spec(SCHEMA1 / "titans.mag_hybrid_tiny.toml", REGISTRY)
    saved = memforge.save_spec(spec, tmp_path / "spec.json")
    data = read_spec_dict(saved)
    assert data["schema_version"] == 2 and "memory_layers" not in data
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
    assert migrate(migrated, 2) == migrated


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
    with pytest.raises(SpecError, match=r"^unknown key integration.'chunk_size' .*; a schema-1 "
                                        r"file\? add schema_version = 1$"):
        from_dict(data, REGISTRY)
    assert from_dict({**data, "schema_version": 1}, REGISTRY) == memforge.preset("titans.mac_tiny")
    data["integration"].pop("chunk_size")
    data["integration"]["segment_lenn"] = 16  # an ordinary typo in a schema-2 file: no hint
    with pytest.raises(SpecError, match=r"segment_lenn(?!.*schema-1)"):
        from_dict(data, REGISTRY)
