"""The monitor server's connections: uvicorn's h11 protocol, with the bounds uvicorn lacks.

    protocol = functools.partial(GuardProtocol, gate=ConnectionGate(limits, log=..., count=...))
    uvicorn.Config(app, http=protocol, ...)      # server.py does this

uvicorn parses HTTP (h11), bounds the request head (`h11_max_incomplete_event_size`), closes idle
keep-alive connections (`timeout_keep_alive`) and holds the listen backlog. What it does not do, this
subclass of its `H11Protocol` adds, per connection:

- **the whole-request deadline**: from the moment a connection opens (and again after each answer) a
  client has `request_timeout_s` to send a whole request head; a head still incomplete then gets a 408
  and the connection is closed, a connection that sent nothing is closed silently. When the head is
  complete the app takes over the same deadline for the body (scope["extensions"][EXTENSION]).
  uvicorn's keep-alive timer alone never cuts a request trickled a byte at a time (slowloris);
- **the connection cap**: `max_connections` connections are served at once; the next
  `reject_slots` get `min(request_timeout_s, 2 s)` to send their request, which the app answers with a
  fast 429 (scope flag `over_cap`); beyond those a new connection is closed at once. uvicorn's own
  `limit_concurrency` answers 503 in plain text and counts the connection itself, so it is not used;
- **JSON errors** for what uvicorn answers before the app runs: a malformed request (400), a request
  line over the head limit (414) or headers over it (431) get `{"error": {"message", "type"}}`;
- **a lingering close**: a connection the server closes is half-closed first, and what the client still
  sends (at most 1 MiB, for at most 1 s) is read and dropped, so a 408/413/429 is not destroyed by the
  reset a close with unread input sends;
- **a write deadline**: a client that stops reading its answer is dropped after `socket_timeout_s`;
- **one stderr line per aborted client** (a connection lost in the middle of a request), never a
  traceback.

Everything here runs on the event loop thread; nothing blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from achilles_guard.errors import first_line

__all__ = ["EXTENSION", "ConnectionGate", "GuardProtocol", "REJECT_TIMEOUT_S"]

EXTENSION = "achilles_guard.request"  # scope["extensions"] key: {"deadline": monotonic s, "over_cap": bool}
REJECT_TIMEOUT_S = 2.0  # a connection over the cap gets this long (at most) to send its request
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


class ConnectionGate:
    """The connection counts of one server (event-loop thread only) and its two outlets: a stderr line
    (`log`) and the request counter (`count(status)`, for the errors answered before the app runs)."""

    def __init__(self, limits, *, log: Callable[[str], None], count: Callable[[int], None]):
        self.limits, self.log, self.count = limits, log, count
        self.served = 0
        self.rejecting = 0

    def admit(self) -> str | None:
        """"served", "over" (gets a 429) or None (close at once)."""
        if self.served < self.limits.max_connections:
            self.served += 1
            return "served"
        if self.rejecting < self.limits.reject_slots:
            self.rejecting += 1
            return "over"
        return None

    def release(self, kind: str) -> None:
        if kind == "served":
            self.served -= 1
        elif kind == "over":
            self.rejecting -= 1


class _LingeringTransport:
    """The connection's transport as uvicorn's code sees it: `close()` half-closes and lingers."""

    def __init__(self, transport, loop):
        self._t, self._loop = transport, loop
        self.lingering = False
        self._dropped = 0
        self._timer = None

    def __getattr__(self, name):
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self.lingering or self._t.is_closing()

    def close(self) -> None:
        if self.lingering or self._t.is_closing():
            return
        self.lingering = True
        if not self._t.can_write_eof():
            self._t.close()
            return
        try:
            self._t.write_eof()  # after the buffered answer
        except (OSError, RuntimeError):
            self._t.abort()
            return
        self._timer = self._loop.call_later(LINGER_S, self._end)

    def drop(self, n: int) -> None:
        """Input that arrived while lingering: counted, dropped."""
        self._dropped += n
        if self._dropped > LINGER_BYTES:
            self._end()

    def _end(self) -> None:
        self._timer = None
        if self._t.get_write_buffer_size():  # the client does not read its answer
            self._t.abort()
        else:
            self._t.close()

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GuardProtocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline, a connection cap, JSON errors and lingering close."""

    def __init__(self, config, server_state, app_state, _loop=None, *, gate: ConnectionGate):
        super().__init__(config, server_state, app_state, _loop)
        self.gate = gate
        self._admitted: str | None = None
        self._timer = None
        self._write_timer = None
        self._limit_s = gate.limits.request_timeout_s
        self._deadline = 0.0
        self._received = 0  # bytes of the request now arriving (since the last answer)
        self._closed_by_us = False
        self._parse_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event

        def next_event_noting_errors():  # uvicorn drops h11's reason; the 400 body names it
            try:
                return next_event()
            except h11.RemoteProtocolError as err:
                self._parse_error = err
                raise

        self.conn.next_event = next_event_noting_errors

    # -- the connection ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._admitted = self.gate.admit()
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self.loop)
        if self._admitted is None:  # a flood: closed at once
            self._closed_by_us = True
            transport.abort()
            return
        if self._admitted == "over":
            self._limit_s = min(self._limit_s, REJECT_TIMEOUT_S)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._stop_write_timer()
        lingering = isinstance(self.transport, _LingeringTransport) and self.transport.lingering
        if isinstance(self.transport, _LingeringTransport):
            self.transport.lost()
        if not self._closed_by_us and not lingering and self._mid_request():
            why = f"{type(exc).__name__}: {first_line(exc)}" if exc else "closed before the answer"
            self._log(f"aborted the connection: {why}")
        if self._admitted is not None:
            self.gate.release(self._admitted)
            self._admitted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            self.transport.drop(len(data))
            return
        self._received += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None and self.cycle.scope is self.scope:
            # a request head arrived: the app reads the body under what is left of the deadline
            self._disarm()
            self.scope["extensions"] = {
                **(self.scope.get("extensions") or {}),
                EXTENSION: {"deadline": self._deadline, "limit_s": self._limit_s,
                            "over_cap": self._admitted == "over"},
            }

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request's deadline (before uvicorn may start a pipelined one)
        super().on_response_complete()

    def shutdown(self) -> None:
        if self.transport.is_closing():
            return
        try:
            super().shutdown()
        except h11.LocalProtocolError:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as JSON with the status that fits."""
        self._disarm()
        data, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size or 16384
        if len(data) > limit:
            if b"\n" not in data[:limit]:
                status, message = 414, f"the request line exceeds {limit} bytes"
            else:
                status, message = 431, f"the request head exceeds {limit} bytes"
        else:
            err = self._parse_error
            status, message = 400, f"malformed HTTP request: {first_line(err)}" if err else "malformed HTTP request"
        self._error_and_close(status, message, "invalid_request_error")

    # -- flow control: a client that stops reading is dropped -------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.gate.limits.socket_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._write_timer = None
        self._closed_by_us = True
        self._log(f"read nothing of its answer for {self.gate.limits.socket_timeout_s:g} s; dropped")
        self.transport.abort()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- the request deadline ---------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._received = 0
        self._deadline = time.monotonic() + self._limit_s
        self._timer = self.loop.call_later(self._limit_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self._closed_by_us = True
        if not self._received:  # nothing asked: closed without an answer
            self.transport.close()
            return
        self._log(f"sent no complete request within {self._limit_s:g} s; closed with 408")
        self._error_and_close(408, f"the request did not arrive within {self._limit_s:g} s", "timeout_error")

    def _mid_request(self) -> bool:
        if self.cycle is not None and not self.cycle.response_complete:
            return True
        return self._received > 0

    def _error_and_close(self, status: int, message: str, kind: str) -> None:
        """Answer before (or instead of) h11's request: raw bytes, since h11 may hold no request to answer."""
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:  # an answer is under way: it cannot be replaced
                self.transport.close()
                return
            self.cycle.disconnected = True  # the app's answer goes nowhere
            self.cycle.message_event.set()
        self._closed_by_us = True
        body = (json.dumps({"error": {"message": message, "type": kind}}) + "\n").encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()
        self.gate.count(status)

    def _log(self, what: str) -> None:
        who = "%s:%d" % self.client if self.client else "?"
        self.gate.log(f"guard monitor: client {who} {what}")
