"""HellaSwag accuracy: a bucketed, jitted, device-sharded scorer.

Each item is a context and 4 endings; the model scores each ending as a continuation
of the context (context tokens = encode(ctx), ending tokens = encode(" " + ending), truncated from
the left to block_size) and picks one by three rules:
  acc            largest sum of the ending's token log-probs (lm-eval-harness `acc`)
  acc_norm       largest sum divided by the ending's length in UTF-8 bytes (lm-eval-harness `acc_norm`,
                 "byte-length normalised"; its code uses len() of the string, which differs only on
                 the 199 of 40,168 validation endings with non-ASCII characters)
  acc_token_avg  largest mean log-prob per ending token, i.e. smallest mean token loss: what
                 build-nanogpt / llm.c / FGPT report and call "acc_norm" (GPT-2 124M: 0.2955)

`HellaSwagScorer` tokenises every item once and packs them into fixed-shape numpy batches per
length bucket (powers of two up to block_size), so the jitted scoring function compiles once per
bucket used, not once per item. Only the log-probs of ending tokens are needed, so the LM head and
the softmax over the 50k vocabulary run on those positions alone: the final hidden states of all
rows of a device are flattened and the ending positions gathered into a fixed-size list (sized to
the fullest device batch of the bucket), which is ~3x fewer head FLOPs than padding each row to the
longest ending. Per-token log-probs come back in float32 and are summed per ending on the host in
float64. Batches are split over all devices of the mesh by whole items; with several processes
each process passes its own slice of every global batch and the (small) result is replicated, so
every process returns the same metrics.

Shapes: N items, E=4 endings, R rows per batch (4 per item), L bucket length, S devices,
K gathered ending positions per device, D width, V vocabulary.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from fgpt_jax import sharding as shd
from fgpt_jax.data.hellaswag import N_ENDINGS, Example, load_examples
from fgpt_jax.loss import token_losses
from fgpt_jax.tokenizer import get_tokenizer


def default_buckets(block_size: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below block_size, then block_size itself."""
    out, b = [], smallest
    while b < block_size:
        out.append(b)
        b *= 2
    return tuple(out + [block_size])


def hellaswag_metrics(logprob_NE: np.ndarray, ntok_NE: np.ndarray, nbytes_NE: np.ndarray, labels_N: np.ndarray) -> dict:
    """{n, acc, acc_norm, acc_token_avg} from per-ending log-prob sums, token and character counts."""
    labels_N = np.asarray(labels_N)
    preds = {
        "acc": np.argmax(logprob_NE, axis=1),
        "acc_norm": np.argmax(logprob_NE / np.maximum(nbytes_NE, 1), axis=1),
        "acc_token_avg": np.argmax(logprob_NE / np.maximum(ntok_NE, 1), axis=1),
    }
    return {"n": int(len(labels_N)), **{k: float(np.mean(p == labels_N)) for k, p in preds.items()}}


@dataclass
class _Bucket:
    """The packed batches of one length bucket (host numpy, global batches)."""

    length: int  # L
    items_BN: np.ndarray  # [batches, items per batch] item index, -1 for padding
    tokens_BRL: np.ndarray  # int32 model inputs, rows 4i..4i+3 are item i's endings
    pos_BSK: np.ndarray  # int32 flat position (local row * L + t) whose output predicts a target
    tgt_BSK: np.ndarray  # int32 the ending token predicted there
    row_BSK: np.ndarray  # int32 row of the global batch it belongs to, -1 for padding


