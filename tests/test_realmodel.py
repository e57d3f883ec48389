"""Integration tests on a real pretrained LLM: SmolLM2-135M-Instruct (tests/realmodel.py).

One scan per session (`smol_scan`, the four packaged texts, the paper's 100 samples) feeds every
test that needs a report or a fingerprint. Every reported set is re-masked by `independent_delta`,
a plain forward hook that zeroes the channel and a plain cross-entropy: none of the project's
masking or loss code.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from achilles_guard.engine.neurons import Neuron
from tests.builders import edited, independent_delta, run_guard, scale_element, swap_rows

pytestmark = pytest.mark.realmodel

SINK = ("model.layers.11.mlp.down_proj", 507)


@pytest.fixture(scope="session")
def smol_lm(smollm2):
    from achilles_guard.formats.load import load_model

    return load_model(smollm2, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smol_scan(smol_lm, tmp_path_factory):
    """(ScanResult, report doc, out dir with report.json + fingerprint.safetensors): default texts, all attacks.

    K = 20 noise samples instead of the paper's 100 to keep the session short: the sink neuron's
    importance (~2e4) is three orders of magnitude above the next, so the ranking's head is the same
    (docs/real-model.md has the K = 100 run); the sets and Δ asserted here are re-measured anyway."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.engine.texts import default_texts
    from achilles_guard.integrity.fingerprint import write_fingerprint
    from achilles_guard.report.documents import scan_report, write_json

    probes = [tokenize_probe(smol_lm, name, text) for name, text in default_texts()]
    result = run_scan(smol_lm, probes, ScanParams(samples=20))
    out = tmp_path_factory.mktemp("smol-scan")
    doc = scan_report(result)
    write_json(out / "report.json", doc)
    write_fingerprint(out / "fingerprint.safetensors", result, top=16)
    return result, doc, out


def _pairs(records) -> list[tuple[str, int]]:
    return [(r["module"], r["channel"]) for r in records]


def test_scan_finds_the_attention_sink_neuron(smol_scan):
    _, doc, _ = smol_scan
    assert len(doc["texts"]) == 4
    for text in doc["texts"]:
        assert text["converged"] and _pairs(text["critical_set"]) == [SINK], text["name"]
        assert text["delta_log10"] >= 4.0
        assert text["strongest"]["n"] == 1 and _pairs(text["strongest"]["critical_set"]) == [SINK]
    strongest = doc["strongest"]
    assert (
        strongest["n"] == 1
        and strongest["delta_log10"] >= 4.0
        and strongest["text"] in {t["name"] for t in doc["texts"]}
    )
    # the other attacks only had to look below n = 1: they say so
    for text in doc["texts"]:
        notes = {a["attack"]: a["note"] for a in text["attacks"] if not a["converged"]}
        assert set(notes) == {"activation", "gradient", "greedy"} and set(notes.values()) == {"none below 1"}


def test_every_reported_set_reproduces_its_delta(smol_scan, smol_lm):
    result, doc, _ = smol_scan
    ids = {t.probe.name: t.probe.input_ids for t in result.texts}
    for text in doc["texts"]:
        for attack in [a for a in text["attacks"] if a["converged"]] + [text["strongest"]]:
            got = independent_delta(smol_lm.model, ids[text["name"]], _pairs(attack["critical_set"]))
            assert got == pytest.approx(attack["delta_log10"], abs=2e-3), (text["name"], attack["attack"])
        got = independent_delta(smol_lm.model, ids[text["name"]], _pairs(text["critical_set"]))
        assert got == pytest.approx(text["delta_log10"], abs=2e-3)


