"""Decode throughput: KV-cache generation vs recomputing the whole sequence for every new token.

    python scripts/bench_generate.py [--preset tiny] [--block-size 512] [--new-tokens 256] [--batch 1 16]

Both sides are one jitted loop with static shapes, greedy, random weights, timed after a warm-up
call (compilation excluded), best of --repeat. The recompute baseline runs the full forward over a
fixed [B, prompt + new] buffer each step and takes the LM head on the last position only (what a
cache-less sampler must do at best). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.inference.generator import Generator
from fgpt_jax.model import GPT, GPTConfig


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new"))
def recompute_generate(graphdef, params, buf_BS, prompt_len, n_new):
    model = nnx.merge(graphdef, params)

    def body(i, buf_BS):
        pos = prompt_len + i
        h_BSD = model.hidden_states(buf_BS)  # the whole sequence again (causal: the tail is inert)
        h_B1D = jax.lax.dynamic_slice_in_dim(h_BSD, pos - 1, 1, axis=1)
        nxt_B = jnp.argmax(model.logits(h_B1D)[:, 0], axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf_BS, nxt_B[:, None], (0, pos))

    return jax.lax.fori_loop(0, n_new, body, buf_BS)


def best_time(fn, repeat):
    fn()  # warm-up: compilation
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 256])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    cfg = GPTConfig.preset(args.preset, block_size=args.block_size, dtype=args.dtype)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    gen = Generator.from_model(model, stop_ids=())  # no early stop: every row decodes all tokens
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, preset {args.preset} "
        f"({cfg.num_params() / 1e6:.2f}M params), context {cfg.block_size}, {args.dtype}, "
        f"{args.new_tokens} new tokens, greedy"
    )
    print("| prompt tokens | batch | KV cache tok/s | recompute tok/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for P in args.prompt_tokens:
        for B in args.batch:
            prompts = rng.integers(0, 50257, (B, P)).tolist()
            kv = best_time(lambda: gen.generate(prompts, args.new_tokens, temperature=0), args.repeat)
            buf = np.zeros((B, P + args.new_tokens), np.int32)
            buf[:, :P] = prompts
            buf = jnp.asarray(buf)
            re = best_time(
                lambda: recompute_generate(graphdef, params, buf, P, args.new_tokens).block_until_ready(), args.repeat
            )
            n = B * args.new_tokens
            print(f"| {P} | {B} | {n / kv:,.0f} | {n / re:,.0f} | {re / kv:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
