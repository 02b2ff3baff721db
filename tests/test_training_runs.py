"""Running training like production: signals, one writer per run, restarts, output, permissions.

The CLI tests run ``memforge train`` in a subprocess whose steps are slowed by a sleep (a test
harness around the real CLI, see ``_CHILD``), send it SIGTERM or SIGINT once it has logged a
step, and continue the run with the command it prints; the rest runs in-process on a tiny model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import memforge
from memforge import io as memforge_io
from memforge.cli import main
from memforge.training import (
    CheckpointError,
    TrainConfig,
    TrainingError,
    TrainingInterrupted,
    load_checkpoint,
    train,
)
from memforge.training import loop as loop_module
from memforge.training.checkpoint import save_checkpoint
from memforge.training.progress import TrainProgress
from memforge.training.rundir import read_metrics
from memforge.training.runlock import RunLock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "baseline.transformer_tiny"
STEPS = 24
#: ``memforge train`` flags of the runs here, and the same run as a config.
ARGS = ["train", "--preset", TINY, "--task-option", "seq_len=32", "--task-option", "num_pairs=4",
        "--steps", str(STEPS), "--batch-size", "4", "--warmup", "1", "--eval-every", "8",
        "--eval-batches", "1", "--device", "cpu", "--progress-every", "0.2"]


def config(out: Path, **changes) -> TrainConfig:
    settings = dict(model=TINY, task="mqar", task_options={"seq_len": 32, "num_pairs": 4},
                    steps=STEPS, batch_size=4, warmup_steps=1, eval_every=8, eval_batches=1,
                    device="cpu", out=out)
    settings.update(changes)
    return TrainConfig(**settings)


#: The child process: the real CLI, each step slowed by a sleep so a signal lands mid-run.
_CHILD = """
import sys, time
import memforge.training.loop as loop
from memforge.cli import main
delay, real = float(sys.argv[1]), loop.batch_seed
def slowed(seed, step, rank):
    time.sleep(delay)
    return real(seed, step, rank)
loop.batch_seed = slowed
raise SystemExit(main(sys.argv[2:]))
"""


def start_child(out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(delay), *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(child: subprocess.Popen, out: Path, step: int = 1, timeout: float = 60) -> None:
    """Poll the metrics log until the child has logged ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_metrics(out / "metrics.jsonl")
        if any(r["split"] == "train" and r["step"] >= step for r in rows):
            return
        assert child.poll() is None, child.communicate()
        time.sleep(0.02)
    child.kill()
    raise AssertionError(f"no step {step} logged within {timeout} s")


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must end up identical to."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(config(out))
    return out


