"""Muon vs AdamW at the same model, data and token budget: how many tokens each needs to reach AdamW's
final validation loss. FGPT's headline claim is that Muon converges faster; the goal here is Muon
needing <= 0.7x AdamW's tokens.

Each optimizer gets a small learning-rate sweep (AdamW first; Muon's hidden-matrix rate is then swept
with the embeddings/LayerNorms at AdamW's best rate), every run through the real trainer
(`fgpt_jax.train.train`) with the same seed, hence the same batches. A run's "tokens to target" is
where its validation curve first reaches the target, linearly interpolated between evaluations.

    python -m fgpt_jax.data text BOOKS/*.txt --out data/gutenberg
    python scripts/bench_optim.py --data data/gutenberg --steps 300 [--config tiny --config.model.n_layer=4 ...]

Prints a markdown table; `--json FILE` writes the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fgpt_jax.config import resolve_config, split_config_args
from fgpt_jax.metrics import read_metrics
from fgpt_jax.train import train


def tokens_to(curve: list[tuple[int, float]], target: float, tokens_per_step: int) -> float | None:
    """Tokens at which the (step, val loss) curve first reaches `target` (interpolated), or None."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            frac = 1.0 if v0 == v1 else min(1.0, max(0.0, (v0 - target) / (v0 - v1)))
            return (s0 + frac * (s1 - s0)) * tokens_per_step
    return None


def run_one(base, overrides: list[str], workdir: Path) -> dict:
    cfg = resolve_config(base, overrides)
    t0 = time.perf_counter()
    train(cfg, workdir)
    curve = [(r["step"], r["val/loss"]) for r in read_metrics(workdir) if "val/loss" in r]
    return {
        "overrides": overrides,
        "curve": curve,
        "final": curve[-1][1],
        "seconds": time.perf_counter() - t0,
        "tokens_per_step": cfg.train.batch_size * (cfg.train.seq_len or cfg.model.block_size),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec, overrides, rest = split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shard directory (python -m fgpt_jax.data text ... --out DIR)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    p.add_argument("--json", help="write the curves to this file")
    args = p.parse_args(rest)
    common = overrides + [
        f"data.path={args.data}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "train.ckpt_every=0",
        "train.sample_every=0",
        "train.core_every=0",  # a preset's CORE would download nanochat's bundle and cost time off the curves
        "train.log_every=50",
        f"optim.warmup_steps={max(1, args.steps // 20)}",
    ]
    base = spec or "tiny"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lr in enumerate(args.adamw_lrs):
            runs.append(
                {
                    "optimizer": "adamw",
                    "lr": lr,
                    **run_one(base, common + ["optim.name=adamw", f"optim.lr={lr}"], Path(tmp) / f"adamw{i}"),
                }
            )
        best_adamw = min((r for r in runs if r["optimizer"] == "adamw"), key=lambda r: r["final"])
        for i, lr in enumerate(args.muon_lrs):
            runs.append(
                {
                    "optimizer": "muon",
                    "lr": lr,
                    **run_one(
                        base,
                        common + ["optim.name=muon", f"optim.lr={best_adamw['lr']}", f"optim.muon_lr={lr}"],
                        Path(tmp) / f"muon{i}",
                    ),
                }
            )
    best_muon = min((r for r in runs if r["optimizer"] == "muon"), key=lambda r: r["final"])
    target = best_adamw["final"]
    tps = best_adamw["tokens_per_step"]
    cfg = resolve_config(base, common)
    print(
        f"{cfg.model.num_params() / 1e6:.2f}M parameters, {args.steps} steps of {tps:,} tokens "
        f"({args.steps * tps:,} tokens), val every {args.eval_every} steps, data {args.data}"
    )
    print("| optimizer | lr (muon: hidden matrices) | final val loss | tokens to AdamW's final | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        reach = tokens_to(r["curve"], target, r["tokens_per_step"])
        print(
            f"| {r['optimizer']}{' (best)' if r in (best_adamw, best_muon) else ''} | {r['lr']:g} | "
            f"{r['final']:.4f} | {'not reached' if reach is None else f'{reach:,.0f}'} | {r['seconds']:.0f} |"
        )
    muon_tokens = tokens_to(best_muon["curve"], target, tps)
    adamw_tokens = tokens_to(best_adamw["curve"], target, tps)
    ratio = None if muon_tokens is None or not adamw_tokens else muon_tokens / adamw_tokens
    print(
        f"\nMuon (lr {best_muon['lr']:g}) needs {'n/a' if ratio is None else f'{ratio:.2f}x'} the tokens AdamW "
        f"(lr {best_adamw['lr']:g}) needs to reach {target:.4f} (goal: <= 0.70x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "ratio": ratio, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
