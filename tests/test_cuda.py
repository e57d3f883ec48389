"""The CUDA path: fp16 on the GPU, batch sizing from free GPU memory, and a model split across devices.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from achilles_guard.engine import pcicn
from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.engine.neurons import discover
from achilles_guard.formats.load import load_model
from tests.builders import PROBE, run_guard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# run_guard hides the GPUs from subprocesses by default; these ones must see them.
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")
           or ",".join(str(i) for i in range(torch.cuda.device_count()))}


def _ids(lm):
    return lm.tokenizer(PROBE, return_tensors="pt")["input_ids"].to(lm.input_device)


def _scan(model, ids, samples=20):
    cands = discover(model, "all")
    ranking = pcicn.rank(model, ids, cands, samples=samples, seed=42)
    return ranking, pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=200)


def test_auto_dtype_is_fp16_on_cuda_and_finds_the_planted_set(planted):
    path, critical = planted
    lm = load_model(path, device="auto")
    assert lm.device == "cuda" and lm.dtype == torch.float16
    assert lm.model.get_input_embeddings().weight.dtype == torch.float16
    ranking, result = _scan(lm.model, _ids(lm))
    assert result.converged and set(result.critical_set) == critical


def test_fp16_cuda_matches_fp32_cpu(planted):
    path, critical = planted
    gpu = load_model(path, device="cuda", dtype="float16")
    cpu = load_model(path, device="cpu", dtype="float32")
    r_gpu, s_gpu = _scan(gpu.model, _ids(gpu))
    r_cpu, s_cpu = _scan(cpu.model, _ids(cpu))
    assert set(r_gpu.top(3)) == set(r_cpu.top(3)) == critical  # fp16 may swap the order of near-equal scores
    assert s_gpu.n_star == s_cpu.n_star == 3
    assert abs(s_gpu.delta_log10 - s_cpu.delta_log10) < 0.1


def test_batch_sizes_come_from_free_gpu_memory(planted):
    lm = load_model(planted[0], device="cuda")
    T = _ids(lm).shape[1]
    free, _ = torch.cuda.mem_get_info()
    assert pcicn._memory_budget(lm.model) == int(free * 0.4)
    assert 1 <= pcicn.search_batch_size(lm.model, T) <= 64
    assert 1 <= pcicn._rank_batch(lm.model, T, discover(lm.model, "all").total) <= 64


def test_batched_search_equals_sequential_on_cuda(planted):
    lm = load_model(planted[0], device="cuda", dtype="float16")
    ids = _ids(lm)
    ranking = pcicn.rank(lm.model, ids, discover(lm.model, "all"), samples=10, seed=42)
    batched = pcicn.masked_losses(lm.model, ids, ranking, range(1, 9))
    one_by_one = torch.cat([pcicn.masked_losses(lm.model, ids, ranking, [n], batch_size=1) for n in range(1, 9)])
    assert torch.allclose(batched, one_by_one, atol=2e-2, rtol=1e-3)


def test_model_split_across_gpu_and_cpu_gives_the_single_device_result(planted):
    """accelerate device_map with a max_memory cap: layers 0-1 on the GPU, the rest on the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    path, critical = planted
    whole = load_model(path, device="cpu", dtype="float32")
    split = load_model(path, device="cpu", dtype="float32")
    per_layer = sum(p.numel() * 4 for p in split.model.model.layers[0].parameters())
    embed = split.model.get_input_embeddings().weight.numel() * 4
    device_map = infer_auto_device_map(split.model, max_memory={0: embed + 2 * per_layer + 1024, "cpu": 2**34},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    placed = set(device_map.values())
    assert 0 in placed and "cpu" in placed, device_map
    model = dispatch_model(split.model, device_map=device_map, main_device="cpu")  # CPU layers run on the CPU
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cuda", "cpu"}

    ids = whole.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    r_whole, s_whole = _scan(whole.model, ids)
    r_split, s_split = _scan(model, ids.to(model.get_input_embeddings().weight.device))
    assert r_split.top(10) == r_whole.top(10)
    assert s_split.n_star == s_whole.n_star and s_split.critical_set == s_whole.critical_set
    assert abs(s_split.delta_log10 - s_whole.delta_log10) < 1e-3
    # masking hooks on modules that live on different devices
    with masked(model, MaskPlan.fixed(critical)):
        split_loss = pcicn.clean_loss(model, ids.to(model.get_input_embeddings().weight.device))
    with masked(whole.model, MaskPlan.fixed(critical)):
        whole_loss = pcicn.clean_loss(whole.model, ids)
    assert abs(split_loss - whole_loss) < 1e-3


def test_cli_scan_demo_on_cuda_reports_fp16(tmp_path):
    proc = run_guard(
        ["scan", "--demo", "--device", "cuda", "--format", "json", "--out", str(tmp_path / "o")], env=GPU_ENV
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"]["device"] == "cuda" and doc["model"]["dtype"] == "float16"
    assert len(doc["critical_set"]) == 3 and doc["delta_log10"] > 1
