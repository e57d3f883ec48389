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
from tests.builders import PROBE as PROBE_TEXT
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
    # the critical set's rows were zeroed (the fingerprint also holds other rankings' rows, intact)
    assert {x["status"] for x in doc["slices"] if x["param"] == DOWN and x["critical"]} == {"zeroed"}


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

    from achilles_guard.formats.checkpoint import Checkpoint

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


# --- item 2: 0-slice fingerprints, absurd configs, report/fingerprint written as a pair -------------

def test_zero_slice_fingerprint_refused_on_verify(layouts, tmp_path):
    from safetensors.torch import save

    model, _, fp = layouts
    with safe_open(str(fp), framework="pt") as h:
        meta = dict(h.metadata())
    meta["slices"], meta["neurons"], meta["critical_set"], meta["norms"] = "{}", "[]", "[]", "{}"
    meta.pop("tensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(save({}, metadata=meta))
    result = guard("verify-checkpoint", model, "--fingerprint", empty)
    assert result.exit_code == 2 and "0 slices" in one_line_error(result)


def test_norm_recorded_without_its_tensor_refused(layouts, tmp_path):
    """A fingerprint whose metadata lists a norm weight but whose file lacks the tensor is corrupt, said so."""
    from safetensors.torch import save

    model, _, fp = layouts
    with safe_open(str(fp), framework="pt") as h:
        meta = dict(h.metadata())
        tensors = {k: h.get_tensor(k) for k in h.keys() if not k.startswith("norms/")}
    assert json.loads(meta["norms"]), "the planted scan should record its norms"
    stripped = tmp_path / "stripped.safetensors"
    stripped.write_bytes(save(tensors, metadata=meta))
    result = guard("verify-checkpoint", model, "--fingerprint", stripped)
    assert result.exit_code == 2 and "tensor is missing" in one_line_error(result)


def test_zero_slice_fingerprint_refused_on_write(planted, tmp_path):
    """`--fingerprint-top 0` and no critical set: refuse, and neither report nor fingerprint is written."""
    model, _ = planted
    out = tmp_path / "out"
    result = guard("scan", model, "--text", PROBE_TEXT, "--samples", "2", "--max-neurons", "1", "--epsilon", "50",
                   "--fingerprint-top", "0", "--out", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "0 slices" in one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("layers", [10**9, 4096])
def test_absurd_config_size_refused_before_allocating(layouts, tmp_path, layers):
    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    config = json.loads((m / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (m / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = guard("scan", m, "--out", out, "--samples", "2")
    assert result.exit_code == 2 and "implies at least" in one_line_error(result)
    assert not out.exists()
    tampered = guard("tamper", m, "--out", tmp_path / "t", "--neuron", "model.layers.0.mlp.down_proj:3")
    assert tampered.exit_code == 2 and "implies at least" in one_line_error(tampered)
    assert not (tmp_path / "t").exists()


def test_pickle_model_scan_refused_before_writing(planted, tmp_path):
    """--allow-pickle: the fingerprint reads safetensors only, so the scan refuses up front; nothing written."""
    from transformers import AutoModelForCausalLM

    model, _ = planted
    p = _copy(model, tmp_path / "P")
    torch.save(AutoModelForCausalLM.from_pretrained(str(model)).state_dict(), p / "pytorch_model.bin")
    (p / "model.safetensors").unlink()
    out = tmp_path / "out"
    result = guard("scan", p, "--allow-pickle", "--out", out, "--samples", "2")
    assert result.exit_code == 2 and "nothing was written" in one_line_error(result)
    assert not out.exists()


def test_scan_outputs_published_together_or_not_at_all(planted, tmp_path, monkeypatch):
    """A fault while producing the fingerprint leaves the old pair untouched."""
    import achilles_guard.integrity.fingerprint as fingerprint  # `guard scan` imports it when it runs

    model, _ = planted
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old report")
    (out / "fingerprint.safetensors").write_bytes(b"old fingerprint")

    def boom(*a, **k):
        raise OSError("disk fault while building the fingerprint")

    monkeypatch.setattr(fingerprint, "fingerprint_bytes", boom)
    result = guard("scan", model, "--text", PROBE_TEXT, "--samples", "2", "--out", out, "--device", "cpu")
    assert result.exit_code != 0
    assert (out / "report.json").read_text() == "old report"
    assert (out / "fingerprint.safetensors").read_bytes() == b"old fingerprint"
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.safetensors", "report.json"]


def test_publish_files_reports_exactly_what_was_written(tmp_path, monkeypatch):
    import os

    from achilles_guard.errors import RuntimeFailure
    from achilles_guard.formats import staging

    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(staging.os, "replace", flaky)
    with pytest.raises(RuntimeFailure) as err:
        staging.publish_files(tmp_path / "o", {"report.json": b"r", "fingerprint.safetensors": b"f"})
    assert "written: report.json; unchanged: fingerprint.safetensors" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.json"]  # no staging leftovers


def test_one_staging_helper_everywhere():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "achilles_guard"
    offenders = [str(p) for p in root.rglob("*.py") if p.name != "staging.py" and "mkdtemp(" in p.read_text()]
    assert offenders == []


# --- item 3: bad input is exit 2, one line, and leaves nothing behind ---------------------------------

def _scan_bad(model_dir, tmp_path, *extra):
    out = tmp_path / "out"
    result = guard("scan", model_dir, "--out", out, "--samples", "2", *extra)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert not out.exists(), "a bad-input run must not leave an empty --out"
    return line


def test_config_wrong_type_exit_2(layouts, tmp_path):
    model, _, _ = layouts
    m = _copy(model, tmp_path / "M")
    config = json.loads((m / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (m / "config.json").write_text(json.dumps(config))
    assert "hidden_size must be a positive integer" in _scan_bad(m, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "header-length", "offsets"])
def test_broken_safetensors_exit_2(layouts, tmp_path, damage):
    import struct

    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    f = m / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "header-length":
        f.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    else:
        header = json.loads(raw[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [0, 10**12]
        body = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    _scan_bad(m, tmp_path)
    result = guard("verify-checkpoint", m, "--fingerprint", fp)
    assert result.exit_code == 2 and "not a readable safetensors" in one_line_error(result)


def test_pickle_that_fails_to_unpickle_exit_2(layouts, tmp_path):
    model, _, _ = layouts
    m = _copy(model, tmp_path / "M")
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that is not a pickle")
    _scan_bad(m, tmp_path, "--allow-pickle")


def test_fingerprint_schema_version_not_a_number(layouts, tmp_path):
    from safetensors.torch import save

    model, _, fp = layouts
    with safe_open(str(fp), framework="pt") as h:
        meta = dict(h.metadata())
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    meta["schema_version"] = "one"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(tensors, metadata=meta))
    result = guard("verify-checkpoint", model, "--fingerprint", bad)
    assert result.exit_code == 2 and "schema_version" in one_line_error(result)


def test_tamper_channel_out_of_range_and_noop_scale(layouts, tmp_path):
    model, _, _ = layouts
    out = tmp_path / "t"
    r = guard("tamper", model, "--out", out, "--neuron", "model.layers.0.mlp.down_proj:100000")
    assert r.exit_code == 2 and "out of range" in one_line_error(r) and not out.exists()
    r = guard(
        "tamper", model, "--out", out, "--neuron", "model.layers.0.mlp.down_proj:3", "--kind", "scale", "--scale", "1.0"
    )
    assert r.exit_code == 2 and "1.0" in one_line_error(r) and not out.exists()


@pytest.mark.parametrize("opt", ["--alpha", "--epsilon"])
def test_infinite_alpha_epsilon_rejected_up_front(planted, tmp_path, opt):
    model, _ = planted
    assert "finite" in _scan_bad(model, tmp_path, opt, "inf")


def test_env_key_needs_16_bytes_like_key_files(layouts, tmp_path, monkeypatch):
    model, _, fp = layouts
    monkeypatch.setenv("GUARD_SHORT_KEY", "x")
    result = guard("verify-checkpoint", model, "--fingerprint", fp, "--verify-key", "env:GUARD_SHORT_KEY")
    assert result.exit_code == 2 and "too short" in one_line_error(result)


def test_missing_tokenizer_message_is_complete(planted, tmp_path):
    model, _ = planted
    m = _copy(model, tmp_path / "M")
    for f in list(m.iterdir()):
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    line = _scan_bad(m, tmp_path)
    assert "tokenizer" in line and not line.rstrip().endswith(":") and "(1)" in line


def test_repair_other_architecture_exit_2_nothing_written(layouts, tmp_path):
    from tests.builders import save_model, tiny_model

    _, _, fp = layouts
    other = save_model(tiny_model("gpt2"), tmp_path / "gpt2")
    out = tmp_path / "rep"
    result = guard("repair", other, "--fingerprint", fp, "--out", out)
    assert result.exit_code == 2 and "architecture differs" in one_line_error(result)
    assert not out.exists()


def test_repaired_copy_drops_tamper_marker_and_verifies(layouts, tmp_path):
    model, zeroed, fp = layouts
    assert (zeroed / "TAMPERED_BY_GUARD.json").exists()
    out = tmp_path / "rep"
    result = guard("repair", zeroed, "--fingerprint", fp, "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / "TAMPERED_BY_GUARD.json").exists()
    assert guard("verify-checkpoint", out, "--fingerprint", fp).exit_code == 0


def test_repair_accepts_what_verify_calls_equivalent(layouts, tmp_path):
    """A bf16 re-save: verify says equivalent (exit 0); repair must call it intact, not unrepairable."""
    model, _, fp = layouts
    b = reshard(model, tmp_path / "B", shards=1, dtype=torch.bfloat16)
    v, doc = _verify_json(b, fp)
    assert v.exit_code == 0 and doc["counts"]["equivalent"] > 0
    result = guard("repair", b, "--fingerprint", fp, "--out", tmp_path / "rep", "--format", "json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["counts"]["unrepairable"] == 0 and rep["counts"]["restored"] == 0


# --- what already held, pinned here so it keeps holding ------------------------------------------------

def test_one_ulp_edit_is_caught(layouts, tmp_path):
    model, _, fp = layouts
    m = _copy(model, tmp_path / "M")
    with safe_open(str(m / "model.safetensors"), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    row = tensors[DOWN][11].clone()
    row[0] = torch.nextafter(row[0], torch.tensor(float("inf"), dtype=row.dtype))
    tensors[DOWN][11] = row
    save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    result, doc = _verify_json(m, fp)
    assert result.exit_code == 1 and doc["verdict"] == "tampered"
    assert any(s["status"] == "perturbed" and s["param"] == DOWN for s in doc["slices"])


def test_hmac_catches_altered_metadata(planted_scan, tmp_path):
    from safetensors.torch import save

    path, _, out = planted_scan
    with safe_open(str(out / "signed.safetensors"), framework="pt") as h:
        meta = dict(h.metadata())
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    meta["critical_set"] = "[]"  # an attacker hides the critical set but keeps the old MAC
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(tensors, metadata=meta))
    result = guard("verify-checkpoint", path, "--fingerprint", bad, "--verify-key", out / "key")
    assert result.exit_code == 1 and "HMAC" in result.stderr


def test_tokenizer_auto_map_runs_no_code(planted, tmp_path):
    model, _ = planted
    m = _copy(model, tmp_path / "M")
    sentinel = tmp_path / "PWNED"
    (m / "evil_tok.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\nclass EvilTokenizer: pass\n")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    result = guard("scan", m, "--text", PROBE_TEXT, "--samples", "2", "--out", tmp_path / "out", "--device", "cpu")
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1, 2)
    assert not sentinel.exists(), "tokenizer auto_map code ran"


def test_interrupt_while_staging_leaves_old_outputs(tmp_path):
    """SIGINT (KeyboardInterrupt) during a staged write: the old directory is untouched, no staging left."""
    from achilles_guard.formats.staging import staged_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(target, mode="replace") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
