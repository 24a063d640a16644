"""Validation loss and perplexity: the one implementation the trainer's val/loss and
`python -m fgpt_jax.eval val` both use, so the two print the same number for the same batches.

Loss sums and target counts are added on the device and read once at the end (one host sync for
the whole pass, not one per batch); the mean is token-weighted, so masked batches (SFT) count each
supervised token once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax.sharding import NamedSharding

from fgpt_jax import sharding as shd
from fgpt_jax.data import Batch


def mean_loss(
    eval_step: Callable, params, batches: Sequence[Batch], sharding: NamedSharding, progress: Callable | None = None
) -> tuple[float, int]:
    """(mean masked next-token loss, number of target tokens) over `batches` (this process's rows).

    `eval_step` is `fgpt_jax.loss.make_eval_step(graphdef)`; `progress(n)` is called per batch
    dispatched (a tqdm update, say)."""
    if not batches:
        raise ValueError("no validation batches")
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for batch in batches:
        s, n = eval_step(params, Batch(*(shd.global_batch(x, sharding) for x in batch)))
        total, count = total + s, count + n
        if progress is not None:
            progress(1)
    total, count = float(total), float(count)  # the one host sync
    return total / max(count, 1.0), int(count)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709 nats
