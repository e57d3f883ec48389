"""The monitor's HTTP server (stdlib): /metrics, /healthz, /v1/completions, and test endpoints.

    server = build_server(ServeContext(lm, monitor, limits), host="127.0.0.1", port=9464)
    server.serve_forever()             # server.shutdown() from another thread stops it

- `GET /metrics`: Prometheus text format of the monitor's registry.
- `GET /healthz`: 200 when the weights match the fingerprint and the canary holds, else 503.
  With protection (`--protect`) the canary runs through the pin guard, so it measures what clients
  get; a tamper still makes /healthz 503 through the weight integrity check.
- `POST /v1/completions`: OpenAI-style subset `{prompt, max_tokens, temperature, seed}`; greedy
  unless temperature > 0. Bounded body size, prompt length and requests in flight (429 beyond).
- `POST /v1/test/disrupt` / `POST /v1/test/restore`: only with `enable_test_endpoints`; zero a
  fingerprinted neuron's weights in memory (or put them back), then re-check at once.

Every error is a JSON body `{"error": {"message", "type"}}` with a 4xx/5xx status, the stdlib's own
errors included (501 unknown method, 414 request line too long, 431 headers too large); a bad
request never stops the server.

Abuse bounds (docs/security.md (Monitor server)): each request (line, headers and body) must arrive within
`request_timeout_s` (else 408 and close, or a silent close when nothing came); at most
`max_connections` connections are served at once, the next ones (up to `3 * max_connections` more)
get a fast 429 and are closed, and beyond those new connections are closed at once; the listen
backlog is `4 * max_connections` (at least 128), so a burst gets HTTP answers, not resets. A client
that aborts costs one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from achilles_guard.engine.neurons import Neuron, parse_neuron
from achilles_guard.errors import InputError, first_line
from achilles_guard.monitor.generate import complete
from achilles_guard.monitor.tamper import disrupt
from achilles_guard.report.documents import json_number

__all__ = ["ServerLimits", "ServeContext", "build_server", "bind_context", "RequestError"]


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 65536
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_in_flight: int = 4  # completion requests at once; more get 429
    socket_timeout_s: float = 30.0  # per socket read or write
    request_timeout_s: float = 10.0  # the whole request (line, headers, body) must arrive within this
    max_connections: int = 64  # connections served at once; the next ones get a fast 429

    @property
    def reject_slots(self) -> int:
        """Connections over the cap that still get a 429 (short-lived threads); beyond: closed."""
        return 3 * self.max_connections

    @property
    def backlog(self) -> int:
        return min(4096, max(128, self.max_connections + self.reject_slots))


MAX_SEED = 2**63 - 1
_REJECT_TIMEOUT_S = 2.0  # a connection over the cap gets this long (at most) to send its request


@dataclass
class ServeContext:
    """What the handlers share: the loaded model, its monitor, limits and the test switch."""

    lm: object  # LoadedModel
    monitor: object  # ActivationMonitor
    limits: ServerLimits = field(default_factory=ServerLimits)
    enable_test_endpoints: bool = False
    model_name: str = "model"

    def __post_init__(self):
        self.slots = threading.BoundedSemaphore(self.limits.max_in_flight)
        self.disruptions: list = []
        self.tamper_lock = threading.Lock()
        positions = getattr(self.lm.model.config, "max_position_embeddings", None) or getattr(
            self.lm.model.config, "n_positions", None
        )
        self.context_length = int(positions) if positions else None


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def build_server(
    ctx: ServeContext | None, *, host: str, port: int, limits: ServerLimits | None = None
) -> ThreadingHTTPServer:
    """Bind now (InputError when the address is taken or invalid); serve with `serve_forever()`.

    `ctx` may be given later with `bind_context` (bind first, load the model, then serve); the
    connection limits (backlog, cap, deadline) come from `limits`, else `ctx.limits`.
    """

    class Handler(_Handler):
        context = ctx

    limits = limits or (ctx.limits if ctx is not None else ServerLimits())
    try:
        server = _Server((host, port), Handler, limits)
    except OSError as err:
        raise InputError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port or --host"
        ) from None
    return server


def bind_context(server: ThreadingHTTPServer, ctx: ServeContext) -> None:
    server.RequestHandlerClass.context = ctx
    server.limits = ctx.limits


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a sized backlog, a connection cap and one-line error logs."""

    daemon_threads = True

    def __init__(self, address, handler, limits: ServerLimits):
        self.limits = limits
        self.request_queue_size = limits.backlog  # read by server_activate() (listen)
        self._count_lock = threading.Lock()
        self._served = 0
        self._rejecting = 0
        self._local = threading.local()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        cap = self.limits.max_connections
        with self._count_lock:
            if self._served < cap:
                self._served, over = self._served + 1, False
            elif self._rejecting < self.limits.reject_slots:
                self._rejecting, over = self._rejecting + 1, True
            else:  # a flood: close at once, no thread (this is the accept loop)
                self.close_request(request)
                return
        thread = threading.Thread(target=self._serve_one, args=(request, client_address, over), daemon=True)
        try:
            thread.start()
        except RuntimeError:  # cannot start a thread: give the slot back and close
            self._release(over)
            self.close_request(request)

    def shutdown_request(self, request):
        """Half-close, then read what the client still sends (bounded) before closing: closing a
        socket with unread input sends a reset, which can destroy the answer before it is read."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            _linger(request, _LINGER_S)
        self.close_request(request)

    def _serve_one(self, request, client_address, over: bool) -> None:
        self._local.over_cap = over
        try:
            self.process_request_thread(request, client_address)  # handle_error / shutdown_request inside
        finally:
            self._release(over)

    def _release(self, over: bool) -> None:
        with self._count_lock:
            if over:
                self._rejecting -= 1
            else:
                self._served -= 1

    def over_cap(self) -> bool:
        return getattr(self._local, "over_cap", False)

    def handle_error(self, request, client_address):
        """One line on stderr per failed connection (a client that aborts, mostly), no traceback."""
        err = sys.exc_info()[1]
        who = (
            f"{client_address[0]}:{client_address[1]}"
            if isinstance(client_address, tuple) and len(client_address) >= 2
            else str(client_address)
        )
        if isinstance(err, (ConnectionError, TimeoutError)):
            what = "aborted the connection"
        else:
            what = "request failed"
        _log(f"guard monitor: client {who} {what}: {type(err).__name__}: {first_line(err) if err else ''}")


class _DeadlineIO(io.RawIOBase):
    """The socket's read side, where every read must finish before the request's deadline.

    The socket timeout alone bounds each read; a client trickling a byte a second would hold its
    thread forever. Each recv here gets min(per-read timeout, time left) and TimeoutError after.
    """

    def __init__(self, sock: socket.socket, per_read_s: float):
        super().__init__()
        self._sock, self._per_read = sock, per_read_s
        self.deadline: float | None = None
        self.received = 0

    def arm(self, seconds: float) -> None:
        self.deadline, self.received = time.monotonic() + seconds, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request deadline passed")
            self._sock.settimeout(min(left, self._per_read))
        n = self._sock.recv_into(buffer)
        self.received += n
        return n


class _Handler(BaseHTTPRequestHandler):
    context: ServeContext
    server_version = "achilles-guard"
    sys_version = ""

    def setup(self):
        limits = self.server.limits
        self.timeout = limits.socket_timeout_s
        super().setup()
        self.rfile.close()  # the stdlib's makefile; left open it would keep the socket from closing
        self._over_cap = self.server.over_cap() if hasattr(self.server, "over_cap") else False
        self._request_timeout = (
            min(limits.request_timeout_s, _REJECT_TIMEOUT_S) if self._over_cap else limits.request_timeout_s
        )
        self._raw_in = _DeadlineIO(self.connection, limits.socket_timeout_s)
        self.rfile = io.BufferedReader(self._raw_in)

    def handle_one_request(self):
        """The stdlib's, under a whole-request deadline; a request cut by it gets a 408."""
        self._raw_in.arm(self._request_timeout)
        self.command, self.request_version, self.requestline, self._responded = "", "", "", False
        super().handle_one_request()  # a TimeoutError inside closes the connection
        if self.close_connection and not self._responded and self._raw_in.received and _expired(self._raw_in):
            self._log_line(f"sent no complete request within {self._request_timeout:g} s; closed with 408")
            self.send_error(408, f"the request did not arrive within {self._request_timeout:g} s")

    def log_message(self, format, *args):  # stdlib signature; no per-request logs on stderr
        return

    def _log_line(self, what: str) -> None:
        _log(f"guard monitor: client {self.client_address[0]}:{self.client_address[1]} {what}")

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors (400, 408, 414, 431, 501, 505...) as JSON, and the connection closed."""
        self.close_connection = True
        if getattr(self, "request_version", "") == "HTTP/0.9":  # the stdlib's default before the version is read:
            self.request_version = "HTTP/1.0"  # an error always gets a status line and headers
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(RequestError(int(code), message or phrase, _ERROR_KINDS.get(int(code), "invalid_request_error")))
        ctx = self.context
        if ctx is not None:
            ctx.monitor.metrics.request("other", int(code), 0.0)

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if self._over_cap:
            self._timed("other", self._reject)
        elif path == "/metrics":
            self._timed("/metrics", self._metrics)
        elif path == "/healthz":
            self._timed("/healthz", self._healthz)
        else:
            self._timed("other", lambda: self._error(RequestError(404, f"no such endpoint: GET {path}", "not_found")))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if self._over_cap:
            self._timed("other", self._reject)
        elif path == "/v1/completions":
            self._timed("/v1/completions", self._completions)
        elif path in ("/v1/test/disrupt", "/v1/test/restore") and self.context.enable_test_endpoints:
            self._timed("/v1/test", self._disrupt if path.endswith("disrupt") else self._restore)
        else:
            self._timed("other", lambda: self._error(RequestError(404, f"no such endpoint: POST {path}", "not_found")))

    def _timed(self, endpoint: str, handler) -> None:
        t0 = time.perf_counter()
        self._status = 500
        try:
            handler()
        except RequestError as err:
            self._error(err)
        except TimeoutError:
            self.close_connection = True
            if self._responded or not _expired(self._raw_in):  # a write timed out: nothing to answer on
                raise
            self._log_line(f"sent no complete request within {self._request_timeout:g} s; closed with 408")
            self._error(
                RequestError(408, f"the request did not arrive within {self._request_timeout:g} s", "timeout_error")
            )
        except ConnectionError:  # the client went away: handle_error logs one line
            self.close_connection = True
            self._status = 499
            raise
        except Exception as err:  # one bad request must never stop the server
            self._error(RequestError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))
        finally:
            self.context.monitor.metrics.request(endpoint, self._status, time.perf_counter() - t0)

    # -- endpoints -------------------------------------------------------------------------

    def _reject(self) -> None:
        """Over the connection cap: read the body (so closing resets nothing), then a fast 429."""
        self.close_connection = True
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= self.server.limits.max_body_bytes:
            _drain(self.rfile, int(length))
        raise RequestError(
            429, f"{self.server.limits.max_connections} connections already open; retry later", "rate_limit_error"
        )

    def _metrics(self) -> None:
        self._send(200, generate_latest(self.context.monitor.metrics.registry), CONTENT_TYPE_LATEST)

    def _healthz(self) -> None:
        monitor = self.context.monitor
        state = monitor.state()
        if state.integrity is None:
            monitor.check_integrity()
            state = monitor.state()
        self._json(200 if state.healthy else 503, _state_doc(state))

    def _completions(self) -> None:
        ctx, limits = self.context, self.context.limits
        body = self._read_json()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string")
        max_tokens = body.get("max_tokens", 16)
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= limits.max_new_tokens
        ):
            raise RequestError(400, f"'max_tokens' must be an integer from 1 to {limits.max_new_tokens}")
        temperature = body.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
            raise RequestError(400, "'temperature' must be a number from 0 to 2 (0 = greedy)")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise RequestError(400, "'seed' must be an integer from 0 to 2^63-1")
        if body.get("stream"):
            raise RequestError(400, "'stream' is not supported")
        tok = ctx.lm.tokenizer
        ids = tok(prompt, return_tensors="pt")["input_ids"]  # (1, T)
        if ids.shape[1] == 0:
            raise RequestError(400, "'prompt' tokenizes to nothing")
        if ids.shape[1] > limits.max_prompt_tokens:
            raise RequestError(400, f"prompt has {ids.shape[1]} tokens; the limit is {limits.max_prompt_tokens}")
        if ctx.context_length and ids.shape[1] + max_tokens > ctx.context_length:
            raise RequestError(
                400,
                f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) exceeds the context length "
                f"{ctx.context_length}",
            )
        if not ctx.slots.acquire(blocking=False):
            raise RequestError(
                429, f"{limits.max_in_flight} requests already in flight; retry later", "rate_limit_error"
            )
        metrics = ctx.monitor.metrics
        metrics.in_flight.inc()
        try:
            with ctx.monitor.lock:
                result = complete(ctx.lm.model, ids.to(ctx.lm.input_device), max_new_tokens=max_tokens,
                                  temperature=float(temperature), eos_token_id=tok.eos_token_id, seed=seed)
        finally:
            metrics.in_flight.dec()
            ctx.slots.release()
        metrics.prompt_tokens.inc(ids.shape[1])
        metrics.completion_tokens.inc(len(result.token_ids))
        state = ctx.monitor.state()
        self._json(200, {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": ctx.model_name,
            "choices": [{"index": 0, "text": tok.decode(list(result.token_ids), skip_special_tokens=True),
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": len(result.token_ids),
                      "total_tokens": int(ids.shape[1]) + len(result.token_ids)},
            "guard": {"anomaly_score": state.last.score if state.last else 0.0,
                      "anomalous_neurons": list(state.last.anomalous) if state.last else [],
                      "protected": state.interventions is not None, "pin_interventions": state.interventions or 0},
        })

    def _disrupt(self) -> None:
        ctx = self.context
        body = self._read_json()
        fp = ctx.monitor.fingerprint
        spec = body.get("neuron")
        if body.get("all"):
            neurons = list(fp.critical_set)
        elif spec is None:
            neurons = list(fp.critical_set[:1]) or [fp.neurons[0].neuron]
        else:
            neurons = [_parse_neuron(spec)]
        scale = body.get("scale", 0.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise RequestError(400, "'scale' must be a number")
        try:
            with ctx.tamper_lock, ctx.monitor.lock:
                ctx.disruptions.append(disrupt(ctx.lm.model, fp, neurons, scale=float(scale)))
        except Exception as err:  # UsageError: not a fingerprinted neuron
            raise RequestError(400, str(err)) from None
        self._after_tamper({"disrupted": [str(n) for n in neurons]})

    def _restore(self) -> None:
        ctx = self.context
        with ctx.tamper_lock, ctx.monitor.lock:
            restored = [str(n) for d in ctx.disruptions for n in d.neurons]
            for d in reversed(ctx.disruptions):
                d.restore()
            ctx.disruptions.clear()
        self._after_tamper({"restored": restored})

    def _after_tamper(self, doc: dict) -> None:
        monitor = self.context.monitor
        monitor.check_integrity()
        if monitor.has_canary:
            monitor.run_canary()
        state = monitor.state()
        self._json(200, {**doc, **_state_doc(state)})

    # -- plumbing --------------------------------------------------------------------------

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a JSON body with Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if size < 0:
            raise RequestError(400, "bad Content-Length")
        if size > self.context.limits.max_body_bytes:
            self.close_connection = True
            if size <= _DRAIN_LIMIT:  # read and drop it, so the client sees the 413 and not a reset
                _drain(self.rfile, size)
            raise RequestError(413, f"body of {size} bytes exceeds the limit of {self.context.limits.max_body_bytes}")
        raw = self.rfile.read(size)
        if len(raw) < size:
            self.close_connection = True
            raise ConnectionAbortedError(f"closed after {len(raw)} of {size} body bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        except RecursionError:
            raise RequestError(400, "malformed JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the JSON body must be an object")
        return body

    def _error(self, err: RequestError) -> None:
        self._json(err.status, {"error": {"message": err.message, "type": err.kind}})

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, (json.dumps(doc, allow_nan=False) + "\n").encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self._status = status
        self._responded = True
        self.connection.settimeout(self.server.limits.socket_timeout_s)  # reads may have left it short
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


_DRAIN_LIMIT = 8 * 1024 * 1024

_ERROR_KINDS = {
    404: "not_found",
    408: "timeout_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "not_implemented",
    505: "invalid_request_error",
}


_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20


def _linger(sock: socket.socket, seconds: float) -> None:
    deadline, total = time.monotonic() + seconds, 0
    while total < _LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            return
        total += len(data)


def _log(line: str) -> None:
    """One line on stderr; a closed stderr must not take a thread down."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _expired(raw: _DeadlineIO) -> bool:
    return raw.deadline is not None and time.monotonic() >= raw.deadline - 0.05


