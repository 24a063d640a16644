"""Connection limits for the server's uvicorn: a deadline on receiving each request, a cap on open
connections that makes room by closing the oldest one still waiting on its request, OpenAI-shaped
refusals, and log lines that an attack cannot multiply.

Why our own code. uvicorn (h11 and httptools alike) bounds none of this in time: its
`timeout_keep_alive` is armed only after a response and cancelled by any byte received, so a client
that connects and sends nothing, or sends one byte every few seconds, is never closed (a slowloris);
`limit_concurrency` is checked only once a whole request head has arrived and then answers 503
without closing anything, so half-sent requests never count against it; `h11_max_incomplete_event_size`
bounds the size of a request head, not the time it takes. An ASGI middleware cannot help: the app
is called only after the head is parsed. So the guard is a small subclass of uvicorn's h11 protocol
(`uvicorn.Config(http=...)` takes a protocol class) that reads h11's own connection state, the
parser uvicorn already runs, to know whether a request is being received.

What it enforces (`ConnectionLimits`; the serve CLI's flags, docs/serving.md):
  * a request's head and body must arrive within `request_timeout` seconds of its first byte (of the
    connection opening, for the first request); the clock stops once the request is whole, so a
    long generation or stream is never cut. Past it: 408 (or nothing, to a client that never sent a
    byte) and the connection is closed;
  * at most `max_connections` open connections. One more closes the oldest connection that is still
    waiting on a request (idle, or sending one: 408) to make room, so a flood of half-sent requests
    cannot lock out a client that sends a whole one; when every connection has a request in the
    works, the new one is answered 503 (Retry-After: 1) and closed at once. Either way the process
    holds at most about `max_connections` sockets and never runs out of file descriptors;
  * idle keep-alive connections close after uvicorn's `timeout_keep_alive` (passed through);
  * an unparsable request, or a head still unfinished past `max_head_bytes` (h11 bounds what it buffers,
    so a head that arrives whole in one read may be longer), gets uvicorn's 400 as OpenAI's error object;
  * every warning a client can cause (ours and uvicorn's) is logged at most once a minute per kind.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of the HTTP server (defaults: the serve CLI's)."""

    request_timeout: float = 20.0  # s from a request's first byte until its head and body are all in
    keep_alive_timeout: float = 5.0  # s an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)
    max_connections: int = 512  # open connections; past it the oldest waiting one is closed, or the new one refused
    max_head_bytes: int = 16 * 1024  # buffered bytes of an unfinished request head (h11's default); more: 400
    backlog: int = 2048  # connections the kernel queues before they are accepted (asyncio accepts up to
    # this many at once, so the process may briefly hold max_connections + backlog sockets)

    def __post_init__(self):
        if not (self.request_timeout > 0 and self.keep_alive_timeout > 0):
            raise ValueError(f"{self}: timeouts must be > 0")
        if self.max_connections < 1 or self.max_head_bytes < 1 or self.backlog < 1:
            raise ValueError(f"{self}: max_connections, max_head_bytes and backlog must be >= 1")


class Incidents:
    """Warnings that a flood cannot multiply: the first of each kind is logged at once; the next ones
    within `every` seconds are only counted, and the count rides on the next line logged for that kind.
    A thousand slow clients cost one line a minute, not a thousand (nor a traceback each)."""

    def __init__(self, log: logging.Logger, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.every, self.clock = log, every, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, kind: str, message: str) -> None:
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        if held:
            message += f" (and {held} more like it in the last {now - self._last[kind]:.0f} s)"
        self._last[kind] = now
        self.log.warning(message)


def error_bytes(status: int, reason: str, message: str, kind: str, code: str | None, headers: str = "") -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error object, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{headers}\r\n"
    )
    return head.encode() + body


