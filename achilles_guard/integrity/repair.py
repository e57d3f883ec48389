"""Recovery: a copy of a checkpoint with every tampered producing slice restored from the fingerprint.

Never writes in place. The copy is assembled in a staging directory next to OUT, every fingerprinted
slice is re-read from the staged files and compared (sha256 of the exact bytes) with the fingerprint,
and only then is the staging directory renamed to OUT: a reader sees no OUT, or a verified one.

    outcome = repair_checkpoint("ckpt", fp, "ckpt-repaired")
    outcome.restored, outcome.unrepairable, outcome.verified
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from achilles_guard.errors import UsageError
from achilles_guard.formats.checkpoint import Checkpoint
from achilles_guard.formats.load import config_sha256
from achilles_guard.integrity.files import check_loader_files

TAMPER_MARKER = "TAMPERED_BY_GUARD.json"

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
    # loader files (tokenizer, template...) that differ from the fingerprinted ones: copied as they are, since the
    # fingerprint holds their digests, not their bytes; the copy is not the fingerprinted model until they are restored
    files_changed: tuple[str, ...] = ()

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
            "files_changed": list(self.files_changed),
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
    from achilles_guard.integrity.slices import SliceStatus, check_config, judge_slice

    check_config(source, fp)  # InputError (exit 2, nothing written) for a fingerprint of another architecture
    with Checkpoint.open(source) as ckpt:
        plan: dict[str, dict[str, list]] = {}  # shard -> checkpoint key -> [(SliceRecord)]
        results: dict[str, SliceRepair] = {}
        for key, rec in fp.slices.items():
            verdicts = judge_slice(ckpt, rec, fp.tensors[key])  # the same lookup and judgement as verify-checkpoint
            first = verdicts[0]
            if first.status is SliceStatus.missing:
                results[key] = SliceRepair(
                    key, rec.checkpoint_key, "unrepairable", "tensor missing from the checkpoint"
                )
                continue
            ckey = first.checkpoint_key
            if all(v.ok for v in verdicts):  # intact or equivalent (e.g. a bf16 re-save): nothing to restore
                results[key] = SliceRepair(key, ckey, "intact")
                continue
            bad = [v for v in verdicts if not v.ok]
            wrong = [v for v in bad if v.status is SliceStatus.shape_mismatch or v.actual_dtype != rec.dtype]
            if wrong:
                v = wrong[0]
                results[key] = SliceRepair(
                    key,
                    ckey,
                    "unrepairable",
                    f"tensor is {v.actual_dtype}{list(v.actual_shape or ())} in {v.shard}, "
                    f"the fingerprint recorded {rec.dtype}{list(rec.shape)}",
                )
                continue
            for v in bad:
                plan.setdefault(v.shard, {}).setdefault(ckey, []).append(rec)
            results[key] = SliceRepair(key, ckey, "restored")
    from achilles_guard.formats.staging import staged_dir

    with staged_dir(out) as staging:
        for item in source.iterdir():
            if item.name in plan or item.name == TAMPER_MARKER:  # a repaired copy is no longer "tampered by guard"
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
            elif item.is_dir():  # additional_chat_templates/ and the like: the loader reads them too
                shutil.copytree(item, staging / item.name)
        for shard, tensors in plan.items():
            _rewrite_shard(source / shard, staging / shard, tensors, fp)
        verified = _verify(staging, fp, results)
    try:
        matches = config_sha256(source) == fp.config_sha256
    except Exception:
        matches = False
    changed = () if fp.files is None else tuple(f.name for f in check_loader_files(source, fp.files).findings)
    return RepairOutcome(str(source), str(out), tuple(results[k] for k in fp.slices), matches, verified, changed)


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
    from achilles_guard.integrity.slices import judge_slice

    with Checkpoint.open(root) as ckpt:
        for key, res in results.items():
            if res.status == "unrepairable":
                continue
            if not all(v.ok for v in judge_slice(ckpt, fp.slices[key], fp.tensors[key])):
                return False
    return True
