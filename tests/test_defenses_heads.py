"""heads: k copies of every attention head holding a fingerprinted q/k/v channel compute the same function,
load with plain from_pretrained, and zeroing one query row of one copy removes only 1/k of the head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from achilles_guard.defenses.heads import check_duplicable, duplicate_heads, plan_heads
from achilles_guard.defenses.reattack import original_attack_delta
from achilles_guard.engine.neurons import Neuron
from achilles_guard.errors import UsageError
from tests.builders import tiny_model


def _fp(*records):
    return SimpleNamespace(
        neurons=tuple(
            SimpleNamespace(neuron=Neuron(m, c), component=comp, layer=layer, critical=False, attacks=())
            for m, c, comp, layer in records
        )
    )


@pytest.mark.parametrize(("family", "kv_heads"), [("llama", 2), ("llama", 4), ("qwen2", 2)])
def test_function_preserving_and_loads_with_plain_from_pretrained(family, kv_heads, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, num_key_value_heads=kv_heads).double()
    if family == "qwen2":  # q/k/v biases must be copied (and zero in padding heads)
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.data.normal_()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    head_dim = model.config.hidden_size // model.config.num_attention_heads  # 8
    fp = _fp(
        ("model.layers.0.self_attn.q_proj", 3 * head_dim + 1, "attn_in", 0),  # query head 3
        ("model.layers.1.self_attn.k_proj", 0, "attn_in", 1),  # KV head 0
        ("model.layers.1.mlp.down_proj", 5, "mlp_out", 1),  # not a head: ignored
    )
    plan = plan_heads(model, fp, copies=5)
    group_size = 4 // kv_heads
    assert plan.groups == {0: (3 // group_size,), 1: (0,)}
    counts = duplicate_heads(model, plan)
    cfg = model.config
    assert cfg.num_key_value_heads >= kv_heads + 4 and cfg.num_attention_heads == cfg.num_key_value_heads * group_size
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.head_dim == head_dim
    assert model.model.layers[0].self_attn.q_proj.out_features == cfg.num_attention_heads * head_dim
    assert counts["num_attention_heads"] == [4, cfg.num_attention_heads]
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-5
    model.float().save_pretrained(tmp_path / "m", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert reloaded.config.num_attention_heads == cfg.num_attention_heads
    assert reloaded.config.num_key_value_heads == cfg.num_key_value_heads
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - before.float()).abs().max() < 1e-5


def test_copies_really_share_the_head(tmp_path):
    """The original head keeps its index with 1/k of its output: zeroing its query rows changes the
    output by 1/k of what it did before (the change is linear in the o_proj columns)."""
    model = tiny_model("llama", num_key_value_heads=4).double()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    head = tuple(Neuron("model.layers.1.self_attn.q_proj", c) for c in range(8, 16))  # query head 1, all rows
    captured = {}

    def grab(module, args):
        captured["x"] = args[0].detach().clone()

    def o_input(m):
        """Layer 1's o_proj weight and its input, clean and with query head 1 zeroed."""
        from achilles_guard.engine.masking import MaskPlan, masked

        handle = m.model.layers[1].self_attn.o_proj.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                m(input_ids=ids)
                clean = captured["x"]
                with masked(m, MaskPlan.fixed(head, 0.0)):
                    m(input_ids=ids)
                broken = captured["x"]
        finally:
            handle.remove()
        return m.model.layers[1].self_attn.o_proj.weight, clean, broken

    w, clean, broken = o_input(model)
    change_before = (broken - clean) @ w.T
    duplicate_heads(model, plan_heads(model, _fp(("model.layers.1.self_attn.q_proj", 9, "attn_in", 1)), copies=4))
    w, clean, broken = o_input(model)
    change_after = (broken - clean) @ w.T
    assert change_before.abs().max() > 1e-6  # random init (std 0.02): small, but far above float64 noise
    assert torch.allclose(change_after, change_before / 4, rtol=1e-6, atol=1e-12)


def test_one_query_row_of_one_copy_no_longer_collapses_the_sink_fixture(tmp_path):
    """Measured: zeroing a sink head's query row collapses the fixture (Δ 11.97); with 64 copies of every
    fingerprinted head one row gives Δ 0.16, and the Δ of m rows follows m / k (the broken copies' share)."""
    from achilles_guard.engine.scan import tokenize_probe
    from achilles_guard.formats.load import load_model
    from tests.builders import PROBE
    from tests.sink import SINK_PLANT, build_sink_model

    lm = load_model(build_sink_model(tmp_path / "sink"))
    ids = tokenize_probe(lm, "probe", PROBE).input_ids
    head_dim = 16
    slow = head_dim // 2 - 1  # the row the plant uses
    rows = [
        (f"model.layers.{layer}.self_attn.{proj}", h * head_dim + slow, "attn_in", layer)
        for layer in (1, 2, 3)
        for h in SINK_PLANT.sink_heads
        for proj in ("q_proj", "k_proj")
    ]
    one = (Neuron("model.layers.3.self_attn.q_proj", slow),)
    assert original_attack_delta(lm.model, ids, one) > 5
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    plan = plan_heads(lm.model, _fp(*rows), copies=64)
    assert plan.groups == {1: (0, 1), 2: (0, 1), 3: (0, 1)}
    duplicate_heads(lm.model, plan)
    with torch.no_grad():
        assert (lm.model(input_ids=ids).logits - before).abs().max() < 1e-4  # float32 model
    assert original_attack_delta(lm.model, ids, one) < 0.5
    # two copies of head 0 of layer 3: the original (group 0) and its first copy (group 4)
    two = (*one, Neuron("model.layers.3.self_attn.q_proj", 4 * head_dim + slow))
    assert original_attack_delta(lm.model, ids, two) > original_attack_delta(lm.model, ids, one)


def test_other_families_and_bad_copies_are_refused():
    with pytest.raises(UsageError, match="heads"):
        check_duplicable("gpt2")
    with pytest.raises(UsageError, match="head-copies"):
        plan_heads(tiny_model("llama"), _fp(), copies=1)