class HellaSwagScorer:
    """Pre-tokenised, bucketed HellaSwag items; `scorer(graphdef, params) -> metrics dict`.

    Build once (it tokenises every item), call every N training steps: each bucket's
    function is traced and compiled on the first call only (`compiles` counts traces).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        block_size: int,
        batch_size: int = 32,
        buckets: Sequence[int] | None = None,
        tokenizer=None,
        mesh: Mesh | None = None,
        progress: bool = False,
    ):
        if not examples:
            raise ValueError("HellaSwagScorer: no examples")
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: need at least 2 positions to score a token")
        tokenizer = tokenizer or get_tokenizer()
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.block_size, self.progress, self.compiles = block_size, progress, 0
        self.buckets = tuple(sorted(set(buckets or default_buckets(block_size))))
        if self.buckets[-1] > block_size or self.buckets[0] < 2:
            raise ValueError(f"buckets {self.buckets}: each must lie in [2, block_size={block_size}]")
        if self.buckets[-1] < block_size:
            self.buckets += (block_size,)  # every truncated item fits the last bucket
        S, n_proc = self.mesh.size, jax.process_count()
        self.batch_size = -(-max(batch_size, 1) // S) * S  # whole items per device
        self.labels_N = np.array([ex.label for ex in examples], np.int64)
        self.nbytes_NE = np.array([[len(e.encode("utf-8")) for e in ex.endings] for ex in examples], np.float64)

        ctx = tokenizer.encode_batch([ex.context for ex in examples])
        ends = tokenizer.encode_batch([" " + e for ex in examples for e in ex.endings])
        seqs, ntok = [], np.zeros((len(examples), N_ENDINGS), np.int64)
        for i, c in enumerate(ctx):
            for j in range(N_ENDINGS):
                end = ends[N_ENDINGS * i + j]
                seq = (c + end)[-block_size:]  # keep the ending and as much context as fits
                ntok[i, j] = min(len(end), len(seq) - 1)  # the first position has no prediction
                seqs.append(seq)
        self.ntok_NE = ntok
        length_N = np.array(
            [max(len(s) for s in seqs[N_ENDINGS * i : N_ENDINGS * (i + 1)]) for i in range(len(examples))]
        )
        bucket_N = np.searchsorted(np.array(self.buckets), length_N)
        B, R = self.batch_size, N_ENDINGS * self.batch_size
        Rd = R // S  # rows per device
        self._buckets: list[_Bucket] = []
        for b, L in enumerate(self.buckets):
            items = np.nonzero(bucket_N == b)[0]
            if len(items) == 0:
                continue
            nb = -(-len(items) // B)
            items_BN = np.full((nb, B), -1, np.int64)
            items_BN.flat[: len(items)] = items
            tokens = np.zeros((nb, R, L), np.int32)
            # parts[k][s] = (positions, targets, rows): the ending tokens of batch k on device s.
            parts = [[([], [], []) for _ in range(S)] for _ in range(nb)]
            for k in range(nb):
                for slot, i in enumerate(items_BN[k]):
                    if i < 0:
                        continue
                    for j in range(N_ENDINGS):
                        r = N_ENDINGS * slot + j
                        s, local = divmod(r, Rd)
                        seq, n = seqs[N_ENDINGS * i + j], int(ntok[i, j])
                        tokens[k, r, : len(seq)] = seq
                        t = np.arange(len(seq) - n, len(seq))  # target positions (the ending)
                        pos, tgt, row = parts[k][s]
                        pos.append(local * L + t - 1)  # the output at t - 1 predicts token t
                        tgt.append(np.asarray(seq, np.int32)[t])
                        row.append(np.full(n, r))
            # K: the most ending tokens any device gets in any batch of this bucket (fixed shape).
            K = max(8, -(-max(sum(map(len, p[0])) for batch in parts for p in batch) // 8) * 8)
            arrays = [np.zeros((nb, S, K), np.int32) for _ in range(2)] + [np.full((nb, S, K), -1, np.int32)]
            for k in range(nb):
                for s in range(S):
                    for arr, chunks in zip(arrays, parts[k][s]):
                        if chunks:
                            flat = np.concatenate(chunks)
                            arr[k, s, : len(flat)] = flat
            self._buckets.append(_Bucket(L, items_BN, tokens, *arrays))

        # Each process feeds its own devices' rows of every global batch (devices are ordered by
        # process in make_mesh, so that is a contiguous slice).
        self._proc = slice(jax.process_index() * R // n_proc, (jax.process_index() + 1) * R // n_proc)
        self._proc_dev = slice(jax.process_index() * S // n_proc, (jax.process_index() + 1) * S // n_proc)
        self._row_sharding = shd.batch_sharding(self.mesh, 2)
        # Replicated output: tiny ([S, K] floats), and readable on every process.
        self._fn = jax.jit(self._token_logprobs, static_argnums=0, out_shardings=NamedSharding(self.mesh, P()))

    @classmethod
    def from_file(
        cls,
        path: str | Path | None,
        block_size: int,
        limit: int | None = None,
        preprocess_mode: str = "harness",
        **kwargs,
    ) -> HellaSwagScorer:
        """A scorer over the items of `path` (default: the official val jsonl, downloaded once)."""
        return cls(load_examples(path, limit, preprocess_mode), block_size, **kwargs)

    @property
    def n(self) -> int:
        return len(self.labels_N)

    @property
    def shapes(self) -> list[tuple]:
        """(batches, rows, L, K) per bucket used: one compilation each."""
        return [
            (bk.tokens_BRL.shape[0], bk.tokens_BRL.shape[1], bk.length, bk.pos_BSK.shape[2]) for bk in self._buckets
        ]

    def _token_logprobs(self, graphdef, params, tokens_RL, pos_SK, tgt_SK):
        self.compiles += 1  # runs at trace time only
        model = nnx.merge(graphdef, params)
        h_RLD = model.hidden_states(tokens_RL)
        R, L, D = h_RLD.shape
        S = pos_SK.shape[0]
        # Rows are split over devices in S contiguous groups: flattening each group keeps the
        # gather local to its device.
        h_SMD = h_RLD.reshape(S, (R // S) * L, D)
        hg_SKD = jnp.take_along_axis(h_SMD, pos_SK[:, :, None], axis=1)
        return -token_losses(model.logits(hg_SKD), tgt_SK)  # float32 log p(target)

    def score_endings(self, graphdef: nnx.GraphDef, params) -> tuple[np.ndarray, np.ndarray]:
        """(sum of log-probs [N, 4] float64, ending token counts [N, 4]) for every item."""
        lp_NE = np.zeros((self.n, N_ENDINGS), np.float64)
        R = N_ENDINGS * self.batch_size
        total = sum(len(bk.items_BN) for bk in self._buckets)
        bar = tqdm(
            total=total,
            desc="hellaswag",
            unit="batch",
            file=sys.stderr,
            disable=not (self.progress and jax.process_index() == 0),
        )

        def collect(bk: _Bucket, k: int, out) -> None:
            lp_SK = np.asarray(out, np.float64)
            row_SK = bk.row_BSK[k]
            valid = row_SK >= 0
            sums_R = np.bincount(row_SK[valid], weights=lp_SK[valid], minlength=R)
            items = bk.items_BN[k]
            keep = items >= 0
            lp_NE[items[keep]] = sums_R.reshape(-1, N_ENDINGS)[keep]
            bar.update(1)

        pending = None
        for bk in self._buckets:
            for k in range(len(bk.items_BN)):
                out = self._fn(
                    graphdef,
                    params,
                    shd.global_batch(bk.tokens_BRL[k][self._proc], self._row_sharding),
                    shd.global_batch(bk.pos_BSK[k][self._proc_dev], self._row_sharding),
                    shd.global_batch(bk.tgt_BSK[k][self._proc_dev], self._row_sharding),
                )
                if pending is not None:  # read batch k-1 while batch k runs
                    collect(*pending)
                pending = (bk, k, out)
        collect(*pending)
        bar.close()
        return lp_NE, self.ntok_NE.copy()

    def __call__(self, graphdef: nnx.GraphDef, params) -> dict:
        """{n, acc, acc_norm, acc_token_avg} of the model (graphdef, params)."""
        lp_NE, ntok_NE = self.score_endings(graphdef, params)
        return hellaswag_metrics(lp_NE, ntok_NE, self.nbytes_NE, self.labels_N)
