"""Text generation with a KV cache (the engine behind generate, chat, serve and the trainer's samples).

`Generator` holds the model's graph and parameters and compiles two programs per shape bucket:
  * `generate(prompts)`: prefill, then the whole decode loop inside one `lax.while_loop`
    (no host round trip per token), for batches of prompts of different lengths;
  * `stream(prompt)`: prefill, then one jitted step per token, yielding each token as it comes.
Prompts are left-padded to a bucket length (powers of two up to the context) and the cache is
sized to a bucket too, so new prompt lengths reuse compiled programs instead of recompiling.
Rows stop independently at a stop token (<|end|> or <|endoftext|> by default).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.model import GPT, init_cache
from fgpt_jax.inference.sampling import sample_token
from fgpt_jax.tokenizer import get_tokenizer


def _bucket(n: int, limit: int, smallest: int = 16) -> int:
    """Smallest power of two >= n (at least `smallest`), capped at `limit`."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, limit)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "n_new", "temperature", "top_k", "top_p"))
def _generate(graphdef, params, prompt_BP, start_B, key, stop_ids, *, cache_len, n_new, temperature, top_k, top_p):
    """Prefill the left-padded prompts, then sample `n_new` tokens per row inside one while_loop."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    cache = init_cache(model.config, B, cache_len, start_B)
    logits_BPV, cache = model.decode(prompt_BP, cache)
    key, sub = jax.random.split(key)
    tok_B = sample_token(logits_BPV[:, -1], sub, temperature, top_k, top_p)
    out_BN = jnp.zeros((B, n_new), jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < n_new) & ~jnp.all(done_B)

    def body(carry):
        i, tok_B, cache, out_BN, done_B, key = carry
        logits_B1V, cache = model.decode(tok_B[:, None], cache)
        key, sub = jax.random.split(key)
        nxt_B = sample_token(logits_B1V[:, 0], sub, temperature, top_k, top_p)
        out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, 0, nxt_B)[:, None], (0, i))
        done_B = done_B | jnp.isin(nxt_B, stop_ids)
        return i + 1, nxt_B, cache, out_BN, done_B, key

    _, _, _, out_BN, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_B, cache, out_BN, done_B, key))
    return out_BN


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "temperature", "top_k", "top_p"))
def _prefill(graphdef, params, prompt_BP, start_B, key, *, cache_len, temperature, top_k, top_p):
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, prompt_BP.shape[0], cache_len, start_B)
    logits_BPV, cache = model.decode(prompt_BP, cache)
    return sample_token(logits_BPV[:, -1], key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def _step(graphdef, params, tok_B, cache, key, *, temperature, top_k, top_p):
    logits_B1V, cache = nnx.merge(graphdef, params).decode(tok_B[:, None], cache)
    return sample_token(logits_B1V[:, 0], key, temperature, top_k, top_p), cache


class Generator:
    """Sampling from a GPT with a KV cache. Temperature 0 is greedy (deterministic)."""

    def __init__(self, graphdef: nnx.GraphDef, params, stop_ids: Sequence[int] | None = None):
        """From a split model (what the trainer holds); `Generator.from_model(model)` otherwise."""
        self.graphdef, self.params = graphdef, params
        self.config = nnx.merge(graphdef, params).config
        self.stop_ids = tuple(get_tokenizer().stop_ids if stop_ids is None else stop_ids)

    @classmethod
    def from_model(cls, model: GPT, stop_ids: Sequence[int] | None = None) -> "Generator":
        return cls(*nnx.split(model, nnx.Param), stop_ids=stop_ids)

    def _layout(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Left-pad the prompts into [B, P] and size the cache; prompts keep their last tokens if too long."""
        limit = self.config.block_size
        if not 0 < max_new_tokens < limit:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: must be in [1, {limit - 1}] for a context of {limit}")
        keep = limit - max_new_tokens
        prompts = [list(p)[-keep:] for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt: must hold at least one token")
        P = _bucket(max(map(len, prompts)), keep)
        rows = np.zeros((len(prompts), P), np.int32)
        start = np.zeros((len(prompts),), np.int32)
        for b, p in enumerate(prompts):
            rows[b, P - len(p):] = p
            start[b] = P - len(p)
        cache_len = _bucket(P + max_new_tokens, limit)
        return jnp.asarray(rows), jnp.asarray(start), cache_len

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        """New tokens per prompt, each list ending at (and including) its first stop token."""
        rows, start, cache_len = self._layout(prompts, max_new_tokens)
        out = _generate(self.graphdef, self.params, rows, start, jax.random.key(seed),
                        jnp.asarray(self.stop_ids, jnp.int32), cache_len=cache_len, n_new=max_new_tokens,
                        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        result = []
        for row in np.asarray(jax.device_get(out)).tolist():
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            result.append(row if stop is None else row[:stop + 1])
        return result

    def stream(self, prompt: Sequence[int], max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """Yield new tokens one at a time (the stop token, if reached, is the last one yielded)."""
        rows, start, cache_len = self._layout([prompt], max_new_tokens)
        sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        tok, cache = _prefill(self.graphdef, self.params, rows, start, sub, cache_len=cache_len, **sampling)
        for i in range(max_new_tokens):
            t = int(tok[0])  # the one host sync per token that streaming needs
            yield t
            if t in self.stop_ids or i == max_new_tokens - 1:
                return
            key, sub = jax.random.split(key)
            tok, cache = _step(self.graphdef, self.params, tok, cache, sub, **sampling)


class TextStreamer:
    """Turns streamed token ids into printable text; holds back bytes of an incomplete UTF-8 character."""

    def __init__(self):
        self.tok = get_tokenizer()
        self.pending = b""

    def push(self, token: int) -> str:
        self.pending += self.tok.decode_bytes([token])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            text, self.pending = self.pending[:e.start].decode("utf-8"), self.pending[e.start:]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
