"""Training and evaluation jobs: run artefacts, exact resume, atomic checkpoints, errors, eval, CLI.

Every run is a tiny model (``baseline.transformer_tiny``) on a short task for a handful of steps
on the CPU, so the whole file stays well under a minute and a half on two cores.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import attrs
import pytest
import torch
from rich.console import Console

import memforge
from memforge.cli import main
from memforge.io import load_spec
from memforge.tasks import make_task
from memforge.training import (
    CheckpointError,
    TrainConfig,
    TrainingError,
    batch_seed,
    load_checkpoint,
    load_weights,
    train,
)
from memforge.training import checkpoint as checkpoint_module
from memforge.training import loop as loop_module
from memforge.training.evaluate import (
    EvalConfig,
    evaluate,
    parse_depths,
    parse_lengths,
    report_table,
    write_report,
)
from memforge.training.metrics import score_batches
from memforge.training.optim import lr_at, make_optimizer
from memforge.training.rundir import read_metrics

# The package's ``evaluate`` is the function; the module it lives in is needed for monkeypatching.
evaluate_module = importlib.import_module("memforge.training.evaluate")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "baseline.transformer_tiny"
MQAR_SMALL = {"seq_len": 32, "num_pairs": 4}


def tiny_config(out: Path, **changes) -> TrainConfig:
    """A run that takes a second or two: tiny model, short MQAR, small batches."""
    settings = dict(model=TINY, task="mqar", task_options=MQAR_SMALL, steps=6, batch_size=4,
                    warmup_steps=1, eval_every=3, eval_batches=1, device="cpu", out=out)
    settings.update(changes)
    return TrainConfig(**settings)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["split"] == "train"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    """One finished 6-step run, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    return train(tiny_config(run_dir)), run_dir


def test_short_run_writes_every_artefact(finished_run) -> None:
    result, run_dir = finished_run
    assert result.run_dir == run_dir and result.step == 6 and result.finished
    assert load_spec(run_dir / "spec.toml") == memforge.preset(TINY)
    task = json.loads((run_dir / "task.json").read_text())
    assert task["task"] == "mqar" and task["seq_len"] == 32 and task["vocab_size"] == 64
    run = json.loads((run_dir / "run.json").read_text())
    assert run["steps"] == 6 and run["seed"] == 0 and run["lr"] == 3e-3 and run["world_size"] == 1

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    validation = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [3, 6]
    assert {"loss", "accuracy", "perplexity", "exact_match"} <= set(validation[-1])
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.step == 6 and checkpoint.path.name == "step-00000006"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000006"
    model = memforge.build_model(memforge.preset(TINY))
    load_weights(model, checkpoint)
    for name, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert {"optimizer", "rng", "data", "schedule"} <= set(checkpoint.state)
    assert checkpoint.state["data"]["next_step"] == 6


def test_stop_and_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(steps=8, eval_every=4, checkpoint_every=2)
    whole = train(tiny_config(tmp_path / "whole", **settings))

    # A crash during step 6: the log holds step 5, the newest checkpoint is step 4.
    def crash_at_step_6(step: int, config: TrainConfig) -> float:
        if step == 5:
            raise KeyboardInterrupt
        return lr_at(step, config)

    monkeypatch.setattr(loop_module, "lr_at", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "split", **settings))
    monkeypatch.undo()
    assert train_losses(tmp_path / "split")[-1][0] == 5
    assert load_checkpoint(tmp_path / "split").step == 4

    resumed = train(tiny_config(tmp_path / "split", resume=True, **settings))
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert read_metrics(tmp_path / "split" / "metrics.jsonl") == read_metrics(
        tmp_path / "whole" / "metrics.jsonl")
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_stop_after_then_resume_with_more_steps(tmp_path: Path) -> None:
    stopped = train(tiny_config(tmp_path / "run", steps=6, stop_after=2))
    assert stopped.step == 2 and not stopped.finished
    assert load_checkpoint(tmp_path / "run").step == 2
    # Only --steps may change on resume.
    extended = train(tiny_config(tmp_path / "run", steps=7, resume=True))
    assert extended.step == 7 and [s for s, _ in train_losses(tmp_path / "run")] == list(range(1, 8))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 7


