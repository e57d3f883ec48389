"""redundancy: the widened model computes the same function, loads with plain from_pretrained, and
zeroing one copy of a residual channel removes only 1/sqrt(k) of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from achilles_guard.defenses.redundancy import carried_channels, check_redundant, plan_redundancy, widen_residual
from achilles_guard.engine.neurons import Neuron
from achilles_guard.errors import UsageError
from tests.builders import tiny_model


def _fp(*records):
    return SimpleNamespace(
        neurons=tuple(
            SimpleNamespace(neuron=Neuron(m, c), component=comp, layer=layer, critical=True, attacks=())
            for m, c, comp, layer in records
        )
    )


@pytest.mark.parametrize("tied", [False, True])
def test_function_preserving_and_loads_with_plain_from_pretrained(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", tie_word_embeddings=tied).double()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fp = _fp(("model.layers.1.mlp.down_proj", 5, "mlp_out", 1), ("model.layers.0.mlp.act_fn", 3, "mlp_act", 0))
    plan = plan_redundancy(model, fp, [ids], copies=5)
    assert plan.channels == (5,) and 3 in plan.units[0] and plan.units[1]  # the writing units of layer 1 too
    d = model.config.hidden_size
    d_new = widen_residual(model, plan)
    assert d_new >= d + 4 and d_new % model.config.num_attention_heads == 0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-6  # float64 weights (RoPE tables are float32 in transformers)
    model.float().save_pretrained(tmp_path / "m", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert reloaded.config.hidden_size == d_new and reloaded.config.head_dim == model.config.head_dim
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, before.float(), atol=1e-4)


def test_other_families_are_refused():
    with pytest.raises(UsageError, match="redundancy"):
        check_redundant("gpt2")


def test_wide_carries_every_other_fingerprinted_residual_channel():
    model = tiny_model("llama").double()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    o_row = model.model.layers[0].self_attn.o_proj.weight[2].clone()
    fp = _fp(("model.layers.1.mlp.down_proj", 5, "mlp_out", 1))
    top = [  # the top of the rankings: not in any attack's set
        ("model.layers.0.self_attn.o_proj", 2, "attn_out", 0),
        ("model.layers.1.post_attention_layernorm", 7, "norm", 1),
        ("model.layers.1.mlp.down_proj", 5, "mlp_out", 1),  # already an attack channel: keeps `copies`
        ("model.layers.0.self_attn.q_proj", 3, "attn_in", 0),  # not residual: heads' business
    ]
    fp.neurons += tuple(
        SimpleNamespace(neuron=Neuron(m, c), component=comp, layer=layer, critical=False, attacks=())
        for m, c, comp, layer in top
    )
    plan = plan_redundancy(model, fp, [ids], copies=5, wide_copies=3)
    assert plan.channels == (5,) and plan.wide == (2, 7) and plan.wide_copies == 3
    assert plan.copies_of() == {2: 3, 7: 3, 5: 5}
    d = model.config.hidden_size
    d_new = widen_residual(model, plan)
    assert d_new >= d + 4 + 2 * 2 and d_new % model.config.num_attention_heads == 0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-6
    rows = model.model.layers[0].self_attn.o_proj.weight  # (d', d): channel 2 is now on 3 rows of o_row / sqrt(3)
    carriers = [j for j in range(d_new) if torch.allclose(rows[j], o_row / 3**0.5, atol=1e-12)]
    assert len(carriers) == 3 and carriers[0] == 2
    with pytest.raises(UsageError, match="--redundancy-wide must be >= 2"):
        plan_redundancy(model, fp, [ids], copies=5, wide_copies=1)


def test_a_second_step_does_not_copy_copies_again():
    model = tiny_model("llama").double()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    first = _fp(("model.layers.1.mlp.down_proj", 5, "mlp_out", 1))
    d_first = widen_residual(model, plan_redundancy(model, first, [ids], copies=4))
    carried = carried_channels(model)
    assert carried == {c: 4 for c in carried} and len(carried) == 4 and 5 in carried  # 5 and its 3 copies
    copy = max(carried)
    second = _fp(
        ("model.layers.1.mlp.down_proj", copy, "mlp_out", 1), ("model.layers.0.self_attn.o_proj", 2, "attn_out", 0)
    )
    plan = plan_redundancy(model, second, [ids], copies=3)
    assert plan.channels == (2,) and any(f"[{copy}]" in s and "already carried on 4" in s for s in plan.skipped)
    assert widen_residual(model, plan) - d_first <= 2 + model.config.num_attention_heads
