"""Bad input on resume: every damaged run directory or checkpoint is one line, before any write.

Each case copies a finished run (checkpoints at steps 4 and 6, ``latest`` naming step 6), damages
it, and runs ``memforge train ... --resume`` on it: exit status 2, one line on stderr naming the
file at fault and the fix, no traceback, and not one byte of the run directory changed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import memforge
from memforge.cli import main
from memforge.training import TrainConfig, train

TINY = "baseline.transformer_tiny"
ARGS = ["train", "--preset", TINY, "--task-option", "seq_len=32", "--task-option", "num_pairs=4",
        "--steps", "6", "--batch-size", "4", "--warmup", "1", "--eval-every", "2",
        "--eval-batches", "1", "--device", "cpu"]
LATEST = "checkpoints/step-00000006"
EARLIER = "--resume-from NAME (available: step-00000004)"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    try:
        train(TrainConfig(model=TINY, task="mqar", task_options={"seq_len": 32, "num_pairs": 4},
                          steps=6, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
                          device="cpu", out=out))
    finally:
        torch.set_num_threads(threads)
    return out


_MARKER: list[Path] = []


def _leave_a_mark() -> None:
    """What an unsafe pickle would run if it were loaded: touches the marker file."""
    _MARKER[0].write_text("unpickled")


class _Unsafe:
    def __reduce__(self) -> tuple:
        return (_leave_a_mark, ())


def state_edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """Rewrite the latest checkpoint's state with ``change`` applied to it in place."""

    def damage(run: Path) -> None:
        path = run / LATEST / "state.pt"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return damage


def write(relative: str, data: str | bytes) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / relative
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return damage


