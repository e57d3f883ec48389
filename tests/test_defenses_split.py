"""split: exact function preservation; an intermediate-unit critical set is mitigated; residual channels are not."""

from __future__ import annotations

import pytest
import torch

from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.defenses.split import SplitPlan, plan_split, split_model
from achilles_guard.engine.demo import Plant
from achilles_guard.engine.neurons import Neuron, discover
from achilles_guard.errors import UsageError
from tests.builders import PROBE, planted_model, scanned, tiny_model, tokenizer


def test_split_preserves_the_function_exactly():
    model = tiny_model("llama")
    ids = tokenizer()(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    plan = SplitPlan(4, {0: (1, 5, 9), 1: (2,)}, (), (), {})
    width = split_model(model, plan)
    assert width == 64 + 3 * 3 and model.config.intermediate_size == width
    assert model.model.layers[1].mlp.gate_proj.out_features == width  # padded with zero units
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-5 * before.abs().max()


def test_copies_below_two_are_refused():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="--copies"):
        plan_split(model, (Neuron("model.layers.0.mlp.act_fn", 1),), discover(model).by_name(), copies=1)


def test_intermediate_unit_critical_set_is_mitigated(tmp_path):
    # a large gate/up gain makes the planted unit itself massive: scanning MLP units finds it alone
    path, _ = planted_model(tmp_path / "m", Plant(gain=40.0))
    scan_dir = scanned(path, tmp_path / "scan", components="re:act_fn")
    outcome = harden(
        HardenRequest(path, scan_dir / "fingerprint.safetensors", None, "split", tmp_path / "out", copies=16)
    )
    v = outcome.attempts[0].verification
    assert v.before.n_star == 1
    assert v.original_attack_before >= 1 and v.original_attack_after < 1  # the original mask no longer collapses
    assert v.after.n_star >= 10  # the attacker now needs every copy
    assert outcome.verdict == "mitigated" and outcome.attempts[0].details["protects_all"]


def test_residual_channel_critical_set_is_reported_as_not_protected(planted, tmp_path):
    path, _ = planted
    scan_dir = scanned(path, tmp_path / "scan")
    outcome = harden(
        HardenRequest(path, scan_dir / "fingerprint.safetensors", None, "split", tmp_path / "out", copies=4)
    )
    details = outcome.attempts[0].details
    assert not details["protects_all"] and "residual-stream channels" in details["notes"][0]
    assert outcome.verdict == "not mitigated"
    assert outcome.attempts[0].verification.original_attack_after >= 1
