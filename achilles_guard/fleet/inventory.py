"""Which models a fleet run covers: every model directory or `.gguf` file under a root, or a list file.

A **model directory** holds `config.json` and at least one weights file (`*.safetensors`, or pickle
`*.bin`/`*.pt`, which the scan then refuses with a clear row instead of the fleet skipping it
silently). Discovery walks the root in sorted order, never descends into a model directory or a
hidden one (`.staging` folders), and never follows a symlinked directory out of the root.

The **stable id** of a model is its path relative to the root (or the list line as written),
sanitized to `[A-Za-z0-9._-]`, plus the first 8 hex digits of the SHA-256 of that relative path, so
two paths that sanitize alike never share an output directory, and the same registry copied to
another place keeps its ids (that is how `fleet verify` finds each model's fingerprint).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from achilles_guard.errors import InputError

__all__ = ["ModelEntry", "discover", "stable_id", "is_model_dir", "model_files"]

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the output directory's name under OUT
    path: Path  # absolute
    rel: str  # relative to the root (or the list line as written): what the id is made from
    kind: str  # "dir" or "gguf"

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights on disk (what the Ray backend sizes a task's memory from)."""
        if self.kind == "gguf":
            return _size(self.path)
        return sum(_size(p) for p in self.path.iterdir() if p.suffix in _WEIGHTS)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def stable_id(rel: str) -> str:
    rel = rel.replace(os.sep, "/").strip("/") or "."
    name = _UNSAFE.sub("_", rel.replace("/", "__")).strip("._-")[:80] or "model"
    return f"{name}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"


def is_model_dir(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and any(
            p.suffix in _WEIGHTS and p.is_file() for p in path.iterdir()
        )
    except OSError:
        return False


def model_files(entry: ModelEntry) -> list[Path]:
    """Every file that is part of the model (what the cache digests): the .gguf, or the directory's files."""
    if entry.kind == "gguf":
        return [entry.path]
    return sorted(p for p in entry.path.iterdir() if p.is_file() and not p.name.startswith("."))


def _entry(path: Path, rel: str) -> ModelEntry:
    kind = "gguf" if path.suffix == ".gguf" and path.is_file() else "dir"
    return ModelEntry(id=stable_id(rel), path=path.absolute(), rel=rel.replace(os.sep, "/"), kind=kind)


def _walk(root: Path, exclude: set[Path]) -> list[ModelEntry]:
    found: list[ModelEntry] = []
    stack = [root]
    while stack:
        here = stack.pop()
        if is_model_dir(here):
            found.append(_entry(here, str(here.relative_to(root))))
            continue
        try:
            children = sorted(here.iterdir(), key=lambda p: p.name, reverse=True)
        except OSError as err:
            raise InputError(f"{here}: cannot list ({err.strerror or err})") from None
        for child in children:
            if child.name.startswith(".") or child.absolute() in exclude:
                continue
            if child.is_dir() and not child.is_symlink():
                stack.append(child)
            elif child.suffix == ".gguf" and child.is_file():
                found.append(_entry(child, str(child.relative_to(root))))
    return sorted(found, key=lambda e: e.rel)


def _read_list(path: Path) -> list[ModelEntry]:
    entries = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        target = Path(line).expanduser()
        target = target if target.is_absolute() else path.parent / target
        entries.append(_entry(target, line))
    return entries


def discover(root_or_list: Path, *, exclude: tuple[Path, ...] = ()) -> list[ModelEntry]:
    """The models of a fleet, in a deterministic order; InputError when there is none or ids collide."""
    root_or_list = Path(root_or_list)
    if not root_or_list.exists():
        raise InputError(f"{root_or_list}: no such directory or list file")
    if root_or_list.is_file() and root_or_list.suffix != ".gguf":
        entries = _read_list(root_or_list)
    elif root_or_list.is_file():
        entries = [_entry(root_or_list, root_or_list.name)]
    else:
        entries = _walk(root_or_list, {p.absolute() for p in exclude})
    if not entries:
        raise InputError(
            f"{root_or_list}: no model found (a model is a directory with config.json and weights, or a .gguf file)"
        )
    seen: dict[str, str] = {}
    for e in entries:
        if e.id in seen:
            raise InputError(f"{root_or_list}: {e.rel!r} is listed twice (or as {seen[e.id]!r})")
        seen[e.id] = e.rel
    return entries
