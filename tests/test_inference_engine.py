"""The continuous-batching engine and its per-row sampler: the same tokens alone, in a busy batch and
from the Generator; slots freed by stops, budgets and cancels; cache shifts; sampling rules equal to
sampling.filter_logits."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgpt_jax.inference import row_sampling
from fgpt_jax.inference.engine import Engine, EngineBusy, EngineClosed, SamplingParams
from fgpt_jax.inference.generator import Generator
from fgpt_jax.inference.sampling import filter_logits
from fgpt_jax.model import GPT, GPTConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    """A random model with its weights scaled x3: a plain random init repeats one token greedily, this one
    gives varied text that depends on the whole context, so a wrong position, row or slot shows."""
    m = GPT(GPTConfig.preset("tiny", n_layer=2, block_size=64), rngs=nnx.Rngs(0))
    nnx.update(m, jax.tree.map(lambda x: x * 3, nnx.state(m, nnx.Param)))
    return m


@pytest.fixture(scope="module")
def gen(model):
    return Generator.from_model(model, stop_ids=())


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuation by the plain forward pass over a fixed [1, context] buffer (one compile; an
    independent check of the cache arithmetic), with the Generator's rule for over-long prompts."""
    graphdef, params = nnx.split(model)
    # The argmax at position i only: not the whole [1, T, vocab] logits to the host per token.
    fwd = jax.jit(lambda p, x, i: jnp.argmax(nnx.merge(graphdef, p)(x)[0, i]))
    T = model.config.block_size

    def run(prompt, n):
        seq = list(prompt)[-(T - n) :]
        out = []
        for _ in range(n):
            buf = np.zeros((1, T), np.int32)
            buf[0, : len(seq)] = seq
            nxt = int(fwd(params, jnp.asarray(buf), len(seq) - 1))
            seq.append(nxt)
            out.append(nxt)
        return out

    return run


@pytest.fixture(scope="module")
def engine(model):
    with Engine(model, max_batch=4, max_queue=32, stop_ids=()) as eng:
        yield eng


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50257, n).tolist() for n in (3, 20, 7, 40, 1, 33, 12, 5, 17)]


def _wait(reqs, timeout=120):
    for r in reqs:
        assert r.finished.wait(timeout), "request did not finish"
    return reqs


# ---- per-row sampling ----


def test_filter_rows_equals_filter_logits_row_by_row():
    """Per-row (k, p), fast path and bisection fallback alike, keep exactly filter_logits' sets."""
    logits = jax.random.normal(jax.random.key(0), (6, 3000)) * jnp.asarray([[0.5], [2], [4], [8], [1], [3]])
    cases = [(0, 1.0), (5, 1.0), (0, 0.5), (40, 0.9), (200, 1.0), (0, 0.99)]  # 200 and 0.99: past the candidates
    k = jnp.asarray([c[0] for c in cases], jnp.int32)
    p = jnp.asarray([c[1] for c in cases], jnp.float32)
    for fn in (row_sampling.filter_rows, row_sampling.filter_rows_exact):
        got = np.isfinite(np.asarray(jax.jit(fn)(logits, k, p)))
        for b, (kb, pb) in enumerate(cases):
            want = np.isfinite(np.asarray(filter_logits(logits[b : b + 1], kb, pb)))[0]
            assert np.array_equal(got[b], want), (fn.__name__, b, got[b].sum(), want.sum())


def test_top_k_cutoff_is_the_kth_value():
    x = jax.random.normal(jax.random.key(1), (3, 1000)) * 100
    k = jnp.asarray([1, 17, 1000])
    want = [float(jax.lax.top_k(x[b], int(k[b]))[0][-1]) for b in range(3)]
    assert np.asarray(row_sampling.top_k_cutoff(x, k)).tolist() == want


