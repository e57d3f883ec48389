"""The one entry of each checkpoint-rewriting operation, whatever the file format: `guard tamper` and
`guard repair` call these and never branch on the format themselves.

    targets = tamper_targets(src, neurons_file, explicit, top)   # the neurons' producing slices
    tamper(src, out, targets, kind="zero")                         # a sabotaged copy (red team)
    repair(src, fp, out)                                           # a verified, restored copy

Each format is one `Editor` with the same three operations, chosen in one place (`editor_for`): a
safetensors checkpoint (directory) is edited through `tamper.py` / `repair.py` (float slices, shards
rewritten); a GGUF file through `gguf_tamper.py` (its quantized blocks patched in a copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from achilles_guard.errors import InputError
from achilles_guard.formats.gguf import is_gguf
from achilles_guard.integrity.gguf_tamper import repair_gguf, select_gguf_targets, tamper_gguf
from achilles_guard.integrity.repair import RepairOutcome, check_out_dir, repair_checkpoint
from achilles_guard.integrity.tamper import TamperKind, select_targets, tamper_checkpoint

__all__ = ["Editor", "editor_for", "tamper_targets", "tamper", "repair"]


@dataclass(frozen=True)
class Editor:
    """A file format's three rewriting operations (what `tamper_targets`, `tamper` and `repair` call)."""

    kind: str
    targets: Callable  # (src, neurons_file, explicit, top) -> [target]
    tamper: Callable  # (src, out, targets, *, kind, scale, noise, seed) -> out
    repair: Callable  # (src, fp, out) -> RepairOutcome
    check_source: Callable  # (src, out) -> None, InputError / UsageError before anything is read or written


def _check_gguf(src: Path, out: Path) -> None:
    if not src.is_file():
        raise InputError(f"{src}: no such GGUF file")


def _check_directory(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise InputError(f"{src}: no such directory")
    check_out_dir(src, out)


_GGUF = Editor("gguf", select_gguf_targets,
               lambda src, out, targets, *, kind, **kw: tamper_gguf(src, out, targets, kind=kind.value, **kw),
               repair_gguf, _check_gguf)
_SAFETENSORS = Editor("safetensors", select_targets, tamper_checkpoint, repair_checkpoint, _check_directory)


def editor_for(src: str | Path) -> Editor:
    """The editor of `src`'s format: the one place a rewrite asks which format it has."""
    return _GGUF if is_gguf(src) else _SAFETENSORS


def tamper_targets(src: Path, source: Path | None, explicit: list[str], top: int | None) -> list:
    """The chosen neurons (report.json / fingerprint, its top-N, or --neuron specs) as slices of `src`."""
    return editor_for(src).targets(src, source, explicit, top)


def tamper(src: str | Path, out: str | Path, targets: list, *, kind: TamperKind | str = TamperKind.zero,
           scale: float = 0.3, noise: float = 0.1, seed: int = 0) -> Path:
    """Write a copy of `src` to `out` with every target slice changed (atomically); returns `out`."""
    return editor_for(src).tamper(src, out, targets, kind=TamperKind(kind), scale=scale, noise=noise, seed=seed)


def repair(src: str | Path, fp, out: str | Path) -> RepairOutcome:
    """A copy of `src` at `out` with every tampered fingerprinted slice restored, re-verified. `fp` is a
    Fingerprint or its path (then loaded once the checkpoint and --out have passed their checks)."""
    from achilles_guard.integrity.fingerprint import load_fingerprint

    src = Path(src)
    editor = editor_for(src)
    editor.check_source(src, Path(out))
    return editor.repair(src, load_fingerprint(fp) if isinstance(fp, (str, Path)) else fp, out)
