"""Log-probabilities of prompt and completion tokens for `/v1/completions` (`echo`, `logprobs`), and
OpenAI's legacy `logprobs` object that carries them: what lm-evaluation-harness's `local-completions`
model reads to score a task over HTTP.

Scoring goes through the evaluations' `SpanScorer` (fgpt_jax.eval.scoring): the sequences of one
request are packed into length buckets and scored in fixed-shape batches, one compiled program per
(rows, bucket, K, top-k) shape, never one forward per sequence. The log-softmax runs over the
vocabulary rows a Hugging Face export keeps (`fgpt_jax.hf.weights.export_vocab_size`), exactly as
`python -m fgpt_jax.eval harness` scores in process, so a task gives the same numbers both ways.
A target that is the argmax carries the top-1 value bit for bit, so "its log-prob equals the largest
one" (lm-eval's greedy test) holds exactly.

One scoring job runs at a time (a lock: memory stays bounded by one batch of rows x context); the
server runs it in a worker thread, so the event loop keeps serving while the device works and the
engine's decode thread runs beside it.
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fgpt_jax import sharding as shd
from fgpt_jax.eval.scoring import Span, SpanScorer
from fgpt_jax.hf.weights import export_vocab_size


@dataclass
class TokenScores:
    """One sequence's scored tokens (tokens[start:]): `logprobs` [n] and the `top_k` most likely tokens
    at each of those positions, most likely first: `top_ids` [n, k], `top_logprobs` [n, k]."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    FIELDS = ("logprobs", "top_ids", "top_logprobs")


class PromptScorer:
    """Scores token sequences with the served model (see the module docstring).

    `max_rows`: the most sequences scored per batch; a request of n sequences uses the smallest power
    of two >= n (up to `max_rows`) rows, so a one-prompt request does not pay for a full batch."""

    def __init__(self, graphdef: nnx.GraphDef, params, block_size: int, max_rows: int = 16):
        self.graphdef, self.params, self.block_size, self.max_rows = graphdef, params, block_size, max_rows
        wte = nnx.merge(graphdef, params).wte.embedding[...]
        self.vocab_size = export_vocab_size(np.asarray(jax.device_get(wte)))
        # The devices the parameters live on (the engine's): scoring rows are split over exactly those.
        devices = sorted(jax.tree.leaves(params)[0].sharding.device_set, key=lambda d: d.id)
        self.mesh = Mesh(np.asarray(devices), (shd.AXIS,))
        self._scorers: dict[int, SpanScorer] = {}
        self._lock = threading.Lock()

    def _scorer(self, n: int) -> SpanScorer:
        rows = min(1 << max(n - 1, 0).bit_length(), self.max_rows)
        if rows not in self._scorers:
            self._scorers[rows] = SpanScorer(self.block_size, rows=rows, mesh=self.mesh, vocab_size=self.vocab_size)
        return self._scorers[rows]

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], top_k: int) -> list[TokenScores]:
        """Per sequence, its tokens[start:] scored (each predicted from the tokens before it), with the
        `top_k` (>= 1) most likely tokens at each of those positions. A sequence with nothing to score
        (start >= its length) gets empty arrays. Sequences hold at most block_size + 1 tokens."""
        spans = [Span(list(s), st) for s, st in zip(sequences, starts) if len(s) > st]
        empty = TokenScores(np.zeros(0, np.float32), np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32))
        if not spans:
            return [empty for _ in sequences]
        with self._lock:
            scorer = self._scorer(len(spans))
            scores = scorer(self.graphdef, self.params, scorer.pack(spans), top_k=top_k)
        it = iter(zip(scores.logprobs, scores.top_ids, scores.top_logprobs))
        return [TokenScores(*next(it)) if len(s) > st else empty for s, st in zip(sequences, starts)]


def token_text(tok, token_id: int) -> str:
    """A token as OpenAI's `logprobs.tokens` show it: its text, or "bytes:\\xe2\\x80" for bytes that are
    not whole UTF-8 characters; ids past the tokenizer (padded vocabulary rows) as <|padded_ID|>."""
    if not 0 <= token_id < tok.n_vocab:
        return f"<|padded_{token_id}|>"
    raw = tok.decode_bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def legacy_logprobs(
    tok,
    tokens: Sequence[int],
    token_logprobs: Sequence[float | None],
    top: Sequence[tuple[np.ndarray, np.ndarray] | None],
) -> dict:
    """OpenAI's legacy completions `logprobs` object for the tokens shown in a choice: `tokens` (their
    text), `token_logprobs` (None where nothing predicts the token: a prompt's first), `top_logprobs`
    (a {text: logprob} dict per token, None where its log-prob is None) and `text_offset` (the
    character offset of each token in the choice's text)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, chars = [], 0
    for t in tokens:
        offsets.append(chars)
        chars += len(decoder.decode(tok.decode_bytes([t]) if 0 <= t < tok.n_vocab else b""))
    return {
        "tokens": [token_text(tok, int(t)) for t in tokens],
        "token_logprobs": [None if lp is None else float(lp) for lp in token_logprobs],
        "top_logprobs": [
            None if entry is None else {token_text(tok, int(i)): float(v) for i, v in zip(*entry)} for entry in top
        ],
        "text_offset": offsets,
    }
