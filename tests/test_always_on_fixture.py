"""The always-on fixture (the demo construction, `planted`): the two defences docs/defenses.md calls mitigated on
it, each checked without harden's numbers.

By construction the fixture's single point is the MLP unit `layers.0.mlp.gate_proj[3]`, which reads the constant
residual channel 0 and writes the massive value into 3 residual channels (greedy finds it: n0 = 1). `pin` restores
it exactly; `redundancy` carries the 3 channels on 32 channels each and splits the unit into 32 copies, and
`--redundancy-wide 16` also carries channel 0 on 16 channels, so an attacker has to zero a large share of the
copies. Each test re-attacks the hardened model with the whole portfolio and another seed, re-trying the original
sets with every copy, and re-masks sets with plain hooks (tests.builders.independent_delta).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.defenses.reattack import search_ceiling
from achilles_guard.engine.demo import DEMO_PLANT
from achilles_guard.engine.neurons import Neuron
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.formats.load import load_model
from tests.builders import PROBE, independent_delta, scanned

UNIT = f"model.layers.{DEMO_PLANT.layer}.mlp.gate_proj"


@pytest.fixture(scope="module")
def always_on(planted, tmp_path_factory):
    """(model_dir, loaded model, probe ids, scan dir): a scan with budget 10 = 10 x n0 and a greedy pool of 8."""
    model_dir = planted[0]
    lm = load_model(model_dir)
    ids = tokenize_probe(lm, "probe", PROBE).input_ids
    return model_dir, lm, ids, scanned(model_dir, tmp_path_factory.mktemp("always-on-scan"), max_neurons=10,
                                       greedy_pool=8)


def _original_sets(scan_dir):
    report = json.loads((scan_dir / "report.json").read_text())
    sets = [report["strongest"]["critical_set"], report["critical_set"]]
    return tuple(tuple(Neuron(c["module"], c["channel"]) for c in found) for found in sets)


def _reattack(lm, n0, known, demote=()):
    """The whole portfolio from scratch (seed 7), up to harden's search ceiling, copy-aware, the known sets re-tried."""
    params = ScanParams(samples=10, seed=7, max_neurons=10 * n0, greedy_pool=8)
    return run_scan(lm, [tokenize_probe(lm, "again", PROBE)], replace(params, max_neurons=search_ceiling(params, n0)),
                    demote=demote, known_sets=known, copy_aware=True)


def test_pin_mitigates_and_an_independent_reattack_agrees(always_on, tmp_path):
    from achilles_guard.defenses.pin import PinGuard, PinnedModel
    from achilles_guard.integrity.fingerprint import load_fingerprint

    model_dir, lm, ids, scan_dir = always_on
    attempt = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "pin",
                                   tmp_path / "pin")).attempts[0]
    v = attempt.verification
    assert v.verdict == "mitigated" and v.clean_cost == 0.0 and v.n0 == 1, v.reasons
    guard = PinGuard.from_fingerprint(load_fingerprint(scan_dir / "fingerprint.safetensors"), neurons="all")
    pinned = PinnedModel(lm.model, guard)
    with torch.no_grad():  # bit-identical when nothing is attacked
        assert torch.equal(lm.model(input_ids=ids).logits, pinned(input_ids=ids).logits)
    known = _original_sets(scan_dir)
    for found in known:
        pairs = [(n.module, n.channel) for n in found]
        assert independent_delta(lm.model, ids, pairs) > 5  # collapses the bare model
        assert abs(independent_delta(pinned, ids, pairs)) < 0.01  # not the guarded one
    again = _reattack(replace(lm, model=pinned), v.n0, known, demote=guard.restored)
    assert again.strongest is None or again.strongest.n >= 10 * v.n0, again.strongest


def test_redundancy_wide_mitigates_and_an_independent_reattack_agrees(always_on, tmp_path):
    """One probe text: greedy finds the unit, not the constant channel 0 it reads, so plain `redundancy` carries
    only the 3 massive channels and one norm channel (0) still collapses the model alone (docs/defenses.md).
    `--redundancy-wide 16` also carries every other fingerprinted residual channel, channel 0 among them. The
    checkpoint, loaded with plain from_pretrained, holds 32 copies of the unit and 16 carriers of channel 0 (found
    here by comparing weights, not with copies.py): zeroing 9 of either does not collapse it, zeroing all does,
    and a fresh copy-aware portfolio finds nothing below 10."""
    from transformers import AutoModelForCausalLM

    model_dir, lm, ids, scan_dir = always_on
    attempt = harden(HardenRequest(model_dir, scan_dir / "fingerprint.safetensors", None, "redundancy",
                                   tmp_path / "red", redundancy_wide=16)).attempts[0]
    v = attempt.verification
    assert v.verdict == "mitigated" and v.clean_cost < 1e-4 and v.n0 == 1, v.reasons
    assert v.margin is None or v.margin >= 10
    assert attempt.details["units"] == {"0": [DEMO_PLANT.unit]} and DEMO_PLANT.const_channel in attempt.details["wide"]
    assert attempt.hardened_model == tmp_path / "red" / "model"
    plain = AutoModelForCausalLM.from_pretrained(attempt.hardened_model, dtype=torch.float32).eval()
    gate, up = plain.get_submodule(UNIT).weight, plain.get_submodule(UNIT.replace("gate_proj", "up_proj")).weight
    unit = torch.nonzero((gate == gate[DEMO_PLANT.unit]).all(1) & (up == up[DEMO_PLANT.unit]).all(1)).flatten()
    embed = plain.get_input_embeddings().weight
    const = DEMO_PLANT.const_channel
    carriers = torch.nonzero((embed == embed[:, const:const + 1]).all(0)).flatten()
    assert len(unit) == 32 and len(carriers) == 16
    norm = f"model.layers.{DEMO_PLANT.layer}.post_attention_layernorm"  # what the unit reads
    for module, copies, every in ((UNIT, unit.tolist(), 5), (norm, carriers.tolist(), 5)):
        assert independent_delta(plain, ids, [(module, c) for c in copies[:9]]) < 1.0
        assert independent_delta(plain, ids, [(module, c) for c in copies]) > every
    known = _original_sets(scan_dir)
    for found in known:
        assert abs(independent_delta(plain, ids, [(n.module, n.channel) for n in found])) < 0.1
    again = _reattack(replace(load_model(attempt.hardened_model), model=plain), v.n0, known)
    assert again.strongest is not None and again.strongest.n >= 10 * v.n0, again.strongest  # the copies, found
    got = independent_delta(plain, ids, [(n.module, n.channel) for n in again.strongest.critical_set])
    assert got == pytest.approx(again.strongest.delta_log10, abs=2e-3)
