"""KV-cache decoding and sampling: exactness against the full forward pass, sampling sets, stops,
batching, streaming, and the generate CLI on a run written by the trainer."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgpt_jax.inference.generator import Generator, TextStreamer
from fgpt_jax.inference.sampling import filter_logits, sample_token
from fgpt_jax.model import GPT, GPTConfig, init_cache


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig.preset("tiny", block_size=64, n_layer=2), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def full_forward(model):
    """logits of `seq` from the plain forward pass, padded to the context (causal: padding is inert).
    One fixed shape, so it compiles once for the whole module."""
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def run(seq):
        buf = np.zeros((1, model.config.block_size), np.int32)
        buf[0, : len(seq)] = seq
        return np.asarray(fwd(params, jnp.asarray(buf))[0, : len(seq)])

    return run


def test_kv_cache_logits_equal_full_forward(model, full_forward):
    """Prefill of left-padded prompts + one-token steps == the full forward at every position."""
    rng = np.random.default_rng(0)
    lengths, n_new, P = [9, 5, 1], 12, 16
    seqs = [rng.integers(0, 50257, n + n_new) for n in lengths]
    prompt = np.zeros((3, P), np.int32)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        prompt[b, P - n :] = s[:n]
    graphdef, params = nnx.split(model)
    decode = jax.jit(lambda p, x, c: nnx.merge(graphdef, p).decode(x, c))
    cache = init_cache(model.config, 3, 32, start_B=[P - n for n in lengths])
    logits_prefill, cache = decode(params, jnp.asarray(prompt), cache)
    steps = []
    for i in range(n_new):
        tok = np.asarray([s[n + i] for s, n in zip(seqs, lengths)], np.int32)[:, None]
        logits, cache = decode(params, jnp.asarray(tok), cache)
        steps.append(np.asarray(logits[:, 0]))
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        full = full_forward(s)  # [n + n_new, V]
        np.testing.assert_allclose(np.asarray(logits_prefill[b, P - n :]), full[:n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.stack([x[b] for x in steps]), full[n:], rtol=1e-5, atol=1e-5)


def _greedy_reference(full_forward, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_forward(seq)[-1])))
    return seq[len(prompt) :]


def test_greedy_is_deterministic_and_matches_full_forward(model, full_forward):
    gen = Generator.from_model(model, stop_ids=())
    prompt = [464, 2068, 7586, 21831]
    a = gen.generate([prompt], max_new_tokens=10, temperature=0, seed=1)[0]
    b = gen.generate([prompt], max_new_tokens=10, temperature=0, seed=2)[0]
    assert a == b == _greedy_reference(full_forward, prompt, 10)


def test_batch_of_different_lengths_equals_one_by_one(model):
    gen = Generator.from_model(model, stop_ids=())
    prompts = [[464], [464, 2068, 7586, 21831, 18045, 625, 262], [15496, 995, 11]]
    batch = gen.generate(prompts, max_new_tokens=8, temperature=0)
    single = [gen.generate([p], max_new_tokens=8, temperature=0)[0] for p in prompts]
    assert batch == single


def test_stream_equals_generate(model):
    gen = Generator.from_model(model, stop_ids=())
    prompt = [464, 2068]
    assert list(gen.stream(prompt, max_new_tokens=9, temperature=0)) == gen.generate([prompt], 9, temperature=0)[0]
    sampled = list(gen.stream(prompt, max_new_tokens=9, temperature=1.0, seed=3))
    assert len(sampled) == 9 and sampled == list(gen.stream(prompt, max_new_tokens=9, temperature=1.0, seed=3))


def test_stop_tokens_stop(model):
    prompt = [464, 2068, 7586]
    greedy = Generator.from_model(model, stop_ids=()).generate([prompt], 10, temperature=0)[0]
    third = greedy[2]
    first_hit = greedy.index(third)
    gen = Generator.from_model(model, stop_ids=(third,))
    out = gen.generate([prompt], 10, temperature=0)[0]
    assert out == greedy[: first_hit + 1] and out[-1] == third
    assert list(gen.stream(prompt, 10, temperature=0)) == out
    # In a batch, a stopped row stops while the others go on.
    rows = gen.generate([prompt, [15496, 995]], 10, temperature=0)
    assert rows[0] == out


def test_top_k_never_leaves_its_set():
    logits = jax.random.normal(jax.random.key(0), (1, 1000)) * 3
    allowed = set(np.argsort(-np.asarray(logits[0]))[:7].tolist())
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = jax.vmap(lambda k: sample_token(logits, k, temperature=1.5, top_k=7))(keys)
    drawn = set(np.asarray(draws).ravel().tolist())
    assert drawn <= allowed and len(drawn) >= 5


def test_top_p_never_leaves_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # Mass before each token (sorted): 0, .5, .7, .85, .95 -> top_p=0.8 keeps the first three.
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.8)))[0]
    assert kept.tolist() == [True, True, True, False, False]
    assert np.isfinite(np.asarray(filter_logits(logits, top_p=0.5)))[0].tolist() == [True, False, False, False, False]
    keys = jax.random.split(jax.random.key(2), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_p=0.8))(keys)).ravel()
    assert set(draws.tolist()) == {0, 1, 2}
    # Frequencies follow the renormalised nucleus (0.5, 0.2, 0.15) / 0.85.
    np.testing.assert_allclose(
        np.bincount(draws, minlength=3)[:3] / len(draws), np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.04
    )


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(3), (4, 50))
    assert np.array_equal(sample_token(logits, jax.random.key(0), temperature=0), np.argmax(logits, -1))


def test_bad_lengths(model):
    gen = Generator.from_model(model)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens .*: expected an integer >= 1"):
            gen.generate([[1]], max_new_tokens=bad)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        gen.stream([], max_new_tokens=4)  # raised at the call, before any token is asked for


def _sliding_reference(full_forward, prompt, n, L, keep, pad=0):
    """Greedy tokens under the sliding-window policy, from the plain forward pass: the first window
    holds the context minus the prompt's left padding; when a window would exceed it, the next one
    starts from the last `keep` tokens."""
    seq, w, cap = list(prompt)[-L:], 0, L - pad
    for _ in range(n):
        if len(seq) - w > cap:
            w, cap = len(seq) - keep, L
        seq.append(int(np.argmax(full_forward(seq[w:])[-1])))
    return seq[-n:]


@pytest.mark.slow
def test_generates_past_the_context(model, full_forward):
    """A 64-token context generates 200 tokens: greedy generate == greedy stream; each window
    continues the text (== the plain forward pass over that window); the tokens before the first
    slide are plain greedy decoding. Both prompts share one bucket: one compiled program."""
    L = model.config.block_size
    gen = Generator.from_model(model, stop_ids=())
    assert gen.keep == L // 2
    prompt = [
        464,
        2068,
        7586,
        21831,
        18045,
        625,
        262,
        16931,
        3290,
        13,
        383,
        2068,
        7586,
        21831,
        18045,
        625,
    ]  # 16: no pad
    out = gen.generate([prompt], max_new_tokens=200, temperature=0)[0]
    assert len(out) == 200
    assert list(gen.stream(prompt, max_new_tokens=200, temperature=0)) == out
    assert out == _sliding_reference(full_forward, prompt, 200, L, L // 2)
    assert out[: L - len(prompt)] == _greedy_reference(full_forward, prompt, L - len(prompt))
    # A 4-token prompt sits in the same 16-slot bucket: its first window is 12 tokens shorter.
    short = prompt[:4]
    out = gen.generate([short], max_new_tokens=200, temperature=0)[0]
    assert out == list(gen.stream(short, max_new_tokens=200, temperature=0))
    assert out == _sliding_reference(full_forward, short, 200, L, L // 2, pad=12)


def test_prompt_longer_than_the_context_keeps_its_last_tokens(model, full_forward):
    gen = Generator.from_model(model, stop_ids=())
    L = model.config.block_size
    long = list(range(1000, 1100))
    out = gen.generate([long], max_new_tokens=20, temperature=0)[0]
    assert out == gen.generate([long[-L:]], max_new_tokens=20, temperature=0)[0]
    assert out == list(gen.stream(long, max_new_tokens=20, temperature=0))
    assert out == _sliding_reference(full_forward, long, 20, L, L // 2)


def test_within_the_context_nothing_slides(model, full_forward):
    """prompt + new tokens == the context: one window, plain greedy decoding to the last slot."""
    gen = Generator.from_model(model, stop_ids=())
    prompt = [464, 2068, 7586, 21831]
    n = model.config.block_size - len(prompt)
    out = gen.generate([prompt], max_new_tokens=n, temperature=0)[0]
    assert out == _greedy_reference(full_forward, prompt, n) == list(gen.stream(prompt, n, temperature=0))


@pytest.mark.slow
def test_sampling_past_the_context_is_reproducible(model):
    """Sampled past the context: the same seed gives the same tokens, generated or streamed."""
    gen = Generator.from_model(model, stop_ids=())
    prompt = [464, 2068]
    a = gen.generate([prompt], max_new_tokens=120, temperature=1.0, top_k=20, seed=5)[0]
    assert len(a) == 120 and a == gen.generate([prompt], max_new_tokens=120, temperature=1.0, top_k=20, seed=5)[0]
    assert list(gen.stream(prompt, max_new_tokens=120, temperature=1.0, top_k=20, seed=5)) == a
    assert a != gen.generate([prompt], max_new_tokens=120, temperature=1.0, top_k=20, seed=6)[0]


def test_top_k_past_the_vocabulary_keeps_all():
    """top_k >= the vocabulary keeps every token (it was a shape error from lax.top_k)."""
    logits = jax.random.normal(jax.random.key(4), (2, 300))
    np.testing.assert_array_equal(filter_logits(logits, top_k=100_000), logits)
    np.testing.assert_array_equal(filter_logits(logits, top_k=300), logits)
    key = jax.random.key(9)
    assert np.array_equal(sample_token(logits, key, 1.0, top_k=100_000), sample_token(logits, key, 1.0, top_k=0))


def test_text_streamer_holds_split_characters():
    from fgpt_jax.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode("café 🙂 ok")
    s = TextStreamer()
    pieces = [s.push(t) for t in ids] + [s.flush()]
    assert "".join(pieces) == "café 🙂 ok"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
def test_generate_cli_on_trained_run(tmp_path):
    from fgpt_jax.config import apply_overrides, load_config
    from fgpt_jax.train import train

    cfg = apply_overrides(
        load_config("tiny"),
        [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=32",
            "train.steps=2",
            "train.batch_size=2",
            "train.eval_every=0",
            "train.sample_tokens=4",
        ],
    )
    train(cfg, tmp_path / "run")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.generate",
            "--run",
            str(tmp_path / "run"),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time")
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.generate",
            "--run",
            str(tmp_path / "run"),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--num-samples",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r2.returncode == 0 and len(r2.stdout.strip().splitlines()) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.generate", "--run", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
