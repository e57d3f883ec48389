"""`guard monitor --protect`: the pin guard serves intact outputs while the monitor still alarms."""

from __future__ import annotations

import re
import signal

import pytest
import torch
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.defenses.pin import PinGuard
from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor import ActivationMonitor, disrupted
from achilles_guard.monitor.generate import complete
from tests.builders import Server, delta, scanned, varied_prompts

PROMPTS = ("The river rose", "Farmers moved their cattle", "def f(x):")


@pytest.fixture(scope="module")
def lm(planted):
    return load_model(planted[0])


@pytest.fixture(scope="module")
def fp(planted_fp):
    return load_fingerprint(planted_fp)


def monitor_with(lm, fp, guard=None):
    registry = CollectorRegistry()
    return ActivationMonitor(
        lm.model, fp, registry=registry, tokenizer=lm.tokenizer, model_name="m", guard=guard
    ), registry


def sample(registry, name, **labels):
    value = registry.get_sample_value(name, {"model": "m", **labels})
    return 0.0 if value is None else value


def completions(lm, n=8):
    return [
        complete(lm.model, lm.tokenizer(p, return_tensors="pt")["input_ids"], max_new_tokens=n).token_ids
        for p in PROMPTS
    ]


def test_protected_outputs_survive_the_whole_set_zeroed_and_the_monitor_still_alarms(lm, fp):
    clean = completions(lm)
    guard = PinGuard.from_fingerprint(fp)
    monitor, registry = monitor_with(lm, fp, guard)
    with monitor, disrupted(lm.model, fp, fp.critical_set):
        protected = completions(lm)
        reading = monitor.state().last
        canary = monitor.run_canary()
        integrity = monitor.check_integrity()
    assert protected == clean  # greedy completions identical to the clean model's
    assert reading.score > 1 and set(reading.anomalous) == {
        str(n) for n in fp.critical_set
    }  # the monitor saw raw values
    assert canary.ok and abs(canary.delta_log10) < 0.01  # the canary measures what is served
    assert not integrity.ok
    generated = sum(len(c) for c in clean)
    prompt_positions = sum(lm.tokenizer(p, return_tensors="pt")["input_ids"].shape[1] for p in PROMPTS)
    canary_positions = monitor._canary.input_ids.shape[1]
    # every position of every forward, for each of the 3 critical neurons, restored (the last token is not fed back)
    expected = len(fp.critical_set) * (prompt_positions + generated - len(PROMPTS) + canary_positions)
    assert guard.interventions == guard.restorations == expected
    assert sample(registry, "guard_pin_interventions_total", action="restore") == expected
    assert sample(registry, "guard_pin_interventions_total", action="clamp") == 0
    assert sample(registry, "guard_protection_enabled") == 1
    assert sample(registry, "guard_activation_anomalies_total", kind="collapse") > 0

    unprotected, _ = monitor_with(lm, fp)  # the same attack without --protect collapses the model
    with unprotected, disrupted(lm.model, fp, fp.critical_set):
        assert completions(lm) != clean
        bare = unprotected.run_canary()
    assert not bare.ok and bare.delta_log10 > 5


def test_protection_changes_nothing_without_an_attack(lm, fp):
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        bare = lm.model(input_ids=ids).logits
    guard = PinGuard.from_fingerprint(fp)
    monitor, registry = monitor_with(lm, fp, guard)
    with monitor, torch.no_grad():
        pinned = lm.model(input_ids=ids).logits
        for text in varied_prompts(60):
            lm.model(input_ids=lm.tokenizer(text, return_tensors="pt")["input_ids"])
        assert monitor.run_canary().delta_log10 == 0.0
    assert torch.equal(bare, pinned)  # bit-identical
    assert guard.interventions == 0 and monitor.state().interventions == 0
    assert sample(registry, "guard_pin_interventions_total", action="restore") == 0
    assert sample(registry, "guard_protection_enabled") == 1


def test_a_guard_installed_before_the_monitor_would_hide_the_attack(lm, fp):
    """Why the monitor's hooks go first: the other order shows the monitor only restored values."""
    guard = PinGuard.from_fingerprint(fp)
    monitor, _ = monitor_with(lm, fp)
    ids = lm.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with guard.installed(lm.model), monitor, disrupted(lm.model, fp, fp.critical_set), torch.no_grad():
        lm.model(input_ids=ids)
        assert monitor.state().last.score == 0.0 and guard.interventions > 0


def test_without_protect_metrics_say_off_and_detach_removes_the_guard(lm, fp):
    monitor, registry = monitor_with(lm, fp)
    assert sample(registry, "guard_protection_enabled") == 0 and monitor.state().interventions is None
    assert registry.get_sample_value("guard_pin_interventions_total", {"model": "m", "action": "restore"}) == 0
    before = sum(len(m._forward_hooks) for m in lm.model.modules())
    protected, _ = monitor_with(lm, fp, PinGuard.from_fingerprint(fp))
    protected.attach()
    assert sum(len(m._forward_hooks) for m in lm.model.modules()) == before + len(protected._table.modules) + len(
        protected.guard.profiles
    )
    protected.detach()
    assert sum(len(m._forward_hooks) for m in lm.model.modules()) == before