class _RateLimitedWarnings:
    """uvicorn's logger as its protocol uses it, with the warnings a client can cause at will (a request
    that is not HTTP, an unsupported upgrade) passed through Incidents; errors (an exception in the app:
    a bug) keep their tracebacks."""

    def __init__(self, log: logging.Logger, incidents: Incidents):
        self._log, self._incidents = log, incidents

    def warning(self, msg: str, *args) -> None:
        self._incidents.report(f"uvicorn: {msg}", msg % args if args else msg)

    def __getattr__(self, name):
        return getattr(self._log, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline and a connection cap (see the module docstring).
    Built per server by `guarded_protocol`, which sets the class attributes below."""

    limits: ConnectionLimits
    incidents: Incidents
    waiting: dict  # this server's connections without a request in the works, oldest first (an ordered set)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logger = _RateLimitedWarnings(self.logger, self.incidents)  # type: ignore[assignment]

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._refused, self._closed_by_us, self._fresh, self._deadline = False, False, True, None
        n = self.limits.max_connections
        if len(self.server_state.connections) >= n:
            oldest = next(iter(self.waiting), None)
            if oldest is None:  # every connection has a request in the works: nothing to take back
                self._refused = True
                transport.write(
                    error_bytes(
                        503,
                        "Service Unavailable",
                        f"Too many open connections (this server takes {n}); try again later.",
                        "server_error",
                        "server_busy",
                        "retry-after: 1\r\n",
                    )
                )
                transport.close()  # once the write is flushed
                self.incidents.report("refused", f"refused connections: {n} open, all busy (--max-connections {n})")
                return
            oldest._close(
                "evicted",
                "The server needed this connection for another client; send the request again.",
                f"closed {oldest._peer()}, waiting on a request, to make room: {n} open (--max-connections {n})",
            )
        super().connection_made(transport)
        self._update_state()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already buffered
        self._update_state()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            if not self._closed_by_us and self._partial_request():
                self.incidents.report("left", f"{self._peer()} closed its connection in the middle of a request")
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP (or an unfinished head past max_head_bytes), as
        OpenAI's error."""
        self.transport.write(
            error_bytes(
                400,
                "Bad Request",
                f"{msg.rstrip('.')}: not HTTP/1.1, or a request head over {self.limits.max_head_bytes} bytes.",
                "invalid_request_error",
                None,
            )
        )
        self.transport.close()

    # -- where the connection stands --
    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _partial_request(self) -> bool:
        """Part of a request has arrived and is not answered: a head in progress, or a body still coming
        in before the app has started its response."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:  # the current cycle is this request's
            return not self.cycle.response_started
        return state is h11.IDLE and bool(self.conn.trailing_data[0])

    def _update_state(self) -> None:
        """After every event: is a request being received (the deadline runs), and is the connection
        waiting on one (it may be closed to make room)?"""
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._fresh = False
        closing = self.transport.is_closing()
        receiving = not closing and (
            state is h11.SEND_BODY or (state is h11.IDLE and (self._fresh or bool(self.conn.trailing_data[0])))
        )
        if receiving and self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_timeout, self._deadline_passed)
        elif not receiving and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not closing and state in (h11.IDLE, h11.SEND_BODY):
            self.waiting.setdefault(self, None)  # keeps its place: a drip feed does not move to the back
        else:
            self.waiting.pop(self, None)

    def _deadline_passed(self) -> None:
        self._deadline = None
        t = self.limits.request_timeout
        self._close(
            "timeout",
            f"The request was not received within {t:g} s.",
            f"closed {self._peer()}: no whole request within {t:g} s (--request-timeout {t:g})",
        )

    def _close(self, kind: str, message: str, log_line: str) -> None:
        """Close now, answering 408 to a request in progress (nothing to one that never began)."""
        self.waiting.pop(self, None)
        self.server_state.connections.discard(self)  # counts as gone at once (the socket closes next loop turn)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.transport.is_closing():
            return
        self._closed_by_us = True
        if self._partial_request():
            self.transport.write(
                error_bytes(408, "Request Timeout", message, "invalid_request_error", "request_timeout")
            )
        self.incidents.report(kind, log_line)
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits, log: logging.Logger | None = None) -> type[GuardedH11Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, with these limits (one class per server,
    so two servers in one process keep their own limits, waiting lists and incident counts)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"limits": limits, "incidents": Incidents(log or logging.getLogger("uvicorn.error")), "waiting": {}},
    )


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """The uvicorn.Config keywords that carry these limits."""
    return dict(
        http=guarded_protocol(limits),
        ws="none",  # no WebSocket routes: an upgrade request is plain HTTP to the app
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        backlog=limits.backlog,
    )
