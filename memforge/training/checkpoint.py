"""Checkpoints: weights in safetensors, everything else (optimiser, RNG, data position) in torch.

Layout inside a run directory::

    checkpoints/
        step-00000100/  model.safetensors  state.pt  spec.toml
        step-00000200/  ...
        latest          "step-00000200"

A checkpoint is written into a temporary directory next to its target, every file fsynced, then
renamed into place; ``latest`` is replaced atomically last. A crash at any point leaves either the
previous checkpoint or the new one behind, complete, and ``latest`` always names a complete one.
``latest`` holds a bare checkpoint name (never a path), so it cannot point outside its run.

Clean-up removes only what this module writes: directories named like its checkpoints and
temporary directories, the three files it puts in them, and ``latest``'s temporary files. Files
and folders of any other name, inside or beside the checkpoints, are never touched. Files and
directories follow the user's umask.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import safetensors
import safetensors.torch
import torch
from torch import nn

from memforge.errors import MemforgeError
from memforge.io import atomic_write_bytes, dumps_spec, read_spec_dict
from memforge.migrations import migrate_state_dict
from memforge.spec import ModelSpec
from memforge.training.config import TrainingError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
SPEC = "spec.toml"
_FILES = (WEIGHTS, STATE, SPEC)
_TMP_PREFIX = ".tmp-"
#: Names this module gives its directories and temporary files (nothing else is ever removed).
_CHECKPOINT_NAME = re.compile(r"step-(\d{8,})")
_TMP_NAME = re.compile(r"\.tmp-(?:step-\d{8,}|stale)-[0-9a-z_]+")
_LATEST_TMP_NAME = re.compile(r"\.latest\.[0-9a-z_]+\.tmp")
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


def _make_dir(root: Path, prefix: str) -> Path:
    """A new, uniquely named directory ``<prefix><random>`` in ``root`` (mode 0o777 less umask)."""
    while True:
        path = root / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue


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
    tmp = _make_dir(root, f"{_TMP_PREFIX}{name}-")
    try:
        # Cloning to the CPU also unties shared tensors, which safetensors refuses to write.
        weights = {key: value.detach().to("cpu", copy=True).contiguous()
                   for key, value in model.state_dict().items()}
        (tmp / SPEC).write_text(dumps_spec(spec), encoding="utf-8")
        safetensors.torch.save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
        torch.save({"format": FORMAT_VERSION, "step": step, **state}, tmp / STATE)
        # safetensors writes its file 0600; give it the mode the umask gave the plain spec file.
        os.chmod(tmp / WEIGHTS, stat.S_IMODE((tmp / SPEC).stat().st_mode))
        for file in _FILES:
            _fsync_file(tmp / file)
        _fsync_dir(tmp)
        target = root / name
        if target.exists():
            # Left by a run that got past this step before being resumed from an earlier one.
            stale = _make_dir(root, f"{_TMP_PREFIX}stale-")
            os.replace(target, stale / name)
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        _remove_ours(tmp)
        raise
    point_latest(run_dir, target)
    _prune(root, step, keep)
    return target


def point_latest(run_dir: str | os.PathLike[str], checkpoint: Path) -> None:
    """Make ``latest`` of ``run_dir`` name ``checkpoint`` (one of its checkpoints), atomically."""
    root = Path(run_dir) / CHECKPOINTS
    atomic_write_bytes(root / LATEST, checkpoint.name.encode())
    _fsync_dir(root)


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint directory this module named, else ``None``."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match is None or path.is_symlink() or not path.is_dir():
        return None
    step = int(match.group(1))
    return step if checkpoint_name(step) == path.name else None


def _remove_ours(path: Path) -> None:
    """Remove ``path`` if it holds only what this module writes; anything else stays."""
    if path.is_symlink() or not path.is_dir():
        return
    for child in path.iterdir():
        if child.name in _FILES and child.is_file() and not child.is_symlink():
            child.unlink(missing_ok=True)
        elif _step_of(child) is not None:
            _remove_ours(child)
    try:
        path.rmdir()
    except OSError:  # something of someone else's is inside: leave it
        pass


def _prune(root: Path, current: int, keep: int) -> None:
    """Remove temporary leftovers, checkpoints after ``current``, and all but ``keep`` newest."""
    for path in root.iterdir():
        if _TMP_NAME.fullmatch(path.name):
            _remove_ours(path)
        elif _LATEST_TMP_NAME.fullmatch(path.name) and path.is_file():  # a crash in atomic_write_bytes
            path.unlink(missing_ok=True)
    steps = sorted((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None)
    kept = [(s, p) for s, p in steps if s <= current][-keep:]
    for s, path in steps:
        if (s, path) not in kept:
            _remove_ours(path)


def is_leftover(path: Path) -> bool:
    """Whether ``path`` (in ``checkpoints/``) is a temporary this module left when interrupted."""
    return bool(_TMP_NAME.fullmatch(path.name) or _LATEST_TMP_NAME.fullmatch(path.name))


def _complete(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / STATE).is_file()


def checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoint directories of ``run_dir``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = sorted((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and _complete(p))
    return [path for _, path in found]


def available(run_dir: str | os.PathLike[str], *, besides: Path | None = None) -> str:
    """The names of ``run_dir``'s complete checkpoints (newest first, without ``besides``)."""
    names = [p.name for p in reversed(checkpoints(run_dir)) if besides is None or p.name != besides.name]
    return ", ".join(names) if names else "none"


