"""The server under hostile clients, over real sockets: slow and silent connections are closed after
`--request-timeout`, idle keep-alive ones after `--keep-alive-timeout`, connections past
`--max-connections` push out the oldest half-sent ones (the server's file descriptors stay bounded,
and a whole request is still served); a client that
leaves mid-body costs at most one log line; deeply nested JSON is a 400 that leaves the keep-alive
connection usable; a request that can never fit is a 400 the openai client does not retry; strict
types are 422s naming the field; a DPO run is served as instruction-tuned. After every bad request a
good one is answered.

HTTP is spoken through h11 (the reference parser uvicorn itself uses) on raw sockets wherever the
test needs to control the bytes or the connection; the model is a random-init tiny GPT saved as a
DPO (data.format "preference") run, so nothing is trained."""

import dataclasses
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import h11
import httpx
import openai
import pytest

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

MODEL = "dpo-run"
REQUEST_TIMEOUT = 5.0  # --request-timeout (s): long enough to tell "closed at once" from "timed out"
KEEP_ALIVE = 1.0  # --keep-alive-timeout (s)
MAX_CONNECTIONS = 16
MAX_BATCH, MAX_QUEUE = 2, 2
GOOD = {"prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(process, base url, log path) of `python -m fgpt_jax.serve` on a DPO-format run."""
    from flax import nnx

    from fgpt_jax.checkpoint import save_model
    from fgpt_jax.config import Config
    from fgpt_jax.data import DataConfig
    from fgpt_jax.model import GPT, GPTConfig

    run = tmp_path_factory.mktemp("hostile") / MODEL
    shape = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=128)
    cfg = Config(model=shape, data=dataclasses.replace(DataConfig(), format="preference"))
    save_model(run, GPT(shape, rngs=nnx.Rngs(0)), cfg)
    log_path = run.parent / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fgpt_jax.serve",
            "--run",
            str(run),
            "--port",
            "0",
            "--max-batch",
            str(MAX_BATCH),
            "--max-queue",
            str(MAX_QUEUE),
            "--request-timeout",
            str(REQUEST_TIMEOUT),
            "--keep-alive-timeout",
            str(KEEP_ALIVE),
            "--max-connections",
            str(MAX_CONNECTIONS),
        ],
        stdout=subprocess.PIPE,
        stderr=open(log_path, "w"),
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=300)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"server did not start: {log_path.read_text()[-2000:]}") from None
    assert first.startswith(f"serving {MODEL} at "), first
    yield proc, first.split(" at ")[1].split()[0], log_path, first
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, log_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def address(url):
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def served_ok(url):
    """A good request on a fresh connection is answered."""
    r = httpx.post(url + "v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    assert httpx.get(url + "health", timeout=60).json()["status"] == "ok"


def check_error(status, body, want_status, param=None):
    """OpenAI's error object with the status (and the param, when given)."""
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


class Connection:
    """One HTTP/1.1 keep-alive connection on a raw socket, spoken through h11's client side."""

    def __init__(self, address, timeout=60.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.h11 = h11.Connection(h11.CLIENT)

    def request(self, method, path, body=b""):
        """(status, parsed JSON body); raises if the server did not keep the connection open."""
        headers = [("Host", "test"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        out = self.h11.send(h11.Request(method=method, target=path, headers=headers))
        out += self.h11.send(h11.Data(data=body)) if body else b""
        self.sock.sendall(out + self.h11.send(h11.EndOfMessage()))
        status, data = None, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        self.h11.start_next_cycle()  # fails if the server asked to close the connection
        return status, json.loads(data)

    def close(self):
        self.sock.close()


def read_until_closed(sock, limit):
    """(bytes received, seconds until the server closed the connection), within `limit` seconds."""
    t0, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s; received {data[:200]!r}") from None
    return data, time.monotonic() - t0


def wait_for_idle_connections_to_close():
    """Earlier tests' keep-alive connections are closed by the server after KEEP_ALIVE."""
    time.sleep(KEEP_ALIVE + 0.5)


def server_fds(proc):
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


# ---- item 7: a DPO run is instruction-tuned ----


def test_instruction_tuned_is_one_rule():
    from fgpt_jax.config import Config, instruction_tuned
    from fgpt_jax.data import DataConfig

    def of(fmt):
        return instruction_tuned(Config(data=dataclasses.replace(DataConfig(), format=fmt)))

    assert (of("tokens"), of("chat"), of("preference")) == (False, True, True)


def test_a_dpo_run_is_served_as_instruction_tuned(served, url):
    assert "instruction-tuned model" in served[3]
    card = httpx.get(url + "v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["instruction_tuned"] is True
    assert httpx.get(url + f"v1/models/{MODEL}").json()["instruction_tuned"] is True
    assert httpx.get(url + "health").json()["instruction_tuned"] is True


# ---- item 2: slow, silent and too many connections ----


def test_slow_and_silent_connections_are_closed_after_the_request_timeout(address, url):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    groups = {
        "silent": [b""] * 3,  # connected, never sent a byte
        "half head": [head[:40]] * 3,
        "half body": [head + b"Content-Length: 200\r\n\r\n" + b'{"prompt": "'] * 3,
    }
    t0 = time.monotonic()
    socks = {}
    for kind, payloads in groups.items():
        socks[kind] = []
        for p in payloads:
            s = socket.create_connection(address)
            s.sendall(p)
            socks[kind].append(s)
    # A drip feed: one byte of header every 0.2 s would reset a per-read timer forever.
    drip = socket.create_connection(address)
    drip_end = []

    def feed():
        try:
            for b in (head + b"X-Slow: " + b"a" * 1000).decode():
                drip.sendall(b.encode())
                time.sleep(0.2)
        except OSError:
            pass
        drip_end.append(time.monotonic() - t0)

    threading.Thread(target=feed, daemon=True).start()
    served_ok(url)  # while all of them are open
    for kind, group in socks.items():
        for s in group:
            data, _ = read_until_closed(s, REQUEST_TIMEOUT + 10)
            closed = time.monotonic() - t0
            assert REQUEST_TIMEOUT * 0.8 <= closed <= REQUEST_TIMEOUT + 8, (kind, closed)
            if kind == "silent":
                assert data == b"", data  # nothing to answer
            else:
                assert data.startswith(b"HTTP/1.1 408 "), (kind, data[:200])
            s.close()
    data, _ = read_until_closed(drip, REQUEST_TIMEOUT + 10)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert time.monotonic() - t0 <= REQUEST_TIMEOUT + 8
    drip.close()
    served_ok(url)


def test_an_idle_keep_alive_connection_is_closed(address, url):
    conn = Connection(address)
    status, body = conn.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    data, after = read_until_closed(conn.sock, KEEP_ALIVE + 5)
    assert data == b"" and after <= KEEP_ALIVE + 4
    conn.close()
    served_ok(url)


def test_a_slowloris_past_the_connection_limit_locks_nobody_out_and_files_stay_bounded(served, address, url):
    """A scaled-down 5,000 half-sent requests: 4 x MAX_CONNECTIONS of them. Each one past the limit
    closes the oldest (408, at once), a whole request is still served during the flood, the last ones
    are closed by the request timeout, and the server's open files stay bounded throughout."""
    proc = served[0]
    wait_for_idle_connections_to_close()
    before = peak = server_fds(proc)
    n = 4 * MAX_CONNECTIONS
    t0 = time.monotonic()
    socks = []
    for i in range(n):
        socks.append(socket.create_connection(address))
        socks[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: te")
        if i % 8 == 7:
            time.sleep(0.05)  # let the server take them in
            peak = max(peak, server_fds(proc))
    served_ok(url)  # two more connections: they push out two more of the oldest
    time.sleep(0.3)
    mid = time.monotonic() - t0
    readable = set(select.select(socks, [], [], 0)[0])
    assert mid < REQUEST_TIMEOUT * 0.8, mid  # what is closed by now was not closed by the timeout
    evicted = n - MAX_CONNECTIONS
    assert all(s in readable for s in socks[:evicted])  # the oldest, closed to make room
    assert not any(s in readable for s in socks[evicted + 2 :])  # the newest are still held
    assert peak <= before + MAX_CONNECTIONS + 8, (before, peak)
    for s in socks:
        data, _ = read_until_closed(s, REQUEST_TIMEOUT + 10)
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        s.close()
    assert time.monotonic() - t0 <= REQUEST_TIMEOUT + 8
    served_ok(url)
    time.sleep(0.3)
    assert server_fds(proc) <= before + 2


def test_bytes_that_are_not_http_get_an_openai_error_and_no_log_flood(served, address, url):
    log_path = served[2]
    start = log_path.read_text()
    # Not HTTP; a head still unfinished after 20 kB (h11 buffers at most 16 KiB of one); three times each.
    for raw in [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000] * 3:
        s = socket.create_connection(address)
        s.sendall(raw)
        data, _ = read_until_closed(s, 10)
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), data[:200]
        check_error(400, json.loads(body), 400)
    served_ok(url)
    new = log_path.read_text()[len(start) :].splitlines()
    assert len(new) <= 1, new  # uvicorn's "Invalid HTTP request received." once a minute, not six times


def test_the_file_limit_is_raised_to_fit_the_connections_and_the_backlog():
    from fgpt_jax.errors import UserError
    from fgpt_jax.serve import BACKLOG, FD_RESERVE, plan_file_limit

    inf = -1
    full = 512 + FD_RESERVE + BACKLOG
    assert plan_file_limit(512, full, 1 << 20, inf) == (None, BACKLOG)  # fits already
    assert plan_file_limit(512, 1024, 1 << 20, inf) == (full, BACKLOG)
    assert plan_file_limit(512, 1024, inf, inf) == (full, BACKLOG)
    assert plan_file_limit(512, inf, inf, inf) == (None, BACKLOG)
    assert plan_file_limit(512, 1024, 1024, inf) == (None, 1024 - 512 - FD_RESERVE)  # a low hard limit: less backlog
    with pytest.raises(UserError, match="--max-connections 5000: .* at most 4096 files"):
        plan_file_limit(5000, 1024, 4096, inf)


# ---- item 3: a client that leaves mid-body ----


def test_a_client_that_leaves_mid_body_costs_at_most_one_log_line(served, address, url):
    log_path = served[2]
    served_ok(url)
    start = log_path.read_text()
    n = 5
    for _ in range(n):
        s = socket.create_connection(address)
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"prompt": "Hello, this body stops half-way'
        )
        time.sleep(0.1)  # the app is reading the body
        s.close()
    time.sleep(1.0)
    served_ok(url)
    new = log_path.read_text()[len(start) :]
    lines = new.splitlines()
    assert "Traceback" not in new and len(lines) <= n, new[-3000:]
    assert all(len(line) < 200 for line in lines), lines


# ---- item 4: deeply nested JSON ----


def test_deeply_nested_json_is_400_and_the_connection_stays_usable(address, url):
    conn = Connection(address)
    good = json.dumps(GOOD).encode()
    deep = 100_000
    bad = {
        "nested": b'{"prompt": "x", "extra": ' + b"[" * deep + b"]" * deep + b"}",
        "nested objects": b'{"prompt": ' + b'{"a": ' * deep + b"1" + b"}" * deep + b"}",
        "NaN": b'{"prompt": "x", "temperature": NaN}',
        "huge integer": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
    }
    for kind, body in bad.items():
        status, answer = conn.request("POST", "/v1/completions", body)
        check_error(status, answer, 400)
        status, answer = conn.request("POST", "/v1/completions", good)  # same connection
        assert status == 200, (kind, answer)
    # Nested, but shallow enough to parse: the schema refuses it.
    shallow = b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}"
    status, answer = conn.request("POST", "/v1/completions", shallow)
    check_error(status, answer, 422, "prompt.0.0")  # lists of lists, but not of token ids
    assert conn.request("POST", "/v1/completions", good)[0] == 200
    conn.close()
    served_ok(url)


# ---- item 5: too big to ever fit vs a transiently full queue ----


def test_a_request_that_can_never_fit_is_400_and_not_retried(url):
    sent = []
    with httpx.Client(event_hooks={"request": [sent.append]}, timeout=120) as http_client:
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=3, http_client=http_client)
        capacity = MAX_BATCH + MAX_QUEUE
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=["a", "b"], n=3, max_tokens=2)
        assert len(sent) == 1  # not retried
        err = e.value.body
        assert err["param"] == "n" and f"at most {capacity}" in err["message"], err
        assert f"max batch {MAX_BATCH}" in err["message"] and f"max queue {MAX_QUEUE}" in err["message"], err
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], n=capacity + 1, max_tokens=2
            )
        assert len(sent) == 2
        # Exactly the capacity fits.
        r = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=2)
        assert len(r.choices) == 4
    served_ok(url)


