"""Reading and writing spec files (TOML or JSON, chosen by the file's suffix).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted
save never leaves half a file. Errors name the file and the key.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from memforge.errors import SpecError
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec, from_dict, to_dict

SUFFIXES = (".toml", ".json")


def _path(path: Any, function: str) -> Path:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise SpecError(f"{function} needs a file path (str or pathlib.Path), got "
                        f"{type(path).__name__} {path!r}")
    return Path(path)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SpecError(f"{path}: unknown spec format {suffix or '(no suffix)'!r}; "
                        f"use a .toml or .json file")
    return suffix[1:]


def read_spec_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a spec file into its dict form; syntax errors name the file and position."""
    path = _path(path, "read_spec_dict")
    fmt = _format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a spec file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x}); "
                        f"spec files are UTF-8 TOML or JSON, save it as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not valid {fmt.upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec file must hold a table/object at the top level")
    return data


def load_spec(path: str | os.PathLike[str], registry: ComponentRegistry | None = None) -> ModelSpec:
    """Load and validate a spec from a ``.toml`` or ``.json`` file."""
    path = _path(path, "load_spec")
    data = read_spec_dict(path)
    try:
        return from_dict(data, registry)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def dumps_spec(spec: ModelSpec, fmt: str = "toml") -> str:
    """The spec as TOML or JSON text."""
    _check_spec(spec, "dumps_spec")
    data = to_dict(spec)
    if fmt == "toml":
        return tomli_w.dumps(data)
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    raise SpecError(f"unknown spec format {fmt!r}; use 'toml' or 'json'")


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new ``.<name>.<random>.tmp`` next to ``path``, opened for writing.

    Created with mode 0o666 so the user's umask applies, as for any ordinary file
    (``tempfile.mkstemp`` would make it 0o600 and the renamed file private).
    """
    while True:
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], object]) -> None:
    """Have ``writer`` write a temporary file next to ``path``, then move it onto ``path``.

    Readers see the old file or the new one, never half of one. ``writer`` gets the temporary
    file's name and may replace the file (as ``safetensors.torch.save_file`` does, making it
    0o600): the result gets the mode the umask gives an ordinary new file all the same. The data
    is fsync-ed before the rename; on any failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _check_spec(spec: Any, function: str) -> None:
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{function} needs a ModelSpec, got {type(spec).__name__}; get one from "
                        f"memforge.preset(NAME) or memforge.load_spec(PATH)")


def save_spec(spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` to a ``.toml`` or ``.json`` file (atomically) and return the path.

    The folder must exist. Every failure (a wrong argument, a missing or read-only folder, a
    full disk) is a :class:`SpecError` naming the path, and no partial file is left behind.
    """
    _check_spec(spec, "save_spec")
    path = _path(path, "save_spec")
    text = dumps_spec(spec, _format(path))
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise SpecError(f"cannot save the spec to {path}: the folder {folder} {what}; create it "
                        f"first or choose another path")
    if path.is_dir():
        raise SpecError(f"cannot save the spec to {path}: it is a directory; name a .toml or "
                        f".json file")
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot save the spec to {path}: {exc.strerror or exc}; choose a writable "
                        f"location") from None
    return path
