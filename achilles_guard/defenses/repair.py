"""Recovery: a copy of a checkpoint with every tampered producing slice restored from the fingerprint.

Never writes in place. The copy is assembled in a staging directory next to OUT, every fingerprinted
slice is re-read from the staged files and compared (sha256 of the exact bytes) with the fingerprint,
and only then is the staging directory renamed to OUT: a reader sees no OUT, or a verified one.

    outcome = repair_checkpoint("ckpt", fp, "ckpt-repaired")
    outcome.restored, outcome.unrepairable, outcome.verified
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles_guard.checkpoint import Checkpoint, resolve_key, tensor_sha256
from achilles_guard.errors import UsageError
from achilles_guard.model import config_sha256

__all__ = ["SliceRepair", "RepairOutcome", "repair_checkpoint", "check_out_dir"]

@dataclass(frozen=True)
class SliceRepair:
    key: str
    checkpoint_key: str
    status: str  # intact | restored | unrepairable
    reason: str = ""


@dataclass(frozen=True)
class RepairOutcome:
    source: str
    out: str
    slices: tuple[SliceRepair, ...]
    config_matches: bool
    verified: bool  # every repairable slice of the written copy matches the fingerprint

    @property
    def restored(self) -> tuple[SliceRepair, ...]:
        return tuple(s for s in self.slices if s.status == "restored")

    @property
    def unrepairable(self) -> tuple[SliceRepair, ...]:
        return tuple(s for s in self.slices if s.status == "unrepairable")

    def as_dict(self) -> dict:
        return {
            "schema": "achilles-guard/repair/v1",
            "source": self.source,
            "out": self.out,
            "config_matches_fingerprint": self.config_matches,
            "verified": self.verified,
            "counts": {s: sum(1 for r in self.slices if r.status == s) for s in ("intact", "restored", "unrepairable")},
            "slices": [s.__dict__ for s in self.slices if s.status != "intact"],
        }


def check_out_dir(source: Path, out: Path) -> None:
    """UsageError unless OUT is a new (or empty) directory distinct from the source."""
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the input directory; guard never writes in place: choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")


def repair_checkpoint(source: str | Path, fp, out: str | Path) -> RepairOutcome:
    """Write a repaired, verified copy of `source` to `out` (see module docstring)."""
    source, out = Path(source), Path(out)
    check_out_dir(source, out)
    with Checkpoint.open(source) as ckpt:
        plan: dict[str, dict[str, list]] = {}  # shard -> checkpoint key -> [(SliceRecord)]
        results: dict[str, SliceRepair] = {}
        for key, rec in fp.slices.items():
            ckey = resolve_key(ckpt.weight_map, rec.param)
            if ckey is None:
                results[key] = SliceRepair(key, rec.checkpoint_key, "unrepairable", "tensor missing from the checkpoint")
                continue
            shape, dtype = ckpt.shape_dtype(ckey)
            if tuple(shape) != tuple(rec.shape) or dtype != rec.dtype:
                results[key] = SliceRepair(key, ckey, "unrepairable",
                                           f"tensor is {dtype}{list(shape)}, the fingerprint recorded {rec.dtype}{list(rec.shape)}")
                continue
            if tensor_sha256(ckpt.read_slice(ckey, rec.axis, rec.index)) == rec.sha256:
                results[key] = SliceRepair(key, ckey, "intact")
                continue
            plan.setdefault(ckpt.shard_of(ckey), {}).setdefault(ckey, []).append(rec)
            results[key] = SliceRepair(key, ckey, "restored")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and item.name not in plan:
                shutil.copy2(item, staging / item.name)
        for shard, tensors in plan.items():
            _rewrite_shard(source / shard, staging / shard, tensors, fp)
        verified = _verify(staging, fp, results)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    try:
        matches = config_sha256(source) == fp.config_sha256
    except Exception:  # noqa: BLE001 - a missing config is reported, not fatal to the weights' repair
        matches = False
    return RepairOutcome(str(source), str(out), tuple(results[k] for k in fp.slices), matches, verified)


def _rewrite_shard(src: Path, dst: Path, tensors: dict[str, list], fp) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata()
        everything = {k: handle.get_tensor(k) for k in handle.keys()}
    for ckey, records in tensors.items():
        tensor = everything[ckey].clone()
        for rec in records:
            tensor.select(rec.axis, rec.index).copy_(fp.tensors[rec.key])
        everything[ckey] = tensor
    save_file(everything, str(dst), metadata=metadata)


def _verify(root: Path, fp, results: dict[str, SliceRepair]) -> bool:
    with Checkpoint.open(root) as ckpt:
        for key, res in results.items():
            if res.status == "unrepairable":
                continue
            rec = fp.slices[key]
            if tensor_sha256(ckpt.read_slice(res.checkpoint_key, rec.axis, rec.index)) != rec.sha256:
                return False
    return True
