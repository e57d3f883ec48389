"""pin: restores a zeroed critical neuron; with no attack the logits are bit-identical."""

from __future__ import annotations

import torch

from achilles_guard.defenses.pin import PinGuard, PinnedModel
from achilles_guard.engine.neurons import producing_slices
from achilles_guard.engine.perplexity import delta_log10, row_losses
from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
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
    assert critical <= set(guard.exact)  # down_proj rows: recomputed from the fingerprint's stored rows

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
    with torch.no_grad():
        restored_logits = PinnedModel(lm.model, guard)(input_ids=ids).logits
    assert torch.allclose(restored_logits, clean_logits, rtol=1e-4, atol=1e-4)  # put back exactly, not "within"
    assert abs(delta_log10(_loss(PinnedModel(lm.model, guard), ids), clean)) < 1e-5
    # every position of every neuron, counted (twice: two forwards)
    assert guard.interventions == 2 * ids.shape[1] * len(critical)


def test_exact_rule_restores_any_row_tamper_on_unseen_inputs_and_never_fires_untampered(planted, tmp_path):
    """The weight-backed rule recomputes x @ w from the fingerprinted row: a scaled, sign-flipped or noised row
    is put back at every position of prompts the scan never saw; untampered, 0 interventions on those prompts
    for every fingerprinted row, in float32 and float16."""
    path, critical = planted
    fp = load_fingerprint(scanned(path, tmp_path / "scan") / "fingerprint.safetensors")
    lm = load_model(path)
    guard = PinGuard.from_fingerprint(fp)  # what monitor --protect installs: profile rules on the critical sets only
    assert len(guard.exact) > len(critical)  # rows of the top of every ranking too, not only the critical set
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, lm.model.config.vocab_size, (2, 37), generator=g) for _ in range(3)]
    for dtype in (torch.float32, torch.float16):
        model = lm.model.to(dtype)
        with torch.no_grad():
            clean = [model(input_ids=p).logits for p in prompts]
            guard.reset()
            with guard.installed(model):
                assert all(torch.equal(c, model(input_ids=p).logits) for c, p in zip(clean, prompts))
            assert guard.interventions == 0
    model = lm.model.float()
    # Linear rows outside the critical set (the exact rule covers every norm channel too)
    rows = [n for n in guard.exact if n not in critical and n.module.endswith(("down_proj", "o_proj"))][:4]
    assert len(rows) == 4
    with torch.no_grad():
        clean = [model(input_ids=p).logits for p in prompts]
        for i, neuron in enumerate(rows):
            w = model.get_parameter(f"{neuron.module}.weight")[neuron.channel]
            w.copy_([w * 0.5, -w, w + 0.3 * torch.randn(w.shape, generator=g), torch.zeros_like(w)][i % 4])
        tampered = [model(input_ids=p).logits for p in prompts]
        assert any(not torch.allclose(t, c, atol=1e-3) for t, c in zip(tampered, clean))
        guard.reset()
        with guard.installed(model):
            for c, p in zip(clean, prompts):
                assert torch.allclose(model(input_ids=p).logits, c, rtol=1e-4, atol=1e-4)
    assert guard.restorations > 0


def test_a_tuple_output_and_flattened_tokens_are_guarded_as_vllm_returns_them(planted, tmp_path):
    """vLLM's parallel linears return (output, bias) and see a batch flattened to (tokens, channels): the guard
    restores a zeroed critical row there exactly as on the (batch, positions, channels) tensor, bias untouched."""

    path, critical = planted
    fp = load_fingerprint(scanned(path, tmp_path / "scan") / "fingerprint.safetensors")
    lm = load_model(path)
    guard = PinGuard.from_fingerprint(fp)
    neuron = sorted(critical, key=str)[0]
    module = lm.model.get_submodule(neuron.module)
    x = torch.randn(2, 7, module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x)  # intact
        module.weight[neuron.channel].zero_()  # the tamper
        got = {}
        with guard.installed(lm.model):
            got["tensor"] = module(x)
            pin = module._forward_hooks[next(reversed(module._forward_hooks))]
            flat = x.reshape(-1, x.shape[-1])
            out, bias = pin(module, (flat,), (module.forward(flat), None))  # forward(): the bare, tampered output
    assert bias is None and out.shape == flat.shape[:1] + (module.out_features,)
    assert torch.allclose(got["tensor"], want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, want.reshape(out.shape), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(module.forward(flat)[:, neuron.channel], want.reshape(out.shape)[:, neuron.channel])
