"""A trained model one call away: :func:`save_model` and :func:`load_model` (no pickle anywhere).

A saved model is a directory of two files::

    model.safetensors   the weights; its metadata holds the format, the memforge version and the
                        spec (TOML), so the file alone rebuilds the model
    spec.toml           the same spec, to read (load_model refuses a copy that no longer matches)

:func:`load_model` also reads the checkpoints of ``memforge train`` (a run directory means its
latest checkpoint; see :mod:`memforge.training.checkpoint`), whose weights sit beside their own
``spec.toml``. Only ``model.safetensors`` and the spec are read, never the training state.

Compatibility: :data:`FORMAT_VERSION` changes only when what a saved model holds changes. A newer
memforge reads every older format; an older one refuses a newer format in one line that names
both versions, as does a file whose weights no longer fit the layers of this memforge. The spec
of an older schema is migrated, and weights named after its kinds are renamed with them
(:func:`memforge.migrations.migrate_state_dict`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from memforge.errors import InputError, MemforgeError
from memforge.io import atomic_write, atomic_write_bytes, dumps_spec
from memforge.migrations import migrate_state_dict
from memforge.model import MemforgeModel
from memforge.spec import ModelSpec, from_dict

#: The ``format`` entry of a saved model's safetensors metadata.
FORMAT = "memforge.model"
#: The layout of a saved model; see the module docstring for what a change means.
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPEC = "spec.toml"


class ModelFileError(MemforgeError, ValueError):
    """A saved model or checkpoint that cannot be written, read, or rebuilt into its model."""


def _memforge_version() -> str:
    import memforge

    return memforge.__version__


def _unwrap(model: Any) -> Any:
    """The model inside ``torch.compile``'s and ``DistributedDataParallel``'s wrappers."""
    while True:
        if isinstance(model, nn.Module) and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _check_target(directory: Path) -> None:
    """Refuse a directory that holds anything but an earlier :func:`save_model`'s files."""
    if directory.exists() and not directory.is_dir():
        raise ModelFileError(f"{directory} is a file; save_model writes a directory, pass a new "
                             f"or empty directory")
    if not directory.is_dir():
        return
    others = sorted(p.name for p in directory.iterdir() if p.name not in (WEIGHTS, SPEC))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ModelFileError(f"{directory} holds other files ({shown}); save into a new or empty "
                             f"directory, or one that save_model wrote")
    weights = directory / WEIGHTS
    if weights.exists() and _metadata(weights).get("format") != FORMAT:
        raise ModelFileError(f"{weights} was not written by save_model (a training checkpoint?); "
                             f"save into a new or empty directory")


