"""The guard plugin inside the real vLLM OpenAI server, on SmolLM2, over real HTTP on 127.0.0.1 (issue 24).

Marker `vllm`: deselected by default; CI's last step runs these in the venv of ci/vllm-venv.sh
(`python -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_plugin.py`). Server starts
(30-80 s each on 2 cores): intact (completions, /metrics, promtool, 30 prompts without a false alarm,
a bit flipped in vLLM's packed kernel while serving), tampered fail closed (refuses, one line), a swapped
tokenizer vocabulary fails closed, tampered fail open
(serves; the integrity and activation alerts fire on the scraped values, promtool rule test), intact in
bfloat16 (vLLM's other model runner).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed in this venv (ci/vllm-venv.sh builds the one for these)")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.realmodel import RealModelUnavailable, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
START_TIMEOUT_S = 300
PROBE = "The history of the city begins with a small settlement on the river, where traders met to exchange grain."
CRITICAL_TENSOR = "model.layers.11.mlp.down_proj.weight"  # SmolLM2's attention-sink neuron, down_proj[507]
PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "Translate 'good morning' to",
    "The three primary colours are", "Once upon a time, in a small village,", "Water boils at", "SELECT * FROM",
    "List three fruits:", "The quick brown fox", "Explain gravity to a child.", "import numpy as np\n",
    "My favourite book is", "In 1969, humans", "A recipe for pancakes:", "The meaning of life is",
    "How do I reverse a list in Python?", "Dear Sir or Madam,", "2 + 2 =", "The weather today is",
    "Photosynthesis is the process", "Q: What is the tallest mountain?\nA:", "<html><body>", "Roses are red,",
    "The best way to learn a language is", "Summarise the plot of Hamlet.", "Il était une fois", "1, 1, 2, 3, 5,",
    "The largest planet in the solar system", "To be or not to be,",
]


def _guard(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from achilles_guard.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smol() -> Path:
    try:
        return smollm2_dir()
    except RealModelUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 unavailable: {err}")


@pytest.fixture(scope="module")
def fingerprint(smol, tmp_path_factory) -> Path:
    """A cheap fingerprint (one text, 4 samples, budget 10): the sink neuron is its critical set."""
    out = tmp_path_factory.mktemp("vllm-fp") / "scan"
    proc = _guard("scan", str(smol), "--out", str(out), "--samples", "4", "--max-neurons", "10",
                  "--attacks", "pcicn", "--text", PROBE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "fingerprint.safetensors"


@pytest.fixture(scope="module")
def tampered(smol, fingerprint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm-tampered") / "smol-zeroed"
    proc = _guard("tamper", str(smol), "--out", str(out), "--neurons", str(fingerprint))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


INTACT: dict[str, str] = {}  # prompt -> the intact model's greedy answer (filled by the first server test)
UNPROTECTED: dict[str, str] = {}  # prompt -> the tampered copy's answer, served fail-open without protection
PROTECTED_PROMPTS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` as a subprocess of this test (own session, own metrics dir)."""

    def __init__(self, model: Path, tmp: Path, dtype: str = "float32", **env: str):
        self.port = _free_port()
        self.log = tmp / f"vllm-{self.port}.log"
        prom = tmp / f"prom-{self.port}"
        prom.mkdir()
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom), "VLLM_CPU_KVCACHE_SPACE": "1", **env}
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--enforce-eager", "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "512",
                    "--dtype", dtype]
        self.model = str(model)
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None

    def __enter__(self) -> "Server":
        t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=ROOT)
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                return self
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.started_s = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.__exit__()
        pytest.fail(f"vLLM did not start in {START_TIMEOUT_S} s:\n{self.output[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session this test started, nothing else
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def complete(self, prompt: str, max_tokens: int = 8) -> dict:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        req = urllib.request.Request(f"{self.url}/v1/completions", body.encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            return json.loads(r.read())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            return r.read().decode()

    def guard_metrics(self) -> dict[str, list]:
        """{sample name: [(labels, value)]} of the guard_ families on vLLM's /metrics."""
        out: dict[str, list] = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                if s.name.startswith("guard_"):
                    out.setdefault(s.name, []).append((s.labels, s.value))
        return out


def _value(metrics: dict, name: str, **labels) -> float:
    rows = [v for lab, v in metrics.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert rows, f"{name} {labels} not on /metrics (have {sorted(metrics)})"
    return sum(rows)


def _guard_exposition(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines()
                   if line.startswith(("guard_", "# HELP guard_", "# TYPE guard_")))


def test_intact_smollm2_serves_watched_with_live_metrics_and_catches_a_flip(smol, fingerprint, tmp_path):
    flip = tmp_path / "flip-now"
    with Server(smol, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint), ACHILLES_GUARD_INTEGRITY_INTERVAL="1",
                ACHILLES_GUARD_TEST_FLIP_FILE=str(flip)) as srv:
        assert srv.started_s is not None, srv.output[-3000:]
        print(f"vLLM + guard started in {srv.started_s:.1f} s")
        out = srv.output
        assert "achilles-guard: watching 64 neuron(s)" in out and "verified as loaded" in out, out[-3000:]
        assert "tensor(s) and " in out and "loader file(s) verified as loaded" in out, out[-3000:]
        assert "120 linear weight(s) in vLLM's kernels, read back through them" in out, out[-3000:]
        assert "NOT checked" not in out, out[-3000:]
        assert "Traceback" not in out
        t0 = time.perf_counter()
        answers = [srv.complete(p)["choices"][0]["text"] for p in PROMPTS]
        print(f"30 completions x 8 tokens in {time.perf_counter() - t0:.1f} s")
        INTACT.update(zip(PROMPTS, answers))  # what the protected tampered copy must answer (below)
        # the background thread's first read-back of vLLM's packed kernels, compared with the verified weights
        assert "120 linear weight(s) compute with the verified weights bit for bit" in srv.output, srv.output[-3000:]
        assert len(answers) == 30 and all(isinstance(a, str) for a in answers)
        m = srv.guard_metrics()
        assert _value(m, "guard_forward_passes_total") >= 30 * 2  # a prefill and decode steps per prompt
        assert _value(m, "guard_monitored_neurons") == 64
        assert _value(m, "guard_weight_integrity_ok") == 1
        assert _value(m, "guard_weight_slices_mismatched") == 0
        assert _value(m, "guard_anomaly_score") == 0
        # 0 false alarms over the 30 prompts
        assert _value(m, "guard_activation_anomalies_total") == 0, m["guard_activation_anomalies_total"]
        assert _value(m, "guard_integrity_checks_total") >= 2  # at start, then every second
        assert m["guard_build_info"][0][0]["vllm"] == "0.32.0"
        if PROMTOOL:
            proc = subprocess.run([PROMTOOL, "check", "metrics"], input=_guard_exposition(srv.metrics_text()),
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        # a bit flipped in the worker's weights while it serves (the plugin's test-only switch): the background
        # re-check must see it within its interval (1 s here) plus its 0.5 s poll
        t0 = time.monotonic()
        flip.touch()
        while time.monotonic() - t0 < 30:
            m = srv.guard_metrics()
            if _value(m, "guard_weight_integrity_ok") == 0:
                break
            time.sleep(0.2)
        detected = time.monotonic() - t0
        print(f"flip detected in {detected:.2f} s")
        assert _value(m, "guard_weight_integrity_ok") == 0, srv.output[-2000:]
        assert _value(m, "guard_weight_slices_mismatched") >= 1
        assert detected <= 1 + 0.5 + 2.0  # interval + poll + scrape slack
        assert "TEST SWITCH: negated model.layers.11.mlp.down_proj.weight[507, 0]" in srv.output


def test_read_backs_every_tenth_of_a_second_never_disturb_serving(smol, fingerprint, tmp_path):
    """The read-backs of vLLM's kernels run in the guard's thread while vLLM serves: they must never run beside one
    of its kernels. Measured before the lock covered the LM head (vLLM calls it outside the model's forward): the
    worker died within two completions at these intervals."""
    with Server(smol, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint), ACHILLES_GUARD_INTEGRITY_INTERVAL="0.1",
                ACHILLES_GUARD_FULL_INTERVAL="3") as srv:
        assert srv.started_s is not None, srv.output[-3000:]
        answers = [srv.complete(p)["choices"][0]["text"] for p in PROMPTS[:12]]
        m = srv.guard_metrics()
        assert len(answers) == 12
        assert _value(m, "guard_weight_integrity_ok") == 1 and _value(m, "guard_activation_anomalies_total") == 0, m
        assert _value(m, "guard_integrity_checks_total") >= 10
        if all(p in INTACT for p in PROMPTS[:12]):  # the same greedy answers as without the read-backs
            assert answers == [INTACT[p] for p in PROMPTS[:12]]
        assert "Traceback" not in srv.output, srv.output[-3000:]


def test_tampered_copy_fails_closed_with_one_line(tampered, fingerprint, tmp_path):
    t0 = time.monotonic()
    with Server(tampered, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint)) as srv:
        assert srv.started_s is None, "the server started on a tampered checkpoint"
        rc = srv.proc.wait(timeout=60)
    print(f"refused in {time.monotonic() - t0:.1f} s, exit {rc}")
    out = srv.output
    assert rc == 1, out[-3000:]
    refusals = {line for line in out.splitlines() if line.startswith("achilles-guard: REFUSED")}
    assert len(refusals) == 1, out[-3000:]  # one line (the worker says it, the API server repeats it last)
    line = refusals.pop()
    assert CRITICAL_TENSOR in line and "rows 507" in line and "fingerprinted slice" in line, line
    assert "Traceback" not in out, out[-3000:]
    assert out.rstrip().splitlines()[-1] == line or line in out.rstrip().splitlines()[-6:]


def test_swapped_tokenizer_vocabulary_fails_closed(smol, fingerprint, tmp_path):
    """Two entries of tokenizer.json's vocabulary exchanged, not one weight touched: vLLM would serve other
    words for the same ids. The worker compares the loader files with the fingerprint's record before serving."""
    copy = tmp_path / "smol-tokswap"
    copy.mkdir()
    for item in smol.iterdir():  # the weights and the rest shared (hard links), tokenizer.json rewritten
        if item.is_file() and item.name != "tokenizer.json":
            os.link(item, copy / item.name)
    tok = json.loads((smol / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (1000, 1001)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (copy / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with Server(copy, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint)) as srv:
        assert srv.started_s is None, "the server started with a swapped vocabulary"
        rc = srv.proc.wait(timeout=60)
    out = srv.output
    refusals = {line for line in out.splitlines() if line.startswith("achilles-guard: REFUSED")}
    assert rc == 1 and len(refusals) == 1, out[-3000:]
    line = refusals.pop()
    assert "tokenizer.json (tokenizer) bytes differ from the fingerprinted file" in line, line
    assert "Traceback" not in out, out[-3000:]


def test_tampered_copy_fail_open_serves_unhealthy_and_the_alerts_fire(tampered, fingerprint, tmp_path):
    with Server(tampered, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint),
                ACHILLES_GUARD_FAIL_OPEN="1") as srv:
        assert srv.started_s is not None, srv.output[-3000:]
        assert "achilles-guard: FAIL-OPEN, serving anyway:" in srv.output and CRITICAL_TENSOR in srv.output
        srv.complete("A brand new prompt about lighthouses and the sea at night,", max_tokens=1)  # one prefill
        m = srv.guard_metrics()  # the score is the last batch's: read it right after that one prefill
        assert _value(m, "guard_weight_integrity_ok") == 0
        assert _value(m, "guard_weight_slices_mismatched") >= 1
        score = _value(m, "guard_anomaly_score")
        missing = _value(m, "guard_activation_anomalies_total", kind="massive_missing")
        assert score > 0 and missing >= 1, m
        model = m["guard_weight_integrity_ok"][0][0]["model"]
        UNPROTECTED.update((p, srv.complete(p)["choices"][0]["text"]) for p in PROMPTS[:PROTECTED_PROMPTS])
    if not PROMTOOL:
        pytest.skip("promtool not on PATH: the rule test on the scraped values did not run")
    import yaml  # a vLLM dependency

    # the shipped rules, less their annotations (promtool compares those exactly; the labels and exprs are the test)
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    lab = f'model="{model}",instance="127.0.0.1:{srv.port}",job="vllm"'
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                {"series": f"guard_weight_integrity_ok{{{lab}}}", "values": "0x20"},
                {"series": f"guard_weight_slices_mismatched{{{lab}}}",
                 "values": f"{_value(m, 'guard_weight_slices_mismatched'):g}x20"},
                {"series": f"guard_anomaly_score{{{lab}}}", "values": f"{score:g}x20"},
                {"series": f'guard_activation_anomalies_total{{{lab},kind="massive_missing"}}',
                 "values": f"0 {missing:g}x19"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "GuardWeightIntegrityFailed",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "model": model}}]},
                {"eval_time": "2m", "alertname": "GuardCriticalNeuronDisrupted",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "model": model}}]},
                {"eval_time": "2m", "alertname": "GuardActivationAnomalies",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model": model, "kind": "massive_missing"}}]},
            ],
        }],
    }
    path = tmp_path / "scraped_test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    proc = subprocess.run([PROMTOOL, "test", "rules", path.name], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_protect_serves_the_intact_answers_from_the_tampered_copy(smol, tampered, fingerprint, tmp_path):
    """ACHILLES_GUARD_PROTECT=1 (with fail-open, on the copy whose critical neuron is zeroed): the pin guard
    recomputes the fingerprinted neurons from the fingerprint's weights inside vLLM, so greedy answers are the
    intact model's, while the integrity alarm still says the weights are not the fingerprinted ones."""
    prompts = PROMPTS[:PROTECTED_PROMPTS]
    if not all(p in INTACT for p in prompts):
        with Server(smol, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint)) as srv:
            assert srv.started_s is not None, srv.output[-3000:]
            INTACT.update((p, srv.complete(p)["choices"][0]["text"]) for p in prompts)
    with Server(tampered, tmp_path, ACHILLES_GUARD_FINGERPRINT=str(fingerprint), ACHILLES_GUARD_FAIL_OPEN="1",
                ACHILLES_GUARD_PROTECT="1") as srv:
        assert srv.started_s is not None, srv.output[-3000:]
        assert "Traceback" not in srv.output, srv.output[-3000:]
        answers = {p: srv.complete(p)["choices"][0]["text"] for p in prompts}
        m = srv.guard_metrics()
    assert answers == {p: INTACT[p] for p in prompts}
    if UNPROTECTED:  # the same copy without protection answers otherwise: the guard did the work
        assert any(UNPROTECTED[p] != INTACT[p] for p in prompts if p in UNPROTECTED), UNPROTECTED
    assert _value(m, "guard_protection_enabled") == 1
    assert _value(m, "guard_pin_interventions_total", action="restore") > 0
    assert _value(m, "guard_weight_integrity_ok") == 0  # protection never hides the alarm


