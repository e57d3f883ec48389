"""The attention-sink fixture (tests/sink.py, plant_attention_sink) and what each defence does on it.

Measured facts asserted here (deterministic: Hadamard rotation, seeded PCICN, CPU float32):
PCICN finds exactly the planted 3 residual channels; rotation does NOT mitigate (a single rotated
channel collapses the model: the sink still holds but the BOS value is no longer zero, and every
position copies it); pin restores every guarded neuron exactly (its weights are in the fingerprint) and
holds against an attacker who knows what it guards; split cannot protect residual channels; redundancy
protects the massive channels but not the sink heads, and redundancy + head duplication needs k > 288.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import replace

import pytest
import torch

from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.defenses.reattack import losses, original_attack_delta
from achilles_guard.engine.masking import MaskPlan, hooks, masked
from achilles_guard.engine.neurons import Neuron
from achilles_guard.engine.scan import tokenize_probe
from achilles_guard.formats.load import load_model
from tests.builders import PROBE, independent_delta, run_guard, scanned
from tests.sink import SINK_PLANT, build_sink_model

CRITICAL = tuple(sorted(SINK_PLANT.critical_set(), key=lambda n: n.channel))


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    root = tmp_path_factory.mktemp("sink")
    model_dir = build_sink_model(root / "model")
    lm = load_model(model_dir)
    ids = tokenize_probe(lm, "probe", PROBE).input_ids  # (1, T), BOS first
    scan_dir = scanned(model_dir, root / "scan", samples=20)
    return root, model_dir, lm, ids, scan_dir


def _down_proj(lm, ids, plan=None):
    seen = {}
    ctx = masked(lm.model, plan) if plan else torch.no_grad()
    with (
        torch.no_grad(),
        ctx,
        hooks(lm.model, {CRITICAL[0].module: lambda o: seen.__setitem__("a", o.detach().clone())}),
    ):
        lm.model(input_ids=ids)
    return seen["a"][0]  # (T, d)


def _sink_attention(model_dir, ids, plan=None) -> torch.Tensor:
    """Attention of every query t >= 1 to position 0 in each sink head of layers 1..; (layers, heads)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ctx = masked(model, plan) if plan else torch.no_grad()
    with torch.no_grad(), ctx:
        att = model(input_ids=ids, output_attentions=True).attentions
    heads = list(SINK_PLANT.sink_heads)
    return torch.stack([a[0, heads, 1:, 0].mean(-1) for a in att[SINK_PLANT.layer + 1 :]])


def test_massive_activation_only_at_the_first_position_and_fp16_safe(sink):
    _, _, lm, ids, _ = sink
    assert int(ids[0, 0]) == lm.tokenizer.bos_token_id  # the tokenizer prepends BOS, like Llama's
    a = _down_proj(lm, ids)
    channels = list(SINK_PLANT.channels)
    assert (a[0, channels].abs() > 500).all() and (a[0, channels].abs() < 65504).all()
    assert a[1:].abs().max() < 1.0  # nowhere else
    off = torch.ones(a.shape[1], dtype=torch.bool)
    off[channels] = False
    assert a[0, off].abs().max() < 1.0


def test_no_norm_weight_is_scaled(sink):
    _, _, lm, _, _ = sink
    norms = {n: p for n, p in lm.model.named_parameters() if "norm" in n}
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms.values())


def test_later_heads_use_the_first_token_as_a_sink_and_lose_it_without_the_massive_set(sink):
    _, model_dir, _, ids, _ = sink
    assert (_sink_attention(model_dir, ids) > 0.99).all()
    spread = _sink_attention(model_dir, ids, MaskPlan.fixed(CRITICAL, 0.0))
    assert (spread < 0.2).all()  # uniform over the context instead


def test_clean_model_beats_uniform_and_only_the_full_set_collapses_it(sink):
    _, _, lm, ids, _ = sink
    assert losses(lm.model, [ids])[0] < math.log(lm.model.config.vocab_size) - 0.3
    for k in (1, 2):
        for subset in itertools.combinations(CRITICAL, k):
            assert abs(original_attack_delta(lm.model, ids, subset)) < 0.05, subset
    assert original_attack_delta(lm.model, ids, CRITICAL) > 5.0


def test_pcicn_finds_exactly_the_planted_set(sink):
    _, _, _, _, scan_dir = sink
    doc = json.loads((scan_dir / "report.json").read_text())
    assert doc["converged"] and doc["n_star"] == 3
    assert {(c["module"], c["channel"]) for c in doc["critical_set"]} == {(n.module, n.channel) for n in CRITICAL}


