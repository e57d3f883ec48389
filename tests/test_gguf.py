"""GGUF: slices read from blocks, scan -> fingerprint -> verify / tamper / repair on tiny GGUFs written by
gguf.GGUFWriter (tests/builders.tiny_gguf), cross-format verification, and bad input (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.builders import run_guard, run_guard_all, scanned, tiny_gguf

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
    from achilles_guard.formats.load import load_model

    root = tmp_path_factory.mktemp("float")
    lm = load_model(ggufs["F32"], dtype="float32", device="cpu")
    lm.model.save_pretrained(root / "float", safe_serialization=True)
    lm.tokenizer.save_pretrained(root / "float")
    return scanned(root / "float", root / "scan", text=TEXT, samples=4, attacks="pcicn")


@pytest.mark.parametrize("qtype", TYPES)
def test_slices_read_from_blocks_equal_what_transformers_loads(ggufs, qtype):
    from transformers import AutoModelForCausalLM

    from achilles_guard.formats.gguf import dequantize_slice, read_layout

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
    from achilles_guard.formats.gguf import BLOCKS_SUFFIX, gguf_records
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.integrity.verify import verify_slices

    fp = load_fingerprint(gguf_scan / "fingerprint.safetensors")
    meta = gguf_records(fp)
    assert meta and set(meta["slices"]) == set(fp.slices)
    for key, record in fp.slices.items():
        assert key.startswith(("blk.", "token_embd", "output")) and record.checkpoint_key == key.split("@")[0]
        assert record.dtype in ("Q4_1", "F32") and fp.tensors[key + BLOCKS_SUFFIX].dtype == torch.uint8
    report = verify_slices(ggufs["Q4_1"], fp)
    assert report.ok and report.counts["intact"] == len(fp.slices)
    assert report.bytes_read - report.header_bytes == sum(
        len(s["runs"]) and sum(n for _, n in s["runs"]) for s in meta["slices"].values()
    )


@pytest.mark.parametrize(
    "kind,expected", [("zero", "zeroed"), ("scale", "scaled"), ("sign-flip", "sign-flipped"), ("noise", None)]
)
def test_tamper_is_caught_and_repaired(gguf_scan, ggufs, tmp_path, kind, expected):
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.integrity.gguf_tamper import repair_gguf, select_gguf_targets, tamper_gguf
    from achilles_guard.integrity.tamper import TamperKind
    from achilles_guard.integrity.verify import verify_slices

    src, fp_path = ggufs["Q4_1"], gguf_scan / "fingerprint.safetensors"
    fp = load_fingerprint(fp_path)
    targets = select_gguf_targets(src, fp_path, [], None)
    before = src.read_bytes()
    bad = tamper_gguf(src, tmp_path / "bad.gguf", targets, kind=TamperKind(kind).value, scale=0.9, noise=0.1)
    assert src.read_bytes() == before and bad.stat().st_size == src.stat().st_size
    report = verify_slices(bad, fp)
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
    assert verify_slices(tmp_path / "fixed.gguf", fp).ok


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16"])
def test_safetensors_fingerprint_verifies_an_honest_quantization(ggufs, float_scan, tmp_path, qtype):
    """A fingerprint of the float model (F32 GGUF saved as safetensors) calls its quantizations equivalent,
    and still catches zero and scale 0.9 on them."""
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.integrity.gguf_tamper import select_gguf_targets, tamper_gguf
    from achilles_guard.integrity.verify import verify_slices

    out = float_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    report = verify_slices(ggufs[qtype], fp)
    assert report.ok, [(v.key, v.describe()) for v in report.tampered_slices]
    assert report.counts["equivalent"] + report.counts["intact"] == len(fp.slices)
    targets = select_gguf_targets(ggufs[qtype], out / "fingerprint.safetensors", [], None)
    for kind, status in (("zero", "zeroed"), ("scale", "scaled")):
        bad = tamper_gguf(ggufs[qtype], tmp_path / f"{kind}.gguf", targets, kind=kind, scale=0.9)
        caught = verify_slices(bad, fp)
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
    for (args, needle), done in zip(cases, run_guard_all([args for args, _ in cases], timeout=120)):
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


# --- every model command on a .gguf: eval, study, generate, monitor, harden (in process: CliRunner) ---


@pytest.fixture(scope="session")
def f32_scan(ggufs, tmp_path_factory):
    """A scan of the F32 GGUF (the float directory's weights) with float_scan's parameters, but a budget of 40
    masks (n* is 34): harden's re-attack, which re-runs every attack with the scan's budget, stays cheap."""
    return scanned(
        ggufs["F32"], tmp_path_factory.mktemp("f32-scan"), text=TEXT, samples=4, attacks="pcicn", max_neurons=40
    )


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from achilles_guard.cli import app

    return CliRunner().invoke(app, args)


def _json_out(result) -> dict:
    assert result.exit_code == 0, (result.exit_code, result.output, repr(result.exception))
    return json.loads(result.stdout)


def test_scan_of_f32_gguf_finds_the_float_models_critical_set(f32_scan, float_scan):
    gguf_doc = json.loads((f32_scan / "report.json").read_text())
    float_doc = json.loads((float_scan / "report.json").read_text())
    assert gguf_doc["model"]["path"].endswith("tiny-F32.gguf") and gguf_doc["converged"]
    names = [[(c["module"], c["channel"]) for c in d["critical_set"]] for d in (gguf_doc, float_doc)]
    assert names[0] == names[1] and gguf_doc["n_star"] == float_doc["n_star"] > 0
    assert gguf_doc["baseline"]["loss"] == pytest.approx(float_doc["baseline"]["loss"], rel=1e-5)


def test_eval_study_generate_on_gguf_equal_the_float_model(ggufs, f32_scan, float_scan, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join([TEXT] * 3))
    float_dir = float_scan.parent / "float"
    models = {"gguf": (str(ggufs["F32"]), f32_scan), "float": (str(float_dir), float_scan)}
    docs = {}
    for kind, (model, scan) in models.items():
        report = str(scan / "report.json")
        docs[kind, "eval"] = _json_out(
            _cli(["eval", model, "--report", report, "--data", str(corpus), "--levels", "0,1,n*", "--format", "json"])
        )
        docs[kind, "generate"] = _json_out(
            _cli(["generate", model, "--report", report, "--prompt", "The heat is", "--max-new-tokens", "3",
                  "--top-k", "3", "--format", "json"])
        )
        docs[kind, "study"] = _json_out(
            _cli(["study", "scale", model, "--report", report, "--text", TEXT, "--out", str(tmp_path / kind),
                  "--format", "json"])
        )
    gguf_eval, float_eval = docs["gguf", "eval"], docs["float", "eval"]
    assert gguf_eval["model"]["path"] == str(ggufs["F32"]) and gguf_eval["data"] == float_eval["data"]
    assert gguf_eval["baseline"]["ppl"] == pytest.approx(float_eval["baseline"]["ppl"], rel=1e-4)
    assert [lv["n"] for lv in gguf_eval["levels"]] == [lv["n"] for lv in float_eval["levels"]] == [0, 1, 34]
    for a, b in zip(gguf_eval["levels"], float_eval["levels"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)
    assert gguf_eval["levels"][-1]["delta_log10"] > 0.5  # masking the critical set still hurts on the GGUF
    gen = docs["gguf", "generate"]
    assert gen["model"] == str(ggufs["F32"]) and gen["answers"] == docs["float", "generate"]["answers"]
    assert [[t["id"] for t in lv["top"]] for lv in gen["topk"]["levels"]] == [
        [t["id"] for t in lv["top"]] for lv in docs["float", "generate"]["topk"]["levels"]
    ]
    study = docs["gguf", "study"]
    assert study["model"]["path"] == str(ggufs["F32"]) and (tmp_path / "gguf" / "study-scale.json").is_file()
    assert [r["beta"] for r in study["rows"]] == [r["beta"] for r in docs["float", "study"]["rows"]]
    for a, b in zip(study["rows"], docs["float", "study"]["rows"]):
        assert a["delta_log10"] == pytest.approx(b["delta_log10"], rel=1e-4, abs=1e-6)


def test_monitor_one_shot_on_gguf_clean_protected_and_tampered(ggufs, f32_scan, tmp_path):
    from achilles_guard.integrity.fingerprint import load_fingerprint

    fp = str(f32_scan / "fingerprint.safetensors")
    n = len(load_fingerprint(fp).slices)
    base = ["--fingerprint", fp, "--iterations", "1", "--interval", "0.01"]
    clean = _cli(["monitor", str(ggufs["F32"]), *base, "--protect"])
    assert clean.exit_code == 0, clean.output
    assert f"{n} slices hashed, 0 changed" in clean.stdout and "pin guard on" in clean.stdout
    assert "tiny-F32.gguf" in clean.stdout
    bad = tmp_path / "zeroed.gguf"
    done = _cli(["tamper", str(ggufs["F32"]), "--out", str(bad), "--neurons", fp, "--kind", "zero"])
    assert done.exit_code == 0, done.output
    caught = _cli(["monitor", str(bad), *base])
    assert caught.exit_code == 1 and "ALERT" in caught.stdout
    assert f"{n} slices hashed, 0 changed" not in caught.stdout and "changed: blk." in caught.stdout


def test_harden_pin_on_gguf_runs_the_runtime_guard(ggufs, f32_scan, tmp_path):
    out = tmp_path / "pin"
    fp = str(f32_scan / "fingerprint.safetensors")
    res = _cli(["harden", str(ggufs["F32"]), "--fingerprint", fp, "--strategy", "pin", "--out", str(out),
                "--format", "json"])
    assert res.exit_code in (0, 1), (res.output, repr(res.exception))
    doc = json.loads((out / "harden-report.json").read_text())
    assert doc == json.loads(res.stdout) and doc["model"] == str(ggufs["F32"])
    attempt = doc["attempts"][0]
    assert attempt["strategy"] == "pin" and "hardened_model" not in attempt and not (out / "model").exists()
    assert attempt["clean_cost_probe"] == 0.0 and doc["verdict"] == ("mitigated" if res.exit_code == 0 else
                                                                      "not mitigated")
    # the GGUF fingerprint carries what the exact rule needs: the critical set and every norm are recomputed
    from achilles_guard.integrity.fingerprint import load_fingerprint

    critical = {str(n) for n in load_fingerprint(fp).critical_set}
    assert critical and critical <= set(attempt["details"]["exact"]) and attempt["details"]["exact_norms"]


def test_harden_weight_strategy_on_gguf_writes_a_safetensors_directory(ggufs, f32_scan, tmp_path):
    """A weight-level defence cannot write GGUF: its hardened checkpoint is a plain HF safetensors directory
    (config + tokenizer) that from_pretrained loads, computing what the GGUF computes (rotate: same function)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ggufs["F32"]
    before = src.read_bytes()
    out = tmp_path / "rotate"
    fp = str(f32_scan / "fingerprint.safetensors")
    res = _cli(["harden", str(src), "--fingerprint", fp, "--strategy", "rotate", "--out", str(out), "--format", "json"])
    assert res.exit_code in (0, 1), (res.output, repr(res.exception))
    doc = json.loads(res.stdout)
    assert doc["model"] == str(src) and doc["attempts"][0]["hardened_model"] == "model"
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    assert not list(model_dir.glob("*.gguf")) and src.read_bytes() == before
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    hardened = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    original = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name).eval()
    tok, gguf_tok = AutoTokenizer.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(
        str(src.parent), gguf_file=src.name
    )
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(TEXT, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert hardened(ids, labels=ids).loss.item() == pytest.approx(original(ids, labels=ids).loss.item(), rel=1e-4)
    assert (out / "fingerprint.safetensors").is_file() and (out / "report.json").is_file()


def test_truncated_gguf_is_one_line_exit_2_for_every_model_command(ggufs, f32_scan, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(ggufs["F32"].read_bytes()[:20000])
    report, fp, t = str(f32_scan / "report.json"), str(f32_scan / "fingerprint.safetensors"), str(truncated)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out"
    cases = [
        ["eval", t, "--report", report, "--data", str(corpus)],
        ["generate", t, "--report", report, "--prompt", "hi"],
        ["study", "scale", t, "--report", report, "--out", str(out)],
        ["monitor", t, "--fingerprint", fp, "--iterations", "1"],
        ["harden", t, "--fingerprint", fp, "--strategy", "rotate", "--out", str(out)],
        ["harden", str(tmp_path / "missing.gguf"), "--fingerprint", fp, "--strategy", "pin", "--out", str(out)],
    ]
    for args in cases:
        res = _cli(args)
        err = (res.stderr or "").strip()
        assert res.exit_code == 2 and "\n" not in err and "Traceback" not in err, (args, res.exit_code, err)
        assert ("truncated GGUF" if "missing" not in args[1] else "no such file") in err, (args, err)
    assert not out.exists()


def test_vocabulary_string_lengths_are_bounds_checked(ggufs, tmp_path):
    """The header parser skips the vocabulary by its length prefixes only: a prefix that runs past the file, or
    a count larger than the strings there, is a truncated header (InputError), never a read past the end."""
    import struct

    from achilles_guard.errors import InputError
    from achilles_guard.formats.gguf import read_layout

    data = ggufs["Q4_0"].read_bytes()
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key)
    etype, count = struct.unpack_from("<IQ", data, at + 4)
    assert etype == 8 and count > 200
    first = at + 4 + 4 + 8  # value type, element type, count; then the first string's u64 length
    with read_layout(ggufs["Q4_0"]) as layout:
        assert layout.metadata["tokenizer.ggml.tokens"] == ("array", 8, count)
    for offset, value in ((first, 1 << 40), (first, len(data)), (at + 8, count + 10**6)):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, offset, value)
        path = tmp_path / "bad.gguf"
        path.write_bytes(bytes(bad))
        with pytest.raises(InputError, match="truncated|corrupt"):
            read_layout(path).close()


