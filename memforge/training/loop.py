"""The training loop: :func:`train` turns a :class:`TrainConfig` into a trained run directory.

Batch ``step`` of process ``rank`` is ``task.batch(..., seed=batch_seed(seed, step, rank))``, a
pure function of its arguments, so resuming needs no data-loader state and a run stopped at any
checkpoint and resumed follows the very same trajectory (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import memforge
from memforge.builder import build_model, parameter_count
from memforge.compiling import compile_model
from memforge.errors import NonFiniteError
from memforge.spec import ModelSpec, spec_id
from memforge.tasks import IGNORE_INDEX, TaskBatch
from memforge.training import rundir
from memforge.training.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    UnreadableCheckpointError,
    checkpoint_name,
    load_checkpoint,
    point_latest,
    resume_fix,
    resume_training_state,
    rng_states,
    save_checkpoint,
)
from memforge.training.config import (
    TrainConfig,
    TrainingError,
    default_run_dir,
    resolve_spec,
    resolve_task,
)
from memforge.training.distributed import Distributed, setup
from memforge.training.metrics import autocast, score_batches, task_batches
from memforge.training.optim import lr_at, make_optimizer, set_lr
from memforge.training.plots import plot_loss
from memforge.training.progress import DEFAULT_EVERY, TrainProgress, announce
from memforge.training.runlock import RunLock
from memforge.training.stopping import StopSignals, TrainingInterrupted


@attrs.frozen(kw_only=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run directory.
        step: optimiser steps completed (all sessions of the run together).
        steps: steps the schedule runs to; ``step < steps`` after ``stop_after``.
        metrics: the latest validation metrics (``loss``, ``accuracy``, ``perplexity``, ...);
            empty if the run has not been evaluated yet.
        train_loss: the loss of the last step taken (``None`` if none was).
        tokens_per_s: training throughput of this session, all processes together.
        elapsed_s: wall time of this session.
        model: the trained model (unwrapped, on the training device).
    """

    run_dir: Path
    step: int
    steps: int
    metrics: dict[str, Any]
    train_loss: float | None
    tokens_per_s: float
    elapsed_s: float
    model: nn.Module = attrs.field(repr=False, eq=False)

    @property
    def finished(self) -> bool:
        """Whether the run has taken all its steps."""
        return self.step >= self.steps


def batch_seed(seed: int, step: int, rank: int) -> int:
    """The data seed of batch ``step`` (0-based) on process ``rank``: distinct for every triple."""
    digest = hashlib.sha256(f"memforge.train:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def train(config: TrainConfig, *, console: Console | None = None,
          progress_every: float = DEFAULT_EVERY) -> TrainResult:
    """Train (or, with ``config.resume``, continue) a run; see :class:`TrainConfig`.

    Under ``torchrun`` every process calls this; each trains on its own shard of every batch
    and rank 0 alone writes files and prints. Everything is validated before the run
    directory is touched, so a mistake leaves no files behind.

    * **One writer.** Rank 0 holds an exclusive lock on the run directory while it trains
      (:mod:`memforge.training.runlock`); a second process is refused with a
      :class:`TrainingError` naming the holder's pid and host.
    * **Signals.** The first SIGINT or SIGTERM during the steps finishes the step in progress,
      writes a checkpoint and raises :class:`~memforge.training.stopping.TrainingInterrupted`
      (a ``KeyboardInterrupt`` carrying the result and the exit status, 130 or 143); a second
      signal acts at once. The handlers are installed for the steps only, in the main thread,
      and the previous ones restored (:mod:`memforge.training.stopping`).
    * **Output** (rank 0), when ``config.progress`` is set or a ``console`` is given: the run
      directory and the plan at the start; with ``config.progress``, a progress bar on a
      terminal and otherwise a plain line after the first step and every ``progress_every``
      seconds, plus the validation results (:mod:`memforge.training.progress`).
    """
    place = setup(config.device)
    try:
        with contextlib.ExitStack() as stack:
            return _train(config, place, console, progress_every, stack)
    finally:
        place.close()


@attrs.frozen(kw_only=True)
class _Prepared:
    """A run validated and ready to start: nothing written yet (but the run's lock taken)."""

    spec: ModelSpec
    name: str
    task: Any
    task_info: dict[str, Any]
    validation: list[TaskBatch]
    settings: dict[str, Any]
    run_dir: Path
    resume_from: Path | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int


