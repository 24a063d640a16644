"""Token sampling: temperature / top-k / top-p as pure functions of (logits, key).

Kept apart from the model and the KV-cache loop (generator.py) so every sampler, the trainer's
text samples and the chat REPL included, filters logits the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. top_k=0 and top_p=1 keep all;
    a top_k of the vocabulary's size or more keeps all too (clamped, not an error)."""
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass strictly before it is < top_p: the most likely is always kept.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        n_keep_B = jnp.sum(before_BV < top_p, axis=-1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_token(
    logits_BV: jax.Array, key: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Next token per row: greedy argmax at temperature 0, else a draw from the filtered softmax."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0:
        # top_k(., 1) is argmax (ties go to the lower id), ~4x faster than XLA's argmax on CPU.
        return jax.lax.top_k(logits_BV, 1)[1][:, 0].astype(jnp.int32)
    logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