def test_watch_cli_protect(planted, planted_fp):
    result = CliRunner().invoke(
        app,
        [
            "monitor",
            str(planted[0]),
            "--fingerprint",
            str(planted_fp),
            "--protect",
            "--iterations",
            "1",
            "--interval",
            "0.01",
        ],
    )
    assert result.exit_code == 0, result.output
    # the 3 planted channels + greedy's gate_proj[3]
    assert re.search(r"protection on: \d+ neuron\(s\) recomputed from their fingerprinted weights \(4 critical\)",
                     result.output)
    assert re.search(r"pin guard on, 0 activation values restored or clamped", result.output)


def test_protect_refuses_a_fingerprint_without_critical_set(random_llama_dir, tmp_path):
    fp = scanned(random_llama_dir, tmp_path / "scan", samples=2, max_neurons=4) / "fingerprint.safetensors"
    assert not load_fingerprint(fp).critical_set
    result = CliRunner().invoke(
        app, ["monitor", str(random_llama_dir), "--fingerprint", str(fp), "--protect", "--iterations", "1"]
    )
    assert result.exit_code == 2 and "no critical set to protect" in result.output


# -- through real servers ------------------------------------------------------------------


SERVE = [
    "--serve",
    "--enable-test-endpoints",
    "--integrity-interval",
    "0",
    "--canary-interval",
    "0",
    "--max-new-tokens",
    "16",
]


@pytest.fixture(scope="module")
def servers(planted, planted_fp):
    started = {}
    try:
        started["bare"] = Server([str(planted[0]), "--fingerprint", str(planted_fp), *SERVE])
        started["protected"] = Server([str(planted[0]), "--fingerprint", str(planted_fp), *SERVE, "--protect"])
        yield started
    finally:
        for srv in started.values():
            if srv.proc.poll() is None:
                srv.proc.kill()
                srv.proc.communicate()


def test_servers_protect_against_the_whole_set_zeroed(servers):
    bare, protected = servers["bare"], servers["protected"]
    assert any(re.search(r"recomputed from their fingerprinted weights \(4 critical\)", line) for line in protected.log)
    clean = {p: bare.complete(p, max_tokens=8)["choices"][0]["text"] for p in PROMPTS}
    before = protected.scrape()
    assert before[("guard_protection_enabled", ())] == 1 and bare.scrape()[("guard_protection_enabled", ())] == 0
    untouched = [protected.complete(p, max_tokens=8) for p in PROMPTS]
    assert [d["choices"][0]["text"] for d in untouched] == list(clean.values())  # no attack: same text
    assert all(d["guard"]["protected"] and d["guard"]["pin_interventions"] == 0 for d in untouched)
    assert delta(protected.scrape(), before, "guard_pin_interventions_total", action="restore") == 0

    for srv in (bare, protected):
        status, doc = srv.request("POST", "/v1/test/disrupt", {"all": True})
        assert status == 200 and doc["integrity_ok"] is False
        if srv is bare:
            assert doc["canary_ok"] is False and doc["canary_delta_log10"] > 5
        else:
            assert doc["canary_ok"] is True and abs(doc["canary_delta_log10"]) < 0.01 and doc["pin_interventions"] > 0
    during = protected.scrape()
    attacked = [bare.complete(p, max_tokens=8)["choices"][0]["text"] for p in PROMPTS]
    served = [protected.complete(p, max_tokens=8) for p in PROMPTS]
    assert attacked != list(clean.values())  # the unprotected server collapsed
    assert [d["choices"][0]["text"] for d in served] == list(clean.values())  # the protected one did not
    assert all(d["guard"]["anomaly_score"] > 1 for d in served)  # ...and still reports the disruption
    after = protected.scrape()
    moved = delta(after, during, "guard_pin_interventions_total", action="restore")
    generated = sum(d["usage"]["completion_tokens"] for d in served)
    prompt_tokens = sum(d["usage"]["prompt_tokens"] for d in served)
    assert moved == 3 * (prompt_tokens + generated - len(served))
    assert after[("guard_weight_integrity_ok", ())] == 0 and after[("guard_anomaly_score", ())] > 1
    assert protected.request("GET", "/healthz")[0] == 503  # tampered weights: unhealthy even though protected

    for srv in (bare, protected):
        assert srv.request("POST", "/v1/test/restore", {})[1]["status"] == "ok"
    assert [protected.complete(p, max_tokens=8)["choices"][0]["text"] for p in PROMPTS] == list(clean.values())
    assert delta(protected.scrape(), after, "guard_pin_interventions_total", action="restore") == 0
    code, log = protected.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in log
