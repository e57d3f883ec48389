"""Candidate discovery, component labels, forward order and producing slices, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from achilles_guard.engine.adapters import PAPER_NAME_RE, PRESETS
from achilles_guard.engine.masking import MaskPlan, hooks, masked
from achilles_guard.engine.neurons import Neuron, WeightSlice, discover, producing_slices
from achilles_guard.errors import UsageError
from tests.builders import FAMILIES, PROBE, tiny_model, tokenizer

# Block-relative names of each family's MLP output projection, MLP activation and what feeds it.
MLP_OUT = {
    "llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj", "gemma": "mlp.down_proj",
    "phi3": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "opt": "fc2",
}
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}
ATTN_IN = {
    "phi3": {"self_attn.qkv_proj"}, "gpt2": {"attn.c_attn"}, "gpt_neox": {"attention.query_key_value"},
}


def block_prefix(family: str) -> str:
    return BLOCKS.get(family, "model.layers")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def ids():
    return tokenizer()(PROBE, return_tensors="pt")["input_ids"][:, :16]  # (1, 16)


def test_presets_select_their_components(family_model):
    family, model = family_model
    everything = discover(model, "all")
    n_layers = model.config.num_hidden_layers
    assert {c.layer for c in everything.candidates} == set(range(n_layers))
    assert all(c.component != "other" for c in everything.candidates), "every leaf of these families is known"
    for preset in ("mlp-out", "mlp", "attention", "norms"):
        found = discover(model, preset)
        assert {c.component for c in found.candidates} <= PRESETS[preset]
        # a preset is exactly the candidates of `all` carrying its labels, same order
        assert found.candidates == tuple(c for c in everything.candidates if c.component in PRESETS[preset])
    mlp_out = discover(model, "mlp-out").candidates
    assert [c.name for c in mlp_out] == [f"{block_prefix(family)}.{i}.{MLP_OUT[family]}" for i in range(n_layers)]
    assert all(c.width == model.config.hidden_size for c in mlp_out)
    norms = discover(model, "norms").candidates
    assert len(norms) == 2 * n_layers and all(c.kind == "norm" for c in norms)
    # mlp + attention + norms cover `all`
    union = {c.name for p in ("mlp", "attention", "norms") for c in discover(model, p).candidates}
    assert union == {c.name for c in everything.candidates}


def test_paper_preset_and_regex(family_model):
    family, model = family_model
    paper = discover(model, "paper").candidates
    assert paper and all(PAPER_NAME_RE.search(c.name) for c in paper)
    missed = [c.name for c in discover(model, "all").candidates if PAPER_NAME_RE.search(c.name) and c not in paper]
    assert missed == []
    target = f"{block_prefix(family)}.1.{MLP_OUT[family]}"
    found = discover(model, rf"{block_prefix(family)}\.1\.{MLP_OUT[family]}$").candidates
    assert [c.name for c in found] == [target]
    assert found[0].component == "mlp_out"


def test_component_labels(family_model):
    family, model = family_model
    by_rel = {}
    for c in discover(model, "all").candidates:
        if c.layer == 0:
            by_rel[c.name.removeprefix(f"{block_prefix(family)}.0.")] = c
    assert by_rel[MLP_OUT[family]].component == "mlp_out"
    acts = [rel for rel, c in by_rel.items() if c.component == "mlp_act"]
    assert len(acts) == 1 and by_rel[acts[0]].kind == "activation"
    attn_in = {rel for rel, c in by_rel.items() if c.component == "attn_in"}
    assert attn_in == ATTN_IN.get(family, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})
    assert sum(c.component == "attn_out" for c in by_rel.values()) == 1
    kinds = {c.kind for c in by_rel.values()}
    assert kinds == ({"conv1d", "activation", "norm"} if family == "gpt2" else {"linear", "activation", "norm"})
    if family == "phi3":
        assert by_rel["mlp.gate_up_proj"].component == "mlp_in"
        assert by_rel["mlp.gate_up_proj"].width == 2 * by_rel["mlp.activation_fn"].width
    if family in ("llama", "mistral", "qwen2", "gemma"):
        assert (by_rel["mlp.gate_proj"].component, by_rel["mlp.up_proj"].component) == ("mlp_gate", "mlp_up")


def test_dropout_is_never_a_candidate(family_model):
    family, model = family_model
    modules = dict(model.named_modules())
    for c in discover(model, "all").candidates:
        assert not isinstance(modules[c.name], nn.Dropout)
        assert "dropout" not in c.name.lower()
    if any(isinstance(m, nn.Dropout) for m in modules.values()):
        with pytest.raises(UsageError, match="matches no module"):
            discover(model, "re:dropout")


def test_forward_order_is_the_call_order(family_model, ids):
    family, model = family_model
    cands = discover(model, "all").candidates
    called: list[str] = []
    record = {c.name: (lambda out, n=c.name: called.append(n) if n not in called else None) for c in cands}
    with torch.no_grad(), hooks(model, record):
        model(input_ids=ids, use_cache=False)
    assert called == [c.name for c in cands]
    layers = [c.layer for c in cands]
    assert layers == sorted(layers)
    rel = [c.name.removeprefix(f"{block_prefix(family)}.0.") for c in cands if c.layer == 0]
    assert rel.index(MLP_OUT[family]) == len(rel) - 1  # the MLP output closes the block


def test_unknown_preset_and_bad_regex():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="unknown preset 'mlps'"):
        discover(model, "mlps")
    with pytest.raises(UsageError, match="bad regular expression"):
        discover(model, "re:(")
    with pytest.raises(UsageError, match="matches no module"):
        discover(model, "re:nothing_is_called_this")


def test_producing_slices_layout():
    llama = tiny_model("llama")
    p = "model.layers.0"
    assert producing_slices(llama, Neuron(f"{p}.mlp.down_proj", 5)) == (WeightSlice(f"{p}.mlp.down_proj.weight", 0, 5),)
    assert producing_slices(llama, Neuron(f"{p}.mlp.act_fn", 7)) == (
        WeightSlice(f"{p}.mlp.gate_proj.weight", 0, 7), WeightSlice(f"{p}.mlp.up_proj.weight", 0, 7),
    )
    assert producing_slices(llama, Neuron(f"{p}.input_layernorm", 3)) == (
        WeightSlice(f"{p}.input_layernorm.weight", 0, 3),
    )
    phi3 = tiny_model("phi3")
    ff = phi3.config.intermediate_size
    assert producing_slices(phi3, Neuron(f"{p}.mlp.activation_fn", 7)) == (
        WeightSlice(f"{p}.mlp.gate_up_proj.weight", 0, 7), WeightSlice(f"{p}.mlp.gate_up_proj.weight", 0, ff + 7),
    )
    gpt2 = tiny_model("gpt2")
    h = "transformer.h.0"
    assert producing_slices(gpt2, Neuron(f"{h}.mlp.c_proj", 4)) == (
        WeightSlice(f"{h}.mlp.c_proj.weight", 1, 4), WeightSlice(f"{h}.mlp.c_proj.bias", 0, 4),
    )
    assert producing_slices(gpt2, Neuron(f"{h}.mlp.act", 9)) == (
        WeightSlice(f"{h}.mlp.c_fc.weight", 1, 9), WeightSlice(f"{h}.mlp.c_fc.bias", 0, 9),
    )
    assert producing_slices(gpt2, Neuron(f"{h}.ln_2", 2)) == (
        WeightSlice(f"{h}.ln_2.weight", 0, 2), WeightSlice(f"{h}.ln_2.bias", 0, 2),
    )
    neox = tiny_model("gpt_neox")
    n = "gpt_neox.layers.1"
    assert producing_slices(neox, Neuron(f"{n}.mlp.act", 9)) == (
        WeightSlice(f"{n}.mlp.dense_h_to_4h.weight", 0, 9), WeightSlice(f"{n}.mlp.dense_h_to_4h.bias", 0, 9),
    )
    opt = tiny_model("opt")
    o = "model.decoder.layers.0"
    assert producing_slices(opt, Neuron(f"{o}.activation_fn", 1)) == (
        WeightSlice(f"{o}.fc1.weight", 0, 1), WeightSlice(f"{o}.fc1.bias", 0, 1),
    )
    gemma = tiny_model("gemma")
    assert producing_slices(gemma, Neuron(f"{p}.post_attention_layernorm", 3)) == (
        WeightSlice(f"{p}.post_attention_layernorm.weight", 0, 3, -1.0),
    )
    sl = WeightSlice("w", 1, 2)
    assert sl.key == "w@1:2"
    assert torch.equal(sl.read(torch.arange(12).reshape(3, 4)), torch.tensor([2, 6, 10]))


def _zero_slices(model, neuron: Neuron):
    """A copy of `model` with the producing slices of `neuron` set to their null value."""
    attacked = copy.deepcopy(model)
    params = dict(attacked.named_parameters())
    slices = producing_slices(attacked, neuron)
    assert slices, f"{neuron} has no producing slices"
    with torch.no_grad():
        for s in slices:
            params[s.param].select(s.axis, s.index).fill_(s.null_value)
    return attacked


def test_zeroing_producing_slices_equals_masking(family_model, ids):
    """The design's core equivalence, for every candidate module of the first and last block."""
    family, model = family_model
    last = model.config.num_hidden_layers - 1
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
    checked = 0
    for c in discover(model, "all").candidates:
        if c.layer not in (0, last):
            continue
        neuron = Neuron(c.name, (7 * c.layer + 5) % c.width)
        with torch.no_grad():
            with masked(model, MaskPlan.fixed([neuron], scale=0.0)):
                by_mask = model(input_ids=ids, use_cache=False).logits
            by_weights = _zero_slices(model, neuron)(input_ids=ids, use_cache=False).logits
        assert not torch.equal(by_mask, clean), f"masking {neuron} changed nothing: the check would be vacuous"
        torch.testing.assert_close(by_weights, by_mask, rtol=1e-5, atol=1e-6, msg=f"{family} {neuron}")
        checked += 1
    assert checked >= 12