def _drain(stream, size: int) -> None:
    while size > 0:
        chunk = stream.read(min(size, 65536))
        if not chunk:
            return
        size -= len(chunk)


def _parse_neuron(spec) -> Neuron:
    """`"module[channel]"` -> Neuron (`neurons.parse_neuron`); RequestError otherwise."""
    try:
        return parse_neuron(spec)
    except ValueError:
        raise RequestError(400, "'neuron' must look like 'model.layers.0.mlp.down_proj[11]'") from None


def _state_doc(state) -> dict:
    reasons = []
    if state.integrity is not None and not state.integrity.ok:
        reasons.append(f"{len(state.integrity.mismatched)} fingerprinted weight slice(s) changed in memory")
    if state.canary is not None and not state.canary.ok:
        reasons.append(f"canary collapsed: delta {state.canary.delta_log10:.2f} log10 PPL")
    return {
        "status": "ok" if state.healthy else "unhealthy",
        "reasons": reasons,
        "forwards": state.forwards,
        "anomaly_score": json_number(state.last.score) if state.last else 0.0,
        "anomalous_neurons": list(state.last.anomalous) if state.last else [],
        "integrity_ok": state.integrity.ok if state.integrity else None,
        "mismatched_slices": list(state.integrity.mismatched) if state.integrity else [],
        "canary_delta_log10": json_number(state.canary.delta_log10) if state.canary else None,
        "canary_ok": state.canary.ok if state.canary else None,
        "protected": state.interventions is not None,
        "pin_interventions": state.interventions or 0,
    }



