"""The attention-sink fixture (achilles_guard.demo.plant_attention_sink) and what each defence does on it.

Measured facts asserted here (deterministic: Hadamard rotation, seeded PCICN, CPU float32):
PCICN finds exactly the planted 3 residual channels; rotation does NOT mitigate (a single rotated
channel collapses the model: the sink still holds but the BOS value is no longer zero, and every
position copies it); pin cannot restore a massive value that exists at one position only; split
cannot protect residual channels.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.defenses.reattack import losses, original_attack_delta
from achilles_guard.demo import SINK_PLANT, build_sink_model
from achilles_guard.masking import MaskPlan, hooks, masked
from achilles_guard.model import load_model
from achilles_guard.neurons import Neuron
from achilles_guard.scan import tokenize_probe
from tests.builders import PROBE, run_guard, scanned

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
    with torch.no_grad(), ctx, hooks(lm.model, {CRITICAL[0].module: lambda o: seen.__setitem__("a", o.detach().clone())}):
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
    found = tuple(Neuron(c["module"], c["channel"]) for c in json.loads((out / "report.json").read_text())["critical_set"])
    assert {n.module for n in found} == {CRITICAL[0].module}  # rotated channels of the same projection
    attention = _sink_attention(out / "model", ids, MaskPlan.fixed(found, 0.0))
    assert (attention[0] > 0.99).all()
    rotated = load_model(out / "model")
    values = {}
    with torch.no_grad(), masked(rotated.model, MaskPlan.fixed(found, 0.0)), \
            hooks(rotated.model, {"model.layers.1.self_attn.v_proj": lambda o: values.__setitem__("v", o.detach().clone())}):
        rotated.model(input_ids=ids)
    assert values["v"][0, 0].abs().max() > 0.05  # the BOS value every position copies (0 exactly when clean)


@pytest.mark.parametrize("strategy", ["pin", "split"])
def test_pin_and_split_do_not_mitigate_the_sink_fixture(sink, strategy):
    root, model_dir, _, _, scan_dir = sink
    outcome = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, strategy, root / strategy))
    attempt = outcome.attempts[0]
    v = attempt.verification
    assert v.verdict == "not mitigated"
    assert v.after.n_star == 3 and v.original_attack_after is not None and v.original_attack_after > 5.0
    if strategy == "pin":  # massive at one position only: not "always-on", so only clamped, never restored
        assert attempt.details["restorable"] == [] and len(attempt.details["clamp_only"]) == 3
        assert attempt.details["interventions_during_verification"] == 0
    else:
        assert any("residual-stream channels" in note for note in attempt.details["notes"])
