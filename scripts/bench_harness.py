"""lm-evaluation-harness in process (fgpt_jax.eval.harness) against lm-eval's own `hf` backend on the same
model's Hugging Face export: seconds per task, one request type per task, random weights.

  python scripts/bench_harness.py                                   # tiny, the task files of tests/data/harness
  python scripts/bench_harness.py --arc arc_easy.jsonl --limit 200  # more ARC items (CORE bundle format)
  python scripts/bench_harness.py --no-hf                           # ours only (no torch needed)
  python scripts/bench_harness.py --http                            # also over HTTP (local-completions)

Each task runs through `evaluate_harness` twice (the first call compiles every shape it uses, the
second is the steady state) and once through lm-eval's `hf` backend (transformers on CPU, float32,
batch size --batch-size). With --http, also twice through lm-eval's `local-completions` model against
the server's app (uvicorn in this process, on a free port; the export's tokenizer files on the client
side; max_length = block_size + 2, docs/evaluation.md). Prints a markdown table; stderr carries
lm-eval's own logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from flax import nnx

TASKS = Path(__file__).resolve().parent.parent / "tests" / "data" / "harness"
# (task, request type, data file key)
ROWS = [
    ("arc_easy_local", "loglikelihood", "arc"),
    ("shakespeare_rolling", "loglikelihood_rolling", "text"),
    ("qa_wikidata_gen", "generate_until", "qa"),
]


def task_dir(files: dict[str, Path]) -> Path:
    """The bundled task YAMLs with their data_files pointing at `files` (absolute, so any cwd works)."""
    out = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    names = {"arc": "arc_easy_16.jsonl", "text": "shakespeare_6.jsonl", "qa": "qa_wikidata_12.jsonl"}
    for yaml in TASKS.glob("*.yaml"):
        text = yaml.read_text()
        for key, name in names.items():
            text = text.replace(f"test: {name}", f"test: {files[key].resolve()}")
        (out / yaml.name).write_text(text)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (random weights): tiny, gpt2, ...")
    p.add_argument("--block-size", type=int, help="override the preset's block_size")
    p.add_argument("--arc", type=Path, default=TASKS / "arc_easy_16.jsonl", help="ARC items (query/choices/gold)")
    p.add_argument("--text", type=Path, default=TASKS / "shakespeare_6.jsonl", help="documents ({'text': ...})")
    p.add_argument("--qa", type=Path, default=TASKS / "qa_wikidata_12.jsonl", help="prompts (context/continuation)")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per call, both backends (default 32)")
    p.add_argument("--no-hf", action="store_true", help="skip lm-eval's hf backend")
    p.add_argument("--http", action="store_true", help="also lm-eval's local-completions against the server")
    args = p.parse_args(argv)

    import jax
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fgpt_jax.eval import Loaded
    from fgpt_jax.eval.harness import evaluate_harness
    from fgpt_jax.model import GPT, GPTConfig

    cfg = GPTConfig.preset(args.preset, **({"block_size": args.block_size} if args.block_size else {}))
    model = GPT(cfg, rngs=nnx.Rngs(0))
    loaded = Loaded.of(model)
    tasks = task_dir({"arc": args.arc, "text": args.text, "qa": args.qa})
    hf_lm, export, stack = None, None, contextlib.ExitStack()
    if not args.no_hf or args.http:
        from fgpt_jax.hf import to_hf

        export = to_hf(model, cfg, tasks / "hf")
    if not args.no_hf:
        from lm_eval.models.huggingface import HFLM

        hf_lm = HFLM(pretrained=str(export), device="cpu", batch_size=args.batch_size, dtype="float32")
    url = stack.enter_context(serve(model)) if args.http else None
    rows = []
    for task, kind, _ in ROWS:
        common = dict(limit=args.limit, bootstrap_iters=0, log_samples=False)
        times, result = [], None
        for _ in range(2):
            t0 = time.perf_counter()
            result = evaluate_harness(loaded, [task], include_path=tasks, batch_size=args.batch_size, **common)
            times.append(time.perf_counter() - t0)
        n = result["n-samples"][task]["effective"]
        metric = {k: v for k, v in result["results"][task].items() if "," in k and "stderr" not in k}
        hf_s = None
        if hf_lm is not None:
            t0 = time.perf_counter()
            ref = lm_eval.simple_evaluate(
                model=hf_lm,
                tasks=[task],
                task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                **common,
            )
            hf_s = time.perf_counter() - t0
            ref_metric = {k: v for k, v in ref["results"][task].items() if k in metric}
            assert all(np.isclose(metric[k], ref_metric[k], rtol=1e-4) for k in ref_metric), (metric, ref_metric)
        http_s = []
        for _ in range(2 if url else 0):
            t0 = time.perf_counter()
            ref = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=f"base_url={url},model=bench,tokenizer={export},tokenizer_backend=huggingface,"
                f"max_length={cfg.block_size + 2},num_concurrent=1,max_retries=1",
                batch_size=args.batch_size,
                tasks=[task],
                task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                **common,
            )
            http_s.append(time.perf_counter() - t0)
            ref_metric = {k: v for k, v in ref["results"][task].items() if k in metric}
            assert all(np.isclose(metric[k], ref_metric[k], rtol=1e-4) for k in ref_metric), (metric, ref_metric)
        rows.append((task, kind, n, *times, hf_s, http_s, json.dumps({k: round(v, 4) for k, v in metric.items()})))
    stack.close()
    shutil.rmtree(tasks, ignore_errors=True)

    print(
        f"\npreset {args.preset} (block_size {cfg.block_size}), random weights, batch size {args.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs, {platform.machine()}\n"
    )
    print(
        "| task | request type | docs | ours 1st call, s | ours 2nd call, s | hf backend, s | hf / ours 2nd "
        "| HTTP 1st call, s | HTTP 2nd call, s | metrics |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task, kind, n, cold, warm, hf_s, http_s, metric in rows:
        ratio = f"{hf_s / warm:.1f}x" if hf_s else "-"
        hf_text = f"{hf_s:.2f}" if hf_s else "-"
        http = " | ".join(f"{t:.2f}" for t in http_s) if http_s else "- | -"
        print(f"| {task} | {kind} | {n} | {cold:.2f} | {warm:.2f} | {hf_text} | {ratio} | {http} | `{metric}` |")


@contextlib.contextmanager
def serve(model):
    """The server's app over `model` (an Engine, uvicorn in a thread on a free port): the completions URL."""
    import uvicorn

    from fgpt_jax.inference.engine import Engine
    from fgpt_jax.inference.server import create_app

    with Engine(model, max_batch=8) as engine:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench", False), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
        finally:
            server.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
