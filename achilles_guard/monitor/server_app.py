"""The monitor server's endpoints: a Starlette app over the loaded model and its monitor.

    app = MonitorApp(lambda: ctx)     # ctx: server.ServeContext, or None while the model loads
    uvicorn.Config(app, http=GuardProtocol...)    # server.py serves it

- `GET /metrics`: Prometheus text format of the monitor's registry.
- `GET /healthz`: 200 when the weights match the fingerprint and the canary holds, else 503.
- `POST /v1/completions`: OpenAI-style subset `{prompt, max_tokens, temperature, seed}`.
- `POST /v1/test/disrupt` / `POST /v1/test/restore`: only with `ctx.enable_test_endpoints`.

Every answer that is not 200 is a JSON body `{"error": {"message", "type"}}` (405/404 from Starlette's
router too). The body of a POST is read under the request deadline the connection protocol passes in
the scope (server_protocol.EXTENSION; 408 after it), up to `max_body_bytes` (413 beyond). The model
forward is blocking torch: it runs in a worker thread (anyio, a limiter of `max_in_flight` threads)
after a non-blocking take of one of the `max_in_flight` slots (429 when none is free); tokenizing,
integrity checks and tampering run in worker threads too. The event loop never blocks on the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from achilles_guard.engine.neurons import Neuron, parse_neuron
from achilles_guard.monitor.generate import complete
from achilles_guard.monitor.server_log import log_line
from achilles_guard.monitor.server_protocol import EXTENSION
from achilles_guard.monitor.tamper import disrupt
from achilles_guard.report.documents import json_number

__all__ = ["MonitorApp", "RequestError", "MAX_SEED", "MAX_HEADERS"]

MAX_SEED = 2**63 - 1
MAX_HEADERS = 100  # more header lines get 431 (as http.client and the stdlib server count them)
_METHODS = ("GET", "HEAD", "POST")
_DRAIN_LIMIT = 8 * 1024 * 1024  # a body over the limit but under this is read and dropped before the 413

_ERROR_KINDS = {404: "not_found", 405: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error",
                501: "not_implemented", 503: "unavailable"}


class RequestError(Exception):
    """An answer with an error status; `close`: close the connection after it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.close = status, message, kind, close


class _ClientGone(Exception):
    """The client closed before its body arrived (the connection protocol logs the line)."""


def json_response(status: int, doc: dict, *, close: bool = False, headers: dict | None = None) -> Response:
    extra = {**(headers or {}), **({"connection": "close"} if close else {})}
    return Response((json.dumps(doc, allow_nan=False) + "\n").encode(), status_code=status,
                    media_type="application/json", headers=extra)


def error_response(err: RequestError, headers: dict | None = None) -> Response:
    return json_response(err.status, {"error": {"message": err.message, "type": err.kind}}, close=err.close,
                         headers=headers)


