"""The language-modelling loss, shared by the train step, validation and evaluation.

Cross-entropy is taken in float32 on float32 logits (the model's head accumulates in float32), so
a bf16 forward pass never rounds the loss. Losses are returned as (sum, count) pairs, not means:
summing both over micro-batches, devices and validation batches and dividing once gives the exact
token-weighted mean however the tokens were split, also when a mask makes batches unequal.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fgpt_jax.data import Batch


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32 (the cast guards custom models with 16-bit logits)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def lm_loss_sums(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked next-token losses, sum of the mask) of one batch."""
    losses_BT = token_losses(model(batch.tokens[:, :-1]), batch.tokens[:, 1:])
    mask_BT = batch.mask.astype(jnp.float32)
    return jnp.sum(losses_BT * mask_BT), jnp.sum(mask_BT)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """`eval_step(params, batch) -> (loss_sum, count)`, jitted once per batch shape."""

    def eval_step(params, batch: Batch):
        return lm_loss_sums(nnx.merge(graphdef, params), batch)

    return jax.jit(eval_step)
