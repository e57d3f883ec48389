"""Paper Table 10: one model's critical set, applied to a fine-tuned variant of the same architecture."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.engine.demo import plant_massive
from tests.builders import PROBE, run_guard, save_model, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def variant_and_report(planted, tmp_path_factory):
    """A 'fine-tuned variant' of the planted model (every weight nudged, config changed) + the original's report."""
    out = tmp_path_factory.mktemp("cross")
    scan = runner.invoke(app, ["scan", str(planted[0]), "--text", PROBE, "--samples", "6", "--out", str(out / "scan")])
    assert scan.exit_code == 0, scan.output
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=64, layers=4, intermediate=128, seed=0)
    plant_massive(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3 * p.abs().mean())
    model.config.max_position_embeddings = 200  # a different config: another checkpoint, same architecture
    variant = save_model(model, out / "variant")
    corpus = out / "corpus.txt"
    corpus.write_text(PROBE + " " + PROBE)
    return variant, out / "scan" / "report.json", corpus


def test_foreign_report_is_refused_without_cross_model(variant_and_report):
    variant, report, corpus = variant_and_report
    proc = run_guard(["eval", str(variant), "--report", str(report), "--data", str(corpus)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--cross-model" in proc.stderr


def test_cross_model_applies_the_set_to_the_variant(variant_and_report):
    variant, report, corpus = variant_and_report
    result = runner.invoke(app, ["eval", str(variant), "--report", str(report), "--data", str(corpus),
                                 "--levels", "0,n*", "--cross-model", "--format", "json", "--max-length", "64"])
    assert result.exit_code == 0, result.output
    levels = {lv["n"]: lv for lv in json.loads(result.output)["levels"]}
    assert levels[3]["delta_log10"] > 5  # the original's 3 neurons still collapse the variant


def test_cross_model_still_needs_the_same_architecture(variant_and_report, tmp_path):
    _, report, corpus = variant_and_report
    other = save_model(tiny_model("gpt2"), tmp_path / "gpt2")
    result = runner.invoke(app, ["eval", str(other), "--report", str(report), "--data", str(corpus), "--cross-model"])
    assert result.exit_code == 2 and "same architecture" in result.output


def test_channel_beyond_the_module_is_refused(variant_and_report, tmp_path):
    variant, report, corpus = variant_and_report
    doc = json.loads(report.read_text())
    doc["ranking"][0]["channel"] = 10_000
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(doc))
    result = runner.invoke(app, ["eval", str(variant), "--report", str(bad), "--data", str(corpus), "--cross-model"])
    assert result.exit_code == 2 and "channel 10000" in result.output