class MonitorApp:
    """The ASGI app: checks that come before routing (the cap's 429, method, version, header count), then
    Starlette's router over the endpoints. `context_of()` gives the ServeContext (None: still loading)."""

    def __init__(self, context_of: Callable[[], object]):
        self._context_of = context_of
        self._forward_limiter: anyio.CapacityLimiter | None = None
        self._router = Starlette(
            routes=[
                Route("/metrics", self._endpoint("/metrics", self._metrics), methods=["GET"]),
                Route("/healthz", self._endpoint("/healthz", self._healthz), methods=["GET"]),
                Route("/v1/completions", self._endpoint("/v1/completions", self._completions), methods=["POST"]),
                Route("/v1/test/disrupt", self._endpoint("/v1/test", self._disrupt), methods=["POST"]),
                Route("/v1/test/restore", self._endpoint("/v1/test", self._restore), methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        ctx = self._context_of()
        early = await self._before_routing(scope, receive, ctx)
        if early is not None:
            if ctx is not None:
                ctx.monitor.metrics.request("other", early.status_code, 0.0)
            await early(scope, receive, send)
            return
        await self._router(scope, receive, send)

    async def _before_routing(self, scope, receive, ctx) -> Response | None:
        ext = (scope.get("extensions") or {}).get(EXTENSION, {})
        if ctx is None:
            return error_response(RequestError(503, "the model is still loading; retry later", "unavailable",
                                               close=True))
        if ext.get("over_cap"):  # read the body (bounded, so closing resets nothing), then a fast 429
            request = Request(scope, receive)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) <= ctx.limits.max_body_bytes:
                try:
                    await _read_body(request, _deadline(ext, ctx), int(length))
                except (RequestError, _ClientGone):
                    pass
            return error_response(RequestError(
                429, f"{ctx.limits.max_connections} connections already open; retry later", "rate_limit_error",
                close=True))
        if scope.get("http_version") not in ("1.0", "1.1"):
            return error_response(RequestError(505, f"HTTP/{scope.get('http_version')} is not supported", close=True))
        limit = ctx.limits.max_head_bytes  # h11 bounds a head that arrives in pieces; one read can bring more
        line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
        if line > limit:
            return error_response(RequestError(414, f"the request line exceeds {limit} bytes", close=True))
        if line + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > limit:
            return error_response(RequestError(431, f"the request head exceeds {limit} bytes", close=True))
        if len(scope["headers"]) > MAX_HEADERS:
            return error_response(RequestError(431, f"more than {MAX_HEADERS} header lines", close=True))
        if scope["method"] not in _METHODS:
            return error_response(RequestError(501, f"unsupported method {scope['method']!r}", "not_implemented",
                                               close=True))
        return None

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's router errors (404, 405) as JSON."""
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = exc.detail
        ctx = self._context_of()
        if ctx is not None:
            ctx.monitor.metrics.request("other", exc.status_code, 0.0)
        return error_response(RequestError(exc.status_code, message, _ERROR_KINDS.get(exc.status_code,
                                                                                       "invalid_request_error")),
                              headers=exc.headers)

    def _endpoint(self, name: str, handler):
        async def endpoint(request: Request) -> Response:
            ctx = self._context_of()
            t0 = time.perf_counter()
            try:
                response = await handler(request, ctx)
            except RequestError as err:
                response = error_response(err)
            except _ClientGone:
                response = Response(status_code=499)  # goes nowhere: the client is gone
            except Exception as err:  # one bad request must never stop the server
                response = error_response(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                       "server_error"))
            ctx.monitor.metrics.request(name, response.status_code, time.perf_counter() - t0)
            return response

        return endpoint

    # -- endpoints -------------------------------------------------------------------------

    async def _metrics(self, request: Request, ctx) -> Response:
        return Response(generate_latest(ctx.monitor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request, ctx) -> Response:
        monitor = ctx.monitor
        state = monitor.state()
        if state.integrity is None:
            await anyio.to_thread.run_sync(monitor.check_integrity)
            state = monitor.state()
        return json_response(200 if state.healthy else 503, state_doc(state))

    async def _completions(self, request: Request, ctx) -> Response:
        limits = ctx.limits
        params = completion_params(await self._read_json(request, ctx), limits.max_new_tokens)
        if not ctx.slots.acquire(blocking=False):  # before tokenizing: that work is bounded by the slots too
            raise RequestError(429, f"{limits.max_in_flight} requests already in flight; retry later",
                               "rate_limit_error")
        metrics = ctx.monitor.metrics
        metrics.in_flight.inc()
        tok = ctx.lm.tokenizer

        def work():  # one worker thread: tokenize, check, forward
            ids = tok(params["prompt"], return_tensors="pt")["input_ids"]  # (1, T)
            n_prompt = int(ids.shape[1])
            if n_prompt == 0:
                raise RequestError(400, "'prompt' tokenizes to nothing")
            if n_prompt > limits.max_prompt_tokens:
                raise RequestError(400, f"prompt has {n_prompt} tokens; the limit is {limits.max_prompt_tokens}")
            if ctx.context_length and n_prompt + params["max_tokens"] > ctx.context_length:
                raise RequestError(400, f"prompt ({n_prompt} tokens) + max_tokens ({params['max_tokens']}) exceeds "
                                        f"the context length {ctx.context_length}")
            with ctx.monitor.lock:
                return n_prompt, complete(ctx.lm.model, ids.to(ctx.lm.input_device),
                                          max_new_tokens=params["max_tokens"], temperature=params["temperature"],
                                          eos_token_id=tok.eos_token_id, seed=params["seed"])

        try:
            if self._forward_limiter is None:
                self._forward_limiter = anyio.CapacityLimiter(limits.max_in_flight)
            n_prompt, result = await anyio.to_thread.run_sync(work, limiter=self._forward_limiter,
                                                              abandon_on_cancel=True)
        finally:
            metrics.in_flight.dec()
            ctx.slots.release()
        if await request.is_disconnected():  # reset while computing: counted as 499, the answer goes nowhere
            raise _ClientGone()
        metrics.prompt_tokens.inc(n_prompt)
        metrics.completion_tokens.inc(len(result.token_ids))
        state = ctx.monitor.state()
        return json_response(200, {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": ctx.model_name,
            "choices": [{"index": 0, "text": tok.decode(list(result.token_ids), skip_special_tokens=True),
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(result.token_ids),
                      "total_tokens": n_prompt + len(result.token_ids)},
            "guard": {"anomaly_score": state.last.score if state.last else 0.0,
                      "anomalous_neurons": list(state.last.anomalous) if state.last else [],
                      "protected": state.interventions is not None, "pin_interventions": state.interventions or 0},
        })

    async def _disrupt(self, request: Request, ctx) -> Response:
        if not ctx.enable_test_endpoints:
            raise RequestError(404, "no such endpoint: POST /v1/test/disrupt", "not_found")
        body = await self._read_json(request, ctx)
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

        def tamper():
            with ctx.tamper_lock, ctx.monitor.lock:
                ctx.disruptions.append(disrupt(ctx.lm.model, fp, neurons, scale=float(scale)))

        try:
            await anyio.to_thread.run_sync(tamper)
        except Exception as err:  # UsageError: not a fingerprinted neuron
            raise RequestError(400, str(err)) from None
        doc = {"disrupted": [str(n) for n in neurons]}
        return json_response(200, await anyio.to_thread.run_sync(_after_tamper, ctx, doc))

    async def _restore(self, request: Request, ctx) -> Response:
        if not ctx.enable_test_endpoints:
            raise RequestError(404, "no such endpoint: POST /v1/test/restore", "not_found")

        def restore():
            with ctx.tamper_lock, ctx.monitor.lock:
                restored = [str(n) for d in ctx.disruptions for n in d.neurons]
                for d in reversed(ctx.disruptions):
                    d.restore()
                ctx.disruptions.clear()
            return _after_tamper(ctx, {"restored": restored})

        return json_response(200, await anyio.to_thread.run_sync(restore))

    # -- the body --------------------------------------------------------------------------

    async def _read_json(self, request: Request, ctx) -> dict:
        ext = (request.scope.get("extensions") or {}).get(EXTENSION, {})
        limits = ctx.limits
        length = request.headers.get("content-length")
        if length is None:
            raise RequestError(411, "a JSON body with Content-Length is required", close=True)
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length", close=True) from None
        if size < 0:
            raise RequestError(400, "bad Content-Length", close=True)
        if size > limits.max_body_bytes:
            if size <= _DRAIN_LIMIT:  # read and drop it, so the client sees the 413 and not a reset
                await _read_body(request, _deadline(ext, ctx), size, keep=False)
            raise RequestError(413, f"body of {size} bytes exceeds the limit of {limits.max_body_bytes}", close=True)
        raw = await _read_body(request, _deadline(ext, ctx), size)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        except RecursionError:
            raise RequestError(400, "malformed JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the JSON body must be an object")
        return body


def _deadline(ext: dict, ctx) -> tuple[float, float]:
    """(monotonic deadline, its length in s): the protocol's, else one from now."""
    limit = ext.get("limit_s", ctx.limits.request_timeout_s)
    return ext.get("deadline", time.monotonic() + limit), limit


async def _read_body(request: Request, deadline: tuple[float, float], size: int, *, keep: bool = True) -> bytes:
    """The body (h11 holds it to Content-Length), before the deadline: RequestError 408 after it."""
    at, limit = deadline
    chunks: list[bytes] = []
    try:
        with anyio.fail_after(max(0.0, at - time.monotonic())):
            async for chunk in request.stream():
                if keep:
                    chunks.append(chunk)
    except TimeoutError:
        client = request.client
        log_line(f"guard monitor: client {client.host}:{client.port} sent no complete request within {limit:g} s; "
                 f"closed with 408")
        raise RequestError(408, f"the request did not arrive within {limit:g} s", "timeout_error", close=True) from None
    except ClientDisconnect:
        raise _ClientGone() from None
    return b"".join(chunks)


def completion_params(body: dict, max_new_tokens: int) -> dict:
    """The checked fields of a completion request (RequestError 400 on a bad one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_new_tokens:
        raise RequestError(400, f"'max_tokens' must be an integer from 1 to {max_new_tokens}")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
        raise RequestError(400, "'temperature' must be a number from 0 to 2 (0 = greedy)")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise RequestError(400, "'seed' must be an integer from 0 to 2^63-1")
    if body.get("stream"):
        raise RequestError(400, "'stream' is not supported")
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": float(temperature), "seed": seed}


def _after_tamper(ctx, doc: dict) -> dict:
    monitor = ctx.monitor
    monitor.check_integrity()
    if monitor.has_canary:
        monitor.run_canary()
    return {**doc, **state_doc(monitor.state())}


def _parse_neuron(spec) -> Neuron:
    """`"module[channel]"` -> Neuron (`neurons.parse_neuron`); RequestError otherwise."""
    try:
        return parse_neuron(spec)
    except ValueError:
        raise RequestError(400, "'neuron' must look like 'model.layers.0.mlp.down_proj[11]'") from None


def state_doc(state) -> dict:
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
