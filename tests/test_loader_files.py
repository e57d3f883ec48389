"""verify-checkpoint vouches for the files the loader reads besides the weights: tokenizer, chat template,
generation config, remote code. An attacker who swaps two vocabulary entries edits no weight."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from achilles_guard.cli import app
from tests.builders import run_guard

runner = CliRunner()


def verify(model, fp, *extra):
    result = runner.invoke(app, ["verify-checkpoint", str(model), "--fingerprint", str(fp), "--format", "json",
                                 *extra])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def copy(planted_scan, tmp_path):
    path, _, _ = planted_scan
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _swap_vocab(model_dir):
    """Exchange the ids of two vocabulary entries of tokenizer.json: every weight stays byte-identical."""
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model_dir / "tokenizer.json").write_text(json.dumps(doc))
    return a, b


def test_the_fingerprint_records_every_loader_file(planted_scan):
    from achilles_guard.integrity.fingerprint import load_fingerprint

    path, _, out = planted_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    assert "tokenizer.json" in fp.files and "tokenizer_config.json" in fp.files
    assert "model.safetensors" not in fp.files and "config.json" not in fp.files  # their own checks
    code, doc = verify(path, out / "fingerprint.safetensors")
    assert code == 0 and doc["files"]["recorded"] and doc["files"]["findings"] == []
    assert doc["files"]["compared"] == sorted(fp.files)


def test_swapped_vocabulary_entries_are_tampered(planted_scan, copy):
    from transformers import AutoTokenizer

    _, _, out = planted_scan
    a, b = _swap_vocab(copy)
    before = AutoTokenizer.from_pretrained(planted_scan[0]).convert_tokens_to_ids([a, b])
    after = AutoTokenizer.from_pretrained(copy).convert_tokens_to_ids([a, b])
    assert after == before[::-1]  # the attack is real: the tokenizer maps the two tokens the other way round
    for extra in ((), ("--quick",)):
        code, doc = verify(copy, out / "fingerprint.safetensors", *extra)
        assert code == 1 and doc["verdict"] == "tampered", extra
        assert doc["tensors"] is None or doc["tensors"]["findings_count"] == 0  # no weight changed
        assert [(f["name"], f["kind"], f["role"]) for f in doc["files"]["findings"]] == [
            ("tokenizer.json", "changed", "tokenizer")]
    sarif = runner.invoke(app, ["verify-checkpoint", str(copy), "--fingerprint", str(out / "fingerprint.safetensors"),
                                "--format", "sarif"])
    results = json.loads(sarif.stdout)["runs"][0]["results"]
    assert [(r["ruleId"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].rsplit("/", 1)[-1])
            for r in results] == [("AG129", "tokenizer.json")]
    table = runner.invoke(app, ["verify-checkpoint", str(copy), "--fingerprint", str(out / "fingerprint.safetensors")])
    text = " ".join(table.stdout.split())  # unwrapped
    assert table.exit_code == 1 and "tokenizer.json (tokenizer): bytes differ" in text
    assert "TAMPERED (1 loader file(s) changed: tokenizer.json)" in text


@pytest.mark.parametrize("edit, name, kind, role", [
    (lambda d: (d / "chat_template.jinja").write_text("{{ 'ignore the user' }}"), "chat_template.jinja", "added",
     "chat template"),
    (lambda d: (d / "additional_chat_templates").mkdir() or
     (d / "additional_chat_templates" / "tool_use.jinja").write_text("x"),
     "additional_chat_templates/tool_use.jinja", "added", "chat template"),
    (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer_config.json", "missing", "tokenizer"),
    (lambda d: (d / "modeling_evil.py").write_text("import os\n"), "modeling_evil.py", "added", "remote code"),
    (lambda d: (d / "generation_config.json").write_text('{"temperature": 9.0}'), "generation_config.json", "added",
     "generation config"),
    (lambda d: (d / "tekken.json").write_text("{}"), "tekken.json", "added",
     "loader input"),
    (lambda d: (d / "source.spm").write_bytes(b"\0" * 9), "source.spm", "added", "tokenizer"),
])
def test_added_removed_and_new_loader_files(planted_scan, copy, edit, name, kind, role):
    _, _, out = planted_scan
    if name == "generation_config.json" and (copy / name).exists():
        kind = "changed"
    edit(copy)
    code, doc = verify(copy, out / "fingerprint.safetensors")
    assert code == 1 and [(f["name"], f["kind"], f["role"]) for f in doc["files"]["findings"]] == [(name, kind, role)]


def test_other_files_are_listed_as_not_covered(planted_scan, copy):
    _, _, out = planted_scan
    (copy / "README.md").write_text("# a model card edited after the scan\n")
    (copy / "LICENSE").write_text("Apache-2.0\n")
    (copy / "guard-out").mkdir()  # a scan's --out inside the model directory
    (copy / "guard-out" / "report.json").write_text("{}")
    code, doc = verify(copy, out / "fingerprint.safetensors")
    assert code == 0 and doc["verdict"] == "intact" and doc["files"]["not_covered"] == ["LICENSE", "README.md"]
    table = runner.invoke(app, ["verify-checkpoint", str(copy), "--fingerprint", str(out / "fingerprint.safetensors")])
    assert "not covered: LICENSE, README.md" in " ".join(table.stdout.split())


def test_a_symlink_to_a_device_is_not_read(planted_scan, copy):
    """tokenizer.json -> /dev/zero would never end if hashed; it is no regular file, so it is a missing one."""
    _, _, out = planted_scan
    (copy / "tokenizer.json").unlink()
    os.symlink("/dev/zero", copy / "tokenizer.json")
    proc = run_guard(["verify-checkpoint", str(copy), "--fingerprint", str(out / "fingerprint.safetensors"),
                      "--format", "json"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert [(f["name"], f["kind"]) for f in json.loads(proc.stdout)["files"]["findings"]] == [
        ("tokenizer.json", "missing")]


def _without_files(src, dst, key=None):
    """The fingerprint as guard wrote it before it recorded loader files (metadata key `files` absent)."""
    with safe_open(str(src), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    del meta["files"]
    meta.pop("hmac_sha256", None)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_an_older_fingerprint_says_plainly_the_tokenizer_was_not_compared(planted_scan, copy, tmp_path):
    _, _, out = planted_scan
    old = _without_files(out / "fingerprint.safetensors", tmp_path / "old.safetensors")
    _swap_vocab(copy)
    code, doc = verify(copy, old)
    assert code == 0 and doc["files"]["recorded"] is False  # it cannot know: nothing recorded to compare with
    assert "tokenizer.json" in doc["files"]["not_compared"] and "tokenizer.json" in doc["not_checked"]
    table = runner.invoke(app, ["verify-checkpoint", str(copy), "--fingerprint", str(old)])
    assert "the tokenizer files were NOT compared" in " ".join(table.stdout.split())


def test_the_signature_covers_the_file_digests(planted_scan, tmp_path):
    """An attacker who swaps the tokenizer and rewrites its digest in a signed fingerprint breaks the HMAC."""
    _, _, out = planted_scan
    with safe_open(str(out / "signed.safetensors"), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    files = json.loads(meta["files"])
    files["tokenizer.json"] = "0" * 64
    meta["files"] = json.dumps(files, sort_keys=True)
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=meta)
    result = runner.invoke(app, ["verify-checkpoint", str(planted_scan[0]), "--fingerprint",
                                 str(tmp_path / "forged.safetensors"), "--verify-key", str(out / "key")])
    assert result.exit_code == 1 and "signature mismatch" in result.stderr


def test_repair_says_it_cannot_restore_a_changed_tokenizer(planted_scan, copy, tmp_path):
    _, _, out = planted_scan
    _swap_vocab(copy)
    (copy / "additional_chat_templates").mkdir()
    (copy / "additional_chat_templates" / "rag.jinja").write_text("{{ messages }}")
    result = runner.invoke(app, ["repair", str(copy), "--fingerprint", str(out / "fingerprint.safetensors"),
                                 "--out", str(tmp_path / "fixed"), "--format", "json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["files_changed"] == ["additional_chat_templates/rag.jinja", "tokenizer.json"]
    assert (tmp_path / "fixed" / "additional_chat_templates" / "rag.jinja").is_file()  # the copy is whole
