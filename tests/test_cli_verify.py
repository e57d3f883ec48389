"""`guard verify-checkpoint` and `guard tamper` through the CLI: formats, exit codes, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from achilles_guard.cli import app
from tests.builders import reshard, run_guard

runner = CliRunner()


def verify(*args):
    return runner.invoke(app, ["verify-checkpoint", *map(str, args)])


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def zeroed(planted_scan, tmp_path_factory):
    """The planted model, re-sharded into 3 files, with its critical set zeroed by `guard tamper`."""
    path, _, out = planted_scan
    sharded = reshard(path, tmp_path_factory.mktemp("cli-sharded") / "model", shards=3)
    dst = tmp_path_factory.mktemp("cli-zeroed") / "zeroed"
    result = runner.invoke(app, ["tamper", str(sharded), "--out", str(dst), "--neurons", str(out / "report.json")])
    assert result.exit_code == 0, result.output
    assert "RED-TEAM" in result.stdout and "RED-TEAM" in result.stderr
    return sharded, dst


def test_intact_table_exit_0(planted_scan):
    path, _, out = planted_scan
    result = verify(path, "--fingerprint", out / "fingerprint.safetensors")
    assert result.exit_code == 0, result.output
    assert "INTACT" in result.stdout


def test_tampered_json_names_neuron_and_shard(planted_scan, zeroed):
    _, critical, out = planted_scan
    sharded, dst = zeroed
    result = verify(dst, "--fingerprint", out / "fingerprint.safetensors", "--format", "json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "achilles-guard/verify/v1" and doc["verdict"] == "tampered"
    assert {(n["module"], n["channel"]) for n in doc["tampered_neurons"]} == {(n.module, n.channel) for n in critical}
    shard = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.mlp.down_proj.weight"
    ]
    bad = [s for s in doc["slices"] if s["status"] != "intact"]
    assert {s["status"] for s in bad} == {"zeroed"} and {s["shard"] for s in bad} == {shard}
    marker = json.loads((dst / "TAMPERED_BY_GUARD.json").read_text())
    assert marker["kind"] == "zero" and len(marker["slices"]) == len(critical)
    table = verify(dst, "--fingerprint", out / "fingerprint.safetensors")
    assert (
        table.exit_code == 1
        and "TAMPERED" in table.stdout
        and shard in table.stdout
        and "down_proj[11]" in table.stdout
    )


def test_sarif_rules_severity_and_location(planted_scan, zeroed):
    _, critical, out = planted_scan
    _, dst = zeroed
    result = verify(dst, "--fingerprint", out / "fingerprint.safetensors", "--format", "sarif")
    assert result.exit_code == 1
    run = json.loads(result.stdout)["runs"][0]
    rules = {r["id"]: r for r in run["tool"]["driver"]["rules"]}
    assert {"AG101", "AG102", "AG103", "AG104", "AG105", "AG106", "AG110", "AG111"} <= set(rules)
    assert all(float(r["properties"]["security-severity"]) > 0 for r in rules.values())
    slice_results = [r for r in run["results"] if r["ruleId"] == "AG101"]
    tensor_results = [r for r in run["results"] if r["ruleId"] != "AG101"]
    assert len(slice_results) == len(critical)
    # the full check also reports the tensor whose bytes changed, once, as a critical finding
    assert [r["ruleId"] for r in tensor_results] == ["AG120"]
    assert tensor_results[0]["properties"]["severity"] == "critical"
    assert "model.layers.0.mlp.down_proj.weight" in tensor_results[0]["message"]["text"]
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri.startswith(str(dst)) and uri.endswith(".safetensors")


def test_functional_flag_and_max_delta_log10(planted_scan, zeroed):
    _, _, out = planted_scan
    _, dst = zeroed
    result = verify(dst, "--fingerprint", out / "fingerprint.safetensors", "--functional", "--format", "json")
    assert result.exit_code == 1
    fc = json.loads(result.stdout)["functional"]
    assert fc["delta_log10"] >= 1 and fc["loss_ok"] is False
    assert verify(dst, "--fingerprint", out / "fingerprint.safetensors", "--max-delta-log10", "0").exit_code == 2
    old = verify(dst, "--fingerprint", out / "fingerprint.safetensors", "--tolerance", "0")  # deprecated alias
    assert old.exit_code == 2 and "--tolerance is deprecated" in old.stderr


def test_signature_gate(planted_scan, zeroed, tmp_path):
    path, _, out = planted_scan
    key = out / "key"
    ok = verify(path, "--fingerprint", out / "signed.safetensors", "--verify-key", key)
    assert ok.exit_code == 0, ok.output
    (tmp_path / "wrong").write_bytes(b"not-the-right-key-at-all")
    wrong = verify(path, "--fingerprint", out / "signed.safetensors", "--verify-key", tmp_path / "wrong")
    assert wrong.exit_code == 1 and "HMAC" in one_line_error(wrong)
    unsigned = verify(path, "--fingerprint", out / "fingerprint.safetensors", "--verify-key", key)
    assert unsigned.exit_code == 1 and "not signed" in one_line_error(unsigned)
    raw = bytearray((out / "signed.safetensors").read_bytes())
    raw[-1] ^= 0x80
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    flipped = verify(path, "--fingerprint", tmp_path / "flipped.safetensors", "--verify-key", key)
    assert flipped.exit_code == 1 and "HMAC" in one_line_error(flipped)
    warn = verify(path, "--fingerprint", out / "signed.safetensors")
    assert warn.exit_code == 0 and "not checked" in warn.stderr


def _other_architecture(fp_path, dst):
    with safe_open(str(fp_path), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta.update(model_type="gpt2", architecture="GPT2LMHeadModel", config_sha256="0" * 64)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_bad_inputs_exit_2_one_line(planted_scan, tmp_path):
    path, _, out = planted_scan
    fp = out / "fingerprint.safetensors"
    cases = {}
    cases["no such file"] = verify(path, "--fingerprint", tmp_path / "missing.safetensors")
    cases["architecture differs"] = verify(
        path, "--fingerprint", _other_architecture(fp, tmp_path / "gpt2.safetensors")
    )
    corrupt = shutil.copytree(path, tmp_path / "corrupt")
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[8:16] = b"\xff" * 8  # garbage in the JSON header
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    cases["not a readable safetensors"] = verify(corrupt, "--fingerprint", fp)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    cases["pickle"] = verify(pickled, "--fingerprint", fp)
    sharded = reshard(path, tmp_path / "sharded", shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    cases["missing"] = verify(sharded, "--fingerprint", fp)
    cases["no such directory"] = verify(tmp_path / "nowhere", "--fingerprint", fp)
    bad_fp = tmp_path / "bad.safetensors"
    bad_fp.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases["fingerprint"] = verify(path, "--fingerprint", bad_fp)
    for needle, result in cases.items():
        assert result.exit_code == 2, (needle, result.output)
        assert needle in one_line_error(result), (needle, result.stderr)
        assert result.stdout == ""


def test_tamper_refuses_to_overwrite(planted_scan, tmp_path):
    path, _, out = planted_scan
    before = (path / "model.safetensors").read_bytes()
    same = runner.invoke(app, ["tamper", str(path), "--out", str(path), "--neurons", str(out / "report.json")])
    assert same.exit_code == 2 and "refuses" in one_line_error(same)
    inside = runner.invoke(
        app, ["tamper", str(path), "--out", str(path / "sub"), "--neurons", str(out / "report.json")]
    )
    assert inside.exit_code == 2
    both = runner.invoke(app, ["tamper", str(path), "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "exactly one" in one_line_error(both)
    bad = runner.invoke(app, ["tamper", str(path), "--out", str(tmp_path / "x"), "--neuron", "model.layers.0.nope:3"])
    assert bad.exit_code == 2 and "no module" in one_line_error(bad)
    assert (path / "model.safetensors").read_bytes() == before and not (tmp_path / "x").exists()
    assert not [p for p in path.iterdir() if p.name.startswith(".")]


def test_real_cli_subprocess_tamper_then_verify(planted_scan, tmp_path):
    path, _, out = planted_scan
    dst = tmp_path / "scaled"
    proc = run_guard(["tamper", str(path), "--out", str(dst), "--neuron", "model.layers.0.mlp.down_proj:29",
                      "--kind", "scale", "--scale", "0.25"])
    assert proc.returncode == 0, proc.stderr
    assert "RED-TEAM" in proc.stderr
    proc = run_guard(
        ["verify-checkpoint", str(dst), "--fingerprint", str(out / "fingerprint.safetensors"), "--format", "json"]
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    bad = [s for s in doc["slices"] if s["status"] != "intact"]
    assert len(bad) == 1 and bad[0]["status"] == "scaled" and abs(bad[0]["factor"] - 0.25) < 1e-6
    assert bad[0]["neurons"][0]["channel"] == 29 and bad[0]["shard"] == "model.safetensors"
    proc = run_guard(["verify-checkpoint", str(path), "--fingerprint", str(out / "fingerprint.safetensors")])
    assert proc.returncode == 0 and "INTACT" in proc.stdout