class DamagedLatestError(CheckpointError):
    """``latest`` names nothing usable; :attr:`problem` says why, without a fix (callers add theirs).

    Attributes:
        problem: what is wrong, naming the file.
        run_dir: the run directory.
    """

    def __init__(self, problem: str, run_dir: Path) -> None:
        self.problem, self.run_dir = problem, run_dir
        super().__init__(f"{problem}; pass the directory of an earlier checkpoint instead "
                         f"(available: {available(run_dir)})")


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory ``latest`` names in ``run_dir``, or ``None`` if it has none.

    Without ``latest`` (a crash between renaming the run's first checkpoint into place and
    writing the pointer) the newest complete checkpoint is the latest. A pointer naming anything
    but a complete checkpoint of this run is a :class:`DamagedLatestError`.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        found = checkpoints(run_dir)
        return found[-1] if found else None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedLatestError(f"{pointer} cannot be read ({exc})", run_dir) from None
    if not _CHECKPOINT_NAME.fullmatch(name):
        raise DamagedLatestError(f"{pointer} holds {name[:40]!r}, not the name of a checkpoint in "
                                 f"{root}", run_dir)
    target = root / name
    if _step_of(target) is None or not _complete(target):
        raise DamagedLatestError(f"{pointer} names {name}, which is missing or incomplete", run_dir)
    return target


