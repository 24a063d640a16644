"""Serve a run over HTTP: an OpenAI-compatible API and a web chat page. `python -m fgpt_jax.serve --run DIR`.

    python -m fgpt_jax.serve --run DIR [--step N] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                             [--max-batch N] [--max-queue N] [--model-name NAME] [--no-warmup]
                             [--request-timeout S] [--keep-alive-timeout S] [--max-connections N]

Loads the run's checkpoint, compiles the engine's programs (unless --no-warmup), then serves with
uvicorn until Ctrl-C. The socket is bound before anything else starts, so a taken port is a one-line
error; `--port 0` takes a free one. The first stdout line is `serving MODEL at http://HOST:PORT/`.
Slow, silent and surplus connections are bounded (fgpt_jax.inference.connections), and the
process's open-file limit is raised to fit --max-connections and the listen backlog (or that is a
one-line error), so a flood of connections never runs it out of file descriptors.
The API and the page: docs/serving.md; the app: fgpt_jax.inference.server; the engine:
fgpt_jax.inference.engine.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.errors import UserError


def _parser() -> cli.Parser:
    p = cli.Parser(
        prog="python -m fgpt_jax.serve",
        description="Serve a run: OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models) and a web chat page at /.",
    )
    p.add_argument("--run", type=Path, required=True, metavar="DIR", help="run directory (config.json + checkpoints/)")
    p.add_argument("--step", type=cli.int_in(0), metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=cli.int_in(0, 65535), default=8000, help="TCP port; 0 = any free one (default 8000)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: none; also read from FGPT_API_KEY)",
    )
    p.add_argument(
        "--max-batch",
        type=cli.int_in(1, 1024),
        default=8,
        metavar="N",
        help="requests decoded together in one batch (default 8)",
    )
    p.add_argument(
        "--max-queue",
        type=cli.int_in(0),
        default=64,
        metavar="N",
        help="requests that may wait for a slot; more get 503 (default 64)",
    )
    p.add_argument("--model-name", metavar="NAME", help="model id in the API (default: the run directory's name)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start")
    # Defaults: ConnectionLimits' (not imported here, so --help stays fast).
    p.add_argument(
        "--request-timeout",
        type=cli.float_in(0, lo_open=True),
        default=20.0,
        metavar="S",
        help="seconds a request's head and body may take to arrive; then 408 and close (default 20)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=cli.float_in(0, lo_open=True),
        default=5.0,
        metavar="S",
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    p.add_argument(
        "--max-connections",
        type=cli.int_in(1, 1_000_000),
        default=512,
        metavar="N",
        help="open connections at most; past it the oldest one still waiting on a request is closed "
        "(or, if all are busy, the new one answered 503) (default 512)",
    )
    return p


FD_RESERVE = 256  # files the process needs besides connections: the model, JAX, logs, the listening socket
BACKLOG = 2048  # connections the kernel queues before they are accepted (asyncio accepts up to this many at once)


def plan_file_limit(max_connections: int, soft: int, hard: int, infinity: int = -1) -> tuple[int | None, int]:
    """(the soft RLIMIT_NOFILE to set, None to keep it; the listen backlog) such that `max_connections`
    sockets, the up to `backlog` that asyncio may accept at once before any is closed, and FD_RESERVE
    other files all fit: the process then never meets EMFILE. A low hard limit shrinks the backlog;
    UserError when not even the connections fit."""
    floor = max_connections + FD_RESERVE
    backlog = BACKLOG
    if hard != infinity:
        if hard <= floor:
            raise UserError(
                f"--max-connections {max_connections}: this process may open at most {hard} files (ulimit -Hn), "
                f"so at most {max(hard - FD_RESERVE - 1, 1)} connections; lower it or raise the limit"
            )
        backlog = min(backlog, hard - floor)
    need = floor + backlog
    return (None if soft == infinity or soft >= need else need), backlog


def _fit_file_limit(max_connections: int) -> int:
    """Raise this process's open-file limit to fit; returns the listen backlog to use."""
    try:
        import resource
    except ImportError:  # not POSIX: no such limit to raise
        return BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new, backlog = plan_file_limit(max_connections, soft, hard, resource.RLIM_INFINITY)
    if new is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return backlog


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("FGPT_API_KEY") or None
    if args.api_key is not None and not args.api_key.strip():
        _parser().error("--api-key: expected a non-empty key")

    def body() -> int:
        backlog = _fit_file_limit(args.max_connections)
        sock = _bind(args.host, args.port, backlog)
        import uvicorn

        from fgpt_jax.checkpoint import load_model
        from fgpt_jax.config import instruction_tuned as tuned
        from fgpt_jax.inference.connections import ConnectionLimits, uvicorn_options
        from fgpt_jax.inference.engine import Engine
        from fgpt_jax.inference.server import create_app

        limits = ConnectionLimits(
            request_timeout=args.request_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            max_connections=args.max_connections,
            backlog=backlog,
        )
        model, cfg = load_model(args.run, args.step)
        instruction_tuned = tuned(cfg)  # SFT or DPO; base runs are for /v1/completions
        name = args.model_name or args.run.absolute().name
        with Engine(model, max_batch=args.max_batch, max_queue=args.max_queue) as engine:
            if not args.no_warmup:
                print(f"compiling for {name} (max batch {args.max_batch})...", file=sys.stderr, flush=True)
                engine.warmup()
            app = create_app(engine, name, instruction_tuned, api_key=api_key)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(
                f"serving {name} at http://{shown}:{port}/ ({'instruction-tuned' if instruction_tuned else 'base'} "
                f"model, context {model.config.block_size}, max batch {args.max_batch}"
                f"{', API key required' if api_key else ''})",
                flush=True,
            )
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **uvicorn_options(limits))
            server = uvicorn.Server(config)
            server.run(sockets=[sock])
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
