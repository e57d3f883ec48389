"""The monitor server under abuse (issue 14): trickled requests, connection floods, bursts, aborted
clients, hostile JSON and the stdlib's own errors. In-process servers on 127.0.0.1 with small
limits; every client loop is bounded in time and count. See docs/security.md (Monitor server)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import struct
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor import ActivationMonitor
from achilles_guard.monitor.server import ServeContext, ServerLimits, build_server
from tests.builders import run_guard

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def lm(planted):
    return load_model(planted[0])


@pytest.fixture(scope="module")
def fp(planted_fp):
    return load_fingerprint(planted_fp)


class Running:
    def __init__(self, lm, fp, limits: ServerLimits):
        self.monitor = ActivationMonitor(lm.model, fp, registry=CollectorRegistry(), tokenizer=lm.tokenizer)
        self.srv = build_server(ServeContext(lm, self.monitor, limits), host=HOST, port=0)
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def in_flight(self) -> float:
        return self.monitor.metrics.registry.get_sample_value("guard_http_in_flight_requests", {"model": "model"}) or 0

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def serve(lm, fp):
    running = []

    def start(**limits) -> Running:
        running.append(Running(lm, fp, ServerLimits(**limits)))
        return running[-1]

    yield start
    for r in running:
        r.close()


def request(port, method, path, body: bytes | None = None, headers=None, timeout=10.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def read_response(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or limit_s passes)."""
    sock.settimeout(limit_s)
    deadline, data = time.monotonic() + limit_s, b""
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def trickle(port: int, first: bytes, drip: bytes, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Send `first`, then one byte of `drip` every `every_s` until the server answers or closes."""
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(first)
        for b in drip:
            if time.monotonic() - t0 > limit_s:
                break
            readable, _, _ = select.select([sock], [], [], every_s)
            if readable:
                break
            sock.sendall(bytes([b]))
        return read_response(sock, limit_s), time.monotonic() - t0


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickled_request_is_cut_at_the_request_deadline(serve, where):
    srv = serve(request_timeout_s=1.0)
    if where == "headers":
        first, drip = b"GET /metrics HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100
    else:
        first, drip = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"{" + b" " * 99
    raw, took = trickle(srv.port, first, drip, every_s=0.25, limit_s=6.0)
    status, headers, doc = parse(raw)
    assert status == 408 and headers["content-type"] == "application/json" and doc["error"]["type"] == "timeout_error"
    assert 0.9 < took < 3.0  # the deadline, not 100 drips x 0.25 s
    assert request(srv.port, "GET", "/metrics")[0] == 200  # and the server goes on


def test_an_idle_connection_is_closed_silently_at_the_deadline(serve):
    srv = serve(request_timeout_s=0.5)
    with socket.create_connection((HOST, srv.port), timeout=5) as sock:
        t0 = time.monotonic()
        assert read_response(sock, 5.0) == b""  # closed, no answer: nothing was asked
        assert time.monotonic() - t0 < 3.0


def test_connections_over_the_cap_get_a_fast_429(serve):
    srv = serve(request_timeout_s=3.0, max_connections=2)
    holders = [socket.create_connection((HOST, srv.port), timeout=5) for _ in range(2)]
    try:
        for h in holders:
            h.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more: each holds a served slot
        time.sleep(0.2)
        t0 = time.monotonic()
        status, ctype, body = request(srv.port, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
        assert status == 429 and ctype == "application/json" and b"connections already open" in body
        assert time.monotonic() - t0 < 1.0
    finally:
        for h in holders:
            h.close()
    deadline = time.monotonic() + 5
    while (status := request(srv.port, "GET", "/metrics")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200  # the slots come back when the holders leave


def test_a_burst_of_200_posts_gets_http_answers_not_resets(serve):
    srv = serve(max_in_flight=4)  # default cap (64) and backlog
    results: list = []
    lock = threading.Lock()

    def post():
        try:
            status, _, _ = request(
                srv.port, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}', timeout=30
            )
            outcome = status
        except (ConnectionResetError, BrokenPipeError):
            outcome = "reset"
        except Exception as err:  # counted, reported
            outcome = type(err).__name__
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=post, daemon=True) for _ in range(200)]
    t0 = time.monotonic()
    with srv.monitor.lock:  # the model is busy: 4 requests take the slots and wait, the rest get 429
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (len(results) < 196 or srv.in_flight() < 4) and time.monotonic() < deadline:
            time.sleep(0.02)
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    counts = {k: results.count(k) for k in set(results)}
    print(f"burst of 200: {counts} in {took:.2f} s")
    assert counts == {200: 4, 429: 196}, counts


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_aborted_clients_cost_one_line_each_and_no_traceback(serve, capsys):
    srv = serve()
    capsys.readouterr()
    # 1: reset in the middle of the body
    s1 = socket.create_connection((HOST, srv.port), timeout=5)
    s1.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
    time.sleep(0.2)
    _rst(s1)
    # 2: half the body, then a clean close
    s2 = socket.create_connection((HOST, srv.port), timeout=5)
    s2.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
    time.sleep(0.2)
    s2.close()
    # 3: reset while its completion is being computed: the answer has nowhere to go
    with srv.monitor.lock:
        s3 = socket.create_connection((HOST, srv.port), timeout=5)
        s3.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 33\r\n\r\n'
                   b'{"prompt": "hi", "max_tokens": 2}')
        deadline = time.monotonic() + 10
        while srv.in_flight() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        _rst(s3)
    err = ""
    deadline = time.monotonic() + 5
    while err.count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    time.sleep(0.3)
    err += capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 3, err
    assert all(line.startswith("guard monitor: client 127.0.0.1:") and "aborted" in line for line in lines), err
    assert request(srv.port, "GET", "/metrics")[0] == 200


def test_hostile_json_gets_400_not_500(serve):
    srv = serve(max_body_bytes=262144)
    deep = b'{"prompt": ' + b"[" * 60000 + b"]" * 60000 + b"}"
    for body in (b'{"prompt": "hi", "max_tokens": 2, "seed": %d}' % 2**70,
                 b'{"prompt": "hi", "max_tokens": 2, "seed": -1}',
                 deep,
                 b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
                 b'{"prompt": "hi", "temperature": NaN}',
                 b'{"prompt": "hi", "temperature": 1e999}'):
        status, ctype, data = request(srv.port, "POST", "/v1/completions", body)
        assert status == 400 and ctype == "application/json", (body[:60], data[:200])
        assert json.loads(data)["error"]["message"]
    status, _, data = request(
        srv.port, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "seed": %d}' % (2**63 - 1)
    )
    assert status == 200, data


def raw_exchange(port: int, payload: bytes) -> tuple[int, dict, dict]:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(payload)
        return parse(read_response(sock, 5.0))


@pytest.mark.parametrize(("payload", "expected"), [
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host (RFC 9112: 400)
    (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
])
def test_stdlib_errors_are_json(serve, payload, expected):
    srv = serve()
    status, headers, doc = raw_exchange(srv.port, payload)
    assert status == expected and headers["content-type"] == "application/json"
    assert doc["error"]["message"] and doc["error"]["type"]
    assert int(headers["content-length"]) > 0


@pytest.mark.parametrize(("option", "value"), [
    ("--request-timeout", "0"), ("--request-timeout", "nan"), ("--max-connections", "0"),
])
def test_bad_server_options_exit_2_with_one_line(planted, planted_fp, option, value):
    proc = run_guard(
        ["monitor", str(planted[0]), "--fingerprint", str(planted_fp), "--serve", "--port", "0", option, value],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert option in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_a_head_over_the_limit_sent_in_pieces_is_refused_too(serve, head, expected):
    """h11 bounds a head that arrives in pieces (uvicorn's h11_max_incomplete_event_size); the app one read brings."""
    srv = serve()
    with socket.create_connection((HOST, srv.port), timeout=5) as sock:
        for i in range(0, len(head), 8192):
            try:
                sock.sendall(head[i:i + 8192])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
        status, headers, doc = parse(read_response(sock, 5.0))
    assert status == expected and headers["content-type"] == "application/json" and doc["error"]["message"]
    assert request(srv.port, "GET", "/metrics")[0] == 200


def test_a_request_trickled_after_a_keep_alive_answer_is_cut_too(serve):
    """uvicorn's keep-alive timer stops at the first byte of the next request; the request deadline does not."""
    srv = serve(request_timeout_s=1.0)
    with socket.create_connection((HOST, srv.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        for b in b"X-Slow: " + b"a" * 40:
            if select.select([sock], [], [], 0.25)[0]:
                break
            sock.sendall(bytes([b]))
        status, _, doc = parse(read_response(sock, 5.0))
        took = time.monotonic() - t0
    assert status == 408 and doc["error"]["type"] == "timeout_error"
    assert took < 3.0


def test_router_errors_are_json(serve):
    srv = serve()
    status, ctype, body = request(srv.port, "POST", "/metrics", b"{}")
    assert status == 405 and ctype == "application/json" and json.loads(body)["error"]["message"]
    status, ctype, body = request(srv.port, "DELETE", "/v1/completions")
    assert status == 501 and ctype == "application/json"
    status, ctype, body = request(srv.port, "GET", "/v1/completions/x")
    assert status == 404 and ctype == "application/json"
