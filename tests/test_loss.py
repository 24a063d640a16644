"""The loss: the fused, chunked LM head + cross-entropy equals the plain path, and never holds the whole logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgpt_jax import sharding as shd
from fgpt_jax.config import apply_overrides, load_config
from fgpt_jax.data import Batch
from fgpt_jax.loss import fused_loss_sum, lm_loss_sums, make_eval_step, token_losses
from fgpt_jax.model import GPT, GPTConfig, tied_head
from fgpt_jax.train.step import build_setup

CFG = GPTConfig.preset("tiny", n_layer=1, block_size=32)


def _batch(B=3, T=21, seed=0, masked=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32) if masked else np.ones((B, T), np.float32)
    return Batch(jnp.asarray(tokens), jnp.asarray(mask))


def _loss_and_grads(cfg, batch):
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def mean_loss(p):
        total, count = lm_loss_sums(nnx.merge(graphdef, p), batch)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def _assert_trees_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        scale = float(jnp.abs(x).max()) or 1.0
        err = float(jnp.abs(x - y).max()) / scale
        assert err <= rtol, (jax.tree_util.keystr(path), err)


@pytest.fixture(scope="module")
def plain_float32():
    return _loss_and_grads(CFG, _batch())


@pytest.mark.parametrize("chunk", [8, 64])  # T=21: 3 chunks, the last padded; one chunk longer than T
def test_chunked_loss_and_grads_equal_plain_float32(chunk, plain_float32):
    loss, grads = plain_float32
    loss_c, grads_c = _loss_and_grads(dataclasses.replace(CFG, loss_chunk=chunk), _batch())
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
    _assert_trees_close(grads, grads_c, rtol=1e-5)


def test_fused_loss_sum_against_numpy_float64():
    """The fused function alone, against the definition: sum of weight * (logsumexp - target logit)."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(2, 9, 16)).astype(np.float32)
    w = rng.normal(size=(50, 16)).astype(np.float32)
    t = rng.integers(0, 50, (2, 9)).astype(np.int32)
    wt = (rng.random((2, 9)) > 0.4).astype(np.float32)
    logits = h.astype(np.float64) @ w.astype(np.float64).T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = float((wt * (lse - np.take_along_axis(logits, t[..., None], -1)[..., 0])).sum())
    for chunk in (1, 4, 9):
        got = float(jax.jit(fused_loss_sum, static_argnums=4)(h, w, t, wt, chunk))
        assert got == pytest.approx(want, rel=1e-6)
    # and its gradient against autodiff of the plain head + optax cross-entropy
    plain = lambda h, w: jnp.sum(token_losses(tied_head(h, w), t) * wt)  # noqa: E731
    fused = lambda h, w: fused_loss_sum(h, w, t, wt, 4)  # noqa: E731
    g_plain = jax.grad(plain, argnums=(0, 1))(h, w)
    g_fused = jax.grad(fused, argnums=(0, 1))(h, w)
    _assert_trees_close(g_plain, g_fused, rtol=1e-5)


def test_chunked_bfloat16_close_to_plain():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    batch = _batch(masked=False)
    loss, grads = _loss_and_grads(cfg, batch)
    loss_c, grads_c = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=8), batch)
    assert abs(float(loss_c) - float(loss)) < 1e-2
    _assert_trees_close(grads, grads_c, rtol=5e-2)  # bf16 rounding of dlogits, float32 accumulation


