"""HellaSwag scorer throughput (items/s) for a model preset with random weights.

  python scripts/bench_hellaswag.py                                  # tiny, 200 bundled items
  python scripts/bench_hellaswag.py --preset gpt2 --data hellaswag_val_full.txt.bz2     # all 10,042 items

Builds a `HellaSwagScorer` (tokenise + pack), calls it once (compiles every bucket used, then
scores) and then `--repeat` more times (steady state: what the trainer pays every eval). With
`--naive N` it also times the plain reference loop of the tests (one item's 4 endings per call,
each padded to block_size, full logits to the host) on the first N items. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fgpt_jax.data.hellaswag import load_examples
from fgpt_jax.eval.hellaswag import HellaSwagScorer
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.tokenizer import get_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "hellaswag_val_200.txt"


def naive_items_per_sec(graphdef, params, items, block_size: int) -> float:
    tok = get_tokenizer()
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    forward(params, np.zeros((4, block_size), np.int32)).block_until_ready()  # compile outside the timing
    t0 = time.perf_counter()
    for item in items:
        ctx = tok.encode(item.context)
        x = np.zeros((4, block_size), np.int32)
        spans = []
        for j, ending in enumerate(item.endings):
            end = tok.encode(" " + ending)
            seq = (ctx + end)[-block_size:]
            x[j, : len(seq)] = seq
            spans.append((max(len(seq) - len(end), 1), seq))
        logits = np.asarray(forward(params, x), np.float64)
        for j, (first, seq) in enumerate(spans):
            lg = logits[j, first - 1 : len(seq) - 1]
            lg = lg - lg.max(-1, keepdims=True)
            _ = (lg[np.arange(len(lg)), seq[first:]] - np.log(np.exp(lg).sum(-1))).sum()
    return len(items) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (random weights): tiny, gpt2, ...")
    p.add_argument("--block-size", type=int, help="override the preset's block_size")
    p.add_argument("--dtype", help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HellaSwag file (default: the 200 bundled items)")
    p.add_argument("--limit", type=int, help="first N items")
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="items per call (several: one row each)")
    p.add_argument("--repeat", type=int, default=2, help="steady-state calls after the first (best is reported)")
    p.add_argument("--naive", type=int, default=0, help="also time the plain per-item loop on N items")
    args = p.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    overrides = {"dtype": args.dtype or ("bfloat16" if on_gpu else "float32")}
    if args.block_size:
        overrides["block_size"] = args.block_size
    cfg = GPTConfig.preset(args.preset, **overrides)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    items = load_examples(args.data, args.limit)
    dev = jax.devices()[0]
    print(
        f"python {platform.python_version()}, jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPUs; preset {args.preset} ({cfg.num_params() / 1e6:.1f}M, "
        f"block {cfg.block_size}, {cfg.dtype}); {len(items)} items from {args.data.name}",
        flush=True,
    )
    print(
        "| preset | batch (items) | buckets used (L x batches) | build s | first call s (compile + score) "
        "| steady s | items/s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for batch in args.batch_size:
        t0 = time.perf_counter()
        scorer = HellaSwagScorer(items, cfg.block_size, batch_size=batch)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = scorer(graphdef, params)
        first = time.perf_counter() - t0
        steady = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            scorer(graphdef, params)
            steady.append(time.perf_counter() - t0)
        best = min(steady) if steady else first
        used = ", ".join(f"{s[2]}x{s[0]}" for s in scorer.shapes)
        print(
            f"| {args.preset} | {scorer.batch_size} | {used} | {build:.2f} | {first:.2f} | {best:.2f} "
            f"| {len(items) / best:,.1f} |",
            flush=True,
        )
    print(f"metrics (random weights): {result}")
    if args.naive:
        rate = naive_items_per_sec(graphdef, params, items[: args.naive], cfg.block_size)
        print(
            f"naive per-item loop ({min(args.naive, len(items))} items, 4 rows x {cfg.block_size}, full logits): "
            f"{rate:,.1f} items/s"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