@pytest.mark.parametrize("failure", ["serialise", "rename"])
def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    failure: str) -> None:
    result = train(tiny_config(tmp_path / "run", steps=2, eval_every=2))
    root = tmp_path / "run" / "checkpoints"
    # A hard crash earlier left a half-written temporary directory behind.
    (root / ".tmp-step-00000009-x").mkdir()
    (root / ".tmp-step-00000009-x" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.x.tmp").write_bytes(b"step-000")
    assert load_checkpoint(tmp_path / "run").step == 2

    if failure == "serialise":
        def broken_save(*args, **kwargs):
            raise OSError("disk full")
        monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    else:
        real_replace = os.replace

        def broken_replace(source, target):
            if Path(target).name.startswith("step-"):
                raise OSError("power cut")
            real_replace(source, target)
        monkeypatch.setattr(checkpoint_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        checkpoint_module.save_checkpoint(tmp_path / "run", 3, result.model, memforge.preset(TINY),
                                          {"optimizer": {}, "rng": {}})
    monkeypatch.undo()

    assert load_checkpoint(tmp_path / "run").step == 2
    assert (root / "latest").read_text() == "step-00000002"
    assert not (root / "step-00000003").exists()
    leftovers = {p.name for p in root.iterdir() if p.name.startswith(".")}
    assert leftovers == {".tmp-step-00000009-x", ".latest.x.tmp"}  # the hard crash's; ours went

    # The next successful write clears the leftovers of crashed writes.
    checkpoint_module.save_checkpoint(tmp_path / "run", 3, result.model, memforge.preset(TINY),
                                      {"optimizer": {}, "rng": {}})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]


@pytest.mark.parametrize(("changes", "named"), [
    ({"lr": 1e-3}, "'lr'"),
    ({"task_options": {"seq_len": 32, "num_pairs": 5}}, "'num_pairs'"),
    ({"overrides": ("dim=48",)}, "'dim'"),
    ({"seed": 1}, "'seed'"),
])
def test_resume_with_changed_setting_names_it(finished_run, snapshot, changes: dict,
                                              named: str) -> None:
    _, run_dir = finished_run
    before = snapshot(run_dir)
    with pytest.raises(TrainingError, match="cannot resume") as error:
        train(tiny_config(run_dir, resume=True, **changes))
    assert named in str(error.value)
    assert snapshot(run_dir) == before


def test_existing_run_needs_resume_and_resume_needs_a_run(finished_run, tmp_path: Path) -> None:
    _, run_dir = finished_run
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(run_dir))
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(tmp_path / "absent", resume=True))
    assert not (tmp_path / "absent").exists()


def test_incompatible_checkpoint_names_the_tensors(finished_run) -> None:
    _, run_dir = finished_run
    checkpoint = load_checkpoint(run_dir)
    wider = memforge.build_model(memforge.preset(TINY, dim=48))
    with pytest.raises(CheckpointError, match=r"mis-shaped: blocks\.0\.attention\.k_proj\.weight "
                                              r"\(checkpoint \[32, 32\], model \[48, 48\]\)"):
        load_weights(wider, checkpoint)
    deeper = memforge.build_model(memforge.preset(TINY, num_layers=3))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.2\."):
        load_weights(deeper, checkpoint)
    shallower = memforge.build_model(memforge.preset(TINY, num_layers=1))
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.1\."):
        load_weights(shallower, checkpoint)


def test_eval_of_a_checkpoint_with_a_changed_spec_names_the_tensors(finished_run, tmp_path: Path) -> None:
    _, run_dir = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    checkpoint = load_checkpoint(copy).path
    memforge.save_spec(memforge.preset(TINY, dim=48), checkpoint / "spec.toml")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attention\.k_proj\.weight"):
        evaluate(EvalConfig(source=copy, device="cpu", batches=1, batch_size=2))


