"""Byte-level language modelling on real text files, split into train and validation by file.

``TextCorpus(paths=())`` reads the running Python's standard library: every ``*.py`` under
``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``/``dist-packages`` (whatever happens
to be installed is not part of a reproducible corpus), test directories (``test``, ``tests``,
``idle_test``: large, repetitive, and they would dominate) and ``__pycache__``. That is about 12 MB
in ~730 files on CPython 3.11, and it differs between Python versions, which the fingerprint shows.

Files are identified by their path relative to the common parent of the given roots, so the split
and the fingerprint survive moving the corpus. A file goes to validation when a hash of that
relative path falls below ``validation_fraction`` (stable as files are added or removed); if that
leaves a split empty, the file with the smallest (or largest) hash is moved over. Each split is the
concatenation of its files in path order, each followed by one NUL byte that marks the file end
(text files never contain NUL). The corpus is read once, lazily, and cached on the instance.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

from memforge.tasks.base import (
    TaskBatch,
    check_batch_size,
    float_range,
    int_range,
    require,
    split_generator,
)

#: Directory names skipped in the default standard-library corpus.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
#: Like git, a file whose first 8000 bytes contain a NUL byte is binary.
_SNIFF_BYTES = 8000
_SEPARATOR = b"\0"
_TEXT_SPLITS = ("train", "validation")


def _to_paths(value: Any) -> tuple[str, ...]:
    """Accept one path or any iterable of paths; store a tuple of strings."""
    if isinstance(value, str | os.PathLike):
        return (os.fspath(value),)
    return tuple(os.fspath(p) for p in value)


def _is_binary(data: bytes) -> bool:
    return _SEPARATOR in data[:_SNIFF_BYTES]


def _walk(root: Path, skip: frozenset[str]) -> list[Path]:
    """All files under ``root`` (recursive), skipping hidden entries and ``skip`` directories."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        found.extend(Path(folder, f) for f in files if not f.startswith("."))
    return found


def _read(path: Path, limit: int = -1) -> bytes:
    """The bytes of ``path`` (at most ``limit``); an unreadable file is a one-line ValueError."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError as exc:
        raise ValueError(f"text: cannot read {str(path)!r}: {exc.strerror or exc}; make it "
                         f"readable or leave it out of the paths") from None


def _glob_root(pattern: str) -> Path:
    """The longest directory prefix of ``pattern`` without wildcards."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def _check_split(split: str) -> None:
    require(
        split in _TEXT_SPLITS,
        f"text: split={split!r} is not available; TextCorpus splits files into {list(_TEXT_SPLITS)} only",
    )