def test_sample_rows_mixes_greedy_and_sampled_rows():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]] * 2))
    n = 4000
    keys = jax.random.split(jax.random.key(3), n * 2).reshape(n, 2)
    fn = jax.jit(
        jax.vmap(
            lambda kk: row_sampling.sample_rows(
                logits, kk, jnp.asarray([0.0, 1.0]), jnp.asarray([0, 0]), jnp.asarray([1.0, 0.8])
            )
        )
    )
    draws = np.asarray(fn(keys))
    assert set(draws[:, 0].tolist()) == {0}  # greedy row
    # top_p 0.8 keeps the first three; frequencies follow the renormalised nucleus.
    assert set(draws[:, 1].tolist()) == {0, 1, 2}
    np.testing.assert_allclose(
        np.bincount(draws[:, 1], minlength=3)[:3] / n, np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.03
    )


def test_draw_follows_the_distribution_and_skips_filtered_tokens():
    probs = np.zeros(300, np.float32)
    probs[[3, 130, 299]] = [0.2, 0.5, 0.3]  # across the 128-token blocks, and the padded last block
    logits = jnp.log(jnp.asarray(np.tile(probs, (5000, 1))))
    draws = np.asarray(jax.jit(row_sampling.draw)(logits, jax.random.split(jax.random.key(4), 5000)))
    assert set(draws.tolist()) <= {3, 130, 299}
    np.testing.assert_allclose([np.mean(draws == t) for t in (3, 130, 299)], [0.2, 0.5, 0.3], atol=0.03)


# ---- the engine ----


@pytest.mark.slow
def test_alone_equals_generator_and_the_full_forward(engine, gen, reference, prompts):
    for p in prompts[:3]:
        tokens = engine.generate(p, GREEDY).tokens
        assert tokens == gen.generate([p], 12, temperature=0)[0] == reference(p, 12)
        assert len(set(tokens)) >= 8  # varied text, not one repeated token


@pytest.mark.slow
def test_busy_batch_equals_alone(engine, reference, prompts):
    """More requests than slots, different lengths and budgets, joining while others decode."""
    budgets = [12, 3, 30, 12, 1, 25, 8, 12, 20]
    alone = [reference(p, n) for p, n in zip(prompts, budgets)]
    reqs = []
    for p, n in zip(prompts, budgets):
        reqs.append(engine.submit(p, SamplingParams(max_tokens=n, temperature=0)))
        time.sleep(0.01)  # staggered arrivals
    _wait(reqs)
    assert [r.tokens for r in reqs] == alone
    assert [r.finish_reason for r in reqs] == ["length"] * len(reqs)
    assert [r.generated for r in reqs] == budgets


@pytest.mark.slow
def test_seeded_sampling_is_the_same_alone_or_batched(engine, prompts):
    params = [
        SamplingParams(max_tokens=15, temperature=1.0, top_k=k, top_p=p, seed=i)
        for i, (k, p) in enumerate([(0, 1.0), (50, 1.0), (0, 0.9), (20, 0.95), (0, 1.0), (5, 0.5)])
    ]
    alone = [engine.generate(p, sp).tokens for p, sp in zip(prompts, params)]
    batched = _wait([engine.submit(p, sp) for p, sp in zip(prompts, params)])
    assert [r.tokens for r in batched] == alone
    assert alone[0] != engine.generate(prompts[0], SamplingParams(max_tokens=15, temperature=1.0, seed=99)).tokens


def test_cache_shifts_keep_long_generations_exact(engine, reference, prompts):
    """Generations long enough to run the shared index past the cache end several times (left shifts),
    with late joiners whose prompts need room on the left (right shifts)."""
    reqs, budgets = [], [60, 50, 23, 40, 63, 30]
    for p, n in zip(prompts, budgets):
        reqs.append(engine.submit(p, SamplingParams(max_tokens=n, temperature=0)))
        time.sleep(0.05)
    _wait(reqs)
    for p, n, r in zip(prompts, budgets, reqs):
        assert r.tokens == reference(p, n)


