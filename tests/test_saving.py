"""``memforge.save_model`` / ``load_model``: exact round trips, runs and checkpoints, clear refusals."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memforge
from memforge.errors import InputError, MemforgeError
from memforge.io import atomic_write, atomic_write_bytes
from memforge.plugins import default_registry
from memforge.saving import FORMAT_VERSION, SPEC, WEIGHTS, ModelFileError
from memforge.testing.strategies import model_specs
from memforge.training import TrainConfig, train

TINY = ["baseline.transformer_tiny", "titans.lmm_tiny", "titans.mac_tiny"]


def _tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _rewrite(path: Path, *, drop: str | None = None, **metadata: str) -> None:
    """Rewrite a saved weights file with changed metadata entries and/or one tensor left out."""
    with safetensors.safe_open(path, framework="pt") as handle:
        old = dict(handle.metadata())
    tensors = safetensors.torch.load_file(path)
    if drop is not None:
        del tensors[drop]
    safetensors.torch.save_file(tensors, path, metadata={**old, **metadata})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (two checkpoints), as ``memforge train`` leaves it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(model="baseline.transformer_tiny", task="mqar",
                          task_options={"seq_len": 32, "num_pairs": 4}, steps=4, batch_size=4,
                          warmup_steps=1, eval_every=2, eval_batches=1, device="cpu", out=out,
                          progress=False))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_bit_identical_logits(name: str, tmp_path: Path) -> None:
    model = memforge.build_model(memforge.preset(name)).eval()
    saved = memforge.save_model(model, tmp_path / "model")
    assert sorted(p.name for p in saved.iterdir()) == [WEIGHTS, SPEC]
    loaded = memforge.load_model(saved)
    assert not loaded.training and loaded.spec == model.spec
    tokens = _tokens(model.vocab_size, (2, 19))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@settings(max_examples=8)
@given(spec=model_specs(default_registry(), buildable=True), seed=st.integers(0, 2**16))
def test_any_drawn_spec_round_trips_exactly(tmp_path_factory: pytest.TempPathFactory, spec,
                                            seed: int) -> None:
    torch.manual_seed(seed)
    model = memforge.build_model(spec).eval()
    loaded = memforge.load_model(memforge.save_model(model, tmp_path_factory.mktemp("saved")))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_dtype_is_kept_and_can_be_chosen(tmp_path: Path) -> None:
    model = memforge.build_model(memforge.preset("titans.lmm_tiny"), dtype=torch.float64).eval()
    memforge.save_model(model, tmp_path / "m")
    assert memforge.load_model(tmp_path / "m").embedding.weight.dtype == torch.float64
    assert memforge.load_model(tmp_path / "m", dtype=torch.float32).head.weight.dtype == torch.float32


def test_saving_again_replaces_an_earlier_save(tmp_path: Path) -> None:
    spec = memforge.preset("baseline.transformer_tiny")
    first, second = memforge.build_model(spec), memforge.build_model(spec)
    memforge.save_model(first, tmp_path / "m")
    memforge.save_model(second, tmp_path / "m")
    assert torch.equal(memforge.load_model(tmp_path / "m").head.weight, second.head.weight)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = memforge.build_model(memforge.preset("baseline.transformer_tiny"))
    previous = os.umask(umask)
    try:
        memforge.save_model(model, tmp_path / "m")
        memforge.save_model(model, tmp_path / "m")  # replacing keeps the mode too
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {WEIGHTS: 0o666 & ~umask, SPEC: 0o666 & ~umask}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_a_run_directory_loads_its_latest_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    weights = safetensors.torch.load_file(latest / WEIGHTS)
    for source in (run_dir, latest, latest / WEIGHTS):
        model = memforge.load_model(source)
        assert not model.training and model.spec == memforge.load_spec(run_dir / "spec.toml")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # A loaded run exports to a standalone saved model.
    exported = memforge.save_model(memforge.load_model(run_dir), tmp_path / "export")
    tokens = _tokens(64, (1, 12))
    assert torch.equal(memforge.load_model(exported)(tokens).logits,
                       memforge.load_model(run_dir)(tokens).logits)


def test_loading_never_unpickles(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("load_model called torch.load")

    expected = memforge.load_model(run_dir).state_dict()
    monkeypatch.setattr(torch, "load", refuse)
    loaded = memforge.load_model(run_dir).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_a_newer_format_names_both_versions(tmp_path: Path) -> None:
    saved = memforge.save_model(memforge.build_model(memforge.preset("titans.lmm_tiny")), tmp_path / "m")
    _rewrite(saved / WEIGHTS, format_version=str(FORMAT_VERSION + 1), memforge_version="9.0.0")
    with pytest.raises(ModelFileError) as info:
        memforge.load_model(saved)
    message = str(info.value)
    assert "\n" not in message
    assert f"saved by memforge 9.0.0 in model format {FORMAT_VERSION + 1}" in message
    assert f"this memforge ({memforge.__version__}) reads formats up to {FORMAT_VERSION}" in message
    assert "upgrade memforge" in message


def test_a_damaged_format_version_is_refused(tmp_path: Path) -> None:
    saved = memforge.save_model(memforge.build_model(memforge.preset("titans.lmm_tiny")), tmp_path / "m")
    _rewrite(saved / WEIGHTS, format_version="one")
    with pytest.raises(ModelFileError, match="format_version 'one', not a number"):
        memforge.load_model(saved)


def test_weights_that_do_not_fit_the_spec_are_named(tmp_path: Path) -> None:
    saved = memforge.save_model(memforge.build_model(memforge.preset("titans.lmm_tiny")), tmp_path / "m")
    _rewrite(saved / WEIGHTS, drop="head.weight")
    with pytest.raises(ModelFileError, match=r"does not fit the model of its spec \(missing: head\.weight; "
                                             r"saved by memforge"):
        memforge.load_model(saved)


def test_a_checkpoint_for_another_spec_names_the_mis_shaped_tensors(run_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / WEIGHTS).write_bytes((run_dir / "checkpoints" / "step-00000004" / WEIGHTS).read_bytes())
    memforge.save_spec(memforge.preset("baseline.transformer_tiny", dim=48), checkpoint / SPEC)
    with pytest.raises(ModelFileError, match=r"mis-shaped: blocks\.0\.attention\.k_proj\.weight \(file "
                                             r"\[32, 32\], model \[48, 48\]\), .* and \d+ more; a "
                                             r"training checkpoint\)"):
        memforge.load_model(checkpoint)


def test_an_edited_spec_file_is_refused(tmp_path: Path) -> None:
    saved = memforge.save_model(memforge.build_model(memforge.preset("titans.lmm_tiny")), tmp_path / "m")
    memforge.save_spec(memforge.preset("titans.lmm_tiny", num_layers=3), saved / SPEC)
    with pytest.raises(ModelFileError, match="differs from the spec saved in model.safetensors"):
        memforge.load_model(saved)


def _damaged(directory: Path) -> Path:
    (directory / WEIGHTS).write_bytes(b"not safetensors")
    return directory


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: d, "holds no checkpoint"),
        (_damaged, "cannot be read"),
    ],
)
def test_bad_sources_get_one_line_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(MemforgeError, match=message) as info:
        memforge.load_model(make(tmp_path))
    assert "\n" not in str(info.value)


def test_bad_load_arguments(tmp_path: Path) -> None:
    saved = memforge.save_model(memforge.build_model(memforge.preset("titans.lmm_tiny")), tmp_path / "m")
    with pytest.raises(InputError, match="not a torch device"):
        memforge.load_model(saved, device="gpu0")
    with pytest.raises(InputError, match="floating-point torch.dtype"):
        memforge.load_model(saved, dtype=torch.int64)


def test_save_refuses_what_it_cannot_save_or_would_clobber(run_dir: Path, tmp_path: Path) -> None:
    model = memforge.build_model(memforge.preset("titans.lmm_tiny"))
    with pytest.raises(ModelFileError, match="needs a model made by memforge.build_model"):
        memforge.save_model(torch.nn.Linear(2, 2), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFileError, match="is a file"):
        memforge.save_model(model, tmp_path / "file")
    with pytest.raises(ModelFileError, match=r"holds other files \(state\.pt\)"):
        memforge.save_model(model, run_dir / "checkpoints" / "step-00000004")
    assert not list(tmp_path.glob("a*"))


def test_a_compiled_model_is_saved_as_the_model_inside(tmp_path: Path) -> None:
    model = memforge.build_model(memforge.preset("titans.lmm_tiny")).eval()
    saved = memforge.save_model(torch.compile(model, backend="eager"), tmp_path / "m")
    tokens = _tokens(model.vocab_size, (1, 7))
    assert torch.equal(memforge.load_model(saved)(tokens).logits, model(tokens).logits)
