"""What a `guard tamper` request may ask, checked before anything loads (no torch here).

The kinds of sabotage, the red-team banner, and the checks on the options and on --out that the
command runs first, so that a bad request is one line and exit 2 in a fraction of a second.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path

from achilles_guard.errors import InputError, UsageError

__all__ = ["BANNER", "TamperKind", "check_kind_options", "check_out"]

BANNER = (
    "RED-TEAM TOOL: this writes a deliberately SABOTAGED copy of the checkpoint, for testing gates. Never deploy it."
)



class TamperKind(str, Enum):
    zero = "zero"  # slice := its null value (the paper's attack)
    scale = "scale"  # slice := β · slice (the paper's β study; `scaled_slice`)
    sign_flip = "sign-flip"  # slice := -slice
    noise = "noise"  # slice += Gaussian noise with ||noise|| = rel · ||slice||


def check_kind_options(kind: TamperKind, scale: float, noise: float) -> None:
    """UsageError for a `--scale` that changes nothing or a `--noise` that is not a positive size."""
    if kind is TamperKind.scale and (not math.isfinite(scale) or scale == 1.0):
        raise UsageError(
            f"--scale {scale}: must be a finite factor other than 1.0 (1.0 changes nothing; nothing was written)"
        )
    if kind is TamperKind.noise and not (math.isfinite(noise) and noise > 0):
        raise UsageError(f"--noise {noise}: must be a finite number > 0 (nothing was written)")


def check_out(src: Path, out: Path) -> None:
    """Refuse an --out that exists (the input included), sits inside the input, or has no parent."""
    src, out = Path(src), Path(out)
    if out.exists() or out.resolve() == src.resolve():
        raise InputError(
            f"--out {out}: already exists; guard tamper refuses to write over anything (its input included)"
        )
    if src.resolve() in out.resolve().parents:
        raise InputError(f"--out {out}: is inside the input checkpoint; guard tamper refuses to write into its input")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: parent directory {out.parent} does not exist")
