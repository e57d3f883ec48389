"""Red-team cases of the security model (docs/security.md): each promise and the test that checks it.

Every bad input exits 2 with one line and no traceback; every ambiguity or tampering is a finding
(exit 1); nothing half-written is left behind.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from achilles_guard.cli import app
from tests.builders import reshard

runner = CliRunner()
DOWN = "model.layers.0.mlp.down_proj.weight"


def guard(*args):
    return runner.invoke(app, [*map(str, args)])


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def layouts(planted_scan, tmp_path_factory):
    """(model, zeroed copy, fingerprint path): the planted model and its critical set zeroed by `guard tamper`."""
    path, _, out = planted_scan
    dst = tmp_path_factory.mktemp("sec-zeroed") / "zeroed"
    result = guard("tamper", path, "--out", dst, "--neurons", out / "report.json", "--kind", "zero")
    assert result.exit_code == 0, result.output
    return path, dst, out / "fingerprint.safetensors"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _verify_json(ckpt, fp):
    result = guard("verify-checkpoint", ckpt, "--fingerprint", fp, "--format", "json")
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


# --- item 1: resolve files as the loader does; ambiguity is a finding -------------------------------

def test_stray_backup_of_good_weights_does_not_hide_tampering(layouts, tmp_path):
    """The issue's reproduction: tampered model.safetensors + the original as zz-backup.safetensors."""
    model, zeroed, fp = layouts
    t = _copy(zeroed, tmp_path / "T")
    shutil.copy2(model / "model.safetensors", t / "zz-backup.safetensors")
    result, doc = _verify_json(t, fp)
    assert result.exit_code == 1, result.output
    assert doc["verdict"] == "tampered" and doc["counts"]["zeroed"] > 0
    assert doc["layout"]["loaded_files"] == ["model.safetensors"]
    assert any("zz-backup.safetensors" in a for a in doc["layout"]["ambiguities"])
    table = guard("verify-checkpoint", t, "--fingerprint", fp)
    assert table.exit_code == 1 and "TAMPERED" in table.stdout and "stray file zz-backup" in table.stdout


def test_stray_copy_of_intact_weights_is_ambiguous(layouts, tmp_path):
    """Even when the loaded file is intact, a stray safetensors a person might ship is a finding."""
    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    shutil.copy2(m / "model.safetensors", m / "zz-backup.safetensors")
    result, doc = _verify_json(m, fp)
    assert result.exit_code == 1 and doc["verdict"] == "ambiguous"
    sarif = json.loads(guard("verify-checkpoint", m, "--fingerprint", fp, "--format", "sarif").stdout)
    assert any(r["ruleId"] == "AG107" for r in sarif["runs"][0]["results"])
    assert "AMBIGUOUS" in guard("verify-checkpoint", m, "--fingerprint", fp).stdout


def test_tensor_in_two_shards_is_ambiguous_and_worst_copy_reported(layouts, tmp_path):
    """An extra copy of the zeroed tensor in a second listed shard: both copies judged, finding."""
    model, zeroed, fp = layouts
    s = reshard(model, tmp_path / "S", shards=2)
    index = json.loads((s / "model.safetensors.index.json").read_text())
    home = index["weight_map"][DOWN]
    other = next(f for f in set(index["weight_map"].values()) if f != home)
    with safe_open(str(zeroed / "model.safetensors"), framework="pt") as h:
        bad = h.get_tensor(DOWN)
    with safe_open(str(s / other), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    tensors[DOWN] = bad
    save_file(tensors, str(s / other), metadata={"format": "pt"})
    result, doc = _verify_json(s, fp)
    assert result.exit_code == 1 and doc["verdict"] == "tampered"
    assert any(DOWN in a and "2 loaded files" in a for a in doc["layout"]["ambiguities"])
    assert {x["status"] for x in doc["slices"] if x["param"] == DOWN} == {"zeroed"}


def test_index_next_to_tampered_single_file(layouts, tmp_path):
    """An index (pointing at intact shards) plus a tampered model.safetensors: the loader reads model.safetensors."""
    model, zeroed, fp = layouts
    s = reshard(model, tmp_path / "S", shards=2)
    shutil.copy2(zeroed / "model.safetensors", s / "model.safetensors")
    result, doc = _verify_json(s, fp)
    assert result.exit_code == 1 and doc["verdict"] == "tampered"
    assert doc["layout"]["loaded_files"] == ["model.safetensors"]
    assert any("index.json is ignored" in a for a in doc["layout"]["ambiguities"])


def test_index_that_disagrees_with_files(layouts, tmp_path):
    model, _, fp = layouts
    s = reshard(model, tmp_path / "S", shards=2)
    path = s / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][DOWN] = next(f for f in shards if f != index["weight_map"][DOWN])
    path.write_text(json.dumps(index))
    result, doc = _verify_json(s, fp)
    assert result.exit_code == 1 and doc["verdict"] == "ambiguous"
    assert any("index lists " + DOWN in a for a in doc["layout"]["ambiguities"])


def test_clean_resharded_checkpoint_has_no_ambiguity(layouts, tmp_path):
    model, _, fp = layouts
    s = reshard(model, tmp_path / "S", shards=3)
    result, doc = _verify_json(s, fp)
    assert result.exit_code == 0 and doc["verdict"] == "intact" and doc["layout"]["ambiguities"] == []


def test_verified_bytes_are_the_loaded_bytes(layouts, tmp_path):
    """What verify reads equals what AutoModelForCausalLM.from_pretrained loads, in each layout."""
    from transformers import AutoModelForCausalLM

    from achilles_guard.checkpoint import Checkpoint

    model, zeroed, fp = layouts
    t = _copy(zeroed, tmp_path / "T")
    shutil.copy2(model / "model.safetensors", t / "zz-backup.safetensors")
    s = reshard(model, tmp_path / "S", shards=2)
    shutil.copy2(zeroed / "model.safetensors", s / "model.safetensors")
    for root in (t, s, reshard(model, tmp_path / "R", shards=3)):
        loaded = AutoModelForCausalLM.from_pretrained(str(root)).state_dict()
        with Checkpoint.open(root) as ckpt:
            for name in (DOWN, "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
                assert torch.equal(ckpt.read(name), loaded[name]), (root, name)


def test_no_loadable_file_only_strays(layouts, tmp_path):
    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    (m / "model.safetensors").rename(m / "weights-backup.safetensors")
    result = guard("verify-checkpoint", m, "--fingerprint", fp)
    assert result.exit_code == 2
    assert "would read none" in one_line_error(result)


def test_index_weight_map_list_exit_2(layouts, tmp_path):
    model, _, fp = layouts
    s = reshard(model, tmp_path / "S", shards=2)
    (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    result = guard("verify-checkpoint", s, "--fingerprint", fp)
    assert result.exit_code == 2 and "weight_map" in one_line_error(result)


def test_fifo_weights_file_refused(layouts, tmp_path):
    import os

    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "model.safetensors")
    result = guard("verify-checkpoint", m, "--fingerprint", fp)
    assert result.exit_code == 2 and "regular file" in one_line_error(result)
