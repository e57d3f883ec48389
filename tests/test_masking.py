"""The one masking mechanism: zeroes (or scales) a channel everywhere, per-sample rows, hooks always gone."""

from __future__ import annotations

import pytest
import torch

from achilles_guard.engine.masking import MaskPlan, hooks, masked
from achilles_guard.engine.neurons import Neuron, discover
from tests.builders import FAMILIES, PROBE, tiny_model, tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def ids():
    return tokenizer()(PROBE, return_tensors="pt")["input_ids"][:, :12]  # (1, 12)


def _no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _outputs(model, ids, names, plan: MaskPlan | None = None) -> dict[str, torch.Tensor]:
    """Each module's output as the rest of the model sees it (after the mask, if any)."""
    seen: dict[str, torch.Tensor] = {}
    grab = {n: (lambda out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names}
    with torch.no_grad():
        if plan is None:
            with hooks(model, grab):
                model(input_ids=ids, use_cache=False)
        else:
            with masked(model, plan), hooks(model, grab):  # grab runs after the mask hook
                model(input_ids=ids, use_cache=False)
    return seen


@pytest.mark.parametrize("scale", [0.0, 0.5, -2.0])
def test_mask_zeroes_or_scales_every_position(family_model, ids, scale):
    family, model = family_model
    # one module of each kind in the first block: a norm, a projection, the activation, the MLP output
    cands = [c for c in discover(model, "all").candidates if c.layer == 0]
    picked = {c.kind: c for c in cands} | {"mlp_out": next(c for c in cands if c.component == "mlp_out")}
    names = [c.name for c in picked.values()]
    neurons = [Neuron(c.name, ch) for c in picked.values() for ch in (1, c.width - 2)]
    # mask one module at a time so every module's input is the clean one
    for name in names:
        mine = [n for n in neurons if n.module == name]
        clean = _outputs(model, ids, [name])[name]  # (1, T, C)
        out = _outputs(model, ids, [name], MaskPlan.fixed(mine, scale=scale))[name]
        chans = [n.channel for n in mine]
        assert torch.equal(out[..., chans], clean[..., chans] * scale), f"{family} {name}"
        if scale == 0.0:
            assert torch.all(out[..., chans] == 0) and clean[..., chans].abs().sum() > 0
        others = torch.ones(out.shape[-1], dtype=torch.bool)
        others[chans] = False
        assert torch.equal(out[..., others], clean[..., others]), "unmasked channels must keep their bits"
    assert _no_hooks_left(model)


def test_downstream_changes_and_hooks_leave(family_model, ids):
    family, model = family_model
    mlp_out = next(c for c in discover(model, "mlp-out").candidates)
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
        with masked(model, MaskPlan.fixed([Neuron(mlp_out.name, 3)])):
            assert not _no_hooks_left(model)
            hit = model(input_ids=ids, use_cache=False).logits
        again = model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(hit, clean)
    assert torch.equal(again, clean)
    assert _no_hooks_left(model)


def test_per_sample_rows(family_model, ids):
    """Row b of MaskPlan.top_n masks the top ns[b] neurons; each row equals its own fixed mask."""
    family, model = family_model
    cands = discover(model, "all")
    names = tuple(c.name for c in cands.candidates)
    # a made-up ranking spread over three modules, interleaved
    mods = [0, len(names) // 2, len(names) - 1]
    module_index = torch.tensor([mods[i % 3] for i in range(6)])
    channels = torch.tensor([2, 0, 5, 1, 3, 4])
    ranked = [Neuron(names[m], c) for m, c in zip(module_index.tolist(), channels.tolist())]
    ns = [0, 1, 3, 6]
    plan = MaskPlan.top_n(names, module_index, channels, ns, scale=0.0)
    assert plan.rows == len(ns)
    batch = ids.expand(len(ns), -1)  # (4, T)
    seen = _outputs(model, batch, [names[m] for m in mods], plan)
    with torch.no_grad(), masked(model, plan):
        batched = model(input_ids=batch, use_cache=False).logits  # (4, T, V)
    for b, n in enumerate(ns):
        for neuron in ranked:
            out = seen[neuron.module]
            row = out.reshape(len(ns), -1, out.shape[-1])[b, :, neuron.channel]  # OPT's MLP is (B*T, C)
            assert torch.all(row == 0) == (neuron in ranked[:n]), f"row {b}: {neuron}"
        with torch.no_grad(), masked(model, MaskPlan.fixed(ranked[:n])):
            single = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[-1])
    assert _no_hooks_left(model)


def test_hooks_removed_when_the_forward_raises(ids):
    model = tiny_model("llama")
    mlp_out = "model.layers.0.mlp.down_proj"
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, MaskPlan.fixed([Neuron(mlp_out, 1)])):
            model(input_ids=ids, use_cache=False)
            raise RuntimeError("boom")
    assert _no_hooks_left(model)

    def explode(output):
        raise RuntimeError("boom inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"):
        with (
            masked(model, MaskPlan.fixed([Neuron(mlp_out, 1)])),
            hooks(model, {"model.layers.1.mlp.down_proj": explode}),
        ):
            model(input_ids=ids, use_cache=False)
    assert _no_hooks_left(model)

    # a plan with 3 rows on a batch of 2 fails inside the forward; hooks still leave
    plan = MaskPlan.top_n((mlp_out,), torch.tensor([0, 0]), torch.tensor([1, 2]), [0, 1, 2])
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        with torch.no_grad(), masked(model, plan):
            model(input_ids=ids.expand(2, -1), use_cache=False)
    assert _no_hooks_left(model)

    # a bad module name while installing: the hooks already installed are removed
    with pytest.raises(AttributeError):
        with hooks(model, {mlp_out: lambda out: None, "model.layers.0.no_such_module": lambda out: None}):
            pass
    assert _no_hooks_left(model)


def test_mask_keeps_autograd_inputs_intact():
    """With gradients on, the mask never writes into a tensor autograd saved."""
    model = tiny_model("llama")
    ids = tokenizer()(PROBE, return_tensors="pt")["input_ids"][:, :8]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with masked(model, MaskPlan.fixed([Neuron("model.layers.0.mlp.gate_proj", 2)], scale=0.0)):
        loss = model(inputs_embeds=embeds, use_cache=False).logits.square().mean()
        loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert _no_hooks_left(model)
