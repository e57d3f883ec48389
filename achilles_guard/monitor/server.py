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

Every error is a JSON body `{"error": {"message", "type"}}` with a 4xx/5xx status; a bad request
never stops the server.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from achilles_guard.errors import InputError
from achilles_guard.monitor.generate import complete
from achilles_guard.monitor.tamper import disrupt
from achilles_guard.neurons import Neuron

__all__ = ["ServerLimits", "ServeContext", "build_server", "bind_context", "RequestError"]


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 65536
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_in_flight: int = 4  # completion requests at once; more get 429
    socket_timeout_s: float = 30.0


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
        positions = getattr(self.lm.model.config, "max_position_embeddings", None) or getattr(self.lm.model.config, "n_positions", None)
        self.context_length = int(positions) if positions else None


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def build_server(ctx: ServeContext | None, *, host: str, port: int) -> ThreadingHTTPServer:
    """Bind now (InputError when the address is taken or invalid); serve with `serve_forever()`.

    `ctx` may be given later with `bind_context` (bind first, load the model, then serve).
    """

    class Handler(_Handler):
        context = ctx

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port or --host") from None
    server.daemon_threads = True
    return server


def bind_context(server: ThreadingHTTPServer, ctx: ServeContext) -> None:
    server.RequestHandlerClass.context = ctx


class _Handler(BaseHTTPRequestHandler):
    context: ServeContext
    server_version = "achilles-guard"
    sys_version = ""

    def setup(self):
        self.timeout = self.context.limits.socket_timeout_s
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature; no per-request logs on stderr
        return

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._timed("/metrics", self._metrics)
        elif path == "/healthz":
            self._timed("/healthz", self._healthz)
        else:
            self._timed("other", lambda: self._error(RequestError(404, f"no such endpoint: GET {path}", "not_found")))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/v1/completions":
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
        except Exception as err:  # noqa: BLE001 - one bad request must never stop the server
            self._error(RequestError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))
        finally:
            self.context.monitor.metrics.request(endpoint, self._status, time.perf_counter() - t0)

    # -- endpoints -------------------------------------------------------------------------

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
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_new_tokens:
            raise RequestError(400, f"'max_tokens' must be an integer from 1 to {limits.max_new_tokens}")
        temperature = body.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
            raise RequestError(400, "'temperature' must be a number from 0 to 2 (0 = greedy)")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise RequestError(400, "'seed' must be a non-negative integer")
        if body.get("stream"):
            raise RequestError(400, "'stream' is not supported")
        tok = ctx.lm.tokenizer
        ids = tok(prompt, return_tensors="pt")["input_ids"]  # (1, T)
        if ids.shape[1] == 0:
            raise RequestError(400, "'prompt' tokenizes to nothing")
        if ids.shape[1] > limits.max_prompt_tokens:
            raise RequestError(400, f"prompt has {ids.shape[1]} tokens; the limit is {limits.max_prompt_tokens}")
        if ctx.context_length and ids.shape[1] + max_tokens > ctx.context_length:
            raise RequestError(400, f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) exceeds the context length {ctx.context_length}")
        if not ctx.slots.acquire(blocking=False):
            raise RequestError(429, f"{limits.max_in_flight} requests already in flight; retry later", "rate_limit_error")
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
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the JSON body must be an object")
        return body

    def _error(self, err: RequestError) -> None:
        self._json(err.status, {"error": {"message": err.message, "type": err.kind}})

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, (json.dumps(doc, allow_nan=False) + "\n").encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self._status = status
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


_DRAIN_LIMIT = 8 * 1024 * 1024


def _drain(stream, size: int) -> None:
    while size > 0:
        chunk = stream.read(min(size, 65536))
        if not chunk:
            return
        size -= len(chunk)


def _parse_neuron(spec) -> Neuron:
    """`"module[channel]"` -> Neuron; RequestError otherwise."""
    if isinstance(spec, str) and spec.endswith("]") and "[" in spec:
        module, _, channel = spec[:-1].rpartition("[")
        if channel.isdigit():
            return Neuron(module, int(channel))
    raise RequestError(400, "'neuron' must look like 'model.layers.0.mlp.down_proj[11]'")


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
        "anomaly_score": _num(state.last.score) if state.last else 0.0,
        "anomalous_neurons": list(state.last.anomalous) if state.last else [],
        "integrity_ok": state.integrity.ok if state.integrity else None,
        "mismatched_slices": list(state.integrity.mismatched) if state.integrity else [],
        "canary_delta_log10": _num(state.canary.delta_log10) if state.canary else None,
        "canary_ok": state.canary.ok if state.canary else None,
        "protected": state.interventions is not None,
        "pin_interventions": state.interventions or 0,
    }


def _num(x: float):
    return x if x == x and abs(x) != float("inf") else None