def save_model(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save ``model`` (built by :func:`memforge.build_model`, or loaded) into ``directory``.

    Writes ``model.safetensors`` (weights in their dtype, moved to the CPU; the spec and versions
    in its metadata), then ``spec.toml``, each atomically and with the mode the umask gives a new
    file, creating ``directory`` if needed. The weights, which carry the spec, come first: a save
    interrupted between the two leaves an older ``spec.toml`` that :func:`load_model` refuses as
    not matching, and saving again mends it. A ``torch.compile``-d or ``DistributedDataParallel``
    model is saved as the model inside.
    ``directory`` must be new, empty, or an earlier save (which is replaced). Returns it.
    """
    inner = _unwrap(model)
    if not isinstance(inner, MemforgeModel) or not isinstance(inner.spec, ModelSpec):
        raise ModelFileError(f"save_model needs a model made by memforge.build_model or "
                             f"memforge.load_model (it knows its spec), got "
                             f"{type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise ModelFileError(f"save_model needs the path of a directory to save into, got "
                             f"{type(directory).__name__}")
    directory = Path(directory)
    _check_target(directory)
    spec_text = dumps_spec(inner.spec)
    # Copies on the CPU: safetensors wants contiguous, untied tensors.
    tensors = {key: value.detach().to("cpu", copy=True).contiguous()
               for key, value in inner.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "memforge_version": _memforge_version(), "spec": spec_text}
    try:
        atomic_write(directory / WEIGHTS,
                     lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
        atomic_write_bytes(directory / SPEC, spec_text.encode("utf-8"))
    except OSError as exc:
        raise ModelFileError(f"cannot write the model into {directory}: "
                             f"{exc.strerror or exc}") from None
    return directory


def _metadata(weights: Path) -> dict[str, str]:
    try:
        with safetensors.safe_open(weights, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, safetensors.SafetensorError) as exc:
        raise ModelFileError(f"{weights} cannot be read ({exc}); the file is damaged or not "
                             f"safetensors") from None


def _check_format(weights: Path, metadata: Mapping[str, str]) -> None:
    """Refuse a saved model in a format this memforge cannot read, saying why."""
    version = metadata.get("format_version", "")
    saved_by = metadata.get("memforge_version", "an unknown version")
    if not version.isdigit():
        raise ModelFileError(f"{weights} has format_version {version!r}, not a number; the file "
                             f"is damaged, save the model again")
    if int(version) > FORMAT_VERSION:
        raise ModelFileError(f"{weights} was saved by memforge {saved_by} in model format "
                             f"{version}; this memforge ({_memforge_version()}) reads formats up "
                             f"to {FORMAT_VERSION}: upgrade memforge to load it")


def _parse_spec(text: str, where: str) -> tuple[ModelSpec, Any]:
    try:
        data = tomllib.loads(text)
        return from_dict(data), data.get("schema_version")
    except tomllib.TOMLDecodeError as exc:
        raise ModelFileError(f"{where}: the saved spec is not valid TOML ({exc}); the file is "
                             f"damaged") from None
    except MemforgeError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _spec_of(checkpoint: Path, metadata: Mapping[str, str]) -> tuple[ModelSpec, Any]:
    """The spec of a saved model (its metadata) or of a training checkpoint (its spec.toml), and
    the ``schema_version`` it was stored in (its weights' names follow that schema)."""
    from memforge.io import load_spec, read_spec_dict
    from memforge.training.checkpoint import run_dir_of

    if "spec" in metadata:
        spec, version = _parse_spec(metadata["spec"], f"{checkpoint / WEIGHTS} (metadata)")
        if (checkpoint / SPEC).is_file() and load_spec(checkpoint / SPEC) != spec:
            raise ModelFileError(f"{checkpoint / SPEC} differs from the spec saved in {WEIGHTS}; "
                                 f"it was edited after save_model: restore it, or build the "
                                 f"edited spec and load the weights yourself")
        return spec, version
    for path in (checkpoint / SPEC, run_dir_of(checkpoint) / SPEC):
        if path.is_file():
            return load_spec(path), read_spec_dict(path).get("schema_version")
    raise ModelFileError(f"no {SPEC} next to {checkpoint / WEIGHTS} or in its run directory; the "
                         f"model cannot be rebuilt without its spec")


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: Path,
                   metadata: Mapping[str, str]) -> None:
    """Raise naming every tensor that the spec's model and the file disagree on."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(f"{key} (file {list(weights[key].shape)}, model {list(value.shape)})"
                       for key, value in expected.items()
                       if key in weights and weights[key].shape != value.shape)
    problems = [f"{label}: {_names(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if names]
    if problems:
        saved_by = metadata.get("memforge_version")
        origin = (f"saved by memforge {saved_by}, loaded by {_memforge_version()}" if saved_by
                  else "a training checkpoint")
        raise ModelFileError(f"{path} does not fit the model of its spec ({'; '.join(problems)}; "
                             f"{origin}); was the spec or a plugin's layers changed since?")


def _device(device: str | torch.device | None) -> torch.device:
    try:
        resolved = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for CUDA, which this machine does not have; "
                         f"use device='cpu'")
    return resolved


def load_model(
    source: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> MemforgeModel:
    """The model in ``source``, in eval mode, on ``device`` (default the CPU).

    ``source`` is a directory :func:`save_model` wrote, a checkpoint directory of a run, a run
    directory (its latest checkpoint), or the ``model.safetensors`` in one of them. ``dtype``
    defaults to the dtype the weights were saved in (float32 for training checkpoints). The model
    knows its spec (``model.spec``), so ``save_model(load_model(run), DIR)`` exports a run.
    """
    from memforge.builder import build_model
    from memforge.training.checkpoint import find_checkpoint

    if not isinstance(source, (str, os.PathLike)):
        raise ModelFileError(f"load_model needs a path to a run, checkpoint or saved model, got "
                             f"{type(source).__name__}")
    torch_device = _device(device)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"dtype must be a floating-point torch.dtype such as torch.float32, got "
                         f"{dtype!r}")
    checkpoint = find_checkpoint(source)
    path = checkpoint / WEIGHTS
    metadata = _metadata(path)
    if "format" in metadata:
        _check_format(path, metadata)
    spec, version = _spec_of(checkpoint, metadata)
    try:
        weights = safetensors.torch.load_file(path, device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise ModelFileError(f"{path} cannot be read ({exc}); the file is damaged") from None
    weights = migrate_state_dict(weights, version)
    if dtype is None:
        floating = {t.dtype for t in weights.values() if t.is_floating_point()}
        dtype = floating.pop() if len(floating) == 1 else None
    model = build_model(spec, torch_device, dtype)
    _check_weights(model, weights, path, metadata)
    model.load_state_dict(weights)
    return model.eval()
