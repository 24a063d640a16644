"""Training throughput: the real jitted train step on synthetic tokens, with MFU and peak memory.

    python scripts/bench_train.py --config gpt2_124m [--micro-batch 16 32 64] [--grad-accum 1]
                                  [--steps 20] [--warmup 3] [--variant base xla cudnn remat adamw muon]
                                  [--config.model.n_layer=6 ...] [--json results.json]

Each row builds the run exactly as `python -m fgpt_jax.train` does (`fgpt_jax.train.step.build_setup`:
the same mesh, shardings, optax chain and donated step) for the config plus the variant's
overrides, feeds random tokens already on the device, runs --warmup steps (compilation), then
times --steps steps with a single sync at the end. MFU uses the README's FLOPs-per-token formula
and the device's dense bf16 peak (H100 SXM 989 TFLOP/s); on CPU it is n/a. Prints a markdown table
and, with --json, writes the rows.

Variants (overrides on top of the config):
    base   the config as it is          xla    model.attention=xla      cudnn  model.attention=cudnn
    remat  model.remat=true             adamw  optim.name=adamw         muon   optim.name=muon
    fp32   model.dtype=float32          bf16   model.dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from fgpt_jax import sharding as shd
from fgpt_jax.config import apply_overrides, load_config, split_config_args
from fgpt_jax.metrics import mfu, peak_flops
from fgpt_jax.data import Batch
from fgpt_jax.train.step import build_setup

VARIANTS = {
    "base": [], "xla": ["model.attention=xla"], "cudnn": ["model.attention=cudnn"],
    "remat": ["model.remat=true"], "adamw": ["optim.name=adamw"], "muon": ["optim.name=muon"],
    "fp32": ["model.dtype=float32"], "bf16": ["model.dtype=bfloat16"],
}


def peak_memory_gb(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def bench_one(cfg, steps: int, warmup: int, mesh) -> dict:
    t = cfg.train
    T = t.seq_len or cfg.model.block_size
    micro = t.batch_size // t.grad_accum
    setup = build_setup(cfg, mesh)
    state = setup.init(None)
    rng = np.random.default_rng(0)
    host = Batch.of_tokens(rng.integers(0, 50257, (t.grad_accum, micro, T + 1), dtype=np.int32))
    batch = Batch(*(shd.global_batch(x, shd.batch_sharding(mesh, 3, batch_axis=1)) for x in host))
    for _ in range(warmup):  # the first call compiles
        state, metrics = setup.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):  # no host sync inside: dispatch runs ahead, as in the trainer
        state, metrics = setup.train_step(state, batch)
    loss = float(jax.device_get(metrics["train/loss"]))
    elapsed = time.perf_counter() - start
    tok_s = steps * t.batch_size * T / elapsed
    util = mfu(tok_s, cfg.model.flops_per_token(T), mesh.size, peak_flops())
    return {"step_ms": 1000 * elapsed / steps, "tokens_per_sec": tok_s, "mfu": util, "loss": loss,
            "peak_mem_gb": peak_memory_gb(jax.devices()[0])}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec, overrides, rest = split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, nargs="+", help="sequences per micro-batch (global); default: the config's")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variant", nargs="+", default=["base"], choices=sorted(VARIANTS))
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(rest)
    base = apply_overrides(load_config(spec or "gpt2_124m"), overrides)
    mesh = shd.make_mesh()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {mesh.size} x {dev.device_kind}, config {base.name} "
          f"({base.model.num_params() / 1e6:.1f}M params), T={base.train.seq_len or base.model.block_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print("| variant | micro-batch | accum | dtype | attention | remat | optimizer | step ms | tokens/s | MFU | peak GB |")
    print("|---|---:|---:|---|---|---|---|---:|---:|---:|---:|")
    rows = []
    for variant in args.variant:
        for micro in args.micro_batch or [base.train.batch_size // base.train.grad_accum]:
            cfg = apply_overrides(base, VARIANTS[variant] + [f"train.batch_size={micro * args.grad_accum}",
                                                             f"train.grad_accum={args.grad_accum}"])
            try:
                r = bench_one(cfg, args.steps, args.warmup, mesh)
            except Exception as e:  # e.g. out of memory at a large micro-batch: report it, go on
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            row = {"variant": variant, "micro_batch": micro, "grad_accum": args.grad_accum,
                   "dtype": cfg.model.dtype, "attention": cfg.model.attention, "remat": cfg.model.remat,
                   "optimizer": cfg.optim.name, **r}
            rows.append(row)
            if "error" in r:
                print(f"| {variant} | {micro} | {args.grad_accum} | {cfg.model.dtype} | {cfg.model.attention} | "
                      f"{cfg.model.remat} | {cfg.optim.name} | {r['error']} | | | |", flush=True)
                continue
            fmt = lambda v, f: "n/a" if v is None else format(v, f)
            print(f"| {variant} | {micro} | {args.grad_accum} | {cfg.model.dtype} | {cfg.model.attention} | "
                  f"{cfg.model.remat} | {cfg.optim.name} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                  f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gb'], '.1f')} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "config": base.name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
