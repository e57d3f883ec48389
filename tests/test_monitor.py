"""The in-process monitor: baselines, anomalies, integrity, canary, metrics, the watch CLI."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.errors import InputError
from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor import ActivationMonitor, MonitorConfig, disrupt, disrupted
from achilles_guard.monitor.generate import complete
from tests.builders import varied_prompts


@pytest.fixture(scope="module")
def lm(planted):
    return load_model(planted[0])


@pytest.fixture(scope="module")
def fp(planted_fp):
    return load_fingerprint(planted_fp)


def sample(registry, name, **labels):
    value = registry.get_sample_value(name, {"model": "m", **labels})
    return 0.0 if value is None else value


def make(lm, fp, **kw):
    registry = CollectorRegistry()
    return ActivationMonitor(lm.model, fp, registry=registry, tokenizer=lm.tokenizer, model_name="m", **kw), registry


def forward(lm, text):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lm.model(input_ids=ids)


def test_fingerprint_of_planted_model_has_the_plant(fp, planted):
    assert set(fp.critical_set) == planted[1]


def test_normal_prompts_raise_no_anomaly(lm, fp):
    prompts = varied_prompts(60)
    assert len(set(prompts)) >= 50
    monitor, registry = make(lm, fp)
    scores = []
    with monitor:
        for text in prompts:
            forward(lm, text)
            scores.append(monitor.state().last.score)
    assert scores == [0.0] * len(prompts)
    assert sample(registry, "guard_forward_passes_total") == len(prompts)
    assert sample(registry, "guard_monitor_overhead_seconds_count") == len(prompts)
    for kind in ("collapse", "surge", "massive_missing"):
        assert sample(registry, "guard_activation_anomalies_total", kind=kind) == 0
    for neuron in fp.critical_set:
        ratio = sample(registry, "guard_critical_activation_ratio", neuron=str(neuron))
        assert 0.5 < ratio < 2.0


def test_zeroed_critical_neuron_is_detected_and_recovers(lm, fp):
    monitor, registry = make(lm, fp)
    target = fp.critical_set[0]
    with monitor:
        forward(lm, "The baker kept his ovens burning.")
        assert monitor.check_integrity().ok
        with disrupted(lm.model, fp, [target]):
            forward(lm, "The baker kept his ovens burning.")
            reading = monitor.state().last
            assert reading.score > 1.0
            assert reading.anomalous == (str(target),) and reading.kinds == ("collapse",)
            integrity = monitor.check_integrity()
            assert (
                not integrity.ok
                and integrity.mismatched == tuple(r for r in fp.neurons if r.neuron == target)[0].slices
            )
            assert sample(registry, "guard_weight_integrity_ok") == 0
            assert sample(registry, "guard_weight_slices_mismatched") == 1
            assert sample(registry, "guard_critical_activation_ratio", neuron=str(target)) < 1e-3
            assert monitor.run_canary().ok  # one of three: cooperative, the model does not collapse
            assert not monitor.state().healthy
        forward(lm, "The baker kept his ovens burning.")
        assert monitor.state().last.score == 0.0
        assert monitor.check_integrity().ok and monitor.state().healthy
    assert sample(registry, "guard_activation_anomalies_total", kind="collapse") == 2  # disrupted forward + canary
    assert sample(registry, "guard_forward_passes_total") == 4  # 3 forwards + 1 canary


def test_whole_critical_set_zeroed_collapses_the_canary(lm, fp):
    monitor, registry = make(lm, fp)
    with monitor, disrupted(lm.model, fp, fp.critical_set):
        canary = monitor.run_canary()
        assert not canary.ok and canary.delta_log10 > 5
        assert set(monitor.state().last.anomalous) == {str(n) for n in fp.critical_set}
    assert sample(registry, "guard_canary_ok") == 0
    assert sample(registry, "guard_canary_delta_log10") == pytest.approx(canary.delta_log10)
    monitor.run_canary()
    assert sample(registry, "guard_canary_ok") == 1 and abs(sample(registry, "guard_canary_delta_log10")) < 1e-6


def test_amplified_neuron_is_a_surge(lm, fp):
    monitor, registry = make(lm, fp)
    with monitor, disrupted(lm.model, fp, fp.critical_set[1:2], scale=50.0):
        forward(lm, "Farmers moved their cattle to the hills.")
        reading = monitor.state().last
    assert reading.kinds == ("surge",) and reading.score == pytest.approx(math.log10(50) - 1, abs=0.05)


def test_masking_hook_installed_before_the_monitor_is_seen(lm, fp):
    target = fp.critical_set[2]
    monitor, _ = make(lm, fp)
    with masked(lm.model, MaskPlan.fixed({target}, scale=0.0)), monitor:
        forward(lm, "Farmers moved their cattle to the hills.")
        assert monitor.state().last.anomalous == (str(target),)
        assert monitor.check_integrity().ok  # weights untouched: only the activation tells


def test_detach_removes_every_hook(lm, fp):
    before = {n: len(m._forward_hooks) for n, m in lm.model.named_modules()}
    monitor, registry = make(lm, fp)
    monitor.attach()
    assert sum(len(m._forward_hooks) for m in lm.model.modules()) > sum(before.values())
    monitor.detach()
    assert {n: len(m._forward_hooks) for n, m in lm.model.named_modules()} == before
    forward(lm, "no monitor now")
    assert sample(registry, "guard_forward_passes_total") == 0


def test_background_checks_run_on_their_interval(lm, fp):
    monitor, registry = make(lm, fp, config=MonitorConfig(integrity_interval_s=0.05, canary_interval_s=0.05))
    monitor.attach(background=True)
    try:
        deadline = time.monotonic() + 10
        while sample(registry, "guard_canary_runs_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        monitor.detach()
    assert sample(registry, "guard_integrity_checks_total") >= 2
    assert sample(registry, "guard_canary_runs_total") >= 2
    assert sample(registry, "guard_integrity_last_check_timestamp_seconds") > time.time() - 60


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_integrity_in_another_dtype(planted, fp, dtype):
    lm16 = load_model(planted[0], dtype=dtype)
    monitor, _ = make(lm16, fp)
    assert monitor.check_integrity().ok
    assert lm16.model.get_parameter(fp.slices[fp.neurons[0].slices[0]].param).dtype == getattr(torch, dtype)
    handle = disrupt(lm16.model, fp, fp.critical_set[:1], scale=0.5)
    try:
        assert monitor.check_integrity().mismatched == fp.neurons[0].slices
    finally:
        handle.restore()
    assert monitor.check_integrity().ok


def test_fingerprint_of_another_model_is_refused(random_llama_dir, fp):
    other = load_model(random_llama_dir)
    with pytest.raises(InputError, match="another model"):
        ActivationMonitor(other.model, fp, registry=CollectorRegistry(), config_sha256=other.config_sha256)
    with pytest.raises(InputError, match="another model"):  # without the config hash: the shapes tell
        ActivationMonitor(other.model, fp, registry=CollectorRegistry())


def test_kv_cache_completion_equals_full_recompute(lm):
    ids = lm.tokenizer("The river rose slowly", return_tensors="pt")["input_ids"]
    result = complete(lm.model, ids, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, lm.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert list(result.token_ids) == seq[0, ids.shape[1]:].tolist() and result.forwards == 6
    a = complete(lm.model, ids, max_new_tokens=5, temperature=1.0, seed=7)
    assert a == complete(lm.model, ids, max_new_tokens=5, temperature=1.0, seed=7)


def test_watch_cli_one_iteration(planted, planted_fp):
    result = CliRunner().invoke(
        app, ["monitor", str(planted[0]), "--fingerprint", str(planted_fp), "--iterations", "2", "--interval", "0.01"]
    )
    assert result.exit_code == 0, result.output
    assert "weight integrity" in result.output and "ALERT" not in result.output
    assert re.search(r"anomaly score 0\.000, \d+ forwards", result.output)


def test_watch_cli_bad_inputs(planted, planted_fp, random_llama_dir, tmp_path):
    runner = CliRunner()
    other = runner.invoke(
        app, ["monitor", str(random_llama_dir), "--fingerprint", str(planted_fp), "--iterations", "1"]
    )
    assert other.exit_code == 2 and "another model" in other.output
    missing = runner.invoke(app, ["monitor", str(planted[0]), "--fingerprint", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    both = runner.invoke(app, ["monitor", str(planted[0]), "--demo", "--fingerprint", str(planted_fp)])
    assert both.exit_code == 2 and "exactly one" in both.output
    bad = runner.invoke(app, ["monitor", str(planted[0]), "--fingerprint", str(planted_fp), "--drift-factor", "0.5"])
    assert bad.exit_code == 2 and "--drift-factor" in bad.output
    old = runner.invoke(app, ["monitor", str(planted[0]), "--fingerprint", str(planted_fp), "--tolerance", "0.5"])
    assert old.exit_code == 2 and "--tolerance is deprecated" in old.output  # the old name still works, with a warning
