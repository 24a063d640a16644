"""HellaSwag accuracy: every ending scored as a continuation of its context, in the shared batched,
jitted, device-sharded span scorer (fgpt_jax.eval.scoring).

Each item is a context and 4 endings; the model scores each ending as a continuation of the context
(context tokens = encode(ctx), ending tokens = encode(" " + ending), truncated from the left to
block_size) and picks one by three rules:
  acc            largest sum of the ending's token log-probs (lm-eval-harness `acc`)
  acc_norm       largest sum divided by the ending's length in UTF-8 bytes (lm-eval-harness `acc_norm`,
                 "byte-length normalised"; its code uses len() of the string, which differs only on
                 the 199 of 40,168 validation endings with non-ASCII characters)
  acc_token_avg  largest mean log-prob per ending token, i.e. smallest mean token loss: what
                 build-nanogpt / llm.c / FGPT report and call "acc_norm" (GPT-2 124M: 0.2955)

`HellaSwagScorer` tokenises and packs every item once (a `SpanScorer` layout: length buckets, a fixed
set of compiled shapes, the LM head on ending positions only), then scores the packed items each time
it is called, so the trainer's periodic HellaSwag compiles once per bucket for the whole run.
Per-token log-probs come back in float32 and are summed per ending on the host in float64.
With several processes every process returns the same metrics.

Shapes: N items, E=4 endings.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from fgpt_jax.data.hellaswag import N_ENDINGS, Example, load_examples
from fgpt_jax.eval.scoring import SpanScorer, crop_left, default_buckets
from fgpt_jax.tokenizer import get_tokenizer

__all__ = ["HellaSwagScorer", "default_buckets", "evaluate_hellaswag", "hellaswag_metrics"]


def hellaswag_metrics(logprob_NE: np.ndarray, ntok_NE: np.ndarray, nbytes_NE: np.ndarray, labels_N: np.ndarray) -> dict:
    """{n, acc, acc_norm, acc_token_avg} from per-ending log-prob sums, token and byte counts."""
    labels_N = np.asarray(labels_N)
    preds = {
        "acc": np.argmax(logprob_NE, axis=1),
        "acc_norm": np.argmax(logprob_NE / np.maximum(nbytes_NE, 1), axis=1),
        "acc_token_avg": np.argmax(logprob_NE / np.maximum(ntok_NE, 1), axis=1),
    }
    return {"n": int(len(labels_N)), **{k: float(np.mean(p == labels_N)) for k, p in preds.items()}}


class HellaSwagScorer:
    """Pre-tokenised, packed HellaSwag items; `scorer(graphdef, params) -> metrics dict`.

    Build once (it tokenises every item), call every N training steps: each bucket's function is
    traced and compiled on the first call only (`compiles` counts traces). `batch_size` items (4 rows
    each) go to the devices per call, rounded up to a multiple of the device count."""

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
        tokenizer = tokenizer or get_tokenizer()
        self.progress = progress
        # One data set, scored again and again: K exactly what it needs (no shared program grid).
        self.spans = SpanScorer(
            block_size, rows=N_ENDINGS * max(batch_size, 1), buckets=buckets, mesh=mesh, shared_k=False
        )
        self.block_size, self.buckets = block_size, self.spans.buckets
        self.batch_size = self.spans.rows // N_ENDINGS
        self.labels_N = np.array([ex.label for ex in examples], np.int64)
        self.nbytes_NE = np.array([[len(e.encode("utf-8")) for e in ex.endings] for ex in examples], np.float64)
        ctx = tokenizer.encode_batch([ex.context for ex in examples])
        ends = tokenizer.encode_batch([" " + e for ex in examples for e in ex.endings])
        # Keep the ending and as much context as fits (the first position has no prediction).
        spans = [crop_left(ctx[j // N_ENDINGS] + e, len(ctx[j // N_ENDINGS]), block_size) for j, e in enumerate(ends)]
        self._packed = self.spans.pack(spans)
        self.ntok_NE = self._packed.n_targets.reshape(-1, N_ENDINGS)

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
    def compiles(self) -> int:
        return self.spans.compiles

    @property
    def shapes(self) -> list[tuple]:
        """(batches, rows, L, K) per bucket used: one compilation each."""
        return self.spans.shapes(self._packed)

    def score_endings(self, graphdef: nnx.GraphDef, params) -> tuple[np.ndarray, np.ndarray]:
        """(sum of log-probs [N, 4] float64, ending token counts [N, 4]) for every item."""
        bar = tqdm(
            total=self._packed.n_batches,
            desc="hellaswag",
            unit="batch",
            file=sys.stderr,
            disable=not (self.progress and jax.process_index() == 0),
        )
        with bar:
            scores = self.spans(graphdef, params, self._packed, bar.update, with_greedy=False)  # sums only
        return scores.sums().reshape(-1, N_ENDINGS), self.ntok_NE.copy()

    def __call__(self, graphdef: nnx.GraphDef, params) -> dict:
        """{n, acc, acc_norm, acc_token_avg} of the model (graphdef, params)."""
        lp_NE, ntok_NE = self.score_endings(graphdef, params)
        return hellaswag_metrics(lp_NE, ntok_NE, self.nbytes_NE, self.labels_N)


def evaluate_hellaswag(model, examples: Sequence[Example], batch_size: int = 32, progress: bool = False) -> dict:
    """{n, acc, acc_norm, acc_token_avg, seconds} of a loaded model (`fgpt_jax.eval.Loaded`) on
    `examples` (fgpt_jax.data.hellaswag.load_examples); `seconds` is the scoring time, compilation
    included."""
    scorer = HellaSwagScorer(examples, model.block_size, batch_size=batch_size, mesh=model.mesh, progress=progress)
    t0 = time.perf_counter()
    result = scorer(model.graphdef, model.params)
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}
