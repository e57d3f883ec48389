"""rotate: function preservation per family, plain-transformers reload, verdict vs an independent re-scan."""

from __future__ import annotations

import json

import pytest
import torch

from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.defenses.rotate import orthogonal, rotate_model
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.errors import UsageError
from achilles_guard.formats.load import load_model
from tests.builders import PROBE, save_model, scanned, tiny_model, tokenizer


def _ids():
    return tokenizer()(PROBE, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_rotation_preserves_logits_and_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, tie_word_embeddings=True)
    with torch.no_grad():  # non-trivial norm weights so that folding matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    record = rotate_model(model, seed=3)
    assert record.untied
    out = save_model(model, tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.get_output_embeddings().weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        after = reloaded(ids).logits
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    # the rotation really moved the basis: the embeddings are not the originals
    assert not torch.allclose(reloaded.get_input_embeddings().weight, tiny_model(family).get_input_embeddings().weight)


def test_orthogonal_matrices():
    for d, kind in ((64, "hadamard"), (48, "random")):
        q, got = orthogonal(d, seed=1)
        assert got == kind
        assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)


def test_unsupported_family_is_refused():
    with pytest.raises(UsageError, match="pre-norm RMSNorm"):
        rotate_model(tiny_model("gpt2"))


def test_rotate_verdict_agrees_with_an_independent_rescan(planted, tmp_path):
    path, _ = planted
    scan_dir = scanned(path, tmp_path / "scan")
    outcome = harden(HardenRequest(path, scan_dir / "fingerprint.safetensors", None, "rotate", tmp_path / "out"))
    v = outcome.attempts[0].verification
    lm = load_model(tmp_path / "out" / "model")
    independent = run_scan(
        lm, [tokenize_probe(lm, "probe", PROBE)], ScanParams(samples=10, max_neurons=100)
    ).primary.result
    assert v.after.converged == independent.converged and v.after.n_star == independent.n_star
    defeated = not independent.converged or independent.n_star >= 10 * v.before.n_star
    assert outcome.verdict == (
        "mitigated" if defeated and max(v.clean_cost_probe, v.clean_cost_held_out) <= 0.01 else "not mitigated"
    )
    # docs/fixtures.md "Planted always-on": rotation does not mitigate the always-on construction;
    # the re-attack shows it
    assert outcome.verdict == "not mitigated"
    assert abs(v.clean_cost_probe) < 1e-3  # function-preserving
    doc = json.loads((tmp_path / "out" / "harden-report.json").read_text())
    assert doc["verdict"] == outcome.verdict and doc["attempts"][0]["same_basis"] is False
