"""monitor/vllm_map on a tiny model built like vLLM's Llama (fused qkv_proj and gate_up_proj), without vLLM.

The fused modules here are plain torch modules with vLLM's attributes (`packed_modules_mapping` on the
model class, `output_sizes` on the fused module); the real vLLM is exercised in tests/test_vllm_plugin.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from achilles_guard.engine.neurons import Neuron
from achilles_guard.errors import InputError
from achilles_guard.formats.checkpoint import tensor_sha256
from achilles_guard.formats.source import SafetensorsSource
from achilles_guard.integrity.fingerprint import ActivationBaseline, NeuronRecord, SliceRecord
from achilles_guard.integrity.records import build_records, check_tensors
from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker
from achilles_guard.monitor.vllm_map import LiveSource, live_tensors, packed_layout, remap_fingerprint

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 8, 2, 1, 4, 12, 16
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM


class Fused(nn.Module):
    """A fused linear as vLLM's (QKV|MergedColumn)ParallelLinear: one weight, its parts' sizes, a tuple output."""

    def __init__(self, sizes, sizes_attr=True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(sum(sizes), HIDDEN), requires_grad=False)
        if sizes_attr:
            self.output_sizes = list(sizes)

    def forward(self, x):
        return x @ self.weight.T, None


class Block(nn.Module):
    def __init__(self, sizes_attr=True):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Fused([Q, KV, KV], sizes_attr)
        self.self_attn.o_proj = nn.Linear(Q, HIDDEN, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Fused([INTER, INTER], sizes_attr)
        self.mlp.act_fn = nn.SiLU()
        self.mlp.down_proj = nn.Linear(INTER, HIDDEN, bias=False)
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(HIDDEN), requires_grad=False)


class TinyVllmLlama(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, layers=2, sizes_attr=True):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(Block(sizes_attr) for _ in range(layers))
        self.lm_head = nn.Module()
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as vLLM ties SmolLM2's


@dataclass(frozen=True)
class Config:
    hidden_size: int = HIDDEN
    num_attention_heads: int = HEADS
    num_key_value_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    intermediate_size: int = INTER


@dataclass(frozen=True)
class TinyFingerprint:
    """The fields of Fingerprint that remap_fingerprint and RuntimeIntegrityChecker read."""

    path: str
    tensors: dict
    slices: dict
    neurons: tuple
    critical_set: tuple


def checkpoint(layers=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows, cols in (("self_attn.q_proj", Q, HIDDEN), ("self_attn.k_proj", KV, HIDDEN),
                                 ("self_attn.v_proj", KV, HIDDEN), ("self_attn.o_proj", HIDDEN, Q),
                                 ("mlp.gate_proj", INTER, HIDDEN), ("mlp.up_proj", INTER, HIDDEN),
                                 ("mlp.down_proj", HIDDEN, INTER)):
            sd[f"{p}{name}.weight"] = torch.randn(rows, cols, generator=g)
        sd[f"{p}input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    return sd


def served(sd: dict, layers=2, sizes_attr=True, dtype=torch.float32) -> TinyVllmLlama:
    """The model as vLLM loads the checkpoint: the parts concatenated into the fused weights."""
    m = TinyVllmLlama(layers, sizes_attr)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
        for i, block in enumerate(m.model.layers):
            p = f"model.layers.{i}."
            block.self_attn.qkv_proj.weight.copy_(torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
            block.self_attn.o_proj.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            gate_up = [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]
            block.mlp.gate_up_proj.weight.copy_(torch.cat(gate_up))
            block.mlp.down_proj.weight.copy_(sd[p + "mlp.down_proj.weight"])
            block.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
    return m.to(dtype)


def checkpoint_records(folder) -> tuple[dict, object]:
    """(the checkpoint's tensors, the fingerprint's records of them written to folder/model.safetensors)."""
    sd = checkpoint()
    save_file(sd, str(folder / "model.safetensors"))
    with SafetensorsSource.open(folder) as src:
        return sd, build_records(src)


@pytest.fixture()
def records(tmp_path):
    return checkpoint_records(tmp_path)


def test_layout_from_packed_modules_mapping_and_module_sizes():
    layout = packed_layout(served(checkpoint()))
    k = layout.parts["model.layers.1.self_attn.k_proj"]
    assert (k.fused, k.offset, k.size) == ("model.layers.1.self_attn.qkv_proj", Q, KV)
    up = layout.parts["model.layers.0.mlp.up_proj"]
    assert (up.fused, up.offset, up.size) == ("model.layers.0.mlp.gate_up_proj", INTER, INTER)
    assert layout.module("model.layers.0.mlp.down_proj") == ("model.layers.0.mlp.down_proj", 0)
    assert len(layout.parts) == 2 * 5


def test_layout_sizes_from_the_config_when_the_module_has_none():
    layout = packed_layout(served(checkpoint(), sizes_attr=False), Config())
    assert layout.parts["model.layers.0.self_attn.v_proj"].offset == Q + KV
    with pytest.raises(InputError, match="neither the module nor the config"):
        packed_layout(served(checkpoint(), sizes_attr=False))
    with pytest.raises(InputError, match="add up to"):
        packed_layout(served(checkpoint(), sizes_attr=False), Config(intermediate_size=INTER + 1))


def test_tensor_parallel_is_refused():
    m = served(checkpoint())
    m.model.layers[0].self_attn.qkv_proj.tp_size = 2
    with pytest.raises(InputError, match="tensor parallel"):
        packed_layout(m)


def test_live_tensors_are_the_checkpoint_tensors_as_views(records):
    sd, recs = records
    m = served(sd)
    live = live_tensors(m, packed_layout(m), {r.name for r in recs.records})
    assert set(live) == set(sd)  # the tied lm_head is listed once, under the recorded embed_tokens name
    assert all(torch.equal(live[n], sd[n]) for n in sd)
    m.model.layers[0].self_attn.qkv_proj.weight.data[Q + 1, 0] = 42.0  # a view: it follows memory
    assert live["model.layers.0.self_attn.k_proj.weight"][1, 0] == 42.0


def test_check_tensors_on_memory_identical_then_one_fused_row_changed(records):
    sd, recs = records
    m = served(sd)
    layout = packed_layout(m)
    src = LiveSource(live_tensors(m, layout), recs.files)
    check = check_tensors(src, recs)
    assert check.ok and check.identical == len(sd), check.findings
    m.model.layers[1].mlp.gate_up_proj.weight.data[INTER + 5].zero_()  # up_proj row 5 of layer 1
    check = check_tensors(LiveSource(live_tensors(m, layout), recs.files), recs,
                          critical_rows={"model.layers.1.mlp.up_proj.weight": {5}})
    assert [(f.tensor, f.kind, f.rows, f.critical_hits) for f in check.findings] == [
        ("model.layers.1.mlp.up_proj.weight", "bytes", (5,), (5,))]


def test_check_tensors_bf16_load_is_judged_within_rounding(records):
    sd, recs = records
    m = served(sd, dtype=torch.bfloat16)
    layout = packed_layout(m)
    check = check_tensors(LiveSource(live_tensors(m, layout), recs.files), recs)
    assert check.ok and check.equivalent == len(sd), check.findings
    m.model.layers[0].self_attn.qkv_proj.weight.data[Q + KV + 2] *= 4  # v_proj row 2, far beyond rounding
    check = check_tensors(LiveSource(live_tensors(m, layout), recs.files), recs)
    assert [(f.tensor, f.kind, f.rows) for f in check.findings] == [
        ("model.layers.0.self_attn.v_proj.weight", "beyond-rounding", (2,))]


def _slice(param: str, index: int, t: torch.Tensor) -> tuple[str, SliceRecord]:
    key = f"{param}@0:{index}"
    row = t[index].contiguous()
    return key, SliceRecord(key, param, param, 0, index, 0.0, "model.safetensors", "F32", tuple(t.shape),
                            tensor_sha256(row))


def test_remap_fingerprint_onto_fused_modules_and_runtime_check(records):
    sd, _ = records
    m = served(sd)
    base = ActivationBaseline(0.0, 1.0, 1.0, 1.0)
    k_param, act_param, down_param = ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                                      "model.layers.0.mlp.down_proj.weight")
    slices = dict([_slice(k_param, 2, sd[k_param]), _slice(act_param, 3, sd[act_param]),
                   _slice(down_param, 1, sd[down_param])])
    keys = list(slices)
    neurons = (
        NeuronRecord(Neuron("model.layers.1.self_attn.k_proj", 2), 1, "attn_in", 1, 9.0, True, (keys[0],), base),
        NeuronRecord(Neuron("model.layers.0.mlp.act_fn", 3), 0, "mlp_act", 2, 8.0, False, (keys[1],), base),
        NeuronRecord(Neuron("model.layers.0.mlp.down_proj", 1), 0, "mlp_out", 3, 7.0, False, (keys[2],), base),
    )
    fp = TinyFingerprint("tiny.safetensors", {k: sd[r.param][r.index].clone() for k, r in slices.items()}, slices,
                         neurons, (neurons[0].neuron,))
    live, dropped = remap_fingerprint(fp, packed_layout(m), m)
    assert [str(r.neuron) for r in live.neurons] == [f"model.layers.1.self_attn.qkv_proj[{Q + 2}]",
                                                     "model.layers.0.mlp.down_proj[1]"]
    assert live.critical_set == (Neuron("model.layers.1.self_attn.qkv_proj", Q + 2),)
    assert [d[0] for d in dropped] == ["model.layers.0.mlp.act_fn[3]"] and "SiluAndMul" in dropped[0][1]
    k = live.slices[keys[0]]
    assert (k.param, k.index, k.shape) == ("model.layers.1.self_attn.qkv_proj.weight", Q + 2, (Q + 2 * KV, HIDDEN))
    assert live.slices[keys[1]].param == "model.layers.0.mlp.gate_up_proj.weight"  # the act neuron's slice stays
    checker = RuntimeIntegrityChecker(m, live)
    assert checker.check().ok and checker.size == 3
    m.model.layers[1].self_attn.qkv_proj.weight.data[Q + 2, 0] *= -1
    assert checker.check().mismatched == (keys[0],)
