"""Clean-prefix reuse (engine/prefix.py) changes no result: every loss, Δ, curve and set is bit-identical
to the forwards run whole, and it does skip blocks when the first masked block is not the first one."""

from __future__ import annotations

import torch

from achilles_guard.engine.demo import Plant, plant_massive
from achilles_guard.engine.masking import MaskPlan
from achilles_guard.engine.neurons import Neuron, discover
from achilles_guard.engine.prefix import clean_prefix, masked_logits
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.formats.load import load_model
from achilles_guard.report.documents import scan_report
from tests.builders import PROBE, save_model, tiny_model

LATE = Plant(layer=2)  # the critical set lives in block 2 of 4: blocks 0 and 1 are a clean prefix


def _without_timings(doc):
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items() if k not in ("timings", "seconds", "load_s")}
    if isinstance(doc, list):
        return [_without_timings(v) for v in doc]
    return doc


def test_masked_logits_from_a_stored_prefix_are_bit_identical():
    model = tiny_model("llama", hidden=64, layers=4, intermediate=128)
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    plans = [MaskPlan.fixed({Neuron("model.layers.2.mlp.down_proj", c)}) for c in (3, 5, 7)]
    plans.append(MaskPlan.fixed({Neuron("model.layers.3.self_attn.o_proj", 1)}))  # later: starts from block 2's
    plans.append(MaskPlan.fixed({Neuron("model.layers.0.mlp.down_proj", 1)}))  # block 0: nothing to reuse
    batch = ids.expand(3, -1)
    whole = [masked_logits(model, batch, p) for p in plans]
    with clean_prefix(model, ids) as stats:
        reused = [masked_logits(model, batch, p) for p in plans]
        other_rows = masked_logits(model, ids.expand(2, -1), plans[0])  # another batch size: its own prefix
    assert all(torch.equal(a, b) for a, b in zip(whole, reused))
    assert torch.equal(other_rows, whole[0][:2])
    assert (stats.forwards, stats.reused) == (6, 3)  # plans 1, 2 from block 2; plan 3 from block 2 (then 3)
    assert stats.blocks_skipped == 2 + 2 + 2 and stats.blocks_total == 6 * 4
    assert all(not hasattr(b, "forward") or "forward" not in vars(b) for b in model.model.layers)  # restored


def test_a_scan_with_reuse_reports_exactly_what_a_scan_without_it_reports(tmp_path):
    model = tiny_model("llama", hidden=64, layers=4, intermediate=128)
    critical = plant_massive(model, LATE)
    lm = load_model(save_model(model, tmp_path / "late"))
    probes = [tokenize_probe(lm, "probe", PROBE)]
    params = ScanParams(samples=6, max_neurons=40, greedy_pool=16)
    candidates = discover(lm.model, params.components)
    with_reuse = run_scan(lm, probes, params, candidates=candidates)
    without = run_scan(lm, probes, params, candidates=candidates, prefix_reuse=False)
    assert set(with_reuse.primary.result.critical_set) == critical
    assert _without_timings(scan_report(with_reuse)) == _without_timings(scan_report(without))
    saved = with_reuse.primary.prefix
    assert saved.reused > 0 and saved.blocks_skipped > 0, saved
    assert without.primary.prefix.blocks_skipped == 0
    doc = scan_report(with_reuse)["texts"][0]["timings"]["prefix_reuse"]
    assert doc["blocks_skipped"] == saved.blocks_skipped and doc["blocks_total"] == saved.blocks_total
