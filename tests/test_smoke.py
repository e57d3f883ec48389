"""End-to-end smoke: the demo construction is found exactly, through the library and the real CLI."""

from __future__ import annotations

import json

from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.formats.load import load_model
from tests.builders import run_guard


def test_planted_set_found_exactly(planted, probe_text):
    path, critical = planted
    lm = load_model(path)
    result = run_scan(lm, [tokenize_probe(lm, "probe", probe_text)], ScanParams(samples=20))
    assert result.primary.result.converged
    assert set(result.primary.result.critical_set) == critical
    assert result.primary.result.delta_log10 >= 1.0


def test_cli_subprocess_scan_json_and_gate(planted, probe_text, tmp_path):
    path, critical = planted
    proc = run_guard(["scan", str(path), "--text", probe_text, "--samples", "10", "--format", "json",
                      "--out", str(tmp_path), "--fail-under", "3"])
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert {(n["module"], n["channel"]) for n in doc["critical_set"]} == {(n.module, n.channel) for n in critical}
    assert json.loads((tmp_path / "report.json").read_text()) == doc
