"""Study files: parsing, expansion into runs, and every bad file refused before a run starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memforge.ablate.runner import local_resources, plan_study
from memforge.ablate.study import StudyError, expand, load_study, run_id
from memforge.cli import main

TINY = Path(__file__).parent / "studies" / "tiny.toml"


def _write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _tiny(tmp_path: Path, old: str = "", new: str = "") -> Path:
    text = TINY.read_text(encoding="utf-8")
    if old:
        assert old in text
        text = text.replace(old, new)
    return _write(tmp_path, text)


def test_tiny_study_expands_to_validated_runs():
    study = load_study(TINY)
    runs = expand(study)
    assert [run.id for run in runs] == ["lmm__seed=0", "lmm__seed=1", "linear__seed=0", "linear__seed=1"]
    assert study.baseline == "lmm"
    assert [e.name for e in study.evaluations] == ["test", "far", "long"]
    params = {run.variant: run.params for run in runs}
    assert params["lmm"] > params["linear"] > 0  # a deep memory has more weights than a linear one
    assert runs[2].spec.memory.impl == "titans.linear"
    assert runs[0].spec.dim == 16 and runs[0].spec.vocab_size == 32
    # Same study, same fingerprints; seeds and variants give different ones.
    again = expand(load_study(TINY))
    assert [r.fingerprint for r in again] == [r.fingerprint for r in runs]
    assert len({r.fingerprint for r in runs}) == 4


def test_grid_lr_sweep_and_task_axes(tmp_path):
    path = _tiny(tmp_path, "[task]", '[grid]\ndim = [16, 32]\n"task.num_pairs" = [2, 4]\n\n[task]')
    text = path.read_text().replace("lr = 3e-3", "lr = [1e-3, 3e-3]")
    study = load_study(_write(tmp_path, text))
    runs = expand(study)
    assert len(runs) == 2 * 2 * 2 * 2 * 2  # variants x dim x num_pairs x lr x seeds
    assert runs[0].id == "lmm__dim=16__task.num_pairs=2__lr=0.001__seed=0"
    assert runs[0].task_options["num_pairs"] == 2 and runs[0].spec.dim == 16
    assert study.selection is not None and study.selection.metric == "validation/accuracy"
    widths = {r.spec.dim: r.params for r in runs if r.variant == "lmm"}
    assert widths[16] == runs[0].params < widths[32]  # the parameter count follows the dim axis


def test_seed_count_and_implicit_base_variant(tmp_path):
    path = _write(tmp_path, 'seeds = 3\n[base]\npreset = "titans.lmm_tiny"\n[grid]\ndim = [16, 32]\n'
                            '[task]\nname = "mqar"\nseq_len = 32\n')
    runs = expand(load_study(path))
    assert [r.id for r in runs][:3] == ["base__dim=16__seed=0", "base__dim=16__seed=1",
                                        "base__dim=16__seed=2"]


def test_variant_with_its_own_preset_and_layer_placement(tmp_path):
    path = _tiny(tmp_path, "[task]", '[variants.hybrid]\npreset = "titans.mag_tiny"\n'
                                     'memory_layers = [1]\n\n[variants.swa]\n'
                                     'preset = "baseline.swa_tiny"\n\n[task]')
    # The base's overrides (dim, vocab_size) apply to a variant's own preset too.
    runs = {r.variant: r for r in expand(load_study(path))}
    assert runs["hybrid"].spec.choice("integration", 0).impl == "baseline.transformer"
    assert runs["hybrid"].spec.integration.impl == "titans.mag"
    assert runs["swa"].spec.dim == 16 and runs["swa"].spec.memory is None


@pytest.mark.parametrize(("old", "new", "message"), [
    ('name = "tiny"', 'name = "tiny"\nseed = [0]', "unknown key 'seed'; did you mean 'seeds'?"),
    ('baseline = "lmm"', 'baseline = "lmn"', "baseline: 'lmn' is not a variant; did you mean 'lmm'?"),
    ('memory = "titans.linear"', 'memory = "titans.linaer"', "did you mean 'titans.linear'"),
    ('memory = "titans.linear"', 'memroy = "titans.linear"',
     "variants.linear: unknown key 'memroy'; did you mean 'memory'?"),
    ('memory = "titans.linear"', 'memory = { impl = "titans.mlp", depht = 3 }',
     "variants.linear: unknown key memory.'depht'; did you mean 'depth'?"),
    ("steps = 6", "step = 6", "train: unknown key 'step'; did you mean 'steps'?"),
    ("steps = 6", "steps = 0", "train: steps"),
    ("num_pairs = 4", "num_pair = 4", "task: unknown key 'num_pair'; did you mean 'num_pairs'?"),
    ("num_pairs = 4", "num_pairs = 40", "task"),
    ('name = "mqar"', 'name = "mqr"', "unknown task 'mqr'"),
    ("min_query_distance = 16", "min_query_distanse = 16",
     "evaluations.far.options: unknown key 'min_query_distanse'"),
    ("lengths = [32, 64]", "lengths = [32, 64]\ndepths = [0.5]", "task 'mqar' has no needle depth"),
    ("[task]", "[grid]\ndim = [16, 15]\n\n[task]", "grid (dim = 15) for variants.lmm"),
    ("[task]", "[grid]\nvocab_size = [32, 16]\n\n[task]", "out of range for the model's vocab_size=16"),
    ("[task]", '[grid]\n"memory.depth" = [1, 2]\n\n[task]',
     "grid (memory.depth = 1) for variants.linear: unknown key memory.'depth'"),
    ("[task]", '[grid]\nmemory = ["titans.mlp"]\n\n[task]', "variants.linear: sets 'memory', which is also"),
    ("seeds = [0, 1]", "seeds = [0, 0]", "seeds: lists a seed twice"),
    ('primary_metric = "test/accuracy"', 'primary_metric = "tset/accuracy"', "primary_metric"),
    ("lengths = [32, 64]", "lengths = [32, 1000000000]",
     "evaluations[2].lengths: length 1000000000 needs at least"),
    ('name = "far"', 'name = "validation"', "evaluations[1].name: 'validation' is taken"),
    ("[task]", '[grid]\nmemroy = ["titans.mlp"]\n\n[task]',
     "grid: unknown key 'memroy'; did you mean 'memory'? (a spec override like memory.depth = 3 "
     'or optimizer = "titans.sgd")'),
    ("[task]", '[grid]\nforgetting = ["titans.no_forgetting"]\n\n[task]',
     "grid: 'forgetting': the kind 'forgetting' is called 'retention' since spec schema 3 (same "
     "components and settings); write retention"),
    ('memory = "titans.linear"', 'surprise = "titans.gradient"',
     "variants.linear: 'surprise': the kind 'surprise' was split into 'objective' (the loss, "
     "objective=titans.l2) and 'optimizer' (step size and momentum) in spec schema 3; write "
     "optimizer=titans.sgd"),
])
def test_bad_study_files_fail_with_one_line(tmp_path, old, new, message):
    path = _tiny(tmp_path, old, new)
    with pytest.raises(StudyError) as info:
        expand(load_study(path))
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith(str(path))


def test_cli_refuses_bad_study_before_writing_anything(tmp_path, capsys):
    path = _tiny(tmp_path, 'baseline = "lmm"', 'baseline = "deep"')
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memforge: error: ") and "baseline: 'deep' is not a variant" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_dry_run_shows_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ablate", str(TINY), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "study tiny: 4 runs" in text and "10,156" in text and "8,364" in text
    assert "estimated time: about" in text
    assert not out.exists()


def test_long_estimates_are_shown_in_hours():
    from memforge.ablate.runner import _minutes

    assert [_minutes(s) for s in (42, 90 * 60, 120 * 60, 3 * 3600)] == ["42 s", "90.0 min",
                                                                      "120.0 min", "3.0 h"]


def test_plan_of_an_empty_directory_has_everything_to_do(tmp_path):
    plan = plan_study(TINY, tmp_path / "out")
    assert plan.todo == [run.id for run in plan.runs] and not plan.outcomes
    document = plan.to_json()
    assert document["baseline"] == "lmm" and document["primary_metric"] == "test/accuracy"
    assert document["selection"] is None and document["axes"] == []
    assert document["runs"][0]["dir"] == "runs/lmm__seed=0"


def test_workers_beyond_the_cores_are_refused(monkeypatch):
    monkeypatch.setattr("memforge.ablate.runner.cpu_cores", lambda: 2)
    assert local_resources(2, "cpu").threads == 1
    assert local_resources(1, "cpu").threads == 2
    with pytest.raises(StudyError, match="--workers 3 but this machine has 2 CPU cores"):
        local_resources(3, "cpu")


_value = st.one_of(st.integers(-5, 500), st.floats(1e-5, 10, allow_nan=False),
                   st.sampled_from(["titans.mlp", "baseline.causal"]))
_point = st.tuples(st.sampled_from(["lmm", "mac", "no-conv", "x_1"]),
                   st.dictionaries(st.sampled_from(["dim", "memory.depth", "task.seq_len"]), _value,
                                   max_size=3),
                   st.one_of(st.none(), st.floats(1e-6, 1.0)), st.integers(0, 20))


def _key(point):
    variant, axes, lr, seed = point
    return variant, tuple(sorted((k, type(v).__name__, v) for k, v in axes.items())), lr, seed


@settings(deadline=None, max_examples=200)
@given(st.lists(_point, min_size=1, max_size=30))
def test_run_ids_are_distinct_safe_directory_names(points):
    ids = {}
    for point in points:
        variant, axes, lr, seed = point
        identifier = run_id(variant, dict(sorted(axes.items())), lr, seed)
        assert re.fullmatch(r"[A-Za-z0-9_.=,+\[\]-]+", identifier)
        ids.setdefault(identifier, set()).add(_key(point))
    # One id per distinct run: the same run always gets the same id, different runs different ones.
    assert all(len(keys) == 1 for keys in ids.values())


_SWAPS = {"linear": 'memory = "titans.linear"', "no_momentum": 'optimizer = "titans.sgd"',
          "no_conv": 'projection = "titans.plain_qkv"', "shallow": '"memory.depth" = 1'}


@settings(deadline=None, max_examples=12)
@given(variants=st.lists(st.sampled_from(sorted(_SWAPS)), min_size=1, max_size=3, unique=True),
       dims=st.lists(st.sampled_from([8, 16, 24]), min_size=1, max_size=2, unique=True),
       lrs=st.lists(st.sampled_from([1e-3, 3e-3]), min_size=1, max_size=2, unique=True),
       seeds=st.integers(1, 3))
def test_expansion_is_the_product_of_variants_grid_lrs_and_seeds(tmp_path_factory, variants, dims,
                                                                 lrs, seeds):
    text = (f"seeds = {seeds}\nbaseline = {variants[0]!r}\n[base]\npreset = \"titans.lmm_tiny\"\n"
            f"[grid]\ndim = {dims}\n[task]\nname = \"mqar\"\nseq_len = 32\n[train]\nlr = {lrs}\n"
            + "".join(f"[variants.{v}]\n{_SWAPS[v]}\n" for v in variants))
    path = _write(tmp_path_factory.mktemp("study"), text)
    runs = expand(load_study(path))
    assert len(runs) == len(variants) * len(dims) * len(lrs) * seeds
    assert len({r.id for r in runs}) == len(runs) == len({r.fingerprint for r in runs})
    assert [r.fingerprint for r in expand(load_study(path))] == [r.fingerprint for r in runs]
    for run in runs:
        assert run.spec.dim == run.axes["dim"] and run.lr in lrs and run.seed < seeds
