"""pin: restores a zeroed critical neuron; with no attack the logits are bit-identical."""

from __future__ import annotations

import torch

from achilles_guard.defenses.pin import PinGuard, PinnedModel
from achilles_guard.fingerprint import load_fingerprint
from achilles_guard.model import load_model
from achilles_guard.neurons import producing_slices
from achilles_guard.perplexity import delta_log10, row_losses
from tests.builders import PROBE, scanned


def _loss(model, ids):
    with torch.no_grad():
        return float(row_losses(model(input_ids=ids).logits, ids)[0])


def test_pin_restores_zeroed_critical_weights_and_is_silent_otherwise(planted, tmp_path):
    path, critical = planted
    fp = load_fingerprint(scanned(path, tmp_path / "scan") / "fingerprint.safetensors")
    lm = load_model(path)
    ids = lm.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    guard = PinGuard.from_fingerprint(fp)
    assert critical <= set(guard.restorable)  # the paper's set, plus every portfolio attack's set

    with torch.no_grad():
        clean_logits = lm.model(input_ids=ids).logits
        with guard.installed(lm.model):
            pinned_logits = lm.model(input_ids=ids).logits
    assert torch.equal(clean_logits, pinned_logits) and guard.interventions == 0
    clean = _loss(lm.model, ids)

    with torch.no_grad():  # the attack: zero every producing slice of the critical set in the weights
        for neuron in critical:
            for ws in producing_slices(lm.model, neuron):
                lm.model.get_parameter(ws.param).select(ws.axis, ws.index).fill_(ws.null_value)
    attacked = _loss(lm.model, ids)
    assert delta_log10(attacked, clean) >= 1  # the tamper collapses the bare model
    pinned = _loss(PinnedModel(lm.model, guard), ids)
    assert abs(delta_log10(pinned, clean)) < 0.01  # the guard brings it back within tolerance
    assert guard.interventions == ids.shape[1] * len(critical)  # every position of every neuron, counted
