"""deploy/: Prometheus rules (promtool), scrape config, and a Grafana dashboard naming only real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor import EXPORTED_NAMES, ActivationMonitor
from tests.builders import REPO

DEPLOY = REPO / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)"
)
METRIC = re.compile(r"\bguard_[a-z0-9_]+")


@pytest.fixture(scope="module")
def exported(planted, planted_fp) -> set[str]:
    """Every sample name a real monitor exports after a forward, a canary, a check and a request."""
    lm = load_model(planted[0])
    registry = CollectorRegistry()
    monitor = ActivationMonitor(lm.model, load_fingerprint(planted_fp), registry=registry, tokenizer=lm.tokenizer)
    with monitor, torch.no_grad():
        lm.model(input_ids=lm.tokenizer("hello there", return_tensors="pt")["input_ids"])
        monitor.check_integrity()
        monitor.run_canary()
    monitor.metrics.request("/v1/completions", 200, 0.1)
    monitor.metrics.in_flight.inc(0)
    text = generate_latest(registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _queries(node) -> list[str]:
    """Every PromQL string in a Grafana dashboard: panel targets, template queries, annotations."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                found.append(value["query"])
            else:
                found.extend(_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_queries(item))
    return found


def test_exported_names_are_what_a_scrape_carries(exported):
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exported}
    assert set(EXPORTED_NAMES) <= exported | families
    assert all(n.startswith("guard_") and ":" not in n for n in exported)
    assert "guard_build_info" in exported


def test_every_dashboard_query_names_an_exported_metric(exported):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 15
    for query in queries:
        names = METRIC.findall(query)
        assert names, f"query names no guard_ metric: {query}"
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"{query}: {unknown} is not exported"
    panels_metrics = {n for q in queries for n in METRIC.findall(q)}
    for essential in (
        "guard_anomaly_score",
        "guard_weight_integrity_ok",
        "guard_canary_delta_log10",
        "guard_critical_activation_ratio",
    ):
        assert essential in panels_metrics


def test_alert_rules_name_exported_metrics(exported):
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    exprs = re.findall(r"^\s*expr:\s*(.+)$", text, flags=re.M)
    assert len(exprs) >= 5
    for expr in exprs:
        assert all(n in exported for n in METRIC.findall(expr)), expr
    for alert in ("GuardCriticalNeuronDisrupted", "GuardWeightIntegrityFailed", "GuardCanaryCollapse"):
        assert f"alert: {alert}" in text


@needs_promtool
def test_promtool_check_rules():
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


@needs_promtool
def test_promtool_test_rules():
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_test_rules_catches_a_wrong_expectation(tmp_path):
    """The rule tests can fail: an expectation that the integrity alert stays silent is refused."""
    broken = (DEPLOY / "prometheus" / "alerts_test.yml").read_text().replace(
        "      - {eval_time: 45s, alertname: GuardWeightIntegrityFailed, exp_alerts: []}",
        "      - {eval_time: 2m, alertname: GuardWeightIntegrityFailed, exp_alerts: []}",
    )
    assert "eval_time: 2m, alertname: GuardWeightIntegrityFailed" in broken
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "alerts_test.yml").write_text(broken)
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0


@needs_promtool
def test_promtool_check_scrape_config():
    proc = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_metrics_on_an_in_process_scrape(planted, planted_fp):
    lm = load_model(planted[0])
    registry = CollectorRegistry()
    with ActivationMonitor(
        lm.model, load_fingerprint(planted_fp), registry=registry, tokenizer=lm.tokenizer
    ) as monitor:
        monitor.run_canary()
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=generate_latest(registry).decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
