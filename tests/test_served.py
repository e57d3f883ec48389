"""monitor/served: weights a serving engine packed into its kernels, read back through the kernels.

The packed kernel here is the tiny vLLM-shaped model of test_vllm_map with each linear's weight moved into a
private transposed copy (as vLLM's oneDNN dispatch moves it, leaving an empty `weight`); the real vLLM kernels
are read back in tests/test_vllm_plugin.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from achilles_guard.integrity.records import check_tensors
from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker
from achilles_guard.monitor.served import READ_ROWS, Digest, ServedWeights
from achilles_guard.monitor.vllm_map import LiveSource, live_tensors, packed_layout, remap_fingerprint
from tests.test_vllm_map import TinyFingerprint, _slice, checkpoint, checkpoint_records, served


class Kernel:
    """A packed linear kernel: computes x Wᵀ from its own copy of W (in another layout); counts its calls."""

    def __init__(self, weight: torch.Tensor):
        self.buffer = weight.detach().t().contiguous()  # (K, N): what it computes with from now on
        self.calls = 0

    def __call__(self, x, weight, bias):
        assert weight.numel() == 0  # the module's own weight is gone
        self.calls += 1
        return x @ self.buffer


def pack(model: nn.Module) -> tuple[dict, dict]:
    """As vLLM's process_weights_after_loading on a CPU: every linear's weight into a kernel, `weight` emptied.
    (before: module -> Digest of its weight as verified, kernels: module -> Kernel)."""
    before, kernels = {}, {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.endswith("_proj") and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            before[name] = Digest.of(weight)
            kernels[name] = module.cpu_linear = Kernel(weight)
            module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    return before, kernels


def test_read_back_is_the_weight_bit_for_bit_and_the_whole_model_check_passes(tmp_path):
    sd, recs = checkpoint_records(tmp_path)
    m = served(sd)
    layout = packed_layout(m)
    before, kernels = pack(m)
    weights = ServedWeights(m, before)
    assert len(weights) == len(before) == 2 * 4 and not weights.judged("model.layers.0.mlp.down_proj.weight")
    assert weights.confirm() == () and weights.judged("model.layers.0.mlp.down_proj.weight")
    for name, k in kernels.items():
        assert torch.equal(weights.read(f"{name}.weight"), k.buffer.t())
    live = live_tensors(m, layout, {r.name for r in recs.records}, served=weights)
    assert set(live) == set(sd)  # the fused parts of the packed weights, and the plain embedding and norms
    with weights.session():
        check = check_tensors(LiveSource(live, recs.files), recs)
    assert check.ok and check.identical == len(sd), check.findings


def test_a_change_in_the_kernels_buffer_is_found_in_the_tensor_row_and_slice(tmp_path):
    sd, recs = checkpoint_records(tmp_path)
    m = served(sd)
    layout = packed_layout(m)
    param = "model.layers.1.self_attn.k_proj.weight"
    slices = dict([_slice(param, 2, sd[param])])
    fp = TinyFingerprint("tiny.safetensors", {k: sd[r.param][r.index].clone() for k, r in slices.items()}, slices,
                         (), ())
    fp_live, _ = remap_fingerprint(fp, layout, m)
    before, kernels = pack(m)
    weights = ServedWeights(m, before)
    checker = RuntimeIntegrityChecker(m, fp_live, weights)
    first = checker.check()  # before the kernels are confirmed: skipped, not judged
    assert first.ok and (first.checked, first.skipped) == (0, 1)
    weights.confirm()
    assert checker.check().ok and checker.size == 1 and checker.check().checked == 1
    kernels["model.layers.1.self_attn.qkv_proj"].buffer[0, Q_PLUS_2] *= -1  # k_proj row 2, column 0, in the kernel
    assert checker.check().mismatched == tuple(slices)
    live = live_tensors(m, layout, served=weights)
    with weights.session():
        check = check_tensors(LiveSource(live, recs.files), recs, critical_rows={param: {2}})
    assert [(f.tensor, f.kind, f.rows, f.critical_hits) for f in check.findings] == [(param, "bytes", (2,), (2,))]


Q_PLUS_2 = 8 + 2  # q rows (HEADS x HEAD_DIM = 8) then k_proj row 2: its column in the (K, N) kernel buffer


def test_one_read_back_per_layer_in_a_session_and_a_fresh_one_outside():
    m = served(checkpoint())
    before, kernels = pack(m)
    weights = ServedWeights(m, before)
    weights.confirm()
    k = kernels["model.layers.0.mlp.gate_up_proj"]
    k.calls = 0
    calls_per_read = -(-8 // READ_ROWS)  # K = HIDDEN = 8 identity rows, READ_ROWS at a time
    with weights.session():
        for _ in range(3):
            weights.read("model.layers.0.mlp.gate_up_proj.weight")
    assert k.calls == calls_per_read
    weights.read("model.layers.0.mlp.gate_up_proj.weight")
    weights.read("model.layers.0.mlp.gate_up_proj.weight")
    assert k.calls == 3 * calls_per_read  # outside a session, nothing stale is ever judged


def test_a_layer_whose_kernel_does_not_return_its_verified_bits_is_not_judged():
    """-0.0 comes back as +0.0 through any kernel: such a layer is named, never re-checked (no false alarm)."""
    sd = checkpoint()
    sd["model.layers.0.mlp.down_proj.weight"][3, 1] = -0.0
    m = served(sd)
    layout = packed_layout(m)  # from the loaded weights, before the engine packs them (as the plugin takes it)
    before, _ = pack(m)
    weights = ServedWeights(m, before)
    assert weights.confirm() == weights.inexact == ("model.layers.0.mlp.down_proj.weight",)
    assert "model.layers.0.mlp.down_proj.weight" not in weights and len(weights) == 2 * 4 - 1
    live = live_tensors(m, layout, served=weights)
    assert "model.layers.0.mlp.down_proj.weight" not in live  # emptied and not readable: left out, and counted


def test_forwards_hold_the_lock_and_release_it_even_when_they_raise():
    m = served(checkpoint())
    before, _ = pack(m)
    weights = ServedWeights(m, before, threading.Lock())
    seen = []
    m.forward = lambda x: seen.append(weights.lock.locked()) or x
    handles = weights.guard_forwards(m)
    m(torch.zeros(1))
    assert seen == [True] and not weights.lock.locked()

    def boom(x):
        raise RuntimeError("engine error")

    m.forward = boom
    with pytest.raises(RuntimeError):
        m(torch.zeros(1))
    assert not weights.lock.locked()
    for h in handles:
        h.remove()


def test_the_digest_sees_one_changed_bit_a_row_swap_and_a_signed_zero():
    w = torch.randn(37, 19)
    d = Digest.of(w)
    assert Digest.of(w.clone()) == d and d.shape == (37, 19) and d.dtype == torch.float32
    flipped = w.clone()
    flipped.view(torch.int32)[5, 7] ^= 1  # the lowest mantissa bit
    swapped = w.clone()
    swapped[[3, 4]] = w[[4, 3]]
    zero = w.clone()
    zero[2, 2] = 0.0
    negzero = zero.clone()
    negzero[2, 2] = -0.0
    assert len({d, Digest.of(flipped), Digest.of(swapped), Digest.of(zero), Digest.of(negzero)}) == 5
    assert Digest.of(w.bfloat16()) != Digest.of(w.bfloat16().float())  # the dtype is part of it
    big = torch.randn(2500, 3)  # several checksum blocks
    assert Digest.of(big) == Digest.of(big.clone()) and Digest.of(big) != Digest.of(big.flip(0))