def test_prompt_longer_than_the_context_keeps_its_last_tokens(engine, gen):
    long = list(range(1000, 1100))
    r = engine.generate(long, GREEDY)
    assert r.prompt == long[-52:] and r.dropped_prompt_tokens == 48
    # The engine never slides its window: it keeps the prompt's last context - max_tokens tokens, and then
    # decodes exactly what the Generator decodes from that prompt (which fits without sliding).
    assert r.tokens == gen.generate([long[-52:]], 12, temperature=0)[0]


def test_stop_tokens_stop_and_free_the_slot(model, reference, prompts):
    greedy = reference(prompts[0], 12)
    stop = greedy[4]
    with Engine(model, max_batch=4, stop_ids=(stop,)) as eng:
        r = eng.generate(prompts[0], GREEDY)
        assert r.finish_reason == "stop" and r.tokens == greedy[: greedy.index(stop)]
        assert r.generated == len(r.tokens) + 1  # the stop token is counted, not returned
        assert eng.active_count() == 0


def test_cancel_frees_the_slot_for_the_queue(model, prompts):
    seen = []
    with Engine(model, max_batch=4, stop_ids=()) as eng:  # max_batch as the module's engine: no recompiles
        long = eng.submit(
            prompts[0], SamplingParams(max_tokens=63, temperature=0), listener=lambda r, t: seen.append(t)
        )
        others = [eng.submit(p, SamplingParams(max_tokens=63, temperature=0)) for p in prompts[1:4]]
        queued = eng.submit(prompts[4], GREEDY)
        while not seen:
            time.sleep(0.005)
        long.cancel()
        _wait([long, queued])
        assert long.finish_reason == "cancelled" and len(long.tokens) < 63
        assert queued.finish_reason == "length" and len(queued.tokens) == 12
        assert not all(o.finished.is_set() for o in others)  # the queued one ran in the cancelled one's slot
        assert seen[-1] is None and [t for t in seen if t is not None] == long.tokens
        _wait(others)


def test_a_long_request_does_not_starve_a_short_one(engine, prompts):
    started = threading.Event()
    long = engine.submit(prompts[0], SamplingParams(max_tokens=63, temperature=0), listener=lambda r, t: started.set())
    assert started.wait(60)  # the long one is decoding: 60 steps to go, the short one needs 5
    short = engine.submit(prompts[1], SamplingParams(max_tokens=5, temperature=0))
    _wait([short])
    assert not long.finished.is_set()
    _wait([long])


def test_listener_sees_tokens_in_order_then_none(engine, prompts):
    got, done = [], threading.Event()

    def listener(req, tok):
        got.append(tok)
        if tok is None:
            done.set()

    r = engine.submit(prompts[2], GREEDY, listener=listener)
    assert done.wait(60)
    assert got == r.tokens + [None]


def test_bad_requests_and_a_full_queue(model, engine):
    with pytest.raises(ValueError, match="max_tokens 64"):
        engine.submit([1], SamplingParams(max_tokens=64))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([60000], GREEDY)
    eng = Engine(model, max_batch=4, max_queue=1, stop_ids=())
    first = eng.submit([1, 2], SamplingParams(max_tokens=63, temperature=0))
    for _ in range(4):
        eng.submit([1, 2], SamplingParams(max_tokens=63, temperature=0))
    with pytest.raises(EngineBusy):
        eng.submit([1, 2], GREEDY)
    eng.close()
    assert first.finished.is_set() and first.finish_reason == "cancelled"
    with pytest.raises(EngineClosed):
        eng.submit([1, 2], GREEDY)


def test_warmup_compiles_without_disturbing_requests(model, prompts, reference):
    with Engine(model, max_batch=4, stop_ids=()) as eng:
        r = eng.submit(prompts[3], GREEDY)
        eng.warmup()
        assert _wait([r])[0].tokens == reference(prompts[3], 12)
