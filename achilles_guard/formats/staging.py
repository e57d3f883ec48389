"""The one "stage in a temp dir, then rename into place" helper (scan outputs, demo, tamper, repair, harden).

    with staged_dir(out) as tmp:            # tmp: an empty directory next to `out`
        write everything into tmp
    # success: tmp was renamed to `out`; any exception: tmp removed, `out` untouched

    publish_files(out_dir, {"report.json": b"...", "fingerprint.safetensors": b"..."})

A reader never sees half an output: either the old state or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from achilles_guard.errors import RuntimeFailure

__all__ = ["staged_dir", "publish_files"]


@contextmanager
def staged_dir(target: str | Path, *, mode: str = "new"):
    """Yield a fresh staging directory beside `target`; rename it to `target` when the block succeeds.

    mode "new": `target` must not exist, or be an empty directory (removed first);
    "replace": an existing `target` is swapped out and deleted only after the new one is in place;
    "first-wins": when `target` appeared meanwhile (a concurrent builder), ours is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        if mode == "replace" and target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(trash / "old")
            staging.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        elif mode == "first-wins":
            try:
                staging.rename(target)
            except OSError:
                pass  # another process won the race: keep its copy
        else:
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_files(out_dir: str | Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file into a staging directory inside `out_dir` (fsynced), then move them in together.

    Every byte is produced before anything is written, so an input error leaves `out_dir` as it was
    (not even created). A failure while moving (disk full, permission) raises RuntimeFailure naming
    exactly which files were replaced and which still hold their old contents.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".guard-staging-", dir=out_dir))
    moved: list[Path] = []
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging / name, 0o666 & ~umask)
        for name in files:
            try:
                os.replace(staging / name, out_dir / name)
            except OSError as err:
                left = [n for n in files if out_dir / n not in moved]
                raise RuntimeFailure(
                    f"{out_dir}: could not move {name} into place ({err.strerror or err}); "
                    f"written: {', '.join(p.name for p in moved) or 'nothing'}; unchanged: {', '.join(left)}"
                ) from None
            moved.append(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return moved
