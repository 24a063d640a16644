"""Serve a run over HTTP: an OpenAI-compatible API and a web chat page. `python -m fgpt_jax.serve --run DIR`.

    python -m fgpt_jax.serve --run DIR [--step N] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                             [--max-batch N] [--max-queue N] [--model-name NAME] [--no-warmup]

Loads the run's checkpoint, compiles the engine's programs (unless --no-warmup), then serves with
uvicorn until Ctrl-C. The socket is bound before anything else starts, so a taken port is a one-line
error; `--port 0` takes a free one. The first stdout line is `serving MODEL at http://HOST:PORT/`.
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
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("FGPT_API_KEY") or None
    if args.api_key is not None and not args.api_key.strip():
        _parser().error("--api-key: expected a non-empty key")

    def body() -> int:
        sock = _bind(args.host, args.port)
        import uvicorn

        from fgpt_jax.checkpoint import load_model
        from fgpt_jax.config import instruction_tuned as tuned
        from fgpt_jax.inference.engine import Engine
        from fgpt_jax.inference.server import create_app

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
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
            server.run(sockets=[sock])
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