def _prepare(config: TrainConfig, place: Distributed, stack: contextlib.ExitStack) -> _Prepared:
    """Resolve and check everything the run needs, load its checkpoint, and lock its directory."""
    spec, name = resolve_spec(config.model, config.overrides)
    task = resolve_task(config.task, config.task_options, spec)
    if config.batch_size % place.world_size:
        raise TrainingError(f"batch_size={config.batch_size} must be divisible by the "
                            f"{place.world_size} processes; pick a multiple of {place.world_size}")
    task_info = task.describe()
    validation = task_batches(task, config.batch_size, config.eval_batches, split="validation")
    settings = config.settings(place.world_size)
    run_dir = Path(config.out) if config.out is not None else default_run_dir(name, spec, task.name)

    def check() -> Path | None:
        return rundir.check_run_dir(run_dir, spec, task_info, settings, resume=config.resume,
                                    resume_from=config.resume_from)

    resume_from = check()
    torch.manual_seed(config.seed)
    model = build_model(spec, place.device)
    optimizer = make_optimizer(model, config)
    step = 0
    if resume_from is not None:
        try:
            checkpoint = load_checkpoint(resume_from)
        except UnreadableCheckpointError as exc:
            raise CheckpointError(exc.with_fix(resume_fix(resume_from))) from None
        resume_training_state(checkpoint, model, optimizer)
        step = checkpoint.step
    if place.is_main:
        stack.enter_context(RunLock(run_dir))
        # Checked again under the lock: another process may have written the run meanwhile.
        if check() != resume_from:
            raise TrainingError(f"{run_dir} changed while this run was starting (another process "
                                f"wrote to it); start again")
    return _Prepared(spec=spec, name=name, task=task, task_info=dict(task_info),
                     validation=validation, settings=settings,
                     run_dir=run_dir, resume_from=resume_from, model=model, optimizer=optimizer,
                     step=step)


def _train(config: TrainConfig, place: Distributed, console: Console | None, progress_every: float,
           stack: contextlib.ExitStack) -> TrainResult:
    started = time.perf_counter()
    try:
        run = _prepare(config, place, stack)
    except Exception:
        # Tell the other processes, which would otherwise wait for this one forever.
        with contextlib.suppress(Exception):
            place.max_int(1)
        raise
    # Nobody writes before everyone has validated, so a refusal on any rank leaves no files.
    if place.max_int(0):
        raise TrainingError("another training process could not start (its error is printed "
                            "above); nothing was written")

    log = None
    if place.is_main:
        spec = run.spec
        run_info = {**run.settings, "model": run.name, "spec_id": spec_id(spec),
                    "task": run.task.name, "device": place.device.type, "compile": config.compile,
                    "eval_every": config.eval_every, "eval_batches": config.eval_batches,
                    "checkpoint_every": config.checkpoint_interval,
                    "memforge_version": memforge.__version__, "torch_version": torch.__version__}
        rundir.write_run_files(run.run_dir, spec, run.task_info, run_info)
        if config.resume_from is not None and run.resume_from is not None:
            point_latest(run.run_dir, run.resume_from)
        log = rundir.MetricsLog(run.run_dir / rundir.METRICS_FILE, keep_until=run.step)
        stack.callback(log.close)
        if config.progress or console is not None:
            console = console or Console()
            announce(console, run.run_dir, {
                "model": run.name, "parameters": parameter_count(run.model), "task": run.task.name,
                "seq_len": run.task.seq_len, "steps": config.steps, "batch_size": config.batch_size,
                "lr": config.lr, "device": place.device.type, "processes": place.world_size,
                "start": run.step, "checkpoint": run.resume_from})
    session = _Session(config=config, place=place, spec=run.spec, task=run.task,
                       run_dir=run.run_dir, model=run.model, optimizer=run.optimizer,
                       validation=run.validation, log=log, step=run.step,
                       checkpoint=run.resume_from)
    return session.run(console, started, progress_every)


