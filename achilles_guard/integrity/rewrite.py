"""The one entry of each checkpoint-rewriting operation, whatever the file format: `guard tamper` and
`guard repair` call these and never branch on the format themselves.

    targets = tamper_targets(src, neurons_file, explicit, top)   # the neurons' producing slices
    tamper(src, out, targets, kind="zero")                         # a sabotaged copy (red team)
    repair(src, fp, out)                                           # a verified, restored copy

A safetensors checkpoint (directory) is edited through `tamper.py` / `repair.py` (float slices,
shards rewritten); a GGUF file through `gguf_tamper.py` (its quantized blocks patched in a copy).
"""

from __future__ import annotations

from pathlib import Path

from achilles_guard.errors import InputError
from achilles_guard.formats.gguf import is_gguf
from achilles_guard.integrity.gguf_tamper import repair_gguf, select_gguf_targets, tamper_gguf
from achilles_guard.integrity.repair import RepairOutcome, check_out_dir, repair_checkpoint
from achilles_guard.integrity.tamper import TamperKind, select_targets, tamper_checkpoint

__all__ = ["tamper_targets", "tamper", "repair"]


def tamper_targets(src: Path, source: Path | None, explicit: list[str], top: int | None) -> list:
    """The chosen neurons (report.json / fingerprint, its top-N, or --neuron specs) as slices of `src`."""
    if is_gguf(src):
        return select_gguf_targets(src, source, explicit, top)
    return select_targets(src, source, explicit, top)


def tamper(src: str | Path, out: str | Path, targets: list, *, kind: TamperKind | str = TamperKind.zero,
           scale: float = 0.3, noise: float = 0.1, seed: int = 0) -> Path:
    """Write a copy of `src` to `out` with every target slice changed (atomically); returns `out`."""
    kind = TamperKind(kind)
    if is_gguf(src):
        return tamper_gguf(src, out, targets, kind=kind.value, scale=scale, noise=noise, seed=seed)
    return tamper_checkpoint(src, out, targets, kind=kind, scale=scale, noise=noise, seed=seed)


def repair(src: str | Path, fp, out: str | Path) -> RepairOutcome:
    """A copy of `src` at `out` with every tampered fingerprinted slice restored, re-verified. `fp` is a
    Fingerprint or its path (then loaded once the checkpoint and --out have passed their checks)."""
    from achilles_guard.integrity.fingerprint import load_fingerprint

    src = Path(src)
    if is_gguf(src):
        if not src.is_file():
            raise InputError(f"{src}: no such GGUF file")
        return repair_gguf(src, load_fingerprint(fp) if isinstance(fp, (str, Path)) else fp, out)
    if not src.is_dir():
        raise InputError(f"{src}: no such directory")
    check_out_dir(src, Path(out))
    return repair_checkpoint(src, load_fingerprint(fp) if isinstance(fp, (str, Path)) else fp, out)
