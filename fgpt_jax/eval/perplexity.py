"""Validation loss, perplexity and bits per byte: the one implementation the trainer's val/* and
`python -m fgpt_jax.eval val` both use, so the two print the same numbers for the same batches.

Sums (`fgpt_jax.loss.EvalSums`: loss, target tokens, text nats, text bytes) are added on the device and
read once at the end (one host sync for the whole pass, not one per batch); the loss is token-weighted,
so masked batches (SFT) count each supervised token once. Bits per byte are nanochat's: the summed
loss of the targets that are text, / ln 2, / their UTF-8 bytes (special tokens excluded), a number
independent of the vocabulary.

`validation_batches` decides what `eval val` scores for a run: by default exactly the batches the
trainer's val/loss used (the run's data, its data.val_windows windows, its micro-batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from fgpt_jax import sharding as shd
from fgpt_jax.config import Config
from fgpt_jax.data import Batch
from fgpt_jax.errors import UserError


def evaluate_loss(
    eval_step: Callable, params, batches: Sequence[Batch], sharding: NamedSharding, progress: Callable | None = None
) -> dict:
    """{"loss", "ppl", "bpb", "tokens", "bytes"} over `batches` (this process's rows).

    `eval_step` is `fgpt_jax.loss.make_eval_step(graphdef)`; `progress(n)` is called per batch
    dispatched (a tqdm update, say)."""
    if not batches:
        raise ValueError("no validation batches")
    total = None
    for batch in batches:
        sums = eval_step(params, Batch(*(shd.global_batch(x, sharding) for x in batch)))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if progress is not None:
            progress(1)
    total = jax.device_get(total)  # the one host sync
    loss = float(total.loss) / max(float(total.tokens), 1.0)
    n_bytes = int(total.bytes)
    bpb = float(total.nats) / (math.log(2) * n_bytes) if n_bytes else float("inf")
    return {"loss": loss, "ppl": perplexity(loss), "bpb": bpb, "tokens": int(total.tokens), "bytes": n_bytes}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709 nats


def validation_batches(
    cfg: Config,
    mesh: Mesh,
    data: str | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    run: object = "RUN",
) -> tuple[list[Batch], dict]:
    """(this process's validation batches, what they are: {"data", "windows"}) for the run `cfg`.

    Default: the trainer's own validation batches. `data` scores a shard directory, 'tinyshakespeare',
    or a conversations file (.json/.jsonl/.parquet: a masked loss over its held-out split) instead;
    `max_tokens` about that many target tokens (token shards only); `batch_size` sequences per device
    call (default: the run's micro-batch). `run` names the run in error messages."""
    from fgpt_jax.data.pipeline import open_data  # the data stage's loaders: a heavier import

    data_cfg = cfg.data
    if data is not None:
        fmt = "chat" if data.lower().endswith((".json", ".jsonl", ".parquet")) else "tokens"
        data_cfg = dataclasses.replace(cfg.data, path=data, format=fmt)
    elif not cfg.data.path:
        raise UserError(
            f"--run {run}: records no training data (an imported model?); pass --data with a shard "
            f"directory, 'tinyshakespeare' or a conversations file"
        )
    elif cfg.data.format == "preference":
        raise UserError(
            f"--run {run}: trained on preference pairs; its validation metrics come from python -m "
            f"fgpt_jax.eval dpo --run {run} --ref {cfg.init_from} (--data scores a loss on other data)"
        )
    chat = data_cfg.format == "chat"
    if chat and max_tokens is not None:
        raise UserError(
            f"--max-tokens: applies to token shards; conversations ({data_cfg.path}) are scored whole "
            f"(every row of the held-out split)"
        )
    seq_len = cfg.train.seq_len or cfg.model.block_size
    batch = batch_size or cfg.train.batch_size // cfg.train.grad_accum  # the trainer's micro-batch
    batch = -(-batch // mesh.size) * mesh.size
    windows = None
    if not chat:  # conversations: every held-out row, in batches of `batch`, as the trainer reads them
        windows = data_cfg.val_windows if max_tokens is None else max(1, max_tokens // seq_len)
        if windows < batch:  # one batch, still split evenly over the devices
            windows = batch = max(mesh.size, windows - windows % mesh.size)
        data_cfg = dataclasses.replace(data_cfg, val_windows=windows)
    val = open_data(data_cfg, seq_len, batch, batch, jax.process_index(), jax.process_count(), train=False)
    if not val.val:
        raise UserError(val.notes[0] if val.notes else f"--data {data_cfg.path}: no validation batches")
    return val.val, {"data": data_cfg.path, "windows": windows}


def evaluate_val(model, batches: Sequence[Batch], progress: Callable | None = None) -> dict:
    """`evaluate_loss` of a loaded model (`fgpt_jax.eval.Loaded`) over `batches` (this process's rows,
    e.g. from `validation_batches`)."""
    from fgpt_jax.loss import make_eval_step

    return evaluate_loss(
        make_eval_step(model.graphdef), model.params, batches, shd.batch_sharding(model.mesh, 2), progress
    )