def _hash_fraction(relative: str) -> float:
    """A stable number in [0, 1) for a relative path."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@attrs.frozen(kw_only=True)
class _Loaded:
    """The read corpus: per-split byte tensors and the bookkeeping that ``describe`` reports."""

    splits: dict[str, torch.Tensor]
    files: dict[str, tuple[str, ...]]
    fingerprint: str
    num_bytes: int


@attrs.frozen(kw_only=True)
class TextCorpus:
    """Byte-level LM on text files (vocab 256), split by file; see the module docstring.

    Attributes:
        paths: files, folders (searched recursively) or glob patterns; empty means the Python
            standard library. Members of folders and globs that look binary are skipped; a
            binary file named directly is an error.
        seq_len: bytes per row; a row reads ``seq_len + 1`` bytes (inputs and shifted targets).
        validation_fraction: expected share of files held out for validation.

    Only the ``"train"`` and ``"validation"`` splits exist.
    """

    name: ClassVar[str] = "text"

    paths: tuple[str, ...] = attrs.field(default=(), converter=_to_paths)
    seq_len: int = attrs.field(default=256, validator=int_range(1))
    validation_fraction: float = attrs.field(default=0.1, validator=float_range(0.0, 1.0, exclusive=True))
    _cache: dict[str, _Loaded] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    @property
    def vocab_size(self) -> int:
        """Always 256: one token per byte value."""
        return 256

    def _files(self) -> dict[str, Path]:
        """Map relative path -> file for every corpus file (binary members of folders dropped)."""
        if not self.paths:
            root = Path(sysconfig.get_paths()["stdlib"])
            chosen = [p for p in _walk(root, STDLIB_SKIP_DIRS) if p.suffix == ".py"]
            return dict(sorted((p.relative_to(root).as_posix(), p) for p in chosen))

        roots: list[Path] = []
        chosen_by_arg: list[tuple[str, list[Path], bool]] = []
        for arg in self.paths:
            path = Path(arg).expanduser()
            if glob.has_magic(arg):
                matches = [Path(m) for m in glob.glob(os.path.expanduser(arg), recursive=True)]
                members = [f for m in matches for f in (_walk(m, frozenset()) if m.is_dir() else [m])]
                roots.append(_glob_root(os.path.expanduser(arg)))
                chosen_by_arg.append((arg, members, False))
            elif path.is_dir():
                roots.append(path)
                chosen_by_arg.append((arg, _walk(path, frozenset()), False))
            elif path.is_file():
                roots.append(path.parent)
                chosen_by_arg.append((arg, [path], True))
            else:
                raise ValueError(
                    f"text: path {arg!r} does not exist; pass existing files, folders or glob "
                    "patterns (or no paths for the Python standard library)"
                )

        # abspath, not resolve: a symlinked member must not escape the common base.
        base = Path(os.path.commonpath([os.path.abspath(r) for r in roots]))
        files: dict[str, Path] = {}
        for arg, members, named in chosen_by_arg:
            kept = 0
            for member in members:
                binary = _is_binary(_read(member, _SNIFF_BYTES))
                if binary and named:
                    raise ValueError(
                        f"text: {arg!r} looks binary (NUL byte in its first {_SNIFF_BYTES} "
                        "bytes); pass text files only"
                    )
                if not binary:
                    files[Path(os.path.abspath(member)).relative_to(base).as_posix()] = member
                    kept += 1
            require(
                kept > 0,
                f"text: {arg!r} has no text files (no match, an empty folder, or only binary "
                "files); point it at a folder or pattern that contains text files",
            )
        return dict(sorted(files.items()))

    def _load(self) -> _Loaded:
        """Read, hash, split and concatenate the corpus once; later calls hit the cache."""
        if "corpus" in self._cache:
            return self._cache["corpus"]
        files = self._files()
        source = " ".join(self.paths) or "the Python standard library"
        require(
            len(files) >= 2,
            f"text: {source} gives {len(files)} text file(s); splitting by file needs at least 2",
        )
        contents = {rel: _read(path) for rel, path in files.items()}
        listing = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in contents.items())

        ranked = sorted(contents, key=_hash_fraction)
        validation = {rel for rel in ranked if _hash_fraction(rel) < self.validation_fraction}
        if not validation:
            validation = {ranked[0]}
        if len(validation) == len(ranked):
            validation.discard(ranked[-1])
        members = {
            "train": tuple(rel for rel in contents if rel not in validation),
            "validation": tuple(rel for rel in contents if rel in validation),
        }

        def joined(names: tuple[str, ...]) -> torch.Tensor:
            blob = b"".join(contents[n] + _SEPARATOR for n in names)
            return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

        loaded = _Loaded(
            splits={split: joined(names) for split, names in members.items()},
            files=members,
            fingerprint=hashlib.sha256(listing.encode()).hexdigest(),
            num_bytes=sum(len(d) for d in contents.values()),
        )
        self._cache["corpus"] = loaded
        return loaded

    def _split_bytes(self, split: str) -> torch.Tensor:
        """The bytes of ``split``, checked to hold at least one row."""
        _check_split(split)
        data = self._load().splits[split]
        require(
            len(data) >= self.seq_len + 1,
            f"text: the {split} split has {len(data)} bytes, fewer than seq_len+1="
            f"{self.seq_len + 1}; lower seq_len or add files (or raise validation_fraction)",
        )
        return data

    def split_files(self, split: str) -> tuple[str, ...]:
        """Relative paths of the files in ``split`` ("train" or "validation"), sorted."""
        _check_split(split)
        return self._load().files[split]

    @property
    def fingerprint(self) -> str:
        """sha256 over the sorted (relative path, sha256 of contents) list."""
        return self._load().fingerprint

    def batch(self, batch_size: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Return ``batch_size`` random windows of ``seq_len + 1`` bytes from ``split``."""
        check_batch_size(self.name, batch_size)
        data = self._split_bytes(split)
        generator = split_generator(self.name, seed, split)
        starts = torch.randint(len(data) - self.seq_len, (batch_size, 1), generator=generator)
        return self._windows(data, starts)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> TaskBatch:
        """Rows ``data[s : s + seq_len + 1]`` for each start ``s`` in ``starts`` (``[B, 1]``)."""
        rows = data[starts + torch.arange(self.seq_len + 1)].long()
        return TaskBatch(rows[:, :-1], rows[:, 1:])

    def iter_eval_batches(
        self, batch_size: int, max_batches: int | None = None, *, split: str = "validation"
    ) -> Iterator[TaskBatch]:
        """Yield sequential windows over ``split`` for perplexity, in order and deterministic.

        Window ``i`` reads bytes ``[i * seq_len, (i + 1) * seq_len]``: consecutive windows share
        one boundary byte, so every byte after the first is scored exactly once. A tail shorter
        than a window is dropped; the last batch may hold fewer than ``batch_size`` rows.
        ``max_batches=None`` covers the whole split.
        """
        check_batch_size(self.name, batch_size)
        require(
            max_batches is None or max_batches >= 0,
            f"text: max_batches={max_batches} must be None or >= 0",
        )
        data = self._split_bytes(split)  # checked now, not at the first next()
        chunks = torch.arange(0, len(data) - self.seq_len, self.seq_len).split(batch_size)
        return (self._windows(data, chunk[:, None]) for chunk in chunks[:max_batches])

    def describe(self) -> dict[str, Any]:
        """Return the config plus the corpus fingerprint and sizes (reads the corpus)."""
        loaded = self._load()
        return {
            "task": self.name,
            "paths": list(self.paths),
            "source": "stdlib" if not self.paths else "paths",
            "python": sys.version.split()[0],
            "seq_len": self.seq_len,
            "validation_fraction": self.validation_fraction,
            "vocab_size": self.vocab_size,
            "fingerprint": loaded.fingerprint,
            "num_files": sum(len(f) for f in loaded.files.values()),
            "num_bytes": loaded.num_bytes,
            "train_files": len(loaded.files["train"]),
            "validation_files": len(loaded.files["validation"]),
        }
