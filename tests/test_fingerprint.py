"""The fingerprint file: what `guard scan` writes, read back, signed, shown."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.errors import InputError
from achilles_guard.formats.checkpoint import Checkpoint, tensor_sha256
from achilles_guard.integrity.fingerprint import FORMAT, NORM_PREFIX, SignatureError, load_fingerprint, read_key
from achilles_guard.integrity.records import SKETCH_TENSOR
from tests.builders import run_guard


def test_round_trip_exact_bytes_and_metadata(planted_scan):
    path, critical, out = planted_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    assert set(fp.critical_set) == critical
    assert {r.neuron for r in fp.critical_records} == critical
    assert len(fp.neurons) >= 8 and not fp.signed
    assert fp.baseline_loss > 0 and fp.probe_texts
    with Checkpoint.open(path) as ckpt:
        for key, record in fp.slices.items():
            exact = ckpt.read_slice(record.checkpoint_key, record.axis, record.index)
            assert fp.tensors[key].dtype == exact.dtype and bool((fp.tensors[key] == exact).all())
            assert record.sha256 == tensor_sha256(exact) and record.shard == "model.safetensors"
    # plain safetensors can read it: format marker + JSON metadata
    with safe_open(str(out / "fingerprint.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        norms = {NORM_PREFIX + p for p in json.loads(meta["norms"])}
        assert meta["format"] == FORMAT and set(handle.keys()) == set(fp.slices) | norms | {SKETCH_TENSOR}
        # every tensor the loader loads is recorded, its sketch rows inside the sketch tensor
        assert {r.name for r in fp.records.records} == set(Checkpoint.open(path).weight_map)
        assert handle.get_tensor(SKETCH_TENSOR).shape[0] == sum(r.rows for r in fp.records.records)
    assert json.loads(meta["critical_set"])
    # every scanned norm's whole weight, bytes as in the checkpoint (the runtime guard's exact rule reads them)
    with Checkpoint.open(path) as ckpt:
        scanned_norms = {k for k in ckpt.weight_map if "norm" in k and k.startswith("model.layers.")}
        assert {k[len(NORM_PREFIX):] for k in norms} == scanned_norms
        for name, w in fp.norms.items():
            assert torch.equal(w.weight, ckpt.read(f"{name}.weight")) and w.bias is None and w.offset == 0.0


def test_a_changed_norm_weight_makes_the_fingerprint_corrupt(planted_scan, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, out = planted_scan
    with safe_open(str(out / "fingerprint.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(out / "fingerprint.safetensors"))
    key = sorted(k for k in tensors if k.startswith(NORM_PREFIX))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0] += 1.0  # a guard restoring from this would restore the wrong value
    save_file(tensors, str(tmp_path / "fp.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="norm weight .* does not match its recorded sha256"):
        load_fingerprint(tmp_path / "fp.safetensors")


def test_signed_fingerprint_verifies_with_its_key(planted_scan):
    _, _, out = planted_scan
    fp = load_fingerprint(out / "signed.safetensors", verify_key=read_key(str(out / "key")))
    assert fp.signed


def test_wrong_key_and_unsigned_fail_closed(planted_scan):
    _, _, out = planted_scan
    with pytest.raises(SignatureError, match="mismatch"):
        load_fingerprint(out / "signed.safetensors", verify_key=b"another-key-of-enough-length")
    with pytest.raises(SignatureError, match="not signed"):
        load_fingerprint(out / "fingerprint.safetensors", verify_key=b"0123456789abcdef-test-signing-key")


def test_flipped_byte_fails_closed(planted_scan, tmp_path):
    _, _, out = planted_scan
    raw = bytearray((out / "signed.safetensors").read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(SignatureError):
        load_fingerprint(bad, verify_key=b"0123456789abcdef-test-signing-key")
    with pytest.raises(InputError, match="sha256"):  # even without a key, the per-slice / sketch hash catches it
        load_fingerprint(bad)


def test_show_table_and_json(planted_scan):
    _, critical, out = planted_scan
    runner = CliRunner()
    table = runner.invoke(app, ["fingerprint", "show", str(out / "fingerprint.safetensors")])
    assert table.exit_code == 0, table.output
    assert "critical set:" in table.output and "down_proj[11]" in table.output
    doc = runner.invoke(app, ["fingerprint", "show", str(out / "signed.safetensors"), "--format", "json",
                              "--verify-key", str(out / "key")])
    assert doc.exit_code == 0, doc.output
    parsed = json.loads(doc.stdout)
    assert parsed["signature"] == "verified"
    assert {(n["module"], n["channel"]) for n in parsed["critical_set"]} == {(n.module, n.channel) for n in critical}
    wrong = runner.invoke(
        app, ["fingerprint", "show", str(out / "signed.safetensors"), "--verify-key", "env:GUARD_NO_SUCH_KEY"]
    )
    assert wrong.exit_code == 2  # unset key variable: usage error


def test_show_subprocess_missing_file(tmp_path):
    proc = run_guard(["fingerprint", "show", str(tmp_path / "nope.safetensors")])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