def test_monitor_serves_a_gguf_model(ggufs, f32_scan):
    """`guard monitor model.gguf --serve`: healthy, completions name the GGUF, metrics carry its name as label."""
    from tests.builders import Server

    srv = Server([str(ggufs["F32"]), "--fingerprint", str(f32_scan / "fingerprint.safetensors"), "--serve"])
    try:
        status, health = srv.request("GET", "/healthz")
        assert status == 200 and health["integrity_ok"] and health["canary_ok"], health
        doc = srv.complete("The heat is", max_tokens=3)
        assert doc["model"] == "tiny-F32.gguf" and doc["usage"]["completion_tokens"] == 3
        srv.scrape()
        assert 'model="tiny-F32.gguf"' in srv.last_scrape
    finally:
        code, log = srv.stop()
    assert code == 0, log


def test_hardened_gguf_is_saved_in_its_float_type_else_float32(ggufs):
    """A weight-level defence saves a GGUF's hardened copy as safetensors: F16 matrices stay float16, F32 and
    quantized ones (saved as their dequantized values) float32."""
    from achilles_guard.defenses.base import stored_dtype

    expected = {"F32": torch.float32, "F16": torch.float16, "Q8_0": torch.float32, "Q4_0": torch.float32}
    assert {q: stored_dtype(ggufs[q]) for q in expected} == expected


def test_one_parse_per_load_gives_the_same_model(ggufs, monkeypatch):
    """The load parses the file once (transformers alone would build three readers) and the model,
    tokenizer and config are exactly those of the uncached path."""
    from contextlib import nullcontext

    import gguf

    import achilles_guard.formats.load as load

    built = []
    real_reader = gguf.GGUFReader

    class Counting(real_reader):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    once = load.load_model(ggufs["Q4_1"], dtype="float32", device="cpu")
    assert len(built) == 1 and gguf.GGUFReader is Counting  # one parse, and the module is put back
    monkeypatch.setattr(load, "_parse_once", nullcontext)
    built.clear()
    plain = load.load_model(ggufs["Q4_1"], dtype="float32", device="cpu")
    assert len(built) >= 2  # what transformers does by itself (so the count above can fail)
    a, b = once.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert once.model.config.to_dict() == plain.model.config.to_dict()
    text = "The lighthouse keeper wrote in his log"
    assert once.tokenizer(text)["input_ids"] == plain.tokenizer(text)["input_ids"]
