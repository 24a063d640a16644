"""Serving throughput: the same requests with 1, 4 and 16 concurrent streaming clients.

    python scripts/bench_serve.py [--run DIR] [--requests 16] [--max-tokens 64] [--clients 1 4 16] [--max-batch 16]

Starts `python -m fgpt_jax.serve` on a free local port (a run directory, or by default a random-init
"tiny" preset model: throughput does not depend on the weights), then sends the same --requests
greedy streaming completions through the official `openai` client, --clients at a time, and reports
aggregate completion tokens/s (from the usage chunk) against the first row (1 client: the requests one
after another), plus the mean time to first token. A warm-up round runs first (the server also compiles
at start). Greedy decoding never stops early on random weights, so every request decodes --max-tokens.
`--engine` adds the same rounds against the engine alone, in this process (no HTTP, no JSON, no
client): the ceiling batching gives on this machine. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai


def make_run(path: Path, preset: str) -> Path:
    from flax import nnx

    from fgpt_jax.checkpoint import save_model
    from fgpt_jax.config import Config
    from fgpt_jax.model import GPT, GPTConfig

    shape = GPTConfig.preset(preset)
    save_model(path, GPT(shape, rngs=nnx.Rngs(0)), Config(model=shape))
    return path


def start(run: Path, max_batch: int, queue_len: int):
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
            str(max_batch),
            "--max-queue",
            str(queue_len),
            "--model-name",
            "bench",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        sys.exit(f"error: the server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def one(client, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else float("nan")


def run_round(client, prompts: list[str], max_tokens: int, clients: int) -> tuple[int, float, float]:
    work: queue.Queue = queue.Queue()
    for p in prompts:
        work.put(p)
    results, lock = [], threading.Lock()

    def worker():
        while True:
            try:
                p = work.get_nowait()
            except queue.Empty:
                return
            r = one(client, p, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[0] for r in results), wall, sum(r[1] for r in results) / len(results)


def engine_rounds(run: Path, prompts: list[str], args) -> None:
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.inference.engine import Engine, SamplingParams
    from fgpt_jax.tokenizer import get_tokenizer

    model, _ = load_model(run)
    ids = [get_tokenizer().encode(p) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    with Engine(model, max_batch=args.max_batch, stop_ids=()) as eng:
        eng.warmup()
        print("\nengine alone (in-process, no HTTP):")
        print("| clients | tokens | wall s | aggregate tok/s | speed-up |")
        print("|---:|---:|---:|---:|---:|")
        base = None
        for c in args.clients:
            t0, tokens = time.perf_counter(), 0
            for start in range(0, len(ids), c):  # c requests at a time, as c clients would keep the engine busy
                reqs = [eng.submit(p, params) for p in ids[start : start + c]]
                for r in reqs:
                    r.finished.wait()
                    tokens += r.generated
            wall = time.perf_counter() - t0
            base = base or tokens / wall
            print(f"| {c} | {tokens} | {wall:.2f} | {tokens / wall:,.0f} | {tokens / wall / base:.2f}x |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run directory (default: a random-init model of --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--engine", action="store_true", help="also time the engine alone, without HTTP")
    args = p.parse_args()
    from fgpt_jax.cli import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp) / "run", args.preset)
        names = ["First Citizen", "KING RICHARD", "ROMEO", "JULIET", "MENENIUS", "Nurse", "HAMLET", "LUCIO"]
        prompts = [
            f"{names[i % len(names)]}: Before we proceed any further, hear me speak. ({i})"
            for i in range(args.requests)
        ]
        proc, url = start(run, args.max_batch, args.requests)
        try:
            client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=600)
            run_round(client, prompts[: max(args.clients)], args.max_tokens, max(args.clients))  # warm-up
            import jax

            print(
                f"jax {jax.__version__}, {jax.devices()[0].device_kind}, server --max-batch {args.max_batch}, "
                f"{args.requests} streamed greedy completions of {args.max_tokens} tokens, "
                f"{'run ' + str(args.run) if args.run else 'random-init ' + args.preset + ' preset'}"
            )
            print("| clients | tokens | wall s | aggregate tok/s | speed-up | mean time to first token s |")
            print("|---:|---:|---:|---:|---:|---:|")
            base = None
            for c in args.clients:
                tokens, wall, ttft = run_round(client, prompts, args.max_tokens, c)
                base = base or tokens / wall
                print(
                    f"| {c} | {tokens} | {wall:.2f} | {tokens / wall:,.0f} | {tokens / wall / base:.2f}x "
                    f"| {ttft:.3f} |",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        if args.engine:
            engine_rounds(run, prompts, args)


if __name__ == "__main__":
    main()
