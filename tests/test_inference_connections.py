"""The HTTP server's connection guard (fgpt_jax.inference.connections) on a real uvicorn, in this
process, in front of a minimal ASGI app that holds `/slow` requests until told: busy connections are
never closed to make room (one more is refused with 503 and Retry-After), waiting ones are closed
oldest first (408) and a whole request then gets through; and the rate-limited incident log."""

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import pytest
import uvicorn

from fgpt_jax.inference.connections import ConnectionLimits, Incidents, uvicorn_options

LIMITS = ConnectionLimits(request_timeout=10.0, keep_alive_timeout=5.0, max_connections=3)


@contextlib.contextmanager
def serving(app, limits):
    """(host, port) of uvicorn with the guard, serving `app` in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(limits.backlog)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_options(limits)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def app_and_release():
    release = threading.Event()

    async def app(scope, receive, send):  # GET requests only: no body to read
        if scope["path"] == "/slow":
            while not release.is_set():
                await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app, release


def connect(address, payload=b""):
    s = socket.create_connection(address, timeout=10)
    if payload:
        s.sendall(payload)
    return s


def answer(s, limit=10.0):
    """Everything the server sent until it closed the connection (or `limit` seconds passed)."""
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
            if b"ok" in data and data.endswith(b"ok"):  # a whole 200 on a kept-alive connection
                break
    except TimeoutError:
        pass
    return data


def test_busy_connections_are_kept_and_one_more_is_refused_with_503(app_and_release):
    app, release = app_and_release
    release.clear()
    with serving(app, LIMITS) as address:
        busy = [connect(address, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n") for _ in range(3)]
        time.sleep(0.3)  # all three are in the app
        t0 = time.monotonic()
        extra = connect(address)
        data = answer(extra)
        assert time.monotonic() - t0 < 2.0  # at once, not after a timeout
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), head
        err = json.loads(body)["error"]
        assert (
            err["type"] == "server_error"
            and err["code"] == "server_busy"
            and set(err)
            == {
                "message",
                "type",
                "param",
                "code",
            }
        )
        release.set()
        for s in busy:
            assert answer(s).startswith(b"HTTP/1.1 200 ")
            s.close()
        extra.close()


def test_waiting_connections_make_room_oldest_first(app_and_release):
    app, release = app_and_release
    release.set()
    with serving(app, LIMITS) as address:
        first = connect(address, b"GET /fast HTTP/1.1\r\nHost: t\r\n")  # a head, unfinished
        time.sleep(0.1)
        second = connect(address)  # connected, silent
        time.sleep(0.1)
        idle = connect(address, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")  # answered, then kept alive
        assert answer(idle).startswith(b"HTTP/1.1 200 ")
        # A fourth connection closes `first` (the oldest waiting: 408), then a fifth `second` (silently).
        whole = connect(address, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer(whole).startswith(b"HTTP/1.1 200 ")
        assert answer(first, 2.0).startswith(b"HTTP/1.1 408 ")
        another = connect(address, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer(another).startswith(b"HTTP/1.1 200 ")
        second.settimeout(2.0)
        assert second.recv(100) == b""  # closed, nothing said: it never sent a byte
        for s in (first, second, idle, whole, another):
            s.close()


def test_incidents_are_logged_once_a_window_with_a_count():
    lines, now = [], [0.0]

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("test-incidents")
    log.addHandler(Capture())
    log.propagate = False
    incidents = Incidents(log, every=60.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0, 59.0):
        now[0] = t
        incidents.report("timeout", "slow client")
    incidents.report("refused", "too many")  # another kind has its own window
    now[0] = 61.0
    incidents.report("timeout", "slow client")
    now[0] = 62.0
    incidents.report("timeout", "slow client")
    assert lines == ["slow client", "too many", "slow client (and 3 more like it in the last 61 s)"]
