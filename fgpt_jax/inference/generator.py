"""Text generation with a KV cache (the engine behind generate, chat, serve and the trainer's samples).

`Generator` holds the model's graph and parameters and compiles a few programs per shape bucket:
  * `generate(prompts)`: prefill, then the whole decode loop inside `lax.while_loop`s (no host
    round trip per token), for batches of prompts of different lengths;
  * `stream(prompt)`: prefill, then one jitted step per token, yielding each token as it comes.
Prompts are left-padded to a bucket length (powers of two up to the context) and the cache is
sized to a bucket too, so new prompt lengths reuse compiled programs instead of recompiling.
Rows stop independently at a stop token (<|end|> or <|endoftext|> by default).

Past the context. Any `max_new_tokens >= 1` is accepted. When the prompt and the new tokens fit
the context (block_size), nothing slides: the cache holds the whole sequence. Otherwise the prompt
keeps its last block_size tokens and, whenever the cache is full, the window slides: the cache is
refilled from the last `keep = block_size // 2` tokens (a fresh prefill, positions from 0) and
decoding goes on into the freed half. nanoGPT instead crops to the last block_size tokens and
recomputes the whole forward pass for every new token: every token sees a full context, at
block_size token-forwards per token. The learned absolute positions are baked into every cached
key and value (they enter at the input), so the cache cannot simply be shifted; the refill is the
cheapest correct alternative. With keep = block_size / 2 it costs keep tokens once every
block_size - keep new tokens, about 2 token-forwards per token amortised, and every token still
sees at least half a context (a larger keep would see more but refill more often: at keep =
block_size - 1 it is nanoGPT's cost again). Shapes stay static (the refill is one [B, keep]
chunk), so sliding compiles once and never per token, and greedy output stays deterministic.

In a batch, rows share one cache index, so they slide at the same step; a row whose prompt is
shorter than the longest then slides earlier than it would alone (each row keeps its own last
tokens). Rows of equal length (`--num-samples`) behave exactly as alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.inference.sampling import sample_token
from fgpt_jax.model import GPT, init_cache
from fgpt_jax.tokenizer import get_tokenizer


def bucket(n: int, limit: int, smallest: int = 16) -> int:
    """Smallest power of two >= n (at least `smallest`), capped at `limit`: the shapes the generator
    and the engine compile for (a few per length, never one per prompt)."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, limit)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "keep", "n_new", "temperature", "top_k", "top_p"))
