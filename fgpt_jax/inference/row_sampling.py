"""Token sampling with its own temperature / top-k / top-p and PRNG key per row, for shared batches.

`sampling.sample_token` takes its parameters as static Python numbers: right for a batch that
shares them (generate, chat), wrong for a server's decode batch, where every row is another request
and a static parameter would mean one compiled program per combination. Here they are [B] arrays,
so one program serves any mix, and the rules are `sample_token`'s:

  * temperature 0 is greedy: `lax.top_k(logits, 1)` (ties go to the lower id), as in sample_token;
  * otherwise logits / temperature, then top-k (keep values >= the k-th largest; 0 = off), then
    top-p on the top-k-filtered softmax (keep a token while the mass strictly before it, in sorted
    order, is < top_p; the most likely token always stays), then one draw.

How, and why not by sorting: a per-row cutoff needs the k-th largest value or the nucleus edge, and
`jnp.sort` over the 50k vocabulary costs far more on CPU than the decode step it would serve. The
cutoffs are read off the CANDIDATES largest logits (`lax.top_k`, sorted) when they lie among them,
which is the usual case; otherwise they are found exactly by bisection over the ordered bit patterns
of float32 (32 passes of a fused compare-and-sum over [B, V]). Filters run only when some row asks
for one (`lax.cond`). The draw is Gumbel-max in two levels (a 128-token block by its mass, then a
token in it) instead of Gumbel noise over the whole vocabulary, which costs a random number per
logit. So a seeded sample is reproducible here (alone or in any batch), but is not the same draw as
`sample_token`'s for the same seed; greedy decoding is identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BLOCK = 128  # tokens per block of the two-level draw
CANDIDATES = 64  # largest logits per row in which the fast filter looks for the top-k / top-p cutoffs


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> uint32 whose unsigned order is the float order (-inf < ... < -0 < +0 < ... < inf)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _unordered(k: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def _bisect(lo_B: jax.Array, hi_B: jax.Array, go_up) -> jax.Array:
    """The boundary of a monotone predicate over ordered keys: with `go_up(mid_value_B)` True where the
    answer lies above mid, 32 halvings of [lo, hi] (a uint32 range) leave (lo, hi) adjacent."""

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        up = go_up(_unordered(mid)[:, None])
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    return jax.lax.fori_loop(0, 32, body, (lo_B, hi_B))


def top_k_cutoff(logits_BV: jax.Array, k_B: jax.Array) -> jax.Array:
    """The k-th largest logit per row (exactly the value `lax.top_k(logits, k)[0][:, -1]` gives), for k >= 1."""
    lo, hi = _ordered(jnp.min(logits_BV, -1)), _ordered(jnp.max(logits_BV, -1)) + 1
    # Invariant: count(logits >= lo) >= k > count(logits >= hi); the answer is the largest such lo.
    lo, _ = _bisect(lo, hi, lambda t: jnp.sum(logits_BV >= t, -1) >= k_B)
    return _unordered(lo)


def top_p_cutoff(logits_BV: jax.Array, p_B: jax.Array) -> jax.Array:
    """The smallest logit kept by nucleus sampling per row: the smallest value v whose strictly larger
    values hold < p of the softmax mass (what filter_logits' sorted cumulative sum picks), for p < 1."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    lo, hi = _ordered(jnp.min(logits_BV, -1)) - 1, _ordered(jnp.max(logits_BV, -1))
    # Invariant: mass(logits > lo) >= p > mass(logits > hi); the answer is the smallest such hi.
    _, hi = _bisect(lo, hi, lambda t: jnp.sum(jnp.where(logits_BV > t, probs_BV, 0.0), -1) >= p_B)
    return _unordered(hi)


def filter_rows_exact(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Per-row top-k then top-p by bisection: logits outside the kept set become -inf (k=0, p=1 keep all)."""
    use_k = top_k_B > 0
    kth = top_k_cutoff(logits_BV, jnp.clip(top_k_B, 1, logits_BV.shape[-1]))
    logits_BV = jnp.where(use_k[:, None] & (logits_BV < kth[:, None]), -jnp.inf, logits_BV)
    use_p = top_p_B < 1.0
    cut = top_p_cutoff(logits_BV, jnp.where(use_p, top_p_B, 1.0))
    return jnp.where(use_p[:, None] & (logits_BV < cut[:, None]), -jnp.inf, logits_BV)


def filter_rows(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """`filter_rows_exact`, fast when every cutoff lies among each row's CANDIDATES largest logits
    (top_k <= CANDIDATES and a nucleus of fewer tokens: the usual case for a trained model), where
    `lax.top_k` gives them sorted; otherwise (`lax.cond`) the bisection."""
    C = min(CANDIDATES, logits_BV.shape[-1])
    cand_BC = jax.lax.top_k(logits_BV, C)[0]  # sorted, largest first
    use_k, use_p = top_k_B > 0, top_p_B < 1.0
    kth_B = jnp.where(use_k, jnp.take_along_axis(cand_BC, jnp.clip(top_k_B, 1, C)[:, None] - 1, 1)[:, 0], -jnp.inf)
    kept_BV = jnp.where(logits_BV < kth_B[:, None], -jnp.inf, logits_BV)
    cand_BC = jnp.where(cand_BC < kth_B[:, None], -jnp.inf, cand_BC)
    probs_BC = jnp.exp(cand_BC - jax.nn.logsumexp(kept_BV, axis=-1, keepdims=True))
    before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
    n_keep_B = jnp.sum(before_BC < top_p_B[:, None], axis=-1)
    cut_B = jnp.where(use_p, jnp.take_along_axis(cand_BC, jnp.maximum(n_keep_B, 1)[:, None] - 1, 1)[:, 0], -jnp.inf)
    fits = jnp.all((~use_k | (top_k_B <= C)) & (~use_p | (n_keep_B < C)))
    return jax.lax.cond(
        fits,
        lambda: jnp.where(kept_BV < cut_B[:, None], -jnp.inf, kept_BV),
        lambda: filter_rows_exact(logits_BV, top_k_B, top_p_B),
    )


def draw(logits_BV: jax.Array, key_B: jax.Array) -> jax.Array:
    """One token per row from softmax(logits), exactly, with ~V/128 + 128 random numbers per row instead
    of V: Gumbel-max over the log-masses of 128-token blocks picks a block, then Gumbel-max over that
    block's logits picks the token. Both are argmaxes of noisy values, so a rounding difference in the
    logits (another batch size, another program) changes a draw only if it reorders two values closer
    than the rounding itself; an inverse CDF over 50k dense boundaries would flip far more often."""
    B, V = logits_BV.shape
    pad = -V % _BLOCK
    logits_BCK = (jnp.pad(logits_BV, ((0, 0), (0, pad)), constant_values=-jnp.inf) if pad else logits_BV).reshape(
        B, -1, _BLOCK
    )
    C = logits_BCK.shape[1]

    def one(key, logits_CK):
        k_block, k_token = jax.random.split(key)
        mass_C = jax.nn.logsumexp(logits_CK, axis=-1)
        blk = jnp.argmax(mass_C + jax.random.gumbel(k_block, (C,)))
        row_K = jax.lax.dynamic_index_in_dim(logits_CK, blk, 0, keepdims=False)
        return blk * _BLOCK + jnp.argmax(row_K + jax.random.gumbel(k_token, (_BLOCK,)))

    return jax.vmap(one)(key_B, logits_BCK).astype(jnp.int32)


def sample_rows(
    logits_BV: jax.Array, key_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
) -> jax.Array:
    """Next token per row under that row's own sampling parameters (see the module docstring).

    `key_B` is a [B] array of typed PRNG keys (one draw per row); rows at temperature 0 ignore theirs.
    The filters and the draw run only when some row needs them (`lax.cond`), so an all-greedy batch
    costs one top_k(., 1).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jax.lax.top_k(logits_BV, 1)[1][:, 0].astype(jnp.int32)
    hot_B = temperature_B > 0

    def sampled(_):
        scaled_BV = logits_BV / jnp.where(hot_B, temperature_B, 1.0)[:, None]
        k_B, p_B = jnp.where(hot_B, top_k_B, 0), jnp.where(hot_B, top_p_B, 1.0)  # greedy rows filter nothing
        needs = jnp.any((k_B > 0) | (p_B < 1.0))
        scaled_BV = jax.lax.cond(needs, lambda x: filter_rows(x, k_B, p_B), lambda x: x, scaled_BV)
        return draw(scaled_BV, key_B)

    drawn_B = jax.lax.cond(jnp.any(hot_B), sampled, lambda _: greedy_B, None)
    return jnp.where(hot_B, drawn_B, greedy_B)
