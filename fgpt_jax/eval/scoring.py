"""Scoring spans of tokens with a model: the batched, jitted, device-sharded core of every evaluation
that asks "how likely are these tokens after that prefix" (HellaSwag, CORE, lm-evaluation-harness,
the server's prompt log-probabilities).

A `Span` is a token sequence of at most block_size + 1 tokens and the index `start` of its first
scored token: tokens[start:] are the targets, each predicted by the model's output one position
earlier. The model reads tokens[:-1] (the last token is only ever a target), so a span of
block_size + 1 tokens fills the context exactly, as lm-evaluation-harness's windows do.
`SpanScorer.pack(spans)` lays spans out once on the host, `scorer(graphdef, params, packed)` scores
them and returns, per span, the log-probability of every target token (float32, log-softmax over the
whole vocabulary, or over its first `vocab_size` ids) and whether each target is the model's argmax
there (greedy).

Why this shape of computation:
- A fixed set of compiled programs. Spans are grouped into length buckets by the tokens the model
  reads (powers of two from 64, then block_size) and packed into batches of a fixed number of rows
  per bucket, so the jitted function compiles once per (bucket, K) used, never once per span or per
  batch.
- The LM head runs on target positions only. The final hidden states of a device's rows are flattened
  and the target positions gathered into a fixed-size list of K positions per device (K: the most
  targets any device holds in any batch of the bucket, rounded up to a power of two of at least 1/64
  of the bucket's positions, `gathered_k`, so different data sets share a few programs per bucket),
  which for short continuations is many times fewer head FLOPs than computing logits at every
  position, and the [K, V] logits never leave the device.
- Sharded over every device by whole rows; with several processes each process passes its own
  devices' rows of every global batch (devices are ordered by process in `make_mesh`, so that is a
  contiguous slice) and the small result is replicated, so every process gets every score.
- The next batch is dispatched before the previous one is read back: one host sync per batch, never
  one per span.

Shapes: R rows per batch, L bucket length, S devices, K gathered target positions per device,
D width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fgpt_jax import sharding as shd


def default_buckets(block_size: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below block_size, then block_size itself."""
    out, b = [], smallest
    while b < block_size:
        out.append(b)
        b *= 2
    return tuple(out + [block_size])


