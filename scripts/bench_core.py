"""CORE throughput (items/s): the batched evaluator against one prompt per forward pass.

  python scripts/bench_core.py --data /path/to/eval_bundle                 # tiny model, 40 items per task
  python scripts/bench_core.py --data DIR --max-per-task 0 --preset gpt2   # everything, GPT-2 124M
  python scripts/bench_core.py --data DIR --layout-only --preset gpt2 --max-per-task 0   # packing + FLOPs only

Random weights (throughput does not depend on them). Rows of the table:
  batched        `CoreEvaluator` (fgpt_jax.eval.core): prepare (render, tokenise, pack) once, the first
                 call (compiles each bucket once), then `--repeat` calls (what the trainer's hook pays)
  one per prompt the baseline, nanochat's shape of work: a jitted forward of one prompt at a time
                 (padded to its length bucket, so it too compiles once per bucket), full logits to the
                 host, the same decisions; on the first `--naive N` items of every task
Both score the same prompts; the script checks that their decisions agree item for item.

`--layout-only` skips the model and prints what a full CORE costs at the preset's context: the
prompts, the padded tokens that run through the blocks, the scored positions that reach the LM head,
and the forward FLOPs (2 x matmul parameters per token, plus attention, plus the head per scored
position). The GPU time estimate in docs/evaluation.md divides those FLOPs by a stated throughput.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.data.core import download_bundle, load_items, read_bundle
from fgpt_jax.eval.core import CoreEvaluator, decide, prepare_task
from fgpt_jax.eval.scoring import default_buckets
from fgpt_jax.model import GPT, GPTConfig


def per_prompt(graphdef, params, evaluator: CoreEvaluator, tasks, n_items: int) -> tuple[float, int, dict]:
    """Seconds, items and {label: correct} scoring the first n items of each task one prompt per
    forward (compile time excluded: every bucket is compiled before the clock starts)."""
    buckets = default_buckets(evaluator.block_size)

    @jax.jit
    def logprobs(p, x):
        return jax.nn.log_softmax(nnx.merge(graphdef, p)(x).astype(jnp.float32), axis=-1)

    for L in buckets:
        logprobs(params, np.zeros((1, L), np.int32)).block_until_ready()
    seconds, items, out = 0.0, 0, {}
    for task, task_items in tasks:
        prep, spans = prepare_task(task, task_items, evaluator.block_size)  # few-shot draws need every item
        n = min(n_items, prep.n)
        prep = replace(prep, gold=prep.gold[:n], first=prep.first[: n + 1], opt_span=prep.opt_span[: prep.first[n]])
        lp, gr = [None] * len(spans), [None] * len(spans)
        t0 = time.perf_counter()
        for s in (int(i) for i in prep.opt_span if i >= 0):
            span = spans[s]
            seq = np.asarray(span.tokens, np.int32)
            L = next(b for b in buckets if b >= len(seq))
            x = np.zeros((1, L), np.int32)
            x[0, : len(seq)] = seq
            logp = np.asarray(logprobs(params, x))[0]  # full [L, V] to the host, as a per-item forward does
            t = np.arange(span.start, len(seq))
            lp[s] = logp[t - 1, seq[t]]
            gr[s] = logp[t - 1].argmax(-1) == seq[t]
        out[task.label] = decide(prep, lp, gr)[0]
        seconds += time.perf_counter() - t0
        items += prep.n
    return seconds, items, out


def layout(evaluator: CoreEvaluator, cfg: GPTConfig) -> dict:
    padded = sum(len(b.span_BR) * evaluator.scorer.rows * b.length for p in evaluator.tasks for b in p.packed.buckets)
    scored = int(sum(p.packed.n_targets.sum() for p in evaluator.tasks))
    head_rows = sum(
        len(b.span_BR) * b.k * evaluator.scorer.mesh.size for p in evaluator.tasks for b in p.packed.buckets
    )
    D, nl, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    block_params = cfg.num_params() - (V + cfg.block_size) * D  # matmul parameters of the blocks
    # Forward FLOPs: 2 per block parameter per token, attention 4 * L * D per layer per token at its
    # bucket's length, the head 2 * V * D per gathered position.
    attn = sum(
        len(b.span_BR) * evaluator.scorer.rows * b.length * 4 * nl * D * b.length
        for p in evaluator.tasks
        for b in p.packed.buckets
    )
    flops = 2 * block_params * padded + attn + 2 * V * D * head_rows
    programs = {(b.length, b.k) for p in evaluator.tasks for b in p.packed.buckets}
    return {
        "padded_tokens": padded,
        "scored": scored,
        "head_rows": head_rows,
        "flops": flops,
        "programs": len(programs),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (random weights): tiny, gpt2, ...")
    p.add_argument("--dtype", help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--data", type=Path, help="eval bundle directory (default: nanochat's, downloaded once)")
    p.add_argument("--max-per-task", type=int, default=40, help="items per task (0: all)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per device call")
    p.add_argument("--repeat", type=int, default=1, help="steady-state calls after the first")
    p.add_argument("--naive", type=int, default=12, help="items per task for the one-prompt-per-forward row (0: skip)")
    p.add_argument("--layout-only", action="store_true", help="pack and count tokens and FLOPs; no model")
    a = p.parse_args(argv)

    dtype = a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    cfg = GPTConfig.preset(a.preset, dtype=dtype)
    bundle = read_bundle(a.data or download_bundle())
    present = [t for t in bundle.tasks if t.path.is_file()]
    max_items = a.max_per_task or None
    t0 = time.perf_counter()
    tasks = [(t, load_items(t, max_items)) for t in present]
    evaluator = CoreEvaluator(tasks, cfg.block_size, a.batch_size, n_total=len(bundle.tasks), max_per_task=max_items)
    prepare = time.perf_counter() - t0
    n_items = sum(pt.n for pt in evaluator.tasks)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind} x {jax.device_count()}"
    print(f"# CORE benchmark: {a.preset} ({cfg.num_params() / 1e6:.1f}M, context {cfg.block_size}, {dtype}), {machine}")
    print(
        f"# {len(present)} of {len(bundle.tasks)} tasks, {n_items} items ({max_items or 'all'} per task), "
        f"{evaluator.n_prompts} prompts, {evaluator.n_batches} batches of {evaluator.scorer.rows} rows"
    )
    print(f"# prepare (read, render, tokenise, pack): {prepare:.1f} s")
    if a.layout_only:
        lay = layout(evaluator, cfg)
        print("| prompts | padded tokens | scored tokens | LM head rows | forward FLOPs | programs (L, K) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {evaluator.n_prompts:,} | {lay['padded_tokens']:,} | {lay['scored']:,} | "
            f"{lay['head_rows']:,} | {lay['flops']:.3e} | {lay['programs']} |"
        )
        return
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    t0 = time.perf_counter()
    first = evaluator(graphdef, params)
    first_s = time.perf_counter() - t0
    steady = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        evaluator(graphdef, params)
        steady.append(time.perf_counter() - t0)
    best = min(steady) if steady else first_s
    print("| row | items | seconds | items/s | compiles |")
    print("|---|---:|---:|---:|---:|")
    print(f"| batched, first call | {n_items} | {first_s:.1f} | {n_items / first_s:.1f} | {evaluator.compiles} |")
    if steady:
        print(f"| batched, steady | {n_items} | {best:.1f} | {n_items / best:.1f} | {evaluator.compiles} |")
    if a.naive:
        secs, items, naive = per_prompt(graphdef, params, evaluator, tasks, a.naive)
        batched = {prep.task.label: c for prep, (c, _), _ in evaluator.score_items(graphdef, params)}
        agree = sum(int(np.sum(c == batched[label][: len(c)])) for label, c in naive.items())
        print(f"| one prompt per forward | {items} | {secs:.1f} | {items / secs:.1f} | - |")
        print(f"# decisions agree on {agree} of {items} items")
    print(f"# CORE ({first['label']}): {first['core']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