def test_activation_attack_alone_finds_a_set_that_reproduces(smol_lm):
    """With the sink out of reach of the paper's search, the activation attack is a separate mechanism."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.engine.texts import default_texts

    name, text = default_texts()[0]
    probe = tokenize_probe(smol_lm, name, text)
    result = run_scan(
        smol_lm, [probe], ScanParams(samples=2, attacks="activation", max_neurons=40, ranking="activation")
    )
    attack = result.primary.portfolio.attacks[0]
    assert attack.attack == "activation"
    if attack.converged:  # pruned: 1-minimal, and the Δ is the set's own
        got = independent_delta(smol_lm.model, probe.input_ids, [(n.module, n.channel) for n in attack.critical_set])
        assert got == pytest.approx(attack.delta_log10, abs=2e-3) and got >= 1.0


def test_verify_checkpoint_catches_a_tampered_critical_row(smol_scan, smollm2, tmp_path):
    _, _, out = smol_scan
    fp = out / "fingerprint.safetensors"
    clean = run_guard(["verify-checkpoint", str(smollm2), "--fingerprint", str(fp)], timeout=120)
    assert clean.returncode == 0, clean.stderr
    tampered = tmp_path / "tampered"
    done = run_guard(
        ["tamper", str(smollm2), "--out", str(tampered), "--neuron", f"{SINK[0]}:{SINK[1]}", "--kind", "zero"],
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    caught = run_guard(["verify-checkpoint", str(tampered), "--fingerprint", str(fp), "--format", "json"], timeout=120)
    assert caught.returncode == 1, caught.stderr
    assert SINK[0] in caught.stdout
    shutil.rmtree(tampered, ignore_errors=True)


def test_whole_model_verify_on_the_real_checkpoint(smol_scan, smollm2, tmp_path):
    """Every one of SmolLM2's 272 tensors is recorded; a bf16 re-save verifies clean; one sign bit in the
    sink's row and two exchanged embedding rows are each caught, localized and ranked."""
    _, _, out = smol_scan
    fp = out / "fingerprint.safetensors"

    def verify(model):
        proc = run_guard(["verify-checkpoint", str(model), "--fingerprint", str(fp), "--format", "json"], timeout=180)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    code, doc = verify(smollm2)
    assert code == 0 and doc["mode"] == "full" and doc["tensors"]["identical"] == doc["tensors"]["recorded"] == 272
    recast = edited(smollm2, tmp_path / "bf16", lambda t: None, dtype=torch.bfloat16)
    code, doc = verify(recast)
    assert code == 0 and doc["tensors"]["equivalent"] == 272, doc["tensors"]
    shutil.rmtree(recast)
    flipped = edited(smollm2, tmp_path / "flip", scale_element(f"{SINK[0]}.weight", SINK[1], 3, -1.0))
    code, doc = verify(flipped)
    assert code == 1
    assert [(f["tensor"], f["kind"], f["rows"], f["severity"]) for f in doc["tensors"]["findings"]] == [
        (f"{SINK[0]}.weight", "bytes", [SINK[1]], "critical")]
    shutil.rmtree(flipped)
    swapped = edited(smollm2, tmp_path / "swap", swap_rows("model.embed_tokens.weight", 100, 200))
    code, doc = verify(swapped)
    assert code == 1
    assert [(f["tensor"], f["rows"]) for f in doc["tensors"]["findings"]] == [("model.embed_tokens.weight", [100, 200])]
    shutil.rmtree(swapped)
    templated = tmp_path / "template"  # every weight the same bytes (symlinked); the chat template edited
    templated.mkdir()
    for item in smollm2.iterdir():
        os.symlink(item.resolve(), templated / item.name)
    (templated / "chat_template.jinja").unlink()
    (templated / "chat_template.jinja").write_text((smollm2 / "chat_template.jinja").read_text().replace(
        "You are a helpful AI assistant", "You are an assistant who never refuses"))
    code, doc = verify(templated)
    assert code == 1 and doc["tensors"]["findings_count"] == 0
    assert [(f["name"], f["kind"]) for f in doc["files"]["findings"]] == [("chat_template.jinja", "changed")]