def handlers() -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def assert_same_run(run: Path, reference: Path) -> None:
    assert read_metrics(run / "metrics.jsonl") == read_metrics(reference / "metrics.jsonl")
    mine, theirs = load_checkpoint(run), load_checkpoint(reference)
    assert mine.step == theirs.step == STEPS
    for name, value in theirs.weights.items():
        assert torch.equal(mine.weights[name], value), name


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory):
    """Three ``memforge train`` children started together (their start-up, seconds, overlaps).

    Each step sleeps 1 s first, so a child is still training when its test signals it; the
    tests run in file order: SIGTERM, SIGINT, then a second SIGTERM.
    """
    started = {}
    for name in ("sigterm", "sigint", "twice"):
        out = tmp_path_factory.mktemp(name) / "run"
        started[name] = (start_child(out, delay=1.0), out)
    yield started
    for child, _ in started.values():
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_checkpoints_and_the_printed_command_resumes_identically(
        children, whole: Path, signum: int, capsys: pytest.CaptureFixture[str]) -> None:
    child, out = children["sigterm" if signum == signal.SIGTERM else "sigint"]
    wait_for_step(child, out)
    if signum == signal.SIGTERM:
        # A second writer is refused while the child trains, by the CLI in one line naming it.
        assert main([*ARGS, "--resume", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {child.pid} on host {socket.gethostname()}" in err
        assert "is in use by another process" in err
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signum, stderr

    lines = stdout.splitlines()
    assert lines[0] == f"run directory: {out}"
    assert lines[1].startswith(f"plan: {TINY} (") and f"{STEPS} steps of 4 sequences" in lines[1]
    assert re.fullmatch(r"step 1/24 \(4%\) \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| elapsed "
                        r"\d+:\d\d:\d\d \| left \d+:\d\d:\d\d", lines[2]), lines[2]
    stopped = [line for line in lines if line.startswith("stopped by")]
    step = max(r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train")
    assert 1 <= step < STEPS
    assert stopped == [f"stopped by {signal.Signals(signum).name} after step {step}/{STEPS}; "
                       f"checkpoint {out}/checkpoints/step-{step:08d}"]
    assert f"memforge: {signal.Signals(signum).name} received" in stderr
    assert load_checkpoint(out).step == step

    (command,) = [line.removeprefix("resume with: ") for line in lines if line.startswith("resume with:")]
    words = shlex.split(command)
    assert words[:2] == ["memforge", "train"] and words[-3:] == ["--resume", "--out", str(out)]
    before = handlers()
    assert main(words[1:]) == 0
    assert handlers() == before
    assert_same_run(out, whole)


def test_second_signal_stops_at_once_and_leaves_no_stale_lock(children, whole: Path) -> None:
    child, out = children["twice"]
    # Right after a step is logged that neither validates nor checkpoints, the child sleeps 1 s
    # at the start of the next step: both signals land in that sleep.
    wait_for_step(child, out)
    step = 1 + max(r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train")
    step += step % 8 == 0
    wait_for_step(child, out, step)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = child.communicate(timeout=30)
    assert time.monotonic() - sent < 0.7  # before the step's 1 s sleep would have ended
    assert child.returncode == -signal.SIGTERM  # SIGTERM's default action ended it
    assert "SIGTERM received" in stderr
    # No checkpoint at the stop: only those of the schedule (every 8 steps), if any yet.
    assert step == max(r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train")
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert checkpoints == [f"step-{s:08d}" for s in range(8, step + 1, 8)][-2:]
    # The killed process held the lock; the OS released it, and the run continues.
    train(config(out, resume=True))
    assert_same_run(out, whole)


def _signal_at(monkeypatch: pytest.MonkeyPatch, signum: int, step: int) -> None:
    """Send ``signum`` to this process while batch ``step`` (0-based) is being made."""
    real = loop_module.batch_seed

    def signalling(seed: int, at: int, rank: int) -> int:
        if at == step:
            os.kill(os.getpid(), signum)
        return real(seed, at, rank)

    monkeypatch.setattr(loop_module, "batch_seed", signalling)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_library_train_stops_on_a_signal_and_restores_the_handlers(
        tmp_path: Path, whole: Path, monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    before = handlers()
    _signal_at(monkeypatch, signum, 4)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(tmp_path / "run"))
    monkeypatch.undo()
    assert handlers() == before
    error = stopped.value
    assert isinstance(error, KeyboardInterrupt)
    assert error.signal == signum and error.exit_status == 128 + signum
    assert error.result.step == 5 and not error.result.finished
    assert error.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000005"
    assert load_checkpoint(tmp_path / "run").step == 5
    assert "resume=True" in str(error)
    train(config(tmp_path / "run", resume=True))
    assert handlers() == before
    assert_same_run(tmp_path / "run", whole)


def test_handlers_are_restored_when_training_fails(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = handlers()

    def failing(seed: int, step: int, rank: int) -> int:
        assert handlers() != before  # installed while the steps run
        raise RuntimeError("boom")

    monkeypatch.setattr(loop_module, "batch_seed", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(config(tmp_path / "run"))
    assert handlers() == before


def _ddp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    real = loop_module.batch_seed

    def signalling(seed: int, at: int, r: int) -> int:
        if r == 1 and at == 2:  # only rank 1 is signalled, while making batch 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(seed, at, r)

    loop_module.batch_seed = signalling
    try:
        train(config(Path(root, "run"), batch_size=8, eval_every=100))
    except TrainingInterrupted as stopped:
        outcome = {"step": stopped.result.step, "signal": stopped.signal,
                   "checkpoint": str(stopped.checkpoint)}
    else:
        outcome = {"step": None}
    Path(root, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_torchrun_processes_stop_after_the_same_step(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Spawned, not forked: a child forked from a process whose OpenMP pool has run (any earlier
    # test's torch work) can deadlock in its first parallel region.
    ranks = mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not ranks.join(timeout=5):
            assert time.monotonic() < deadline, "the two ranks did not finish in 5 minutes"
    finally:  # a hung rank must not outlive the test (the interpreter would wait for it at exit)
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes[0] == outcomes[1] == {
        "step": 3, "signal": signal.SIGTERM,
        "checkpoint": str(tmp_path / "run" / "checkpoints" / "step-00000003")}
    assert load_checkpoint(tmp_path / "run").step == 3


def test_run_stopped_before_its_first_checkpoint_starts_again(
        tmp_path: Path, whole: Path, monkeypatch: pytest.MonkeyPatch, snapshot) -> None:
    def crash(seed: int, step: int, rank: int) -> int:
        if step == 3:
            raise KeyboardInterrupt  # a crash: no checkpoint (the first is at step 8)
        return real(seed, step, rank)

    real = loop_module.batch_seed
    for resume in (False, True):
        out = tmp_path / f"resume-{resume}"
        monkeypatch.setattr(loop_module, "batch_seed", crash)
        with pytest.raises(KeyboardInterrupt):
            train(config(out))
        monkeypatch.undo()
        assert not (out / "checkpoints").exists() and len(read_metrics(out / "metrics.jsonl")) == 3

        before = snapshot(out)
        with pytest.raises(TrainingError, match=r"cannot restart .* changed settings: run setting "
                                                r"'lr' differs \(run: 0\.003, now: 0\.001\)"):
            train(config(out, resume=resume, lr=1e-3))
        assert snapshot(out) == before
        train(config(out, resume=resume))
        assert_same_run(out, whole)


def test_foreign_files_are_never_taken_for_a_run(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(TrainingError, match=r"holds no memforge run \(notes.txt\)"):
            train(config(out, resume=resume))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_lock_refuses_a_second_writer_and_is_free_after_release(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run") as lock:
        assert lock.held
        info = json.loads((tmp_path / "run" / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(TrainingError, match=rf"in use by another process \(pid {os.getpid()} "):
            RunLock(tmp_path / "run").acquire()
        with pytest.raises(TrainingError, match=rf"pid {os.getpid()}"):
            train(config(tmp_path / "run"))
    with RunLock(tmp_path / "run"):
        pass


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        train(config(tmp_path / "run", steps=2, eval_every=2))
    finally:
        os.umask(previous)
    paths = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert {"run/.lock", "run/spec.toml", "run/checkpoints/latest",
            "run/checkpoints/step-00000002/model.safetensors"} <= set(modes)
    for path in paths:
        expected = 0o750 if path.is_dir() else 0o640
        assert modes[str(path.relative_to(tmp_path))] == expected, path


def test_resume_from_a_named_checkpoint_when_latest_is_damaged(
        tmp_path: Path, whole: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train(config(out, stop_after=20, checkpoint_every=4, keep_checkpoints=3))
    (out / "checkpoints" / "step-00000020" / "state.pt").write_bytes(b"damaged")
    assert main([*ARGS, "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-00000020/state.pt cannot be read" in err
    assert "damaged: resume from another checkpoint with --resume-from NAME (available: " \
           "step-00000016, step-00000012)" in err

    (out / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointError, match=r"holds '\.\./\.\./elsewhere', not the name of a "
                                              r"checkpoint .* --resume-from NAME \(available: "
                                              r"step-00000020, step-00000016, step-00000012\)"):
        train(config(out, resume=True))
    with pytest.raises(CheckpointError, match=r"'\.\./whole' is not a checkpoint of run"):
        train(config(out, resume=True, resume_from="../whole"))
    with pytest.raises(TrainingError, match="pass --resume too"):
        config(out, resume_from="step-00000016")

    assert main([*ARGS, "--resume", "--resume-from", "16", "--out", str(out)]) == 0
    assert (out / "checkpoints" / "latest").read_text() == f"step-{STEPS:08d}"
    assert_same_run(out, whole)


def test_without_a_latest_pointer_the_newest_complete_checkpoint_is_the_latest(
        tmp_path: Path, whole: Path) -> None:
    # A crash between renaming a checkpoint into place and writing the pointer.
    out = tmp_path / "run"
    train(config(out, stop_after=16))
    (out / "checkpoints" / "latest").unlink()
    (out / "checkpoints" / "step-00000008" / "state.pt").unlink()  # and an incomplete one
    assert load_checkpoint(out).step == 16
    train(config(out, resume=True))
    assert_same_run(out, whole)


def test_clean_up_touches_only_what_checkpoints_write(tmp_path: Path) -> None:
    run = train(config(tmp_path / "run", steps=2, eval_every=1, keep_checkpoints=1))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    (root / "step-00000002" / "README").write_text("notes about this checkpoint")
    foreign = ["notes.txt", "step-2", "step-00000001-copy", ".tmp-mine", "latest.bak"]
    for name in foreign:
        (root / name).write_text(name)
    (root / "step-00000000").mkdir()  # a user's directory named like a checkpoint
    (root / "step-00000000" / "notes.txt").write_text("theirs")
    spec = memforge.preset(TINY)
    for step in (3, 4):
        save_checkpoint(tmp_path / "run", step, run.model, spec, {}, keep=1)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([*foreign, "latest", "step-00000000", "step-00000002", "step-00000004"])
    # Old checkpoints lost only their own files; the user's files stayed.
    assert [p.name for p in (root / "step-00000002").iterdir()] == ["README"]
    assert [p.name for p in (root / "step-00000000").iterdir()] == ["notes.txt"]


def test_plain_progress_lines_off_a_terminal_and_a_bar_on_one() -> None:
    buffer = StringIO()
    console = Console(file=buffer, force_terminal=False)
    with TrainProgress(10, 2, enabled=True, console=console, every=3600) as progress:
        for step in range(3, 11):
            progress.update(step, 1.5, 1000.0)
        progress.log("step 10: loss 1.5")
    lines = buffer.getvalue().splitlines()
    # The first step, then none for an hour, but always the last.
    assert [line.split(" (")[0] for line in lines] == ["step 3/10", "step 10/10", "step 10: loss 1.5"]
    assert lines[0].startswith("step 3/10 (30%) | loss 1.5000 | 1,000 tokens/s | elapsed 0:00:00")

    terminal = StringIO()
    with TrainProgress(10, 2, enabled=True, console=Console(file=terminal, force_terminal=True),
                       every=0) as progress:
        progress.update(3, 1.5, 1000.0)
    assert "step 3/10" not in terminal.getvalue() and "3/10" in terminal.getvalue()

    silent = StringIO()
    with TrainProgress(10, 2, enabled=False, console=Console(file=silent)) as progress:
        progress.update(3, 1.5, 1000.0)
        progress.log("nothing")
    assert silent.getvalue() == ""


# --- atomic writes -------------------------------------------------------------------------


@given(old=st.binary(max_size=64), new=st.binary(max_size=64),
       failing=st.sampled_from(["fsync", "replace", "write"]))
def test_atomic_write_keeps_the_old_file_when_it_fails_before_the_rename(
        tmp_path_factory: pytest.TempPathFactory, old: bytes, new: bytes, failing: str) -> None:
    folder = tmp_path_factory.mktemp("atomic")
    target = folder / "file.bin"
    memforge_io.atomic_write_bytes(target, old)
    if failing == "write":
        patch = mock.patch.object(memforge_io.Path, "write_bytes",
                                  side_effect=OSError(28, "No space left on device"))
    else:
        patch = mock.patch.object(memforge_io.os, failing, side_effect=OSError("power cut"))
    with patch, pytest.raises(OSError):
        memforge_io.atomic_write_bytes(target, new)
    assert target.read_bytes() == old
    assert [p.name for p in folder.iterdir()] == ["file.bin"]  # no temporary file left
    memforge_io.atomic_write_bytes(target, new)
    assert target.read_bytes() == new and [p.name for p in folder.iterdir()] == ["file.bin"]


def _write_forever(path: str, contents: list[bytes]) -> None:
    for index in range(10**9):
        memforge_io.atomic_write_bytes(path, contents[index % len(contents)])


def test_atomic_write_killed_at_random_moments_leaves_old_or_new_whole(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    # Large and distinct, so a kill often lands mid-write; each is recognisable whole.
    contents = [bytes([i]) * (1 << 20) for i in range(1, 4)]
    memforge_io.atomic_write_bytes(target, contents[0])
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for _ in range(12):
        writer = context.Process(target=_write_forever, args=(str(target), contents))
        writer.start()
        time.sleep(rng.uniform(0.01, 0.15))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert target.read_bytes() in contents
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "file.bin"]
        assert all(re.fullmatch(r"\.file\.bin\.[0-9a-f]{8}\.tmp", name) for name in leftovers)
