"""GGUF: slices read from blocks, scan -> fingerprint -> verify / tamper / repair on tiny GGUFs written by
gguf.GGUFWriter (tests/builders.tiny_gguf), cross-format verification, and bad input (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.builders import run_guard, scanned, tiny_gguf

TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
TEXT = "The heat is a test of the system and the heat is on today, as the team said."


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory):
    """{qtype: path}: the same float weights (seed 0) written in every type: honest quantizations of each other."""
    root = tmp_path_factory.mktemp("gguf")
    return {q: tiny_gguf(root / f"tiny-{q}.gguf", q) for q in TYPES}


@pytest.fixture(scope="session")
def gguf_scan(ggufs, tmp_path_factory):
    """A scan of the Q4_1 file: out dir with report.json and a GGUF fingerprint."""
    return scanned(ggufs["Q4_1"], tmp_path_factory.mktemp("gguf-scan"), text=TEXT, samples=4, attacks="pcicn")


@pytest.fixture(scope="session")
def float_scan(ggufs, tmp_path_factory):
    """The F32 GGUF saved as a safetensors directory and scanned: a fingerprint of the float release."""
    from achilles_guard.model import load_model

    root = tmp_path_factory.mktemp("float")
    lm = load_model(ggufs["F32"], dtype="float32", device="cpu")
    lm.model.save_pretrained(root / "float", safe_serialization=True)
    lm.tokenizer.save_pretrained(root / "float")
    return scanned(root / "float", root / "scan", text=TEXT, samples=4, attacks="pcicn")


@pytest.mark.parametrize("qtype", TYPES)
def test_slices_read_from_blocks_equal_what_transformers_loads(ggufs, qtype):
    from transformers import AutoModelForCausalLM

    from achilles_guard.gguf_file import dequantize_slice, read_layout

    path = ggufs[qtype]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    with read_layout(path) as layout:
        for param in [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.input_layernorm.weight",
        ]:
            name = layout.gguf_name(param)
            tensor = state[param]
            for axis in range(tensor.dim()):
                for index in (0, 5, tensor.shape[axis] - 1):
                    where = layout.locate(name, axis, index)
                    got = dequantize_slice(where, layout.read_blocks(where))
                    assert np.array_equal(got, tensor.select(axis, index).numpy()), (param, axis, index)
        assert layout.gguf_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
        assert layout.bytes_read < layout.file_size


def test_scan_fingerprints_gguf_blocks_and_verifies_intact(gguf_scan, ggufs):
    from achilles_guard.fingerprint import load_fingerprint
    from achilles_guard.gguf_integrity import BLOCKS_SUFFIX, gguf_records, verify_gguf

    fp = load_fingerprint(gguf_scan / "fingerprint.safetensors")
    meta = gguf_records(fp)
    assert meta and set(meta["slices"]) == set(fp.slices)
    for key, record in fp.slices.items():
        assert key.startswith(("blk.", "token_embd", "output")) and record.checkpoint_key == key.split("@")[0]
        assert record.dtype in ("Q4_1", "F32") and fp.tensors[key + BLOCKS_SUFFIX].dtype == torch.uint8
    report = verify_gguf(ggufs["Q4_1"], fp)
    assert report.ok and report.counts["intact"] == len(fp.slices)
    assert report.bytes_read - report.header_bytes == sum(
        len(s["runs"]) and sum(n for _, n in s["runs"]) for s in meta["slices"].values()
    )


@pytest.mark.parametrize(
    "kind,expected", [("zero", "zeroed"), ("scale", "scaled"), ("sign-flip", "sign-flipped"), ("noise", None)]
)
def test_tamper_is_caught_and_repaired(gguf_scan, ggufs, tmp_path, kind, expected):
    from achilles_guard.fingerprint import load_fingerprint
    from achilles_guard.gguf_integrity import verify_gguf
    from achilles_guard.gguf_tamper import repair_gguf, select_gguf_targets, tamper_gguf
    from achilles_guard.tamper import TamperKind

    src, fp_path = ggufs["Q4_1"], gguf_scan / "fingerprint.safetensors"
    fp = load_fingerprint(fp_path)
    targets = select_gguf_targets(src, fp_path, [], None)
    before = src.read_bytes()
    bad = tamper_gguf(src, tmp_path / "bad.gguf", targets, kind=TamperKind(kind).value, scale=0.9, noise=0.1)
    assert src.read_bytes() == before and bad.stat().st_size == src.stat().st_size
    report = verify_gguf(bad, fp)
    assert not report.ok
    hit = {v.key: v for v in report.tampered_slices}
    rows = [t for t in targets if t.axis == 0]
    assert rows and all(f"{t.checkpoint_key}@{t.axis}:{t.index}" in hit for t in targets)
    if expected:
        assert {hit[f"{t.checkpoint_key}@0:{t.index}"].status.value for t in rows} == {expected}
    if kind == "scale":
        assert all(abs(hit[f"{t.checkpoint_key}@0:{t.index}"].factor - 0.9) < 2e-3 for t in rows)
    fixed = repair_gguf(bad, fp, tmp_path / "fixed.gguf")
    assert fixed.verified and not fixed.unrepairable
    assert verify_gguf(tmp_path / "fixed.gguf", fp).ok


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16"])
def test_safetensors_fingerprint_verifies_an_honest_quantization(ggufs, float_scan, tmp_path, qtype):
    """A fingerprint of the float model (F32 GGUF saved as safetensors) calls its quantizations equivalent,
    and still catches zero and scale 0.9 on them."""
    from achilles_guard.fingerprint import load_fingerprint
    from achilles_guard.gguf_integrity import verify_gguf
    from achilles_guard.gguf_tamper import select_gguf_targets, tamper_gguf

    out = float_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    report = verify_gguf(ggufs[qtype], fp)
    assert report.ok, [(v.key, v.describe()) for v in report.tampered_slices]
    assert report.counts["equivalent"] + report.counts["intact"] == len(fp.slices)
    targets = select_gguf_targets(ggufs[qtype], out / "fingerprint.safetensors", [], None)
    for kind, status in (("zero", "zeroed"), ("scale", "scaled")):
        bad = tamper_gguf(ggufs[qtype], tmp_path / f"{kind}.gguf", targets, kind=kind, scale=0.9)
        caught = verify_gguf(bad, fp)
        assert not caught.ok
        assert {v.status.value for v in caught.tampered_slices if v.expected_shape and len(v.expected_shape) == 2} <= {
            status,
            "perturbed",
        }


def test_cli_scan_tamper_verify_repair_on_gguf(ggufs, tmp_path):
    src = ggufs["Q4_0"]
    done = run_guard(
        [
            "scan",
            str(src),
            "--text",
            TEXT,
            "--samples",
            "4",
            "--attacks",
            "pcicn",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "json",
        ],
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr
    fp = tmp_path / "out" / "fingerprint.safetensors"
    clean = run_guard(["verify-checkpoint", str(src), "--fingerprint", str(fp), "--format", "json"])
    assert clean.returncode == 0, clean.stderr
    doc = json.loads(clean.stdout)
    assert (
        doc["checkpoint"]["format"] == "gguf" and 0 < doc["checkpoint"]["bytes_read"] < doc["checkpoint"]["file_size"]
    )
    bad = tmp_path / "bad.gguf"
    done = run_guard(["tamper", str(src), "--out", str(bad), "--neurons", str(fp), "--kind", "sign-flip"])
    assert done.returncode == 0, done.stderr
    caught = run_guard(["verify-checkpoint", str(bad), "--fingerprint", str(fp), "--format", "sarif"])
    assert caught.returncode == 1 and "AG103" in caught.stdout
    again = run_guard(["tamper", str(src), "--out", str(bad), "--neurons", str(fp)])
    assert again.returncode == 2 and "already exists" in again.stderr
    fixed = run_guard(["repair", str(bad), "--fingerprint", str(fp), "--out", str(tmp_path / "fixed.gguf")])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_bad_gguf_input_is_one_line_exit_2(ggufs, gguf_scan, tmp_path):
    import gguf

    fp = str(gguf_scan / "fingerprint.safetensors")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(ggufs["Q4_1"].read_bytes()[:20000])
    other = tiny_gguf(tmp_path / "other.gguf", "Q4_1", hidden=96, ffn=160)
    weird = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(weird), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_tensor(
        "blk.0.ffn_down.weight", np.zeros((1, 66), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    alien = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(alien), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = [
        (["verify-checkpoint", str(truncated), "--fingerprint", fp], "truncated"),
        (["scan", str(truncated), "--samples", "2", "--out", str(tmp_path / "o")], "truncated"),
        (["verify-checkpoint", str(other), "--fingerprint", fp], "another model"),
        (["scan", str(weird), "--samples", "2", "--out", str(tmp_path / "o")], "IQ2_XXS"),
        (["scan", str(alien), "--samples", "2", "--out", str(tmp_path / "o")], "rwkv6"),
        (["verify-checkpoint", str(alien), "--fingerprint", fp], "architecture differs"),
    ]
    for args, needle in cases:
        done = run_guard(args, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, done.stderr)
    assert not (tmp_path / "o").exists()


def test_hostile_gguf_bytes_never_crash_verify(ggufs, gguf_scan, tmp_path):
    """Random byte edits (mostly in the header) and truncations of a GGUF: verify-checkpoint answers 0, 1 or 2
    with at most one stderr line, never an internal error or a traceback (seeded: the same 60 files every run)."""
    import random

    from typer.testing import CliRunner

    from achilles_guard.cli import app

    data = ggufs["Q4_0"].read_bytes()
    fp = str(gguf_scan / "fingerprint.safetensors")
    rng, runner, codes = random.Random(0), CliRunner(), {}
    for i in range(60):
        edited = bytearray(data)
        span = min(len(edited), 4096) if i % 2 else len(edited)
        for _ in range(rng.randint(1, 4)):
            edited[rng.randrange(span)] = rng.randrange(256)
        if i % 5 == 0:
            edited = edited[: rng.randrange(len(edited))]
        path = tmp_path / "hostile.gguf"
        path.write_bytes(bytes(edited))
        result = runner.invoke(app, ["verify-checkpoint", str(path), "--fingerprint", fp])
        err = (result.stderr or "").strip()
        assert result.exit_code in (0, 1, 2), (i, result.exit_code, repr(result.exception), err[-400:])
        assert "Traceback" not in err and (result.exit_code != 2 or "\n" not in err), (i, err)
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
    assert codes.get(2, 0) >= 10  # most header edits are refused as input errors
