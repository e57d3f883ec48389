"""The one interface every defence implements, so `harden` reads: apply each step -> re-attack -> verdict.

    class MyDefense:
        name = "mine"
        kind = "weights"                       # writes a checkpoint (or "runtime": a guard on the model)
        def check(self, request, fp): ...      # input errors before anything is written (UsageError)
        def apply(self, step: Step) -> Applied: ...

A weight-level defence loads a working copy (`step.load(dtype="float64")` for exact edits), edits it
in place and returns `Applied.saved(step, work, details)`: the checkpoint is written under
`step.out / "model"` (a directory plain `AutoModelForCausalLM.from_pretrained` loads) and reloaded
in the request's dtype and device for the re-attack. A runtime defence returns the current model
wrapped (`Applied(lm=replace(step.lm, model=Wrapped(...)), checkpoint=None, ...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from achilles_guard.formats.load import LoadedModel, load_model

__all__ = ["Defense", "Step", "Applied", "stored_dtype", "save_model"]


@dataclass(frozen=True)
class Step:
    """One step of a (possibly chained) hardening: what the defence applies to."""

    model_dir: Path  # the current weights (the original, or the previous step's checkpoint)
    lm: LoadedModel  # the same, loaded in the request's dtype and device
    fp: object  # Fingerprint of the current model (the original's, or the previous step's re-scan)
    request: object  # HardenRequest (options: copies, seed, rotation, finetune, redundancy...)
    out: Path  # this step's output directory
    original: LoadedModel  # the unhardened model (finetune's KL reference)
    log: Callable[[str], None] | None = None
    progress: Callable | None = None

    def load(self, *, dtype: str = "float64", device: str = "cpu") -> LoadedModel:
        """A fresh working copy of the current weights (float64 on the CPU: exact arithmetic for edits)."""
        return load_model(self.model_dir, dtype=dtype, device=device)


@dataclass(frozen=True)
class Applied:
    """What a defence produced: the model to re-attack, where its checkpoint is, and what was done."""

    lm: LoadedModel  # the hardened model (a runtime guard: the current model, wrapped)
    checkpoint: Path | None  # weight-level: the saved HF directory; None for a runtime guard
    same_basis: bool  # neuron names still mean what they meant before (the old mask can be re-applied)
    details: dict
    # a runtime guard: the neurons it restores; the re-attack ranks them last (the attacker knows the guard)
    guarded: tuple = ()

    @staticmethod
    def saved(step: Step, work: LoadedModel, details: dict, *, same_basis: bool) -> "Applied":
        """Write `work` as `step.out / "model"` (in the stored dtype) and reload it for the re-attack."""
        target = step.out / "model"
        save_model(work, target, stored_dtype(step.model_dir))
        req = step.request
        return Applied(load_model(target, dtype=req.dtype, device=req.device), target, same_basis, details)


class Defense(Protocol):
    name: str
    kind: str  # "weights" | "runtime"

    def check(self, request, fp) -> None:
        """Raise UsageError for options or models this defence cannot handle (before OUT exists)."""

    def apply(self, step: Step) -> Applied:
        """Harden `step`'s model."""


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint stores its weights in (float32 when none is found).

    A GGUF file: float16 / bfloat16 when every matrix is stored in it, else float32 (a quantized
    matrix is saved as its dequantized float32 values: a hardened GGUF is a safetensors directory)."""
    from achilles_guard.formats.checkpoint import Checkpoint
    from achilles_guard.formats.gguf import is_gguf, read_layout

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if is_gguf(model_dir):
        with read_layout(model_dir) as layout:
            kinds = {t.qtype for t in layout.tensors.values() if len(t.ne) >= 2}
        return names[kinds.pop()] if len(kinds) == 1 and kinds <= {"F16", "BF16"} else torch.float32
    with Checkpoint.open(model_dir) as ckpt:
        for key in ckpt.weight_map:
            _, dtype = ckpt.shape_dtype(key)
            if dtype in names:
                return names[dtype]
    return torch.float32


def save_model(work: LoadedModel, target: Path, dtype: torch.dtype) -> None:
    """save_pretrained into a staging directory, then swap it in (a reader never sees half a model)."""
    from achilles_guard.formats.staging import staged_dir

    model = work.model.to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    with staged_dir(target, mode="replace") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        work.tokenizer.save_pretrained(staging)