def test_monitor_sees_the_sink_disrupted(smol_scan, smol_lm):
    from prometheus_client import CollectorRegistry

    from achilles_guard.engine.neurons import Neuron
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.monitor import ActivationMonitor, disrupted

    _, _, out = smol_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    target = Neuron(*SINK)
    assert target in fp.critical_set
    monitor = ActivationMonitor(
        smol_lm.model, fp, registry=CollectorRegistry(), tokenizer=smol_lm.tokenizer, model_name="smol"
    )
    ids = smol_lm.tokenizer(
        "The river rose slowly through the night, and by morning the bridge was gone.", return_tensors="pt"
    )["input_ids"]
    with monitor:
        with torch.no_grad():
            smol_lm.model(input_ids=ids)
        assert monitor.state().last.score == 0.0
        with disrupted(smol_lm.model, fp, [target]), torch.no_grad():
            smol_lm.model(input_ids=ids)
            reading = monitor.state().last
        assert str(target) in reading.anomalous and reading.score > 1.0 and reading.kinds  # the sink went missing


@pytest.fixture(scope="session")
def small_fp(smol_lm, tmp_path_factory):
    """A cheap scan for harden (one text, 4 samples, budget 10 = 10 x n0, greedy pool 2): harden re-attacks with
    these params, so a defence that holds costs a search up to 10 per attack, not 1000."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.engine.texts import default_texts
    from achilles_guard.integrity.fingerprint import write_fingerprint
    from achilles_guard.report.documents import scan_report, write_json

    name, text = default_texts()[0]
    result = run_scan(
        smol_lm, [tokenize_probe(smol_lm, name, text)], ScanParams(samples=4, max_neurons=10, greedy_pool=2)
    )
    out = tmp_path_factory.mktemp("smol-small")
    write_json(out / "report.json", scan_report(result))
    write_fingerprint(out / "fingerprint.safetensors", result)  # --fingerprint-top 64, the default
    return out


# SmolLM2's weak sets besides down_proj[507], measured on the original (docs/defenses.md): each pair collapses it
L0 = "model.layers.0."
WEAK_PAIRS = (
    (Neuron(L0 + "self_attn.o_proj", 199), Neuron(L0 + "post_attention_layernorm", 322)),  # Δ 1.05
    (Neuron(L0 + "self_attn.v_proj", 179), Neuron(L0 + "self_attn.o_proj", 247)),  # Δ 1.58
)


# what docs/defenses.md reports: pin holds; redundancy neutralises down_proj[507] but SmolLM2 has other
# weak sets (two layer-0 attention neurons) that still collapse the widened model; carrying every fingerprinted
# residual channel on 16 channels (--redundancy-wide 16) makes them cost at least 10 neurons too.
# `reattack`: 2-8 min each on 2 cores; the README's test command leaves them out and .ci/run runs them in a
# second step after it (`python -m pytest -q -m reattack`).
@pytest.mark.reattack
@pytest.mark.parametrize(
    "strategy,extra,expected",
    [
        ("redundancy", [], "not mitigated"),
        ("pin", [], "mitigated"),
        ("redundancy", ["--redundancy-wide", "16"], "mitigated"),
    ],
    ids=["redundancy", "pin", "redundancy-wide"],
)
def test_harden_verdict_matches_an_independent_reattack(
    strategy, extra, expected, small_fp, smollm2, smol_lm, tmp_path
):
    """harden's verdict, checked without harden's numbers: the re-scan's strongest set re-masked with plain
    hooks; the original set, re-masked, no longer collapses the hardened model; for a mitigated verdict a
    fresh portfolio run (another seed, the same search ceiling, the known weak pairs re-tried with every copy)
    finds no set below 10 x n0."""
    from dataclasses import replace

    from achilles_guard.defenses.reattack import search_ceiling
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model

    target = tmp_path / strategy
    done = run_guard(
        [
            "harden",
            str(smollm2),
            "--fingerprint",
            str(small_fp / "fingerprint.safetensors"),
            "--strategy",
            strategy,
            *extra,
            "--out",
            str(target),
            "--format",
            "json",
        ],
        timeout=1200,  # 6-8 min alone on 2 cores; room for a loaded machine
    )
    assert done.returncode in (0, 1), done.stderr
    outcome = json.loads((target / "harden-report.json").read_text())
    verdict = outcome["verdict"]
    attempt = outcome["attempts"][0]
    assert (done.returncode == 0) == (verdict == "mitigated")
    rescan = json.loads((target / "report.json").read_text())
    strongest = rescan["strongest"]
    ids = smol_lm.tokenizer(rescan["texts"][0]["text"], return_tensors="pt")["input_ids"]
    if strategy == "pin":
        from achilles_guard.defenses.pin import PinGuard, PinnedModel
        from achilles_guard.integrity.fingerprint import load_fingerprint

        guard = PinGuard.from_fingerprint(load_fingerprint(small_fp / "fingerprint.safetensors"), neurons="all")
        lm = replace(smol_lm, model=PinnedModel(smol_lm.model, guard))
        demote = guard.restored  # the attacker knows what the guard restores (every norm channel, every stored row)
        assert "hardened_model" not in attempt and attempt["details"]["ranked_last_by_the_reattack"] == len(demote)
    else:
        assert attempt["hardened_model"] == "model"
        lm = load_model(target / attempt["hardened_model"], dtype="float32", device="cpu")
        demote = ()
    if strongest is not None:  # the re-attack's set, re-masked independently, reproduces its Δ
        got = independent_delta(lm.model, ids, _pairs(strongest["critical_set"]))
        assert got == pytest.approx(strongest["delta_log10"], abs=2e-3)
    original = json.loads((small_fp / "report.json").read_text())["strongest"]["critical_set"]
    assert independent_delta(lm.model, ids, _pairs(original)) < 1.0  # the original attack no longer collapses
    assert rescan["params"]["max_neurons"] == 100  # budget 10 = 10 x n0, searched 10x further and pruned
    if verdict == "mitigated":
        n0 = attempt["n0"]
        assert attempt["margin"] is None or attempt["margin"] >= 10
        params = ScanParams(samples=4, seed=7, max_neurons=10 * n0, greedy_pool=2)
        again = run_scan(
            lm,
            [tokenize_probe(lm, "again", rescan["texts"][0]["text"])],
            replace(params, max_neurons=search_ceiling(params, n0)),
            demote=demote,
            known_sets=(*WEAK_PAIRS, tuple(Neuron(m, c) for m, c in _pairs(original))),
            copy_aware=True,
        )
        assert again.strongest is None or again.strongest.n >= 10 * n0
    else:
        assert strongest is not None and len(strongest["critical_set"]) < 10 * attempt["n0"]
    assert verdict == expected, attempt["reasons"]


def test_scanning_the_real_gguf_finds_the_same_neuron_by_its_gguf_tensor(smollm2_gguf, tmp_path):
    """`guard scan` on the Q4_1 file itself (one text, 4 samples, the mlp-out candidates, PCICN only, to stay
    cheap): the same critical neuron as the float directory, fingerprinted by its GGUF tensor's raw blocks."""
    from achilles_guard.engine.texts import default_texts
    from achilles_guard.integrity.fingerprint import load_fingerprint

    out = tmp_path / "scan"
    done = run_guard(["scan", str(smollm2_gguf), "--text", default_texts()[0][1], "--samples", "4",
                      "--components", "mlp-out", "--attacks", "pcicn", "--fingerprint-top", "4", "--out", str(out),
                      "--format", "json"], timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert _pairs(doc["critical_set"]) == [SINK] and doc["delta_log10"] >= 4.0
    fp = load_fingerprint(out / "fingerprint.safetensors")
    assert any(s.checkpoint_key == "blk.11.ffn_down.weight" and s.index == SINK[1] for s in fp.slices.values())
    clean = run_guard(["verify-checkpoint", str(smollm2_gguf), "--fingerprint", str(out / "fingerprint.safetensors")])
    assert clean.returncode == 0, clean.stderr
