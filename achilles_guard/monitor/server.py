"""The monitor's HTTP server: Starlette on uvicorn, with /metrics, /healthz, /v1/completions and test endpoints.

    server = build_server(ServeContext(lm, monitor, limits), host="127.0.0.1", port=9464)  # binds now
    server.serve_forever()             # server.shutdown() from another thread stops it; then server_close()

- `GET /metrics`: Prometheus text format of the monitor's registry.
- `GET /healthz`: 200 when the weights match the fingerprint and the canary holds, else 503.
  With protection (`--protect`) the canary runs through the pin guard, so it measures what clients
  get; a tamper still makes /healthz 503 through the weight integrity check.
- `POST /v1/completions`: OpenAI-style subset `{prompt, max_tokens, temperature, seed}`; greedy
  unless temperature > 0. Bounded body size, prompt length and requests in flight (429 beyond).
- `POST /v1/test/disrupt` / `POST /v1/test/restore`: only with `enable_test_endpoints`; zero a
  fingerprinted neuron's weights in memory (or put them back), then re-check at once.

Every error is a JSON body `{"error": {"message", "type"}}` with a 4xx/5xx status, those answered
before the app runs included (400 malformed request, 414 request line too long, 431 head too large or
over 100 header lines, 501 unknown method, 505 HTTP version); a bad request never stops the server.

The endpoints are a Starlette app (server_app.py); uvicorn serves it on a socket bound by
`build_server` (so a taken port fails before the slow model load), through uvicorn's h11 protocol
extended by server_protocol.py. Abuse bounds (docs/security.md (Monitor server)), and what holds each:

- each request (line, headers and body) must arrive within `request_timeout_s`, else 408 and close,
  or a silent close when nothing came: server_protocol.py for the head (uvicorn has no head timeout),
  the app for the body (read under `anyio.fail_after`); between requests uvicorn's
  `timeout_keep_alive` (= `request_timeout_s`) closes idle keep-alive connections;
- at most `max_connections` connections are served at once, the next ones (up to
  `3 * max_connections` more) get a fast 429 and are closed, beyond those new connections are closed
  at once: server_protocol.py (uvicorn's `limit_concurrency` would answer 503, in plain text);
- the request head is at most `max_head_bytes` (uvicorn's `h11_max_incomplete_event_size`);
- the listen backlog is `4 * max_connections` (at least 128; `listen()` here and uvicorn's `backlog`),
  so a burst gets HTTP answers, not resets;
- at most `max_in_flight` completions run at once, each in a worker thread, the next ones get 429:
  the app;
- a client that stops reading its answer is dropped after `socket_timeout_s`: server_protocol.py;
- a client that aborts costs one line on stderr, never a traceback: server_protocol.py and
  server_log.py (uvicorn's and asyncio's loggers as one line each, no access log).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from dataclasses import dataclass, field

import uvicorn

from achilles_guard.errors import InputError
from achilles_guard.monitor.server_app import MAX_SEED, MonitorApp, RequestError
from achilles_guard.monitor.server_log import log_line, quiet_uvicorn_logs
from achilles_guard.monitor.server_protocol import ConnectionGate, GuardProtocol

__all__ = ["ServerLimits", "ServeContext", "MonitorServer", "build_server", "bind_context", "RequestError",
           "MAX_SEED"]

SHUTDOWN_GRACE_S = 5  # at a stop, requests under way get this long to finish


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 65536
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_in_flight: int = 4  # completion requests at once; more get 429
    socket_timeout_s: float = 30.0  # a client that reads nothing of its answer this long is dropped
    request_timeout_s: float = 10.0  # the whole request (line, headers, body) must arrive within this
    max_connections: int = 64  # connections served at once; the next ones get a fast 429
    max_head_bytes: int = 65536  # request line and headers together

    @property
    def reject_slots(self) -> int:
        """Connections over the cap that still get a 429; beyond: closed."""
        return 3 * self.max_connections

    @property
    def backlog(self) -> int:
        return min(4096, max(128, self.max_connections + self.reject_slots))


@dataclass
class ServeContext:
    """What the endpoints share: the loaded model, its monitor, limits and the test switch."""

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


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: whoever calls serve_forever owns SIGINT/SIGTERM
    (uvicorn's would re-raise the signal after its shutdown, and the process would die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class MonitorServer:
    """A bound socket and the uvicorn server that serves the app on it (one `serve_forever` per server)."""

    def __init__(self, sock: socket.socket, limits: ServerLimits, ctx: ServeContext | None):
        self.socket = sock
        self.server_address = sock.getsockname()
        self.limits = limits
        self.context = ctx
        self._lock = threading.Lock()
        self._uvicorn: _Uvicorn | None = None
        self._stopping = False
        self._done = threading.Event()
        self._done.set()
        self._gate = ConnectionGate(limits, log=log_line, count=self._count)
        self._app = MonitorApp(lambda: self.context)

    def _count(self, status: int) -> None:
        if self.context is not None:
            self.context.monitor.metrics.request("other", status, 0.0)

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until `shutdown()` (uvicorn checks every 0.1 s; `poll_interval` is accepted and unused)."""
        limits = self.limits
        config = uvicorn.Config(
            self._app,
            http=functools.partial(GuardProtocol, gate=self._gate),
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            headers=[("server", "achilles-guard")],
            backlog=limits.backlog,
            timeout_keep_alive=limits.request_timeout_s,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            h11_max_incomplete_event_size=limits.max_head_bytes,
        )
        quiet_uvicorn_logs()
        with self._lock:
            if self._stopping:
                return
            self._uvicorn = _Uvicorn(config)
            self._done.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has returned (at once when it is not running)."""
        with self._lock:
            self._stopping = True
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True
        self._done.wait()

    def server_close(self) -> None:
        self.socket.close()


def build_server(
    ctx: ServeContext | None, *, host: str, port: int, limits: ServerLimits | None = None
) -> MonitorServer:
    """Bind and listen now (InputError when the address is taken or invalid); serve with `serve_forever()`.

    `ctx` may be given later with `bind_context` (bind first, load the model, then serve); the
    connection limits (backlog, cap, deadline) come from `limits`, else `ctx.limits`.
    """
    limits = limits or (ctx.limits if ctx is not None else ServerLimits())
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(limits.backlog)
    except OSError as err:
        if sock is not None:
            sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port or --host"
        ) from None
    return MonitorServer(sock, limits, ctx)


def bind_context(server: MonitorServer, ctx: ServeContext) -> None:
    """Give a server built without a context its context (before serve_forever)."""
    server.context = ctx