def test_rotation_does_not_mitigate_the_sink_fixture(sink):
    """Real CLI. Measured: n* 3 -> 5 on PROBE with 20 samples (3 -> 1 on the default texts with 50
    samples): far below the 10x that would count as mitigation; clean cost ~0; exit 1."""
    root, model_dir, lm, ids, scan_dir = sink
    out = root / "rotate"
    proc = run_guard(["harden", str(model_dir), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                      "--strategy", "rotate", "--out", str(out), "--format", "json"])
    assert proc.returncode == 1, proc.stderr
    attempt = json.loads(proc.stdout)["attempts"][0]
    assert attempt["verdict"] == "not mitigated"
    assert attempt["after"]["converged"] and attempt["after"]["n_star"] < 10 * len(CRITICAL)
    assert attempt["clean_cost_probe"] < 1e-4 and attempt["clean_cost_held_out"] < 1e-4
    # why: the rotated set leaves the sink standing in layer 1 but makes the BOS value non-zero
    found = tuple(
        Neuron(c["module"], c["channel"]) for c in json.loads((out / "report.json").read_text())["critical_set"]
    )
    assert {n.module for n in found} == {CRITICAL[0].module}  # rotated channels of the same projection
    attention = _sink_attention(out / "model", ids, MaskPlan.fixed(found, 0.0))
    assert (attention[0] > 0.99).all()
    rotated = load_model(out / "model")
    values = {}
    with (
        torch.no_grad(),
        masked(rotated.model, MaskPlan.fixed(found, 0.0)),
        hooks(
            rotated.model, {"model.layers.1.self_attn.v_proj": lambda o: values.__setitem__("v", o.detach().clone())}
        ),
    ):
        rotated.model(input_ids=ids)
    assert values["v"][0, 0].abs().max() > 0.05  # the BOS value every position copies (0 exactly when clean)


def test_split_does_not_mitigate_the_sink_fixture(sink):
    root, model_dir, _, _, scan_dir = sink
    outcome = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "split", root / "split"))
    attempt = outcome.attempts[0]
    v = attempt.verification
    assert v.verdict == "not mitigated"
    assert v.after.n_star == 3 and v.original_attack_after is not None and v.original_attack_after > 5.0
    assert any("residual-stream channels" in note for note in attempt.details["notes"])


def _margin_scan(sink):
    """A scan whose budget is exactly 10 x n0 (n0 = 1: greedy's upstream unit), so a defence that holds
    costs a search up to 10 per attack in the re-attack, not 100."""
    root, model_dir, _, _, _ = sink
    target = root / "scan-margin"
    return target if (target / "report.json").is_file() else scanned(model_dir, target, max_neurons=10, greedy_pool=8)


def test_position_aware_pin_mitigates_the_sink_fixture_and_an_independent_reattack_agrees(sink):
    """The guard restores the first-position value of every fingerprinted neuron that has one (the
    massive channels, the sink keys) and the always-on ones (the sink queries); harden says mitigated,
    and a re-attack with another seed, plain hooks and plain cross-entropy finds no set below 10 x n0."""
    from achilles_guard.defenses.pin import PinGuard, PinnedModel
    from achilles_guard.engine.scan import ScanParams, run_scan
    from achilles_guard.integrity.fingerprint import load_fingerprint

    root, model_dir, lm, ids, _ = sink
    scan_dir = _margin_scan(sink)
    outcome = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "pin", root / "pin"))
    attempt = outcome.attempts[0]
    v = attempt.verification
    assert set(map(str, CRITICAL)) <= set(attempt.details["exact"]) | set(attempt.details["first_position"])
    assert v.verdict == "mitigated" and v.clean_cost == 0.0, v.reasons
    assert v.margin is None or v.margin >= 10
    n0 = v.n0
    guard = PinGuard.from_fingerprint(load_fingerprint(scan_dir / "fingerprint.safetensors"), neurons="all")
    pinned = PinnedModel(lm.model, guard)
    with torch.no_grad():  # bit-identical when nothing is attacked
        assert torch.equal(lm.model(input_ids=ids).logits, pinned(input_ids=ids).logits)
    # the attacker knows what the guard restores and spends no budget on it (every norm channel, every
    # fingerprinted row): without that, the unfingerprinted layers.0.post_attention_layernorm[1] collapses it alone
    assert attempt.details["ranked_last_by_the_reattack"] == len(guard.restored) > 0
    again = run_scan(replace(lm, model=pinned), [tokenize_probe(lm, "again", PROBE)],
                     ScanParams(samples=10, seed=7, max_neurons=10 * n0, greedy_pool=16), demote=guard.restored)
    assert again.strongest is None  # no attack of the portfolio collapses it below 10 x n0
    before = json.loads((scan_dir / "report.json").read_text())["strongest"]["critical_set"]

    original = [(c["module"], c["channel"]) for c in before]
    assert independent_delta(lm.model, ids, original) > 5  # the bare model collapses
    assert abs(independent_delta(pinned, ids, original)) < 0.01  # the guarded one does not