@attrs.define(kw_only=True)
class _Session:
    """One process's part in training a run, from ``step`` on."""

    config: TrainConfig
    place: Distributed
    spec: ModelSpec
    task: Any
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    validation: list[TaskBatch]
    log: rundir.MetricsLog | None  # rank 0 only
    step: int
    checkpoint: Path | None  # the newest checkpoint of the run (on every rank)

    def run(self, console: Console | None, started: float, progress_every: float) -> TrainResult:
        """Train to the end (or ``stop_after``, or a signal): log, validate, plot and checkpoint
        on rank 0; on a signal, raise :class:`TrainingInterrupted` after the checkpoint."""
        config, place = self.config, self.place
        forward = place.wrap(self.model)
        if config.compile:
            forward = compile_model(forward)
        tokens_per_step = config.batch_size * self.task.seq_len
        end = min(config.steps, config.stop_after or config.steps)
        train_time, trained, loss, lr, plotted, signum = 0.0, 0, None, None, None, 0
        saved = self.step if self.checkpoint is not None else None
        with StopSignals(announce=place.is_main) as stop, TrainProgress(
                config.steps, self.step, enabled=config.progress and place.is_main, console=console,
                description=self.task.name, every=progress_every) as progress:
            while self.step < end:
                # Every process takes part, so all of them stop after the same step.
                signum = place.max_int(stop.requested or 0)
                if signum:
                    break
                tick = time.perf_counter()
                loss, lr, grad_norm = self._train_step(forward)
                train_time += time.perf_counter() - tick
                trained += 1
                progress.update(self.step, loss, trained * tokens_per_step / train_time)
                if self.step % config.checkpoint_interval == 0 or self.step == end:
                    self.checkpoint, saved = self._checkpoint_path(), self.step
                if self.log is None:
                    continue
                self.log.append({"step": self.step, "split": "train", "loss": loss, "lr": lr,
                                 "grad_norm": grad_norm, "tokens": self.step * tokens_per_step})
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    metrics = self._validate()
                    progress.log(f"step {self.step}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in metrics.items() if k != "tokens"))
                    self._plot()
                    plotted = self.step
                if saved == self.step:
                    self._save(lr)
            if signum and saved != self.step and lr is not None:
                self.checkpoint, saved = self._checkpoint_path(), self.step
                if self.log is not None:
                    self._save(lr)
            metrics: dict[str, Any] = {}
            if self.log is not None:
                if plotted != self.step:
                    self._plot()
                evaluated = [row for row in self.log.rows if row["split"] == "validation"]
                if evaluated:
                    metrics = {k: v for k, v in evaluated[-1].items() if k != "split"}
        result = TrainResult(
            run_dir=self.run_dir, step=self.step, steps=config.steps, metrics=metrics,
            train_loss=loss, tokens_per_s=trained * tokens_per_step / train_time if trained else 0.0,
            elapsed_s=time.perf_counter() - started, model=self.model,
        )
        if signum:
            raise TrainingInterrupted(signum, result, self.checkpoint)
        return result

    def _checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINTS / checkpoint_name(self.step)

    def _train_step(self, forward: nn.Module) -> tuple[float, float, float]:
        """One optimiser step on this process's shard; the loss is averaged over processes."""
        config, place = self.config, self.place
        lr = lr_at(self.step, config)
        set_lr(self.optimizer, lr)
        inputs, targets = self.task.batch(config.batch_size // place.world_size,
                                          seed=batch_seed(config.seed, self.step, place.rank))
        inputs, targets = inputs.to(place.device), targets.to(place.device)
        try:
            with autocast(place.device):
                logits = forward(inputs).logits
        except NonFiniteError:
            # Activations overflowed inside the model: the same outcome as a non-finite loss, and
            # a NaN loss keeps every process in step until all of them stop together.
            loss = torch.tensor(math.nan, device=place.device)
        else:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        mean_loss = place.mean(loss)
        self._check_finite("loss", mean_loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip))
        self._check_finite("gradient norm", grad_norm)
        self.optimizer.step()
        self.step += 1
        return mean_loss, lr, grad_norm

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            # Stop before the update: the weights (and the last checkpoint) are still finite.
            raise TrainingError(f"the {what} became {value} at step {self.step + 1}; start again "
                                f"with a lower --lr (now {self.config.lr}) or a more stable spec")

    def _validate(self) -> dict[str, Any]:
        try:
            metrics = score_batches(self.model, self.validation, vocab_size=self.spec.vocab_size,
                                    device=self.place.device, byte_level=self.task.name == "text")
        except NonFiniteError as exc:
            raise TrainingError(f"validation at step {self.step}: {exc}; start again with a lower "
                                f"--lr (now {self.config.lr}) or a more stable spec") from None
        self.log.append({"step": self.step, "split": "validation", **metrics})
        return metrics

    def _plot(self) -> None:
        plot_loss(self.log.rows, self.run_dir / rundir.LOSS_PLOT,
                  f"{self.run_dir.name}: {self.task.name}")

    def _save(self, lr: float) -> None:
        config = self.config
        save_checkpoint(self.run_dir, self.step, self.model, self.spec, {
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"kind": "warmup-cosine", "lr": lr, "steps": config.steps,
                         "warmup_steps": config.warmup_steps},
            "rng": rng_states(),
            "data": {"seed": config.seed, "next_step": self.step,
                     "world_size": self.place.world_size},
        }, keep=config.keep_checkpoints)
