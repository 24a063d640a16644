"""The HellaSwag scorer (bucketed, jitted, sharded) against a plain one-item-at-a-time reference loop."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fgpt_jax.data.hellaswag import load_examples
from fgpt_jax.eval.hellaswag import HellaSwagScorer, default_buckets, hellaswag_metrics
from fgpt_jax.model import GPT, GPTConfig

DATA = Path(__file__).parent / "data" / "hellaswag_val_200.txt"
BLOCK = 64


# -- scorer vs a plain reference loop ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig.preset("tiny", block_size=BLOCK)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, params


def reference_logprobs(graphdef, params, items, tok):
    """One item and one ending at a time: a full forward pass, numpy log-softmax, sum over the ending."""
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    out = np.zeros((len(items), 4))
    for i, item in enumerate(items):
        ctx = tok.encode(item.context)
        for j, ending in enumerate(item.endings):
            end = tok.encode(" " + ending)
            seq = (ctx + end)[-BLOCK:]  # left-truncated to the block
            x = np.zeros((1, BLOCK), np.int32)  # right padding: causal, so positions < len(seq) are unaffected
            x[0, : len(seq)] = seq
            logits = np.asarray(forward(params, x))[0, : len(seq)].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            first = max(len(seq) - len(end), 1)
            out[i, j] = sum(logp[t - 1, seq[t]] for t in range(first, len(seq)))
    return out


def test_scorer_equals_reference_loop(tiny, tok):
    graphdef, params = tiny
    items = load_examples(DATA, limit=24)
    scorer = HellaSwagScorer(items, BLOCK, batch_size=8, buckets=(32, 48))
    lp, ntok = scorer.score_endings(graphdef, params)
    ref = reference_logprobs(graphdef, params, items, tok)
    np.testing.assert_allclose(lp, ref, rtol=0, atol=1e-5)
    labels = np.array([x.label for x in items])
    nchar = np.array([[len(e.encode("utf-8")) for e in x.endings] for x in items])  # bytes
    ntok_ref = np.array(
        [
            [
                min(len(tok.encode(" " + e)), len((tok.encode(x.context) + tok.encode(" " + e))[-BLOCK:]) - 1)
                for e in x.endings
            ]
            for x in items
        ]
    )
    np.testing.assert_array_equal(ntok, ntok_ref)
    for name, score in [("acc", ref), ("acc_norm", ref / nchar), ("acc_token_avg", ref / ntok_ref)]:
        np.testing.assert_array_equal(
            np.argmax(lp / {"acc": 1, "acc_norm": nchar, "acc_token_avg": ntok}[name], 1),
            np.argmax(score, 1),
            err_msg=name,
        )
    metrics = scorer(graphdef, params)
    expected = {
        "n": 24,
        "acc": np.mean(np.argmax(ref, 1) == labels),
        "acc_norm": np.mean(np.argmax(ref / nchar, 1) == labels),
        # build-nanogpt: the smallest mean token loss
        "acc_token_avg": np.mean(np.argmin(-ref / ntok_ref, 1) == labels),
    }
    assert metrics == pytest.approx(expected, abs=0)


@pytest.mark.slow
def test_compiles_once_per_bucket(tiny):
    graphdef, params = tiny
    items = load_examples(DATA, limit=40)
    scorer = HellaSwagScorer(items, BLOCK, batch_size=4, buckets=(32, 48))
    assert scorer.buckets == (32, 48, 64)
    used = {shape[2] for shape in scorer.shapes}
    assert len(used) == len(scorer.shapes) >= 2  # several buckets in play, each with several batches
    assert sum(s[0] for s in scorer.shapes) > len(scorer.shapes)
    first = scorer(graphdef, params)
    assert scorer.compiles == len(scorer.shapes)
    assert scorer(graphdef, params) == first and scorer.compiles == len(scorer.shapes)  # no retrace
    # New parameters (a later training step) reuse the compiled functions.
    params2 = jax.tree.map(lambda p: p * 1.01, params)
    scorer(graphdef, params2)
    assert scorer.compiles == len(scorer.shapes)


def test_batch_size_and_padding_do_not_change_scores(tiny):
    graphdef, params = tiny
    items = load_examples(DATA, limit=10)
    a, _ = HellaSwagScorer(items, BLOCK, batch_size=3).score_endings(graphdef, params)  # padded last batch
    b, _ = HellaSwagScorer(items, BLOCK, batch_size=16).score_endings(graphdef, params)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_metric_definitions():
    # Ending 0 has the best sum, ending 1 the best per character, ending 2 the best per token.
    lp = np.array([[-10.0, -12.0, -15.0, -40.0]])
    ntok = np.array([[2, 4, 10, 20]])
    nchar = np.array([[5, 24, 20, 40]])
    for label, key in [(0, "acc"), (1, "acc_norm"), (2, "acc_token_avg")]:
        m = hellaswag_metrics(lp, ntok, nchar, np.array([label]))
        assert m[key] == 1.0 and sum(m[k] for k in ("acc", "acc_norm", "acc_token_avg")) == 1.0


def test_default_buckets():
    assert default_buckets(1024) == (64, 128, 256, 512, 1024)
    assert default_buckets(128) == (64, 128)
    assert default_buckets(48) == (48,)
    assert default_buckets(300) == (64, 128, 256, 300)