def test_bfloat16_load_is_guarded_too(smol, fingerprint, tmp_path):
    """vLLM 0.32 serves bfloat16 through its V2 CPU model runner (float32: V1): the guard must start on both,
    with the float32 fingerprint judged through the row sketch within bf16 rounding."""
    with Server(smol, tmp_path, dtype="bfloat16", ACHILLES_GUARD_FINGERPRINT=str(fingerprint)) as srv:
        assert srv.started_s is not None, srv.output[-3000:]
        assert "achilles-guard: watching 64 neuron(s)" in srv.output, srv.output[-3000:]
        for prompt in PROMPTS[:4]:
            srv.complete(prompt, max_tokens=16)
        m = srv.guard_metrics()
        assert _value(m, "guard_forward_passes_total") >= 4 * 2
        assert _value(m, "guard_weight_integrity_ok") == 1
        assert _value(m, "guard_activation_anomalies_total") == 0


def test_unconfigured_plugin_leaves_vllm_alone(monkeypatch):
    """Without ACHILLES_GUARD_FINGERPRINT, register() wraps nothing (vLLM runs exactly as without guard)."""
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from achilles_guard.monitor import vllm_plugin

    monkeypatch.delenv("ACHILLES_GUARD_FINGERPRINT", raising=False)
    before, runner = base_loader.process_weights_after_loading, CPUModelRunner.load_model
    vllm_plugin.register()
    assert base_loader.process_weights_after_loading is before and not getattr(before, "_achilles_guard", False)
    assert CPUModelRunner.load_model is runner
    from importlib.metadata import entry_points

    names = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "achilles_guard.monitor.vllm_plugin:register" in names
