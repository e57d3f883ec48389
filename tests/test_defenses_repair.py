"""repair: every tamper of a producing slice is restored to `intact` (sha256 vs the fingerprint), never in place."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from achilles_guard.errors import UsageError
from achilles_guard.formats.checkpoint import Checkpoint, tensor_sha256
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.integrity.repair import repair_checkpoint
from tests.builders import scanned

TAMPERS = {
    "zero": lambda row: torch.zeros_like(row),
    "scale": lambda row: row * 0.01,
    "sign-flip": lambda row: -row,
    "noise": lambda row: row + 1e-3 * torch.randn_like(row),
    "one-bit": lambda row: (row.view(torch.int32) ^ 1).view(row.dtype),
}


@pytest.fixture(scope="module")
def scanned_planted(planted, tmp_path_factory):
    path, _ = planted
    return path, load_fingerprint(scanned(path, tmp_path_factory.mktemp("scan")) / "fingerprint.safetensors")


def _status(ckpt_dir, fp) -> dict[str, str]:
    with Checkpoint.open(ckpt_dir) as ckpt:
        return {
            k: (
                "intact"
                if tensor_sha256(ckpt.read_slice(r.checkpoint_key, r.axis, r.index)) == r.sha256
                else "tampered"
            )
            for k, r in fp.slices.items()
        }


def _tamper(src, dst, fp, keys, fn):
    shutil.copytree(src, dst)
    shard = dst / fp.slices[keys[0]].shard
    with safe_open(str(shard), framework="pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    for key in keys:
        rec = fp.slices[key]
        row = tensors[rec.checkpoint_key].select(rec.axis, rec.index)
        row.copy_(fn(row.clone()))
    save_file(tensors, str(shard), metadata=meta)


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_every_tamper_kind_is_restored(scanned_planted, tmp_path, kind):
    path, fp = scanned_planted
    critical = [k for r in fp.critical_records for k in r.slices]
    _tamper(path, tmp_path / "bad", fp, critical, TAMPERS[kind])
    before = _status(tmp_path / "bad", fp)
    assert {before[k] for k in critical} == {"tampered"}
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "bad").iterdir()}
    outcome = repair_checkpoint(tmp_path / "bad", fp, tmp_path / "fixed")
    assert outcome.verified and not outcome.unrepairable
    assert {s.key for s in outcome.restored} == set(critical)
    assert set(_status(tmp_path / "fixed", fp).values()) == {"intact"}
    assert {p.name: p.read_bytes() for p in (tmp_path / "bad").iterdir()} == snapshot  # never in place
    # everything that was not tampered is byte-identical to the original checkpoint
    with (
        safe_open(str(path / "model.safetensors"), framework="pt") as a,
        safe_open(str(tmp_path / "fixed" / "model.safetensors"), framework="pt") as b,
    ):
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_reshaped_tensor_is_unrepairable_and_out_equal_to_input_is_refused(scanned_planted, tmp_path):
    path, fp = scanned_planted
    with pytest.raises(UsageError, match="in place"):
        repair_checkpoint(path, fp, path)
    rec = fp.slices[fp.critical_records[0].slices[0]]
    shutil.copytree(path, tmp_path / "bad")
    shard = tmp_path / "bad" / rec.shard
    with safe_open(str(shard), framework="pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    tensors[rec.checkpoint_key] = tensors[rec.checkpoint_key][:-1].clone()
    save_file(tensors, str(shard), metadata=meta)
    outcome = repair_checkpoint(tmp_path / "bad", fp, tmp_path / "fixed")
    assert rec.key in {s.key for s in outcome.unrepairable}