def test_a_transiently_full_queue_is_503_with_retry_after(url):
    results, barrier = [], threading.Barrier(12)

    def one(i):
        barrier.wait()
        r = httpx.post(
            url + "v1/completions",
            json={"prompt": "To be", "max_tokens": 120, "temperature": 1.0, "seed": i},
            timeout=120,
        )
        results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 503}, codes
    for r in results:
        if r.status_code == 503:
            check_error(503, r.json(), 503)
            assert r.json()["error"]["type"] == "server_error" and r.headers["retry-after"] == "1"
    served_ok(url)


# ---- item 6: strict types ----


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("max_tokens", 2.0),
        ("max_tokens", "5"),
        ("max_completion_tokens", False),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", "0.9"),
        ("top_k", "40"),
        ("top_k", 4.5),
        ("n", 1.5),
        ("n", True),
        ("seed", "7"),
        ("seed", 1.5),
        ("stream", "true"),
        ("stream", 1),
        ("stop", 5),
        ("prompt", 5),
    ],
)
def test_strict_types_are_422_naming_the_field(url, field, value):
    r = httpx.post(url + "v1/completions", json={**GOOD, field: value}, timeout=60)
    check_error(r.status_code, r.json(), 422, field)
    served_ok(url)


def test_strict_types_in_chat_and_through_the_openai_client(url):
    chat = url + "v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body, param in [
        ({**ok, "stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    ]:
        r = httpx.post(chat, json=body, timeout=60)
        check_error(r.status_code, r.json(), 422, param)
        assert httpx.post(chat, json=ok, timeout=60).status_code == 200
    client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=True)
    # Integers are numbers: what OpenAI takes, so is taken.
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=1, top_p=1)
    assert r.choices[0].finish_reason in ("stop", "length")
    # A huge top_k is "no filter", not an engine crash.
    r = httpx.post(url + "v1/completions", json={**GOOD, "top_k": 10**30}, timeout=60)
    assert r.status_code == 200, r.text
    served_ok(url)
