"""Checkpoints: weights in safetensors, everything else (optimiser, RNG, data position) in torch.

Layout inside a run directory::

    checkpoints/
        step-00000100/  model.safetensors  state.pt  spec.toml
        step-00000200/  ...
        latest          "step-00000200"

A checkpoint is written into a temporary directory next to its target, every file fsynced, then
renamed into place; ``latest`` is replaced atomically last. A crash at any point leaves either the
previous checkpoint or the new one behind, complete, and ``latest`` always names a complete one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import safetensors
import safetensors.torch
import torch
from torch import nn

from memforge.io import atomic_write_bytes, dumps_spec
from memforge.spec import ModelSpec
from memforge.training.config import TrainingError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
SPEC = "spec.toml"
_TMP_PREFIX = ".tmp-"
#: Bumped when the contents of ``state.pt`` change incompatibly.
FORMAT_VERSION = 1


class CheckpointError(TrainingError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


@attrs.frozen
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: its directory.
        step: optimiser steps completed when it was written.
        weights: the model's tensors by state-dict name (on the CPU).
        state: optimiser state, RNG states, data position (see :func:`save_checkpoint`).
    """

    path: Path
    step: int
    weights: dict[str, torch.Tensor] = attrs.field(repr=False)
    state: dict[str, Any] = attrs.field(repr=False)


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``."""
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory holding the entry is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device when there are any)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Put back the RNG states :func:`rng_states` took."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    spec: ModelSpec,
    state: Mapping[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` atomically and point ``latest`` at it.

    ``state`` holds the rest of the training state (optimiser, schedule, RNG, data position);
    ``step`` and the format version are added. Keeps the ``keep`` newest checkpoints; removes
    leftovers of interrupted writes, and checkpoints past ``step`` that a resumed run abandoned.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TMP_PREFIX}{name}-"))
    try:
        # Cloning to the CPU also unties shared tensors, which safetensors refuses to write.
        weights = {key: value.detach().to("cpu", copy=True).contiguous()
                   for key, value in model.state_dict().items()}
        safetensors.torch.save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
        torch.save({"format": FORMAT_VERSION, "step": step, **state}, tmp / STATE)
        (tmp / SPEC).write_text(dumps_spec(spec), encoding="utf-8")
        for file in (WEIGHTS, STATE, SPEC):
            _fsync_file(tmp / file)
        _fsync_dir(tmp)
        target = root / name
        if target.exists():
            # Left by a run that got past this step before being resumed from an earlier one.
            stale = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TMP_PREFIX}stale-"))
            os.replace(target, stale / name)
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST, name.encode())
    _fsync_dir(root)
    _prune(root, step, keep)
    return target


def _step_of(path: Path) -> int | None:
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() and path.is_dir() else None


def _prune(root: Path, current: int, keep: int) -> None:
    """Remove temporary leftovers, checkpoints after ``current``, and all but ``keep`` newest."""
    for path in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f".{LATEST}.*.tmp"):  # a crash inside atomic_write_bytes
        path.unlink(missing_ok=True)
    steps = sorted((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None)
    kept = [(s, p) for s, p in steps if s <= current][-keep:]
    for s, path in steps:
        if (s, path) not in kept:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory ``latest`` names in ``run_dir``, or ``None`` if it has none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text(encoding="utf-8").strip()
    if not (target / WEIGHTS).is_file() or not (target / STATE).is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete; "
                              f"point it at a complete checkpoint in {root} or start a new run")
    return target


def find_checkpoint(source: str | os.PathLike[str]) -> Path:
    """The checkpoint directory of a run directory, a checkpoint directory or its weights file."""
    path = Path(source)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / WEIGHTS).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or a checkpoint "
                              f"directory (one holding {WEIGHTS})")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {CHECKPOINTS}/{LATEST} and no "
                              f"{WEIGHTS}); train it first, or pass a checkpoint directory")
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint directory belongs to (itself if it stands alone)."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint


def load_checkpoint(source: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint (see :func:`find_checkpoint` for what ``source`` may be)."""
    path = find_checkpoint(source)
    try:
        weights = safetensors.torch.load_file(path / WEIGHTS, device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read ({exc}); the checkpoint is "
                              f"damaged, use an earlier one") from None
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise CheckpointError(f"{path / STATE} cannot be read ({exc}); the checkpoint is "
                              f"damaged, use an earlier one") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path / STATE} is not a memforge checkpoint of format "
                              f"{FORMAT_VERSION}; it was written by another version")
    return Checkpoint(path, int(state["step"]), weights, state)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's weights into ``model``; a mismatch names the tensors at fault."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(checkpoint.weights))
    unexpected = sorted(set(checkpoint.weights) - set(expected))
    misshaped = sorted(
        f"{key} (checkpoint {list(checkpoint.weights[key].shape)}, model {list(value.shape)})"
        for key, value in expected.items()
        if key in checkpoint.weights and checkpoint.weights[key].shape != value.shape
    )
    problems = [f"{label}: {_names(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit the model ({'; '.join(problems)}); it was "
            f"written for another spec: evaluate it with its own spec.toml, or start a new run")
    model.load_state_dict(checkpoint.weights)
