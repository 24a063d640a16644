"""The span scorer's top-k output (fgpt_jax.eval.scoring, `top_k`), which the server's `logprobs` use:
against a plain forward pass, over a limited vocabulary, and with argmax targets carrying the top-1 value."""

import jax
import numpy as np
import pytest
from flax import nnx

from fgpt_jax.eval.scoring import Span, SpanScorer


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Log-softmax rows of a plain forward pass over `tokens`, in float64, the first `vocab` columns. One
    compiled [1, block_size] program (the model is causal: padding after the tokens changes no row of
    theirs), not an eager pass per length."""
    graphdef, params = nnx.split(tiny_model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    block = tiny_model.config.block_size

    def run(tokens, vocab):
        buf = np.zeros((1, block), np.int32)
        buf[0, : len(tokens)] = tokens
        logits = np.asarray(forward(params, buf)[0, : len(tokens), :vocab], np.float64)
        m = logits.max(-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))

    return run


@pytest.mark.parametrize("vocab", [None, 50257])
def test_top_k_equals_a_forward_pass(tiny_model, reference, vocab):
    rng = np.random.default_rng(0)
    block = tiny_model.config.block_size
    spans = [Span(rng.integers(0, 50257, n).tolist(), s) for n, s in [(5, 1), (block + 1, 3), (12, 11), (2, 1)]]
    graphdef, params = nnx.split(tiny_model, nnx.Param)
    scorer = SpanScorer(block, rows=4, vocab_size=vocab)
    # One span's targets are its own argmax tokens: their log-probs must be the top-1 values exactly.
    seq = spans[0].tokens[:2]
    for _ in range(4):
        seq.append(int(np.argmax(reference(seq, vocab or 50304)[-1])))
    spans.append(Span(seq, 2))
    scores = scorer(graphdef, params, scorer.pack(spans), top_k=3)
    for i, span in enumerate(spans):
        lp = reference(list(span.tokens[:-1]), vocab or 50304)
        rows = lp[span.start - 1 :]
        np.testing.assert_allclose(scores.logprobs[i], rows[np.arange(len(rows)), span.tokens[span.start :]], atol=2e-5)
        np.testing.assert_array_equal(scores.top_ids[i], np.argsort(-rows, axis=-1, kind="stable")[:, :3])
        np.testing.assert_allclose(scores.top_logprobs[i], -np.sort(-rows, axis=-1)[:, :3], atol=2e-5)
        assert (scores.top_ids[i] < (vocab or 50304)).all()
        np.testing.assert_array_equal(scores.greedy[i], scores.top_ids[i][:, 0] == span.tokens[span.start :])
    assert scores.greedy[-1].all()
    assert (scores.logprobs[-1] == scores.top_logprobs[-1][:, 0]).all()  # bit for bit
    without = scorer(graphdef, params, scorer.pack(spans))  # no top_k: the same log-probs, no top arrays
    assert without.top_ids is None
    for a, b in zip(without.logprobs, scores.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        scorer(graphdef, params, scorer.pack(spans), top_k=-1)
