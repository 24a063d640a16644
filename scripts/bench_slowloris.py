"""A slowloris against the server: N connections that each send half a request head and then wait.

    python scripts/bench_slowloris.py [--connections 5000] [--request-timeout 20] [--max-connections 512]

Starts `python -m fgpt_jax.serve` on a free local port with a random-init "tiny" preset run, opens
--connections sockets as fast as it can, each sending the first bytes of a POST and nothing more,
then, while they are open, sends one normal completion. It watches every socket until the server
closes it and samples the server's open file descriptors (/proc/PID/fd) every 0.2 s. Prints a
markdown table: how many were closed early to make room for newer connections (408 before half the
timeout), how many held until the request timeout closed them (408), refused (503), the time of the
last close, the server's descriptors before / at peak / after, and the normal request's status and
latency during the attack. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def make_run(path: Path) -> Path:
    from flax import nnx

    from fgpt_jax.checkpoint import save_model
    from fgpt_jax.config import Config
    from fgpt_jax.model import GPT, GPTConfig

    shape = GPTConfig.preset("tiny")
    save_model(path, GPT(shape, rngs=nnx.Rngs(0)), Config(model=shape))
    return path


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--request-timeout", type=float, default=20.0)
    p.add_argument("--max-connections", type=int, default=512)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need, hard))

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fgpt_jax.serve", "--run", str(run), "--port", "0", "--model-name", "bench"]
            + ["--request-timeout", str(args.request_timeout), "--max-connections", str(args.max_connections)],
            stdout=subprocess.PIPE,
            stderr=open(Path(tmp) / "server.log", "w"),
            text=True,
        )
        line = proc.stdout.readline()
        if not line.startswith("serving "):
            proc.kill()
            sys.exit(f"error: the server did not start: {line!r}")
        url = line.split(" at ")[1].split()[0]
        host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
        httpx.post(url + "v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)  # warm
        quiet = []
        for _ in range(3):
            t = time.monotonic()
            httpx.post(url + "v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120)
            quiet.append(time.monotonic() - t)
        time.sleep(6)  # the warm-up's keep-alive connection is closed
        before = fds(proc.pid)

        peak, sampling = [before], threading.Event()

        def sample():
            while not sampling.is_set():
                peak.append(fds(proc.pid))
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        sel = selectors.DefaultSelector()
        t0 = time.monotonic()
        opened = 0
        for _ in range(args.connections):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: appl")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, data=[b"", time.monotonic()])
            opened += 1
        open_s = time.monotonic() - t0

        result = {}

        def normal():
            t = time.monotonic()
            try:
                r = httpx.post(url + "v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120)
                result["status"] = r.status_code
            except httpx.HTTPError as e:
                result["status"] = type(e).__name__
            result["latency"] = time.monotonic() - t

        during = threading.Thread(target=normal)
        during.start()
        refused = early = timed_out = other = 0
        last_close = 0.0
        remaining = opened
        while remaining and time.monotonic() - t0 < args.request_timeout + 120:
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                try:
                    chunk = s.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    key.data[0] += chunk
                    continue
                head, held = key.data[0][:12], time.monotonic() - key.data[1]
                refused += head == b"HTTP/1.1 503"
                early += head == b"HTTP/1.1 408" and held < args.request_timeout / 2
                timed_out += head == b"HTTP/1.1 408" and held >= args.request_timeout / 2
                other += head not in (b"HTTP/1.1 503", b"HTTP/1.1 408")
                last_close = time.monotonic() - t0
                sel.unregister(s)
                s.close()
                remaining -= 1
        during.join()
        time.sleep(1.0)
        sampling.set()
        after = fds(proc.pid)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log_lines = (Path(tmp) / "server.log").read_text().splitlines()

    print(f"| connections opened | {opened} (in {open_s:.1f} s) |")
    print("|---|---|")
    print(f"| closed early to make room for newer connections (408) | {early} |")
    print(f"| held, then closed by the request timeout (408) | {timed_out} |")
    print(f"| refused (503: every connection busy) | {refused} |")
    print(f"| other answers | {other} |")
    print(f"| still open at the end | {remaining} |")
    print(f"| last one closed after | {last_close:.1f} s (--request-timeout {args.request_timeout:g}) |")
    print(f"| server open fds: before / peak / after | {before} / {max(peak)} / {after} |")
    print(f"| the same completion before the attack, 3 times | {' / '.join(f'{q:.2f}' for q in quiet)} s |")
    print(f"| a normal completion during the attack | {result['status']} in {result['latency']:.2f} s |")
    print(f"| server log lines | {len(log_lines)} |")
    print("\nserver log:\n" + "\n".join(log_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
