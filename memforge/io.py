"""Reading and writing spec files (TOML or JSON, chosen by the file's suffix).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted
save never leaves half a file. Errors name the file and the key.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from memforge.errors import SpecError
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec, from_dict, to_dict

SUFFIXES = (".toml", ".json")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SpecError(f"{path}: unknown spec format {suffix or '(no suffix)'!r}; "
                        f"use a .toml or .json file")
    return suffix[1:]


def read_spec_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a spec file into its dict form; syntax errors name the file and position."""
    path = Path(path)
    fmt = _format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
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
    data = read_spec_dict(path)
    try:
        return from_dict(data, registry)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def dumps_spec(spec: ModelSpec, fmt: str = "toml") -> str:
    """The spec as TOML or JSON text."""
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_spec(spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` to a ``.toml`` or ``.json`` file (atomically) and return the path."""
    path = Path(path)
    atomic_write_bytes(path, dumps_spec(spec, _format(path)).encode("utf-8"))
    return path
