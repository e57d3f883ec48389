"""`guard monitor --serve` as a real subprocess: completions, metrics, health, disruption, bad input."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor import ActivationMonitor
from achilles_guard.monitor.server import ServeContext, ServerLimits, build_server
from tests.builders import Server, delta, run_guard, varied_prompts


@pytest.fixture(scope="module")
def server(planted, planted_fp):
    srv = Server([str(planted[0]), "--fingerprint", str(planted_fp), "--serve", "--enable-test-endpoints",
                  "--integrity-interval", "0", "--canary-interval", "0", "--max-prompt-tokens", "240",
                  "--max-new-tokens", "32", "--max-body-bytes", "16384"])
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.communicate()


def test_completions_move_the_counters_by_the_right_amounts(server, planted_fp):
    before = server.scrape()
    docs = [
        server.complete(p, max_tokens=n)
        for p, n in [("The river rose", 4), ("Farmers moved their cattle", 7), ("The river rose", 4)]
    ]
    after = server.scrape()
    generated = sum(d["usage"]["completion_tokens"] for d in docs)
    prompt_tokens = sum(d["usage"]["prompt_tokens"] for d in docs)
    assert all(
        d["object"] == "text_completion" and d["choices"][0]["finish_reason"] in ("length", "stop") for d in docs
    )
    assert docs[0]["choices"][0]["text"] == docs[2]["choices"][0]["text"]  # greedy by default
    assert delta(after, before, "guard_forward_passes_total") == generated  # one forward per token (KV cache)
    assert delta(after, before, "guard_monitor_overhead_seconds_count") == generated
    assert delta(after, before, "guard_completion_tokens_total") == generated
    assert delta(after, before, "guard_prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "guard_http_requests_total", endpoint="/v1/completions", code="200") == 3
    assert delta(after, before, "guard_http_requests_total", endpoint="/metrics", code="200") == 1  # the first scrape
    assert after[("guard_anomaly_score", ())] == 0 and after[("guard_weight_integrity_ok", ())] == 1
    # every fingerprinted neuron: the top 16 (--fingerprint-top in the builder) of each portfolio ranking, and the sets
    monitored = after[("guard_monitored_neurons", ())]
    assert monitored == len(load_fingerprint(planted_fp).neurons) and monitored >= 16


def test_normal_traffic_raises_no_anomaly(server):
    before = server.scrape()
    prompts = varied_prompts(50)
    scores = [
        server.complete(p, max_tokens=2, temperature=0.8, seed=i)["guard"]["anomaly_score"]
        for i, p in enumerate(prompts)
    ]
    after = server.scrape()
    assert scores == [0.0] * 50
    assert all(
        delta(after, before, "guard_activation_anomalies_total", kind=k) == 0
        for k in ("collapse", "surge", "massive_missing")
    )
    assert delta(after, before, "guard_forward_passes_total") >= 50
    status, health = server.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"


def test_disruption_alarms_and_restore_recovers(server, planted):
    target = sorted(planted[1])[0]
    before = server.scrape()
    status, doc = server.request("POST", "/v1/test/disrupt", {"neuron": str(target)})
    assert status == 200 and doc["disrupted"] == [str(target)]
    status, health = server.request("GET", "/healthz")
    assert (
        status == 503
        and health["integrity_ok"] is False
        and health["mismatched_slices"] == [f"{target.module}.weight@0:{target.channel}"]
    )
    reply = server.complete("The river rose", max_tokens=3)
    assert reply["guard"]["anomaly_score"] > 1 and reply["guard"]["anomalous_neurons"] == [str(target)]
    during = server.scrape()
    assert during[("guard_weight_integrity_ok", ())] == 0
    assert during[("guard_anomaly_score", ())] > 1
    assert during[("guard_critical_activation_ratio", (("neuron", str(target)),))] < 1e-3
    assert delta(during, before, "guard_activation_anomalies_total", kind="collapse") == 3 + 1  # 3 tokens + the canary

    status, doc = server.request("POST", "/v1/test/restore", {})
    assert status == 200 and doc["restored"] == [str(target)] and doc["status"] == "ok"
    assert server.request("GET", "/healthz")[0] == 200
    assert server.complete("The river rose", max_tokens=3)["guard"]["anomaly_score"] == 0
    after = server.scrape()
    assert after[("guard_weight_integrity_ok", ())] == 1 and after[("guard_anomaly_score", ())] == 0


def test_whole_set_disrupted_collapses_canary(server):
    status, doc = server.request("POST", "/v1/test/disrupt", {"all": True})
    assert status == 200 and doc["canary_ok"] is False and doc["canary_delta_log10"] > 5
    assert server.scrape()[("guard_canary_ok", ())] == 0
    assert server.request("POST", "/v1/test/restore", {})[1]["status"] == "ok"
    assert server.scrape()[("guard_canary_ok", ())] == 1


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    bad = [
        ({"raw": b"{not json"}, 400),
        ({"raw": b"[1, 2]"}, 400),
        ({"raw": b"\xff\xfe"}, 400),
        ({"body": {"prompt": "hi", "max_tokens": -1}}, 400),
        ({"body": {"prompt": "hi", "max_tokens": 0}}, 400),
        ({"body": {"prompt": "hi", "max_tokens": True}}, 400),
        ({"body": {"prompt": "hi", "max_tokens": 10**9}}, 400),
        ({"body": {"prompt": "hi", "temperature": -1}}, 400),
        ({"body": {"prompt": "hi", "temperature": "hot"}}, 400),
        ({"body": {"prompt": ""}}, 400),
        ({"body": {"prompt": 42}}, 400),
        ({"body": {"max_tokens": 3}}, 400),
        ({"body": {"prompt": "hi", "stream": True}}, 400),
        ({"body": {"prompt": "word " * 5000}}, 413),  # over --max-body-bytes 16384
        ({"body": {"prompt": "tok " * 1000}}, 400),  # under the body limit, over --max-prompt-tokens 240
    ]
    for kw, expected in bad:
        status, doc = server.request("POST", "/v1/completions", kw.get("body"), raw=kw.get("raw"))
        assert status == expected, (kw, doc)
        assert doc["error"]["message"]
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("POST", "/v1/completions", raw=b"", headers={"Content-Length": "abc"})[0] == 400
    assert server.request("POST", "/v1/test/disrupt", {"neuron": "not a neuron"})[0] == 400
    assert server.request("POST", "/v1/test/disrupt", {"neuron": "model.layers.0.mlp.up_proj[999]"})[0] == 400

    before = server.scrape()
    errors = []

    def hammer(offset):
        for i in range(250):
            kw = bad[(offset + i) % 13][0]  # the cheap ones (no tokenizing of huge prompts)
            status, _ = server.request("POST", "/v1/completions", kw.get("body"), raw=kw.get("raw"))
            if status != 400:
                errors.append(status)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    after = server.scrape()
    assert delta(after, before, "guard_http_requests_total", endpoint="/v1/completions", code="400") == 1000
    assert server.complete("still serving?", max_tokens=2)["usage"]["completion_tokens"] >= 1
    assert server.request("GET", "/healthz")[0] == 200


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)",
)
def test_promtool_accepts_a_real_scrape(server):
    server.scrape()
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=server.last_scrape, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _post(port, path, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_in_process_server_limits_and_no_test_endpoints_by_default(planted, planted_fp):
    lm = load_model(planted[0])
    monitor = ActivationMonitor(
        lm.model, load_fingerprint(planted_fp), registry=CollectorRegistry(), tokenizer=lm.tokenizer
    )
    srv = build_server(ServeContext(lm, monitor, ServerLimits(max_in_flight=1)), host="127.0.0.1", port=0)
    port = srv.server_address[1]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert _post(port, "/v1/test/disrupt", b"{}")[0] == 404  # no --enable-test-endpoints
        assert monitor.check_integrity().ok
        first = {}
        with monitor.lock:  # the model is busy: the first request takes the only slot and waits
            waiter = threading.Thread(
                target=lambda: first.update(r=_post(port, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}'))
            )
            waiter.start()
            deadline = time.monotonic() + 30
            while monitor.metrics.registry.get_sample_value("guard_http_in_flight_requests", {"model": "model"}) != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, body = _post(port, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
            assert status == 429 and b"in flight" in body
        waiter.join(30)
        assert first["r"][0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_port_in_use_exits_2(planted, planted_fp):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_guard(
            ["monitor", str(planted[0]), "--fingerprint", str(planted_fp), "--serve", "--port", str(port)], timeout=120
        )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_fingerprint_of_another_model_exits_2(random_llama_dir, planted_fp):
    proc = run_guard(
        ["monitor", str(random_llama_dir), "--fingerprint", str(planted_fp), "--serve", "--port", "0"], timeout=120
    )
    assert proc.returncode == 2 and "another model" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_stops_cleanly(server):
    code, log = server.stop(signal.SIGTERM)
    assert code == 0, log
    assert "guard monitor: stopped" in log and "Traceback" not in log


def test_ctrl_c_stops_cleanly_with_connections_open(planted, planted_fp):
    srv = Server([str(planted[0]), "--fingerprint", str(planted_fp), "--serve", "--integrity-interval", "0",
                  "--canary-interval", "0", "--request-timeout", "30"])
    try:
        idle = socket.create_connection((srv.host, srv.port), timeout=5)
        partial = socket.create_connection((srv.host, srv.port), timeout=5)
        partial.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends
        assert srv.request("GET", "/healthz")[0] == 200
        t0 = time.monotonic()
        code, log = srv.stop(signal.SIGINT)
        assert time.monotonic() - t0 < 10  # not the 30 s request deadline
        assert code == 0, log
        assert "guard monitor: stopped" in log and "Traceback" not in log
        idle.close()
        partial.close()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.communicate()