def _generate(
    graphdef, params, prompt_BP, start_B, key, stop_ids, *, cache_len, keep, n_new, temperature, top_k, top_p
):
    """Prefill the left-padded prompts, then sample `n_new` tokens per row inside while_loops,
    sliding the window (see the module docstring) whenever the cache is full."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    S = cache_len
    slides = P + n_new - 1 > S  # static: tokens decoded into the cache would overflow it
    cache = init_cache(model.config, B, S, start_B)
    logits_BPV, cache = model.decode(prompt_BP, cache)
    # The token in each cache slot, read back when the window slides (only kept when it can).
    ctx_BS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_BP) if slides else None
    key, sub = jax.random.split(key)
    tok_B = sample_token(logits_BPV[:, -1], sub, temperature, top_k, top_p)
    out_BN = jnp.zeros((B, n_new), jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def emit(carry, logits_BV, cache, ctx_BS):
        """Sample the next token from `logits_BV` and record it."""
        i, _, _, _, out_BN, done_B, key = carry
        key, sub = jax.random.split(key)
        nxt_B = sample_token(logits_BV, sub, temperature, top_k, top_p)
        out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, 0, nxt_B)[:, None], (0, i))
        done_B = done_B | jnp.isin(nxt_B, stop_ids)
        return i + 1, nxt_B, cache, ctx_BS, out_BN, done_B, key

    def step(carry):
        """Decode the last sampled token into the next free slot."""
        _, tok_B, cache, ctx_BS, _, _, _ = carry
        if slides:
            ctx_BS = jax.lax.dynamic_update_slice(ctx_BS, tok_B[:, None], (0, cache["index"]))
        logits_B1V, cache = model.decode(tok_B[:, None], cache)
        return emit(carry, logits_B1V[:, 0], cache, ctx_BS)

    def slide(carry):
        """The cache is full: refill it with each row's last `keep` tokens (the last sampled one
        included) at slots [0, keep). Later slots keep stale keys/values, masked until rewritten."""
        _, tok_B, cache, ctx_BS, _, _, _ = carry
        shift = S - keep + 1
        window_BK = jnp.concatenate([ctx_BS[:, shift:], tok_B[:, None]], axis=1)
        cache = {**cache, "start": jnp.maximum(cache["start"] - shift, 0), "index": jnp.zeros((), jnp.int32)}
        logits_BKV, cache = model.decode(window_BK, cache)
        return emit(carry, logits_BKV[:, -1], cache, jax.lax.dynamic_update_slice(ctx_BS, window_BK, (0, 0)))

    def going(carry):
        i, done_B = carry[0], carry[5]
        return (i < n_new) & ~jnp.all(done_B)

    def room(carry):
        return going(carry) & (carry[2]["index"] < S)

    carry = (jnp.int32(1), tok_B, cache, ctx_BS, out_BN, done_B, key)
    if not slides:
        return jax.lax.while_loop(room, step, carry)[4]

    def window(carry):
        """Slide if the cache is full (not on the first window), then decode until it is full again."""
        carry = jax.lax.cond(carry[2]["index"] >= S, slide, lambda c: c, carry)
        return jax.lax.while_loop(room, step, carry)

    return jax.lax.while_loop(going, window, carry)[4]


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
        # Tokens kept when the window slides (see the module docstring).
        self.keep = max(1, self.config.block_size // 2)

    @classmethod
    def from_model(cls, model: GPT, stop_ids: Sequence[int] | None = None) -> Generator:
        return cls(*nnx.split(model, nnx.Param), stop_ids=stop_ids)

    def _layout(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Left-pad the prompts into [B, P] and size the cache. If prompt + new tokens fit the
        context, the cache is as short as the bucket allows and nothing slides; otherwise prompts
        keep their last block_size tokens, the cache is the whole context, and the window slides."""
        limit = self.config.block_size
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens!r}: expected an integer >= 1")
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt: must hold at least one token")
        longest = max(map(len, prompts))
        if longest + max_new_tokens <= limit:
            P = bucket(longest, limit - max_new_tokens)
            cache_len = bucket(P + max_new_tokens, limit)
        else:
            prompts = [p[-limit:] for p in prompts]
            P, cache_len = bucket(min(longest, limit), limit), limit
        rows = np.zeros((len(prompts), P), np.int32)
        start = np.zeros((len(prompts),), np.int32)
        for b, p in enumerate(prompts):
            rows[b, P - len(p) :] = p
            start[b] = P - len(p)
        return jnp.asarray(rows), jnp.asarray(start), cache_len

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """New tokens per prompt, each list ending at (and including) its first stop token."""
        rows, start, cache_len = self._layout(prompts, max_new_tokens)
        out = _generate(
            self.graphdef,
            self.params,
            rows,
            start,
            jax.random.key(seed),
            jnp.asarray(self.stop_ids, jnp.int32),
            cache_len=cache_len,
            keep=self.keep,
            n_new=int(max_new_tokens),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
        )
        result = []
        for row in np.asarray(jax.device_get(out)).tolist():
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            result.append(row if stop is None else row[: stop + 1])
        return result

    def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Yield new tokens one at a time (the stop token, if reached, is the last one yielded).
        Bad arguments raise here, before the first token is asked for. The same tokens as
        `generate` for one prompt (the same key sequence and the same sliding)."""
        rows, start, cache_len = self._layout([prompt], max_new_tokens)
        return self._stream(
            rows,
            start,
            cache_len,
            int(max_new_tokens),
            dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)),
            seed,
        )

    def _stream(self, rows, start, cache_len: int, max_new_tokens: int, sampling: dict, seed: int) -> Iterator[int]:
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        tok, cache = _prefill(self.graphdef, self.params, rows, start, sub, cache_len=cache_len, **sampling)
        seq = np.asarray(rows[0, int(start[0]) :]).tolist()  # the tokens in the window (host side)
        index = rows.shape[1]  # the next free cache slot
        for i in range(max_new_tokens):
            t = int(tok[0])  # the one host sync per token that streaming needs
            yield t
            if t in self.stop_ids or i == max_new_tokens - 1:
                return
            seq.append(t)
            key, sub = jax.random.split(key)
            if index < cache_len:
                tok, cache = _step(self.graphdef, self.params, tok, cache, sub, **sampling)
                index += 1
            else:  # the cache is full: slide, as _generate does
                seq = seq[-self.keep :]
                tok, cache = _prefill(
                    self.graphdef,
                    self.params,
                    jnp.asarray([seq], jnp.int32),
                    jnp.zeros((1,), jnp.int32),
                    sub,
                    cache_len=cache_len,
                    **sampling,
                )
                index = self.keep


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
            text, self.pending = self.pending[: e.start].decode("utf-8"), self.pending[e.start :]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