def truncate(relative: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def delete(relative: str) -> Callable[[Path], None]:
    return lambda run: (run / relative).unlink()


def _unsafe_state(run: Path) -> None:
    state = torch.load(run / LATEST / "state.pt", weights_only=True)
    torch.save({**state, "extra": _Unsafe()}, run / LATEST / "state.pt")


def _wider_weights(run: Path) -> None:
    model = memforge.build_model(memforge.preset(TINY, dim=48))
    safetensors.torch.save_file(dict(model.state_dict()), run / LATEST / "model.safetensors")


def _set_exp_avg(state: dict[str, Any], value: torch.Tensor) -> None:
    state["optimizer"]["state"][0]["exp_avg"] = value


def _nothing(run: Path) -> None:
    pass


#: (id, damage, extra CLI flags, fragments the one-line message must hold)
CASES: list[tuple[str, Callable[[Path], None], list[str], list[str]]] = [
    ("state without rng", state_edit(lambda s: s.pop("rng")), [],
     [f"{LATEST}/state.pt has no 'rng' entry", EARLIER, "--out DIR"]),
    ("state without optimizer", state_edit(lambda s: s.pop("optimizer")), [],
     [f"{LATEST}/state.pt has no 'optimizer' entry", EARLIER]),
    ("step is text", state_edit(lambda s: s.update(step="six")), [],
     [f"{LATEST}/state.pt holds step='six', not a whole number", EARLIER]),
    ("step is a float", state_edit(lambda s: s.update(step=6.5)), [],
     ["holds step=6.5, not a whole number", EARLIER]),
    ("step is negative", state_edit(lambda s: s.update(step=-1)), [], ["holds step=-1"]),
    ("step is a bool", state_edit(lambda s: s.update(step=True)), [], ["holds step=True"]),
    ("step is missing", state_edit(lambda s: s.pop("step")), [], ["holds step=None"]),
    ("optimiser tensor of the wrong shape",
     state_edit(lambda s: _set_exp_avg(s, torch.zeros(3))), [],
     [f"{LATEST}/state.pt holds the optimiser's 'exp_avg' for embedding.weight with shape [3], "
      f"the parameter's is [64, 32]", EARLIER]),
    ("optimiser state of another model",
     state_edit(lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"][:1])),
     [], ["holds optimiser state for parameter groups of sizes", EARLIER]),
    ("optimiser state for an unknown parameter",
     state_edit(lambda s: s["optimizer"]["state"].update({999: {}})), [],
     ["holds optimiser state for an unknown parameter 999"]),
    ("optimiser state is a string", state_edit(lambda s: s.update(optimizer="adam")), [],
     ["holds a malformed 'optimizer' entry", EARLIER]),
    ("rng state of the wrong kind", state_edit(lambda s: s["rng"].update(torch=torch.zeros(5))), [],
     ["holds no valid torch generator state under 'rng'", EARLIER]),
    ("rng state is a list", state_edit(lambda s: s.update(rng=[1, 2])), [],
     ["holds no valid torch generator state"]),
    ("state of another format", state_edit(lambda s: s.update(format=99)), [],
     ["is not a memforge checkpoint of format 1"]),
    ("state is a list", lambda run: torch.save([1, 2], run / LATEST / "state.pt"), [],
     ["is not a memforge checkpoint"]),
    ("unsafe pickle", _unsafe_state, [],
     [f"{LATEST}/state.pt was refused as unsafe", "_leave_a_mark", "can run arbitrary code",
      "memforge loads tensors and plain data only", EARLIER]),
    ("state is garbage", write(f"{LATEST}/state.pt", b"damaged"), [],
     [f"{LATEST}/state.pt cannot be read (Unsupported operand", "damaged", EARLIER]),
    ("state cut short", truncate(f"{LATEST}/state.pt"), [],
     [f"{LATEST}/state.pt cannot be read", EARLIER]),
    ("weights cut short", truncate(f"{LATEST}/model.safetensors"), [],
     [f"{LATEST}/model.safetensors cannot be read", EARLIER]),
    ("weights of another spec", _wider_weights, [],
     ["does not fit the model (mis-shaped: blocks.0.attention.k_proj.weight"]),
    ("latest checkpoint without weights", delete(f"{LATEST}/model.safetensors"), [],
     ["checkpoints/latest names step-00000006, which is missing or incomplete",
      "--resume --resume-from NAME (available: step-00000004)"]),
    ("latest points outside the run", write("checkpoints/latest", "../../../etc"), [],
     ["holds '../../../etc', not the name of a checkpoint in",
      "available: step-00000006, step-00000004"]),
    ("latest is an absolute path", write("checkpoints/latest", "/etc/passwd"), [],
     ["holds '/etc/passwd', not the name of a checkpoint"]),
    ("latest names a missing checkpoint", write("checkpoints/latest", "step-00000099"), [],
     ["names step-00000099, which is missing or incomplete"]),
    ("latest is empty", write("checkpoints/latest", ""), [], ["holds '', not the name"]),
    ("latest is not text", write("checkpoints/latest", b"\xff\xfe"), [],
     ["checkpoints/latest cannot be read"]),
    ("task.json is a list", write("task.json", "[1, 2]"), [],
     ["task.json holds a JSON list, not an object", "restore the file"]),
    ("task.json is a string", write("task.json", '"mqar"'), [], ["task.json holds a JSON str"]),
    ("task.json is not JSON", write("task.json", "{"), [],
     ["task.json cannot be read", "the run directory is damaged"]),
    ("run.json is a number", write("run.json", "5"), [], ["run.json holds a JSON int, not an object"]),
    ("spec.toml is not TOML", write("spec.toml", "dim = ["), [], ["spec.toml: not valid TOML"]),
    ("resume from a checkpoint it does not have", _nothing, ["--resume-from", "step-00000099"],
     ["'step-00000099' is not a checkpoint of run", "available in", "step-00000006, step-00000004"]),
    ("resume from a step it does not have", _nothing, ["--resume-from", "5"],
     ["'5' is not a checkpoint of run"]),
    ("resume from outside the run", _nothing, ["--resume-from", "/tmp"],
     ["'/tmp' is not a checkpoint of run"]),
    ("resume with a changed setting", _nothing, ["--lr", "0.01"],
     ["cannot resume", "run setting 'lr' differs (run: 0.003, now: 0.01)"]),
    ("resume with a changed spec", _nothing, ["--set", "dim=48"],
     ["cannot resume", "spec setting 'dim' differs (run: 32, now: 48)"]),
    ("progress interval of zero", _nothing, ["--progress-every", "0"],
     ["--progress-every must be a number of seconds > 0, got 0.0"]),
    ("progress interval not a number", _nothing, ["--progress-every", "nan"],
     ["--progress-every must be a number of seconds > 0, got nan"]),
]


@pytest.mark.parametrize(("damage", "flags", "fragments"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_damaged_resume_is_one_line_and_writes_nothing(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: Callable[[Path], None], flags: list[str], fragments: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    before = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    _MARKER[:] = [tmp_path / "unpickled"]
    capsys.readouterr()

    assert main([*ARGS, *flags, "--resume", "--out", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("memforge: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and out == ""
    after = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
    assert not _MARKER[0].exists()


@pytest.mark.parametrize(("setup", "flags", "fragment"), [
    (lambda run: None, ["--resume"], "nothing to resume"),
    (lambda run: run.mkdir(), ["--resume"], "nothing to resume"),
    (lambda run: (run.mkdir(), (run / "notes.txt").write_text("mine")), ["--resume"],
     "is not empty and holds no memforge run (notes.txt)"),
    (lambda run: run.write_text("a file"), ["--resume"], "is a file; pass another --out"),
    (lambda run: None, ["--resume-from", "step-00000004"], "pass --resume too"),
    (lambda run: None, ["--resume", "--resume-from", "4"], "nothing to resume"),
])
def test_resume_without_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          setup: Callable[[Path], Any], flags: list[str],
                                          fragment: str) -> None:
    run = tmp_path / "run"
    setup(run)
    existed = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([*ARGS, *flags, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memforge: error: ") and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == existed


@pytest.mark.parametrize(("text", "fragment"), [
    ("[]", "task.json holds a JSON list, not an object"),
    ('{"task": 5}', "task.json holds task=5, not a task name"),
    ('{"task": "mqar", "seq_len": [32]}', "seq_len"),
], ids=["list", "task-is-a-number", "option-is-a-list"])
def test_eval_of_a_damaged_task_file_is_one_line(finished: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 text: str, fragment: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "task.json").write_text(text)
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()

    assert main(["eval", str(run), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("memforge: error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err and out == "", err
    assert sorted(p.name for p in run.rglob("*")) == before
