"""SFT data layout: packing several conversations per row vs padding one per row.

  python scripts/bench_sft_data.py --data instruction-data.json    # any Alpaca/messages file

Builds the rows both ways (`build_chat_data(pack=True/False)`), then trains the tiny model with the
real jitted train step (AdamW, one micro-batch) for one epoch over every train row, at the same
batch size, timing the epoch (compile excluded: one step is run and the state re-initialised).
Reports rows, fill fraction, steps, seconds per epoch, supervised tokens/s, and the validation loss
after the epoch (on the padded validation rows for both, so the number is layout-neutral). Prints a
markdown table; `--append` adds the output to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from flax import nnx

from fgpt_jax.data import Batch
from fgpt_jax.data.conversations import build_chat_data, load_conversations
from fgpt_jax.data.loader import val_rows
from fgpt_jax.loss import make_eval_step
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.optim import OptimConfig, learning_rates, make_optimizer
from fgpt_jax.tokenizer import get_tokenizer
from fgpt_jax.train.step import init_train_state, make_train_step

HEADING = "## SFT data: packing vs padding (issue 6)"


def run(data, val_batches, cfg: GPTConfig, batch: int, seed: int) -> dict:
    """One epoch over every train row of `data`; returns timings and the val loss after it."""
    batches = val_rows(
        data.train, batch, get_tokenizer().eot_id
    )  # every row once, fixed shape (last batch zero-mask padded)
    steps = len(batches)
    ocfg = OptimConfig(name="adamw", warmup_steps=max(1, steps // 10))
    tx = make_optimizer(ocfg, steps)
    model = GPT(cfg, rngs=nnx.Rngs(seed))
    graphdef, state0 = nnx.graphdef(model), init_train_state(model, tx, seed)
    fresh = lambda: jax.tree.map(lambda x: x.copy(), state0)
    step = make_train_step(graphdef, tx, lambda s: learning_rates(ocfg, steps, s))
    x, m = batches[0]
    state, metrics = step(fresh(), Batch(x[None], m[None]))  # compile
    jax.block_until_ready(metrics)
    state = fresh()
    t0 = time.perf_counter()
    for x, m in batches:
        state, metrics = step(state, Batch(x[None], m[None]))
    loss = float(metrics["train/loss"])
    seconds = time.perf_counter() - t0
    eval_step = make_eval_step(graphdef)
    total = count = 0.0
    for b in val_batches:
        s, n = eval_step(state.params, b)
        total, count = total + float(s), count + float(n)
    sup = int(data.train.mask.sum())
    return {
        "rows": data.train.num_rows,
        "fill": data.stats["train_fill_fraction"],
        "steps": steps,
        "seconds": seconds,
        "sup_tok_s": sup / seconds,
        "supervised": sup,
        "last_loss": loss,
        "val_loss": total / max(count, 1.0),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        required=True,
        help="conversations: a local Alpaca or messages .json/.jsonl/.parquet file (e.g. Raschka's "
        "1,100-record instruction-data.json), or a Hub dataset",
    )
    p.add_argument("--seq-len", type=int, default=128, help="row length T (rows hold T + 1 tokens)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="append the output to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    out = io.StringIO()

    def say(line=""):
        print(line)
        out.write(line + "\n")

    convs = load_conversations(args.data)
    cfg = GPTConfig.preset("tiny", block_size=max(128, args.seq_len))
    padded = build_chat_data(convs, args.seq_len, pack=False, seed=args.seed)
    val_batches = val_rows(padded.val, args.batch, get_tokenizer().eot_id)
    say(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, tiny preset ({cfg.num_params() / 1e6:.2f}M params), "
        f"float32, seq_len {args.seq_len}, batch {args.batch}, AdamW; {len(convs)} conversations from "
        f"{os.path.basename(args.data)}, {padded.stats['train_conversations']} train / "
        f"{padded.stats['val_conversations']} val, {padded.stats['train_supervised_tokens']:,} supervised train tokens"
    )
    columns = (
        "layout | batch | rows | fill | steps/epoch | s/epoch | supervised tok/s | speed-up | val loss after 1 epoch"
    )
    say(f"| {columns} |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    packed = build_chat_data(convs, args.seq_len, pack=True, seed=args.seed)
    # Packing at the same batch takes ~rows ratio fewer optimizer steps per epoch; a batch scaled by
    # that ratio gives about as many steps (and conversations per step) as padding: the fair quality check.
    small = max(1, round(args.batch * packed.train.num_rows / padded.train.num_rows))
    base = None
    for name, data, batch in (
        ("padded (1 per row)", padded, args.batch),
        ("packed (best-fit)", packed, args.batch),
        ("packed, batch scaled to padded's steps", packed, small),
    ):
        r = run(data, val_batches, cfg, batch, args.seed)
        base = base or r["seconds"]
        say(
            f"| {name} | {batch} | {r['rows']:,} | {r['fill']:.1%} | {r['steps']} | {r['seconds']:.1f} | "
            f"{r['sup_tok_s']:,.0f} | {base / r['seconds']:.2f}x | {r['val_loss']:.3f} |"
        )
    say(
        f"load average after the runs (other processes share the 2 cores): "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.append:
        cmd = "python scripts/bench_sft_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "RESULTS.md"), "a") as f:
            f.write(
                f"\n{HEADING}\n\nDate: {datetime.date.today().isoformat()}. Machine: 2-core CPU, no GPU "
                f"({platform.machine()}).\n\n```\n{cmd.strip()}\n```\n\n```\n{out.getvalue()}```\n"
            )


if __name__ == "__main__":
    main()