def named_checkpoint(run_dir: str | os.PathLike[str], choice: str | int | os.PathLike[str]) -> Path:
    """The checkpoint of ``run_dir`` that ``choice`` names: ``step-00000100``, ``100`` or its path.

    Only a complete checkpoint of this very run is accepted, so a resumed run never continues
    from another run's state.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    text = str(choice) if isinstance(choice, int) else os.fspath(choice)
    if text.isdigit():
        path = root / checkpoint_name(int(text))
    elif _CHECKPOINT_NAME.fullmatch(text):
        path = root / text
    else:
        path = Path(text)
    hint = f"available in {root}: {available(run_dir)}"
    if path.parent.resolve() != root.resolve() or _step_of(path) is None:
        raise CheckpointError(f"{text!r} is not a checkpoint of run {run_dir}; pass a checkpoint "
                              f"name such as step-00000100, its step number or its directory "
                              f"({hint})")
    if not _complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {WEIGHTS} or {STATE}); pick "
                              f"another ({hint})")
    return path


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


def _first_line(exc: BaseException) -> str:
    """The gist of an exception's message: its first line, up to the first full stop."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that cannot be loaded: damaged, foreign, or refused as unsafe.

    Attributes:
        problem: what is wrong, naming the file.
        verdict: what that means (``"the checkpoint is damaged"``), or ``""``.
    The message adds a fix; :meth:`with_fix` puts another in its place (a resumed run's).
    """

    def __init__(self, problem: str, verdict: str, fix: str) -> None:
        self.problem, self.verdict = problem, verdict
        super().__init__(self.with_fix(fix))

    def with_fix(self, fix: str) -> str:
        """The message with ``fix`` as the remedy."""
        return f"{self.problem}; {self.verdict}: {fix}" if self.verdict else f"{self.problem}; {fix}"


_DAMAGED = ("the checkpoint is damaged", "use an earlier one")


def _load_state(path: Path) -> Any:
    """``torch.load`` of a state file with tensors and plain data only (never arbitrary code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler names a refused class or function as "GLOBAL module.name";
        # any other refusal is a file that is not a pickle at all.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = detail.group(1).strip() if detail else _first_line(exc)
            raise UnreadableCheckpointError(f"{path} cannot be read ({reason})", *_DAMAGED) from None
        raise UnreadableCheckpointError(
            f"{path} was refused as unsafe: it holds a Python object ({found.group(1)}) that only "
            f"unrestricted unpickling could load, which can run arbitrary code; memforge loads "
            f"tensors and plain data only", "", "use a checkpoint memforge wrote") from None
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise UnreadableCheckpointError(f"{path} cannot be read ({_first_line(exc)})",
                                        *_DAMAGED) from None


def load_checkpoint(source: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint (see :func:`find_checkpoint` for what ``source`` may be).

    The weights come under today's names: those of a checkpoint whose spec is of an older schema
    are renamed (:func:`memforge.migrations.migrate_state_dict`).

    Raises:
        UnreadableCheckpointError: a file is damaged, from another version, or refused as unsafe
            (``state.pt`` is loaded with ``weights_only=True``: tensors and plain data only).
    """
    path = find_checkpoint(source)
    try:
        weights = safetensors.torch.load_file(path / WEIGHTS, device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise UnreadableCheckpointError(f"{path / WEIGHTS} cannot be read ({_first_line(exc)})",
                                        *_DAMAGED) from None
    weights = migrate_state_dict(weights, _stored_schema(path))
    state = _load_state(path / STATE)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UnreadableCheckpointError(f"{path / STATE} is not a memforge checkpoint of format "
                                        f"{FORMAT_VERSION}", "it was written by another version",
                                        "read it with that version")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UnreadableCheckpointError(f"{path / STATE} holds step={step!r}, not a whole number "
                                        f">= 0", *_DAMAGED)
    return Checkpoint(path, step, weights, state)


def _stored_schema(checkpoint: Path) -> Any:
    """The ``schema_version`` the checkpoint's spec file names (``None``: no readable spec file;
    whoever builds the model from it reports that)."""
    for path in (checkpoint / SPEC, run_dir_of(checkpoint) / SPEC):
        if path.is_file():
            try:
                return read_spec_dict(path).get("schema_version")
            except MemforgeError:
                return None
    return None


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


def resume_fix(checkpoint: Path) -> str:
    """How to go on when ``checkpoint`` of a run cannot be resumed: the others, or a new run."""
    others = available(run_dir_of(checkpoint), besides=checkpoint)
    return (f"resume from another checkpoint with --resume-from NAME (available: {others}), or "
            f"start a new run with --out DIR")


def _damaged(checkpoint: Checkpoint, problem: str) -> CheckpointError:
    """A one-line error for a checkpoint of a run whose state cannot be resumed, with the fix."""
    return CheckpointError(f"{checkpoint.path / STATE} {problem}; the checkpoint is damaged: "
                           f"{resume_fix(checkpoint.path)}")


def _check_optimizer_state(checkpoint: Checkpoint, model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    saved = checkpoint.state["optimizer"]
    if (not isinstance(saved, dict) or not isinstance(saved.get("state"), dict)
            or not isinstance(saved.get("param_groups"), list)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                       and all(isinstance(i, int) for i in g["params"])
                       for g in saved["param_groups"])):
        raise _damaged(checkpoint, "holds a malformed 'optimizer' entry")
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    expected = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != expected:
        raise _damaged(checkpoint, f"holds optimiser state for parameter groups of sizes {sizes}, "
                                   f"the model's are {expected}")
    names = {id(p): n for n, p in model.named_parameters()}
    params = {index: param
              for group, mine in zip(saved["param_groups"], optimizer.param_groups, strict=True)
              for index, param in zip(group["params"], mine["params"], strict=True)}
    for index, entry in saved["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise _damaged(checkpoint, f"holds optimiser state for an unknown parameter {index!r}")
        param = params[index]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                raise _damaged(checkpoint, f"holds the optimiser's {key!r} for "
                                           f"{names.get(id(param), index)} with shape "
                                           f"{list(value.shape)}, the parameter's is {list(param.shape)}")


def _check_rng(checkpoint: Checkpoint) -> None:
    states = checkpoint.state["rng"]
    torch_state = states.get("torch") if isinstance(states, dict) else None
    reference = torch.get_rng_state()
    if (not isinstance(torch_state, torch.Tensor) or torch_state.dtype != reference.dtype
            or torch_state.shape != reference.shape):
        raise _damaged(checkpoint, "holds no valid torch generator state under 'rng'")


def resume_training_state(checkpoint: Checkpoint, model: nn.Module,
                          optimizer: torch.optim.Optimizer) -> None:
    """Put the checkpoint's weights, optimiser state and RNG states back, each checked first.

    A damaged or foreign state (an entry missing, an optimiser tensor of the wrong shape, an
    invalid generator state) is a one-line :class:`CheckpointError` naming the file and the
    earlier checkpoints to resume from, raised before anything is changed.
    """
    for key in ("optimizer", "rng"):
        if key not in checkpoint.state:
            raise _damaged(checkpoint, f"has no {key!r} entry")
    _check_optimizer_state(checkpoint, model, optimizer)
    _check_rng(checkpoint)
    load_weights(model, checkpoint)
    try:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        restore_rng_states(checkpoint.state["rng"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise _damaged(checkpoint, f"cannot be restored ({_first_line(exc)})") from None
