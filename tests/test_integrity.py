"""Whole-model verification (achilles_guard.integrity): every loaded tensor is covered by default.

Each edit a write-access attacker could make, alone, on the planted model: caught, with the right
tensor, rows, kind and severity. Benign re-saves (bf16/fp16/fp32, 3 shards) verify clean; a re-cast
that also carries an edit is caught; `--quick` keeps the slice-only check and says what it skips;
an old fingerprint is `incomplete`; a hostile fingerprint is exit 2 with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from typer.testing import CliRunner

from achilles_guard.cli import app
from tests.builders import edited, halve_column, negate, reshard, run_guard, scale_element, swap_rows, tiny_gguf

runner = CliRunner()


def verify_json(model: Path, fp: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify-checkpoint", str(model), "--fingerprint", str(fp), "--format", "json",
                                 *extra])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
UP1, Q1, O2 = "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", \
    "model.layers.2.self_attn.o_proj.weight"

# name -> (edit, tensor, changed rows (None: every row), severity): the five kinds the issue found to pass
EDITS = {
    "embedding rows swapped": (swap_rows(EMBED, 3, 7), EMBED, [3, 7], "other"),
    "up_proj negated": (negate(UP1), UP1, None, "ranked"),
    "one sign bit": (scale_element(O2, 5, 9, -1.0), O2, [5], "ranked"),
    "one exponent bit (x 2^40)": (scale_element(O2, 5, 9, 2.0**40), O2, [5], "ranked"),
    "q_proj rows swapped": (swap_rows(Q1, 0, 1), Q1, [0, 1], "ranked"),
    "lm_head column halved": (halve_column(LM_HEAD, 3), LM_HEAD, None, "other"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_each_edit_alone_is_caught_with_tensor_rows_severity(planted_scan, tmp_path, name):
    path, _, out = planted_scan
    edit, tensor, rows, severity = EDITS[name]
    code, doc = verify_json(edited(path, tmp_path / "m", edit), out / "fingerprint.safetensors")
    assert code == 1 and doc["verdict"] == "tampered" and doc["mode"] == "full"
    findings = doc["tensors"]["findings"]
    assert [(f["tensor"], f["kind"]) for f in findings] == [(tensor, "bytes")], findings
    f = findings[0]
    total = f["rows_total"]
    assert f["rows"] == (rows if rows is not None else list(range(min(total, 32))))
    assert f["rows_changed"] == (len(rows) if rows is not None else total)
    # the rankings of the planted scan hold every channel of the linear outputs it ranks; the embedding
    # and lm_head rows are no neuron: severity follows what the changed rows touch
    assert f["severity"] == severity
    assert doc["tensors"]["present"] == doc["tensors"]["recorded"] == doc["tensors"]["identical"] + 1


def test_the_slice_check_alone_misses_them_and_quick_says_so(planted_scan, tmp_path):
    path, _, out = planted_scan
    edit, *_ = EDITS["embedding rows swapped"]
    model = edited(path, tmp_path / "m", edit)
    code, doc = verify_json(model, out / "fingerprint.safetensors", "--quick")
    assert code == 0 and doc["verdict"] == "intact" and doc["mode"] == "quick" and doc["tensors"] is None
    # the quick check states exactly how many of the loaded tensors (and bytes) it skipped
    from achilles_guard.formats.source import open_source
    from achilles_guard.integrity.fingerprint import load_fingerprint

    fp = load_fingerprint(out / "fingerprint.safetensors")
    covered = {r.checkpoint_key for r in fp.slices.values()} | {
        rec["checkpoint_key"] for rec in json.loads(fp.metadata["norms"]).values()}
    with open_source(model) as src:
        rest = [e for e in src.entries if e.name not in covered]
        assert 0 < len(rest) < len(src.entries)
        expected = (f"{len(rest)} of the {len(src.entries)} loaded tensors hold none of them and were not read "
                    f"({sum(e.nbytes for e in rest):,} of {sum(e.nbytes for e in src.entries):,} bytes)")
    assert expected in doc["not_checked"], doc["not_checked"]
    table = runner.invoke(app, ["verify-checkpoint", str(model), "--fingerprint", str(out / "fingerprint.safetensors"),
                                "--quick"])
    words = " ".join(table.stdout.split())  # the table wraps at the terminal's width
    assert table.exit_code == 0 and "not checked: quick: " in words and expected in words, words
    assert ("verdict: INTACT (quick: the critical weight slices and the 3 tokenizer/template/generation files match; "
            "the rest of the model was not checked)") in words
    # the full check (default) finds the swap; no fingerprinted neuron changed, and the verdict says only what did
    table = runner.invoke(app, ["verify-checkpoint", str(model), "--fingerprint", str(out / "fingerprint.safetensors")])
    words = " ".join(table.stdout.split())
    assert table.exit_code == 1
    assert "verdict: TAMPERED (1 tensor finding(s): 0 critical, 0 ranked, 1 other)" in words, words


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_resaves_and_reshards_verify_clean(planted_scan, tmp_path, dtype):
    path, _, out = planted_scan
    model = reshard(path, tmp_path / "m", shards=3, dtype=dtype)
    code, doc = verify_json(model, out / "fingerprint.safetensors")
    assert code == 0 and doc["verdict"] == "intact", doc["tensors"]["findings"]
    t = doc["tensors"]
    assert t["present"] == t["recorded"] and t["findings_count"] == 0
    if dtype == torch.float32:  # the planted model is fp32: a re-shard is byte-identical
        assert t["identical"] == t["recorded"] and t["sketched"] == 0
    else:
        assert t["equivalent"] == t["recorded"] and t["sketched"] == t["recorded"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["one sign bit", "embedding rows swapped", "q_proj rows swapped"])
def test_recast_plus_edit_is_caught_beyond_rounding(planted_scan, tmp_path, dtype, name):
    path, _, out = planted_scan
    edit, tensor, rows, _ = EDITS[name]
    code, doc = verify_json(edited(path, tmp_path / "m", edit, dtype=dtype), out / "fingerprint.safetensors")
    assert code == 1
    findings = doc["tensors"]["findings"]
    assert [(f["tensor"], f["kind"], f["rows"]) for f in findings] == [(tensor, "beyond-rounding", rows)]
    assert doc["tensors"]["equivalent"] == doc["tensors"]["recorded"] - 1


def test_recast_halved_column_is_localized_to_many_rows(planted_scan, tmp_path):
    path, _, out = planted_scan
    code, doc = verify_json(edited(path, tmp_path / "m", halve_column(LM_HEAD, 3), dtype=torch.bfloat16),
                            out / "fingerprint.safetensors")
    (f,) = doc["tensors"]["findings"]
    # rows whose element 3 is below the row's rounding noise cannot be told apart from a re-cast
    assert code == 1 and f["tensor"] == LM_HEAD and f["kind"] == "beyond-rounding"
    assert f["rows_changed"] >= f["rows_total"] // 2


def test_missing_extra_reshaped_and_dtype(planted_scan, tmp_path):
    path, _, out = planted_scan
    norm = "model.layers.0.input_layernorm.weight"

    def edit(t):
        del t[EMBED]
        t["model.layers.0.mlp.backdoor.weight"] = torch.ones(4, 4)
        t[norm] = t[norm].reshape(2, -1).contiguous()
        t[Q1] = t[Q1].to(torch.int8)

    code, doc = verify_json(edited(path, tmp_path / "m", edit), out / "fingerprint.safetensors")
    kinds = {f["tensor"]: f["kind"] for f in doc["tensors"]["findings"]}
    assert code == 1 and kinds == {EMBED: "missing", "model.layers.0.mlp.backdoor.weight": "extra",
                                   norm: "reshaped", Q1: "dtype"}
    severities = {f["tensor"]: f["severity"] for f in doc["tensors"]["findings"]}
    assert severities[norm] == "critical"  # a scanned norm


def test_sarif_and_table_carry_the_same_fields(planted_scan, tmp_path):
    path, _, out = planted_scan
    model = edited(path, tmp_path / "m", scale_element(O2, 5, 9, -1.0))
    args = ["verify-checkpoint", str(model), "--fingerprint", str(out / "fingerprint.safetensors")]
    sarif = runner.invoke(app, [*args, "--format", "sarif"])
    run = json.loads(sarif.stdout)["runs"][0]
    (result,) = run["results"]
    assert sarif.exit_code == 1 and result["ruleId"] == "AG120"
    assert result["properties"] == {"tensor": O2, "kind": "bytes", "severity": "ranked", "rows": [5],
                                    "rows_changed": 1, "file": "model.safetensors"}
    table = runner.invoke(app, args)
    assert table.exit_code == 1 and "TAMPERED" in table.stdout
    assert all(s in table.stdout for s in ("o_proj", "ranked", "bytes"))


def test_one_slice_fingerprint_still_catches_the_zeroed_critical_set(planted, tmp_path):
    """The issue's case: a fingerprint of one slice, the paper's 3-neuron set zeroed: the default exits 1."""
    path, critical = planted
    scan = run_guard(["scan", str(path), "--out", str(tmp_path / "scan"), "--fingerprint-top", "0",
                      "--max-neurons", "1", "--samples", "5"])
    assert scan.returncode in (0, 1), scan.stderr
    fp = tmp_path / "scan" / "fingerprint.safetensors"
    with safe_open(str(fp), framework="np") as handle:
        assert len([k for k in handle.keys() if k.startswith("slices/")]) <= 2
    down = "model.layers.0.mlp.down_proj.weight"
    channels = sorted(n.channel for n in critical)

    def zero(t):
        t[down][channels] = 0

    model = edited(path, tmp_path / "zeroed", zero)
    proc = run_guard(["verify-checkpoint", str(model), "--fingerprint", str(fp), "--format", "json"])
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["verdict"] == "tampered"
    (f,) = [f for f in doc["tensors"]["findings"] if f["tensor"] == down]
    # the one fingerprinted slice is elsewhere (gate_proj): the zeroed rows are in the stored rankings
    assert f["rows"] == channels and f["severity"] == "ranked"


def _rewrite(fp: Path, dst: Path, *, metadata=None, tensors=None) -> Path:
    with safe_open(str(fp), framework="np") as handle:
        meta = dict(handle.metadata())
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    if metadata:
        metadata(meta)
    if tensors:
        tensors(arrays)
    save_numpy(arrays, str(dst), metadata=meta)
    return dst


def test_old_fingerprint_without_records_is_incomplete_not_intact(planted_scan, tmp_path):
    path, _, out = planted_scan
    old = _rewrite(out / "fingerprint.safetensors", tmp_path / "old.safetensors",
                   metadata=lambda m: m.pop("tensors"), tensors=lambda a: a.pop("tensors/sketch"))
    code, doc = verify_json(path, old)
    assert code == 1 and doc["verdict"] == "incomplete" and "not checked" in doc["not_checked"] or \
        "were not" in doc["not_checked"]
    assert code == 1 and doc["verdict"] == "incomplete"
    table = runner.invoke(app, ["verify-checkpoint", str(path), "--fingerprint", str(old)])
    assert table.exit_code == 1 and "INCOMPLETE" in table.stdout and "INTACT" not in table.stdout
    assert verify_json(path, old, "--quick")[0] == 0  # the user may accept a slice-only check, by name


def _records_edit(fn):
    def metadata(m):
        doc = json.loads(m["tensors"])
        fn(doc)
        m["tensors"] = json.dumps(doc)
    return metadata


HOSTILE = {
    "absurd rows": (_records_edit(lambda d: d["records"][0].__setitem__(2, [2**40, 2**40])), None),
    "digest of the wrong size": (_records_edit(lambda d: d["records"][0].__setitem__(4, "ab" * 8)), None),
    "sketch of the wrong length": (None, lambda a: a.__setitem__("tensors/sketch", a["tensors/sketch"][:-3])),
    "sketch of the wrong width": (None, lambda a: a.__setitem__("tensors/sketch", np.zeros((4, 3), np.float32))),
    "records not JSON": (lambda m: m.__setitem__("tensors", "{not json"), None),
    "negative offset row": (_records_edit(lambda d: d["records"][1].__setitem__(5, -5)), None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_fingerprint_exit_2_one_line(planted_scan, tmp_path, name):
    path, _, out = planted_scan
    metadata, tensors = HOSTILE[name]
    bad = _rewrite(out / "fingerprint.safetensors", tmp_path / "bad.safetensors", metadata=metadata, tensors=tensors)
    proc = run_guard(["verify-checkpoint", str(path), "--fingerprint", str(bad)], timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err and "\n" not in err and "Traceback" not in err, (name, proc.stderr)


def test_signed_records_are_authenticated(planted_scan, tmp_path):
    path, _, out = planted_scan
    key = str(out / "key")
    code, doc = verify_json(path, out / "signed.safetensors", "--verify-key", key)
    assert code == 0 and doc["tensors"]["projections_checked"] is True
    # keyed projections (HMAC(key, nonce)) judge a re-cast that carries an edit
    recast = edited(path, tmp_path / "m", scale_element(O2, 5, 9, -1.0), dtype=torch.bfloat16)
    code, doc = verify_json(recast, out / "signed.safetensors", "--verify-key", key)
    assert code == 1 and [(f["tensor"], f["rows"]) for f in doc["tensors"]["findings"]] == [(O2, [5])]
    # without the key the secret projections are skipped: public projections, abs sum, L2 norm
    code, doc = verify_json(recast, out / "signed.safetensors")
    assert code == 1 and doc["tensors"]["projections_checked"] is False
    forged = _rewrite(out / "signed.safetensors", tmp_path / "forged.safetensors",
                      tensors=lambda a: a.__setitem__("tensors/sketch", a["tensors/sketch"] * 1.5))
    proc = run_guard(["verify-checkpoint", str(path), "--fingerprint", str(forged), "--verify-key", key])
    # a forged signed fingerprint is a signature failure: exit 1 (as test_cli_verify), one line
    assert proc.returncode == 1 and "signature mismatch" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


# --- GGUF: byte-identical or a different model ---


@pytest.fixture(scope="module")
def gguf_scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-int")
    model = tiny_gguf(root / "tiny.gguf", "Q8_0")
    proc = run_guard(["scan", str(model), "--out", str(root / "scan"), "--samples", "3", "--max-neurons", "8"])
    assert proc.returncode in (0, 1), proc.stderr
    return model, root / "scan" / "fingerprint.safetensors"


def test_gguf_copy_intact_requantized_and_flipped(gguf_scan, tmp_path):
    model, fp = gguf_scan
    copy = tmp_path / "copy.gguf"
    shutil.copy2(model, copy)
    code, doc = verify_json(copy, fp)
    assert code == 0 and doc["tensors"]["identical"] == doc["tensors"]["recorded"] > 0

    requant = tiny_gguf(tmp_path / "q4.gguf", "Q4_0")
    code, doc = verify_json(requant, fp)
    kinds = {f["kind"] for f in doc["tensors"]["findings"]}
    assert code == 1 and kinds == {"requantized"}
    assert "different model" in doc["tensors"]["findings"][0]["detail"]

    from achilles_guard.formats.source import open_source

    with open_source(copy) as src:
        entry = next(e for e in src.entries if e.name == "blk.1.ffn_up.weight")
        row_bytes = entry.nbytes // entry.rows
        where = entry.offset + 5 * row_bytes + 7  # a byte inside the 6th stored row
    flipped = tmp_path / "flipped.gguf"
    data = bytearray(copy.read_bytes())
    data[where] ^= 0x40
    flipped.write_bytes(bytes(data))
    code, doc = verify_json(flipped, fp)
    (f,) = doc["tensors"]["findings"]
    assert code == 1 and f["tensor"] == "blk.1.ffn_up.weight" and f["kind"] == "bytes" and f["rows"] == [5]