def test_loss_falls_on_tiny_mqar(tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path / "run", steps=40, batch_size=16, lr=1e-2, warmup_steps=4,
                               eval_every=40, task_options={"seq_len": 24, "num_pairs": 3}))
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, (first, last)
    assert result.train_loss == losses[-1]


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_non_finite_loss_or_gradient_stops_before_the_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    nan = torch.tensor(float("nan"))
    if what == "loss":
        real = torch.nn.functional.cross_entropy
        monkeypatch.setattr(loop_module.F, "cross_entropy", lambda *a, **k: real(*a, **k) * nan)
    else:
        monkeypatch.setattr(loop_module.torch.nn.utils, "clip_grad_norm_", lambda *a, **k: nan)
    with pytest.raises(TrainingError, match=f"the {what} became nan at step 1; start again with a "
                                            f"lower --lr"):
        train(tiny_config(tmp_path / "run"))
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overflow_inside_the_model_stops_training_like_a_nan_loss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def overflowing_forward(self, tokens, state=None):
        raise memforge.NonFiniteError("memory layer got non-finite hidden states")

    monkeypatch.setattr(memforge.model.MemforgeModel, "forward", overflowing_forward)
    with pytest.raises(TrainingError, match="the loss became nan at step 1; start again"):
        train(tiny_config(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_score_batches_names_non_finite_logits() -> None:
    model = memforge.build_model(memforge.preset(TINY))
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    batch = make_task("mqar", vocab_size=64, **MQAR_SMALL).batch(2, seed=0)
    with pytest.raises(memforge.NonFiniteError, match=r"logits became non-finite within tokens 0\.\.31"):
        score_batches(model, [batch], vocab_size=64, device=torch.device("cpu"))


def test_eval_reports_a_diverged_length_and_keeps_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    niah = {"seq_len": 48, "value_len": 2}
    train(tiny_config(tmp_path / "run", task="s-niah", task_options=niah, steps=2, eval_every=2))
    real = evaluate_module.score_batches

    def diverging_past_64(model, batches, **kwargs):
        batches = list(batches)
        if batches[0].inputs.shape[1] > 64:
            raise memforge.NonFiniteError("the model's logits became non-finite within tokens 64..95")
        return real(model, batches, **kwargs)

    monkeypatch.setattr(evaluate_module, "score_batches", diverging_past_64)
    report = evaluate(EvalConfig(source=tmp_path / "run", lengths=(48, 96), depths=(0.0, 1.0),
                                 batches=1, batch_size=2, device="cpu"))
    assert [("diverged" in cell) for cell in report.cells] == [False, False, True, True]
    assert report.value(48, 0.0) is not None and report.value(96, 0.0) is None
    write_report(report)  # the heatmap leaves the diverged cells blank
    console = Console(record=True, width=120)
    console.print(report_table(report))
    rows = [line.split() for line in console.export_text().splitlines()]
    assert any(row[:2] == ["│", "0"] and "diverged" in row for row in rows)
    assert any(row[:2] == ["│", "mean"] and "-" in row for row in rows)


def test_schedule_and_weight_decay_groups() -> None:
    config = TrainConfig(model=TINY, steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55) and lr_at(99, config) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(1, attrs.evolve(config, steps=5)) == pytest.approx(1.0)  # warmup capped at 1
    optimizer = make_optimizer(memforge.build_model(memforge.preset(TINY)), config)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def test_batches_are_a_pure_function_of_seed_step_and_rank() -> None:
    seeds = {batch_seed(s, step, rank) for s in range(3) for step in range(50) for rank in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert batch_seed(1, 2, 3) == batch_seed(1, 2, 3)


def test_eval_s_niah_table_heatmap_and_json(tmp_path: Path) -> None:
    niah = {"seq_len": 48, "value_len": 2}
    train(tiny_config(tmp_path / "run", task="s-niah", task_options=niah, steps=2, eval_every=2))
    report = evaluate(EvalConfig(source=tmp_path / "run", lengths=(48, 96), depths=(0.0, 1.0),
                                 batches=1, batch_size=2, piece_size=32, device="cpu"))
    assert report.task == "s-niah" and report.lengths == (48, 96) and report.train_length == 48
    assert len(report.cells) == 4 and report.step == 2
    assert all(0.0 <= cell["accuracy"] <= 1.0 and cell["tokens"] == 4 for cell in report.cells)

    json_path, png_path = write_report(report)
    assert json_path == tmp_path / "run" / "eval-s-niah.json"
    saved = json.loads(json_path.read_text())
    assert saved["lengths"] == [48, 96] and saved["depths"] == [0.0, 1.0] and len(saved["cells"]) == 4
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    console = Console(record=True, width=120)
    console.print(report_table(report))
    text = " ".join(console.export_text().split())
    assert "96*" in text and "depth" in text and "beyond training length 48" in text


def test_text_corpus_reports_bits_per_byte(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text(f"{name}: the quick brown fox jumps over the lazy dog. " * 20)
    text = {"paths": [str(corpus)], "seq_len": 32, "validation_fraction": 0.4}
    result = train(tiny_config(tmp_path / "run", task="text", task_options=text, steps=2,
                               eval_every=2, overrides=("vocab_size=256",)))
    assert result.metrics["bits_per_byte"] == pytest.approx(result.metrics["loss"] / math.log(2))
    report = evaluate(EvalConfig(source=tmp_path / "run", lengths=(32, 64), batches=2, device="cpu"))
    assert report.metric == "bits_per_byte" and report.value(64) > 0
    assert json.loads((tmp_path / "run" / "task.json").read_text())["fingerprint"]


def test_piecewise_eval_matches_one_call(finished_run) -> None:
    """Reading in pieces with the carried state scores exactly like reading at once."""
    result, _ = finished_run
    task = make_task("mqar", vocab_size=64, seq_len=64, num_pairs=4)
    batches = [task.batch(3, seed=1, split="test")]
    whole = score_batches(result.model, batches, vocab_size=64, device=torch.device("cpu"))
    pieces = score_batches(result.model, batches, vocab_size=64, device=torch.device("cpu"),
                           piece_size=7)
    assert pieces["accuracy"] == whole["accuracy"] and pieces["tokens"] == whole["tokens"]
    assert pieces["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_eval_lengths_and_depths_parse() -> None:
    assert parse_lengths("512, 1k,2k,1.5k") == (512, 1024, 2048, 1536)
    assert parse_depths("0,0.5,1") == (0.0, 0.5, 1.0)
    with pytest.raises(TrainingError, match="'1q'"):
        parse_lengths("1k,1q")


def test_eval_other_tasks_by_length(finished_run) -> None:
    _, run_dir = finished_run
    report = evaluate(EvalConfig(source=run_dir, lengths=(32, 64), batches=1, batch_size=2,
                                 device="cpu"))
    assert report.task == "mqar" and report.depths is None and report.metric == "accuracy"
    assert [cell["length"] for cell in report.cells] == [32, 64]
    with pytest.raises(TrainingError, match="no needle depth"):
        evaluate(EvalConfig(source=run_dir, depths=(0.5,), device="cpu"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "mqr"}, "did you mean 'mqar'"),
    ({"task_options": {"num_pair": 4}}, "did you mean 'num_pairs'"),
    ({"task_options": {"seq_len": 32, "num_pairs": 4, "vocab_size": 128}},
     "token ids up to 127, out of range for the model's vocab_size=64"),
    ({"task": "text", "task_options": {"paths": ["/nonexistent/corpus"]}, "overrides": ("vocab_size=256",)},
     "path '/nonexistent/corpus' does not exist"),
    ({"task": "text", "task_options": {}}, "--set vocab_size=256"),
    ({"model": "baseline.transformr_tiny"}, "did you mean 'baseline.transformer_tiny'"),
    ({"batch_size": 0}, "batch_size (--batch-size) must be in [1, 65536], got 0"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_files(tmp_path: Path, changes: dict,
                                                       message: str) -> None:
    with pytest.raises(memforge.MemforgeError, match=re.escape(message)):
        train(tiny_config(tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()


def test_empty_corpus_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no text files"):
        train(tiny_config(tmp_path / "run", task="text", task_options={"paths": [str(tmp_path / "empty")]},
                          overrides=("vocab_size=256",)))
    assert not (tmp_path / "run").exists()


def test_cli_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--preset", TINY, "--steps", "3", "--batch-size", "4", "--eval-every", "3",
                 "--eval-batches", "1", "--task-option", "seq_len=32", "--task-option", "num_pairs=4",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed and "tokens/s" in printed and str(out) in printed
    assert load_checkpoint(out).step == 3

    code = main(["eval", str(out), "--lengths", "32,64", "--batches", "1", "--batch-size", "2",
                 "--device", "cpu"])
    assert code == 0
    assert (out / "eval-mqar.png").exists() and (out / "eval-mqar.json").exists()


def test_cli_bad_task_exits_2_with_did_you_mean(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--preset", TINY, "--task", "mqr", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memforge: error:") and "did you mean 'mqar'" in err
    assert err.count("\n") == 1
    assert not out.exists()
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