def gathered_k(needed: int, positions: int, shared: bool = True) -> int:
    """K, the LM-head rows per device for a bucket whose batches need at most `needed` of their
    `positions` (rows per device x L).

    shared (the default): a power of two, at least positions/64 (and 8). The floor keeps the number
    of programs a bucket can need, whatever data sets it scores (CORE's 20 tasks need from 1 to 120
    scored tokens per row), at seven or fewer, for a head that computes under twice the positions it
    needs, or positions/64 (a small share of the blocks' work).
    not shared: `needed` rounded up to a multiple of 8, for one data set scored again and again
    (HellaSwag in training): no head work wasted, one program per bucket of that data set. On a
    model whose cost is the head (the tiny one: 50,304 x 128) the power-of-two K cost a third of the
    throughput (benchmarks/RESULTS.md, "HellaSwag scorer after the span-scorer refactor")."""
    if not shared:
        return min(max(8, -(-needed // 8) * 8), positions)
    k = 8
    while k < needed or k < positions // 64:
        k *= 2
    return min(k, positions)


@dataclass(frozen=True)
class Span:
    """`tokens` (2 to block_size + 1 ids) scored at positions start..len(tokens)-1 (start >= 1)."""

    tokens: Sequence[int]
    start: int

    @property
    def n_targets(self) -> int:
        return len(self.tokens) - self.start


def crop_left(tokens: Sequence[int], start: int, block_size: int) -> Span:
    """The span that keeps the last `block_size` tokens of `tokens` (the oldest context goes first),
    its scored part moving with them. nanochat's CORE and HellaSwag keep a window of the context
    length (`block_size` = the model's); lm-evaluation-harness's hf backend keeps one token more
    (pass the model's block_size + 1: its last token is only a target). At least one target is always
    kept; a target that falls off the front (a continuation longer than the window - 1) is dropped
    with it."""
    tokens = list(tokens)
    cut = max(len(tokens) - block_size, 0)
    return Span(tokens[cut:], max(start - cut, 1))


@dataclass
class _Bucket:
    """One length bucket's batches, laid out on the host (global batches)."""

    length: int  # L
    span_BR: np.ndarray  # [batches, rows] the span in each row, -1 for padding
    tokens_BRL: np.ndarray  # int32 model inputs (right-padded with zeros: causal, so harmless)
    pos_BSK: np.ndarray  # int32 flat position (local row * L + t - 1) whose output predicts target t
    tgt_BSK: np.ndarray  # int32 the target token predicted there
    row_BSK: np.ndarray  # int32 row of the global batch the target belongs to, -1 for padding

    @property
    def k(self) -> int:
        return self.pos_BSK.shape[2]


@dataclass
class Packed:
    """Spans laid out for a `SpanScorer`: build once, score as often as the parameters change."""

    n_targets: np.ndarray  # [N] targets per span
    buckets: list[_Bucket]

    @property
    def n(self) -> int:
        return len(self.n_targets)

    @property
    def n_batches(self) -> int:
        return sum(len(b.span_BR) for b in self.buckets)


@dataclass
class Scores:
    """Per span i: `logprobs[i]` float32 [n_targets_i] and `greedy[i]` bool [n_targets_i]; with
    `top_k` > 0, also the k most likely tokens at each target position, most likely first:
    `top_ids[i]` int32 [n_targets_i, k] and `top_logprobs[i]` float32 [n_targets_i, k]."""

    logprobs: list[np.ndarray]
    greedy: list[np.ndarray]
    top_ids: list[np.ndarray] | None = None
    top_logprobs: list[np.ndarray] | None = None

    def sums(self) -> np.ndarray:
        """The total log-probability of each span's targets, float64 [N]."""
        return np.array([lp.astype(np.float64).sum() for lp in self.logprobs])


class SpanScorer:
    """Scores `Span`s in fixed-shape, length-bucketed, device-sharded batches (see the module docstring).

    `rows` is the number of rows per batch (rounded up to a multiple of the devices), the same in
    every bucket so memory stays bounded by rows x block_size; `compiles` counts traces (one per
    (bucket, K) shape used, then none). `vocab_size` limits the log-softmax and the argmax to the
    first ids of the model's (padded) vocabulary: the rows a Hugging Face export keeps, so scores
    equal those of the exported model (default: every row). `shared_k` picks K on a power-of-two grid
    that different data sets share (default), or exactly for one data set (`gathered_k`)."""

    def __init__(
        self,
        block_size: int,
        rows: int = 32,
        buckets: Sequence[int] | None = None,
        mesh: Mesh | None = None,
        vocab_size: int | None = None,
        shared_k: bool = True,
    ):
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: need at least 2 positions to score a token")
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.block_size, self.compiles, self.vocab_size, self.shared_k = block_size, 0, vocab_size, shared_k
        self.buckets = tuple(sorted(set(buckets or default_buckets(block_size))))
        if self.buckets[-1] > block_size or self.buckets[0] < 2:
            raise ValueError(f"buckets {self.buckets}: each must lie in [2, block_size={block_size}]")
        if self.buckets[-1] < block_size:
            self.buckets += (block_size,)  # every span fits the last bucket
        S = self.mesh.size
        self.rows = -(-max(rows, 1) // S) * S
        n_proc, p = jax.process_count(), jax.process_index()
        self._proc_rows = slice(p * self.rows // n_proc, (p + 1) * self.rows // n_proc)
        self._proc_devs = slice(p * S // n_proc, (p + 1) * S // n_proc)
        self._row_sharding = shd.batch_sharding(self.mesh, 2)
        # Replicated output: small ([S, K] values), and readable on every process.
        self._fn = jax.jit(self._score, static_argnums=(0, 1, 2), out_shardings=NamedSharding(self.mesh, P()))

    # -- host side: layout ------------------------------------------------------------------------
    def pack(self, spans: Sequence[Span]) -> Packed:
        """Lay `spans` out into batches (the order of spans inside a bucket is kept)."""
        S, R = self.mesh.size, self.rows
        Rd = R // S  # rows per device
        lengths = np.array([len(s.tokens) - 1 for s in spans], np.int64)  # the tokens the model reads
        for i, s in enumerate(spans):
            if not 1 <= s.start < len(s.tokens) <= self.block_size + 1:
                raise ValueError(
                    f"span {i}: {len(s.tokens)} tokens scored from {s.start}; expected 1 <= start < "
                    f"len(tokens) <= block_size + 1 = {self.block_size + 1} (crop_left first)"
                )
        bucket_of = np.searchsorted(np.array(self.buckets), lengths)
        out = []
        for b, L in enumerate(self.buckets):
            members = np.nonzero(bucket_of == b)[0]
            if len(members) == 0:
                continue
            nb = -(-len(members) // R)
            span_BR = np.full((nb, R), -1, np.int64)
            span_BR.flat[: len(members)] = members
            tokens = np.zeros((nb, R, L), np.int32)
            # parts[k][s] = (positions, targets, rows): the targets of batch k on device s.
            parts = [[([], [], []) for _ in range(S)] for _ in range(nb)]
            for k in range(nb):
                for r, i in enumerate(span_BR[k]):
                    if i < 0:
                        continue
                    span = spans[i]
                    seq = np.asarray(span.tokens, np.int32)
                    tokens[k, r, : len(seq) - 1] = seq[:-1]
                    s, local = divmod(r, Rd)
                    t = np.arange(span.start, len(seq))
                    pos, tgt, row = parts[k][s]
                    pos.append(local * L + t - 1)  # the output at t - 1 predicts token t
                    tgt.append(seq[t])
                    row.append(np.full(len(t), r))
            K = gathered_k(max(sum(map(len, p[0])) for batch in parts for p in batch), Rd * L, self.shared_k)
            arrays = [np.zeros((nb, S, K), np.int32) for _ in range(2)] + [np.full((nb, S, K), -1, np.int32)]
            for k in range(nb):
                for s in range(S):
                    for arr, chunks in zip(arrays, parts[k][s]):
                        if chunks:
                            flat = np.concatenate(chunks)
                            arr[k, s, : len(flat)] = flat
            out.append(_Bucket(L, span_BR, tokens, *arrays))
        return Packed(np.array([s.n_targets for s in spans], np.int64), out)

    def shapes(self, packed: Packed) -> list[tuple[int, int, int, int]]:
        """(batches, rows, L, K) per bucket used: one compilation each."""
        return [(len(b.span_BR), self.rows, b.length, b.k) for b in packed.buckets]

    # -- device side ------------------------------------------------------------------------------
    def _score(self, graphdef, greedy: bool, top_k: int, params, tokens_RL, pos_SK, tgt_SK):
        self.compiles += 1  # runs at trace time only
        model = nnx.merge(graphdef, params)
        h_RLD = model.hidden_states(tokens_RL)
        R, L, D = h_RLD.shape
        S = pos_SK.shape[0]
        # Rows are split over devices in S contiguous groups: flattening each group keeps the
        # gather local to its device.
        h_SMD = h_RLD.reshape(S, (R // S) * L, D)
        hg_SKD = jnp.take_along_axis(h_SMD, pos_SK[:, :, None], axis=1)
        logits_SKV = model.logits(hg_SKD).astype(jnp.float32)
        if self.vocab_size is not None:
            logits_SKV = logits_SKV[..., : self.vocab_size]
        lse_SK = jax.nn.logsumexp(logits_SKV, axis=-1)
        lp_SK = jnp.take_along_axis(logits_SKV, tgt_SK[:, :, None], axis=-1)[..., 0] - lse_SK
        if top_k:
            top_SKk, ids_SKk = jax.lax.top_k(logits_SKV, top_k)
            top_SKk = top_SKk - lse_SK[..., None]
            greedy_SK = ids_SKk[..., 0] == tgt_SK
            # A target that is the argmax gets the top-1 value itself, bit for bit: clients (lm-eval's
            # local-completions) call a token greedy when its log-prob equals the largest one.
            lp_SK = jnp.where(greedy_SK, top_SKk[..., 0], lp_SK)
            return lp_SK, greedy_SK, ids_SKk.astype(jnp.int32), top_SKk
        if not greedy:  # the argmax is one more pass over [S, K, V]: a third of the tiny model's time
            return lp_SK, jnp.zeros(lp_SK.shape, bool)
        greedy_SK = jnp.argmax(logits_SKV, axis=-1) == tgt_SK
        return lp_SK, greedy_SK

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params,
        packed: Packed,
        progress: Callable[[int], object] | None = None,
        with_greedy: bool = True,
        top_k: int = 0,
    ) -> Scores:
        """Score every span of `packed` with the model (graphdef, params); `progress(1)` per batch.
        `with_greedy=False` skips the argmax (its flags come back all False): for log-probs alone.
        `top_k` > 0 also returns the k most likely tokens at each target position (`Scores.top_ids`,
        `Scores.top_logprobs`; the greedy flags then come from the top-1, whatever `with_greedy`)."""
        top_k = int(top_k)
        if not 0 <= top_k <= (self.vocab_size or top_k):
            raise ValueError(f"top_k={top_k}: expected 0 to the scored vocabulary ({self.vocab_size})")
        fields: list[list] = [[None] * packed.n for _ in range(4 if top_k else 2)]

        def collect(bk: _Bucket, k: int, out) -> None:
            arrays = [np.asarray(x) for x in jax.device_get(out)]
            row_SK = bk.row_BSK[k]
            valid = row_SK >= 0
            span = bk.span_BR[k][row_SK[valid]]
            # A span lies in one row, so its targets are one contiguous run, in order, of the
            # flattened valid positions: split at the runs' starts.
            starts = np.flatnonzero(np.r_[True, span[1:] != span[:-1]])
            for field, arr in zip(fields, arrays):
                for i, part in zip(span[starts], np.split(arr[valid], starts[1:])):
                    field[i] = part
            if progress is not None:
                progress(1)

        pending = None
        for bk in packed.buckets:
            for k in range(len(bk.span_BR)):
                out = self._fn(
                    graphdef,
                    with_greedy,
                    top_k,
                    params,
                    shd.global_batch(bk.tokens_BRL[k][self._proc_rows], self._row_sharding),
                    shd.global_batch(bk.pos_BSK[k][self._proc_devs], self._row_sharding),
                    shd.global_batch(bk.tgt_BSK[k][self._proc_devs], self._row_sharding),
                )
                if pending is not None:  # read batch k-1 while batch k runs
                    collect(*pending)
                pending = (bk, k, out)
        if pending is not None:
            collect(*pending)
        return Scores(*fields)