def test_redundancy_protects_the_massive_channels_but_not_the_sink_heads(sink):
    """Measured: the 3 massive channels carried by 32 channels each and the writing unit split in 32 make
    PCICN need many more neurons, function-preserving (cost ~0), but one sink head's query row (an
    attention input, not a residual channel) still collapses the fixture alone: not mitigated."""
    root, model_dir, _, _, _ = sink
    scan_dir = _margin_scan(sink)
    outcome = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "redundancy", root / "red"))
    attempt = outcome.attempts[0]
    v = attempt.verification
    assert attempt.details["channels"] and attempt.details["units"] == {"0": [3]}
    assert v.clean_cost < 1e-4 and v.original_attack_after is not None and v.original_attack_after < 0.01
    assert v.after.max_neurons == 100  # the re-attack searches 10 x the margin it must show
    assert v.after.n_star is None or v.after.n_star > 10  # PCICN needs more than 10 (3 before)
    assert v.verdict == "not mitigated" and v.after.strongest_n == 1
    assert attempt.hardened_model == root / "red" / "model"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AG_SLOW_TESTS") != "1",
                    reason="~6 min of CPU (a 770-wide model re-attacked twice); AG_SLOW_TESTS=1 runs it "
                    "(docs/defenses.md gives the measurement)")
def test_redundancy_plus_head_duplication_mitigates_and_an_independent_reattack_agrees(sink):
    """Weight-level: redundancy carries the massive channels on 32 channels each, then `heads` replaces every
    fingerprinted head (the sink heads of layers 1-3, found by the redundancy re-scan) by 384 copies. Measured:
    one broken copy's share is 1/k and the fixture collapses at a share of about 1/32, so k must exceed
    32 x 9 for no set below 10 to collapse it. harden says mitigated; a re-attack of the checkpoint loaded
    with plain from_pretrained, another seed and a budget of exactly 10 x n0 finds no collapsing set, and
    the original sets (and the sink head's query row that collapses the redundancy model alone) no longer
    collapse it under plain hooks."""
    from transformers import AutoModelForCausalLM

    from achilles_guard.engine.scan import ScanParams, run_scan

    root, model_dir, lm, ids, _ = sink
    scan_dir = _margin_scan(sink)
    outcome = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "redundancy+heads",
                                   root / "rh", head_copies=384))
    attempt = outcome.attempts[0]
    v = attempt.verification
    assert attempt.details["heads"]["groups"] == {"1": [0, 1], "2": [0, 1], "3": [0, 1]}
    assert [s["verdict"] for s in attempt.steps] == ["not mitigated", "mitigated"], attempt.steps
    assert v.verdict == "mitigated" and v.clean_cost < 1e-4, v.reasons
    n0 = v.n0
    hardened_dir = root / "rh" / "heads" / "model"
    assert attempt.hardened_model == hardened_dir
    plain = AutoModelForCausalLM.from_pretrained(hardened_dir, dtype=torch.float32).eval()
    assert plain.config.num_attention_heads > 384  # the checkpoint really holds the copies
    hardened = replace(load_model(hardened_dir), model=plain)
    before = json.loads((scan_dir / "report.json").read_text())
    sets = [before["strongest"]["critical_set"], before["critical_set"]]
    slow = 16 // 2 - 1  # the sink heads' query row (head 0 of layer 3): what collapsed the redundancy model alone
    sets.append([{"module": "model.layers.3.self_attn.q_proj", "channel": slow}])
    known = tuple(tuple(Neuron(c["module"], c["channel"]) for c in found) for found in sets)
    again = run_scan(hardened, [tokenize_probe(hardened, "again", PROBE)],  # copy-aware, the known sets re-tried
                     ScanParams(samples=10, seed=7, max_neurons=10 * n0, greedy_pool=16), known_sets=known,
                     copy_aware=True)
    assert again.strongest is None  # no attack of the portfolio collapses it below 10 x n0
    for found in sets:
        neurons = [(c["module"], c["channel"]) for c in found]
        assert independent_delta(lm.model, ids, neurons) > 5  # collapses the original
        assert abs(independent_delta(plain, ids, neurons)) < 0.1  # not the hardened checkpoint
