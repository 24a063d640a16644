"""The jitted train step: the loss falls, accumulation equals one big batch, masked targets get no gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fgpt_jax import optim
from fgpt_jax.data import Batch
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.optim import OptimConfig, make_optimizer
from fgpt_jax.train.step import init_train_state, make_train_step


def _run(ocfg, tokens, steps, cfg=None, accum=1, tx=None):
    cfg = cfg or GPTConfig.preset("tiny", n_layer=2, block_size=16)
    tx = tx or make_optimizer(ocfg, 100)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.graphdef(model), init_train_state(model, tx, 0)
    step = make_train_step(graphdef, tx, functools.partial(optim.learning_rates, ocfg, 100))
    batch = Batch.of_tokens(tokens.reshape(accum, -1, tokens.shape[-1]))
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["train/loss"]))
    return state, losses


@pytest.mark.slow
@pytest.mark.parametrize("name,lr", [("muon", 3e-3), ("adamw", 3e-3)])
def test_loss_falls_on_repeated_batch(name, lr):
    tokens = np.random.default_rng(0).integers(0, 2000, (4, 17))
    _, losses = _run(OptimConfig(name=name, lr=lr, muon_lr=0.05, warmup_steps=1), tokens, 15)
    assert losses[-1] < losses[0] - 2.0, losses


def test_grad_accumulation_equals_big_batch():
    """4 micro-batches of 2 == one batch of 8: same loss, same gradient (float32).

    Plain SGD (lr 1) as the transform makes the parameter change equal the gradient; Adam or Muon
    would amplify float rounding on parameters whose true gradient is zero (e.g. the key bias).
    """
    tokens = np.random.default_rng(1).integers(0, 2000, (8, 17))
    ocfg = OptimConfig(name="adamw", warmup_steps=1)
    s1, l1 = _run(ocfg, tokens, 2, accum=1, tx=optax.sgd(1.0))
    s4, l4 = _run(ocfg, tokens, 2, accum=4, tx=optax.sgd(1.0))
    np.testing.assert_allclose(l1, l4, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_masked_loss_ignores_masked_targets():
    """Tokens under a zero mask get no gradient: changing them changes nothing."""
    cfg = GPTConfig.preset("tiny", n_layer=1, block_size=16)
    ocfg = OptimConfig(name="adamw", warmup_steps=1)
    tx = make_optimizer(ocfg, 10)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state0 = nnx.graphdef(model), init_train_state(model, tx, 0)
    step = make_train_step(graphdef, tx, functools.partial(optim.learning_rates, ocfg, 10))
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2000, (1, 2, 17))
    mask = np.ones((1, 2, 16), np.float32)
    mask[..., 10:] = 0  # targets 10..15 (= tokens 11..16) do not count
    b = a.copy()
    b[..., 11:] = rng.integers(0, 2000, b[..., 11:].shape)
    copy = lambda s: jax.tree.map(jnp.array, s)
    sa, ma = step(copy(state0), Batch(jnp.asarray(a, jnp.int32), jnp.asarray(mask)))
    sb, mb = step(copy(state0), Batch(jnp.asarray(b, jnp.int32), jnp.asarray(mask)))
    assert float(ma["train/loss"]) == pytest.approx(float(mb["train/loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)