def test_eval_step_equal():
    batch = _batch()
    model = GPT(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    chunked_def = nnx.graphdef(GPT(dataclasses.replace(CFG, loss_chunk=5), rngs=nnx.Rngs(0)))
    a = make_eval_step(graphdef)(params, batch)
    b = make_eval_step(chunked_def)(params, batch)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


@pytest.mark.slow
def test_train_step_with_chunked_loss_matches():
    """The real jitted step (2 scanned micro-batches, AdamW), two steps: the same losses and
    gradient norms. (Parameters are not compared: Adam's first update is lr * sign(g), which turns
    float32 rounding of a near-zero gradient into a full-size difference.)"""
    base = apply_overrides(
        load_config("tiny"),
        ["model.n_layer=1", "model.block_size=16", "train.batch_size=4", "train.grad_accum=2", "optim.name=adamw"],
    )
    mesh = shd.make_mesh()
    batch = Batch.of_tokens(np.random.default_rng(3).integers(0, 50257, (2, 2, 17), dtype=np.int32))
    out = []
    for chunk in (0, 6):
        setup = build_setup(apply_overrides(base, [f"model.loss_chunk={chunk}"]), mesh)
        state, seen = setup.init(None), []
        for _ in range(2):
            state, metrics = setup.train_step(state, Batch(*(jnp.asarray(x) for x in batch)))
            seen += [float(metrics["train/loss"]), float(metrics["grad_norm"])]
        out.append(seen)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5)


def _temp_bytes(cfg, batch) -> int:
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    f = jax.jit(jax.grad(lambda p: lm_loss_sums(nnx.merge(graphdef, p), batch)[0]))
    return f.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_loss_never_holds_the_whole_logits():
    """XLA's own accounting of the compiled gradient program: the plain path keeps the [B, T, V]
    float32 logits (51.5 MB here) among its temporaries, the chunked path needs less than half of
    that in all (its largest buffers are one chunk's logits and the [V, D] head gradient)."""
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=32, n_head=2, block_size=64)
    batch = _batch(B=4, T=64, masked=False)
    logits_bytes = 4 * 64 * cfg.vocab_size * 4
    plain = _temp_bytes(cfg, batch)
    chunked = _temp_bytes(dataclasses.replace(cfg, loss_chunk=8), batch)
    assert plain >= logits_bytes
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)


def test_loss_chunk_validation():
    with pytest.raises(ValueError, match="loss_chunk"):
        GPTConfig(loss_chunk=-1)


def test_eval_step_sums_and_bits_per_byte_against_numpy(tok):
    """EvalSums against the definitions, in float64: the masked loss, and nanochat's bits per byte (the
    loss of the masked targets that are text / ln 2 / their UTF-8 bytes; special tokens count neither)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 50257, (3, 22)).astype(np.int32)
    tokens[0, 5], tokens[1, 9], tokens[2, 1] = tok.eot_id, tok.user_id, tok.end_id  # special targets
    mask = (rng.random((3, 21)) > 0.3).astype(np.float32)
    mask[0, 4] = mask[1, 8] = mask[2, 0] = 1.0  # ... that are masked in, so they must be left out of bpb
    graphdef, params = nnx.split(GPT(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    for cfg_def in (graphdef, nnx.graphdef(GPT(dataclasses.replace(CFG, loss_chunk=5), rngs=nnx.Rngs(0)))):
        sums = jax.device_get(make_eval_step(cfg_def)(params, Batch(jnp.asarray(tokens), jnp.asarray(mask))))
        logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens[:, :-1])), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        loss = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        nbytes = np.array([[len(tok.decode_bytes([t])) if t < tok.eot_id else 0 for t in row] for row in tokens[:, 1:]])
        text = (nbytes > 0) & (mask > 0)
        assert float(sums.tokens) == mask.sum()
        np.testing.assert_allclose(float(sums.loss), (loss * mask).sum(), rtol=1e-5)
        np.testing.assert_allclose(float(sums.nats), loss[text].sum(), rtol=1e-5)
        assert int(sums.bytes) == (nbytes * mask).sum() > 0
        assert float(sums.nats) < float(sums.loss)  # the special targets were left out


def test_token_bytes_table(tok):
    table = tok.token_bytes(50304)
    assert table.shape == (50304,) and table.dtype == np.int32
    assert table[tok.encode("Hello")[0]] == 5 and table[tok.encode(" world")[0]] == 6
    assert (table[tok.eot_id :] == 0).all()  # <|endoftext|>, the chat tokens and the padded vocabulary
    assert (table[: tok.eot_id] >= 1).all()
