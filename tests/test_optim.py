import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import scale_by_muon

from fgpt_jax import optim
from fgpt_jax.model import GPT, GPTConfig, abstract_model, named_leaves
from fgpt_jax.optim import NS_COEFFS, OptimConfig, lr_multiplier, make_optimizer, param_labels

MUON_SUFFIXES = ("attn/c_attn/kernel", "attn/c_proj/kernel", "mlp/c_fc/kernel", "mlp/c_proj/kernel")


def test_labels_explicit_and_complete():
    params = nnx.state(abstract_model(GPTConfig.preset("gpt2")), nnx.Param)
    labels = named_leaves(param_labels(params))
    shapes = named_leaves(params)
    assert labels.keys() == {k for k in shapes}  # every parameter has exactly one label
    assert set(labels.values()) == {"muon", "adamw"}
    for name, label in labels.items():
        is_hidden = name.startswith("h/") and name.endswith(MUON_SUFFIXES)
        assert label == ("muon" if is_hidden else "adamw"), name
    # The 2-D matrices that must NOT be Muon, although optax.contrib.muon's ndim rule would pick them.
    assert labels["wte/embedding"] == labels["wpe/embedding"] == "adamw"
    assert sum(v == "muon" for v in labels.values()) == 4 * 12
    n_muon = sum(math.prod(shapes[k].shape) for k, v in labels.items() if v == "muon")
    assert n_muon == 12 * 12 * 768 * 768  # all hidden matrices: 12 D^2 per block


def _ns_reference(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic Newton-Schulz iteration in float64 numpy."""
    a, b, c = NS_COEFFS
    x = g.astype(np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (48, 48)])
def test_newton_schulz_matches_float64_reference(shape):
    g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    # beta=0: the momentum is the gradient itself, so the update is exactly NS(g).
    tx = scale_by_muon(ns_coeffs=NS_COEFFS, ns_steps=5, beta=0.0, nesterov=False)
    out, _ = tx.update(g, tx.init(g))
    ref = _ns_reference(np.asarray(g))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-5)
    # It approximately orthogonalises: singular values land near 1 (in (0.5, 1.5) by design).
    s = np.linalg.svd(ref, compute_uv=False)
    assert 0.4 < s.min() and s.max() < 1.6


def test_muon_update_of_hidden_matrix():
    """First update of c_fc (in D, out 4D): -muon_lr * warmup * sqrt(4) * NS(grad); embeddings get Adam."""
    cfg = GPTConfig.preset("tiny", n_layer=1, block_size=8)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    ocfg = OptimConfig(warmup_steps=4, grad_clip=0.0, muon_weight_decay=0.0, weight_decay=0.0)
    tx = make_optimizer(ocfg, 100)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = np.asarray(grads["h"][0]["mlp"]["c_fc"]["kernel"][...])
    want = -ocfg.muon_lr * (1 / 4) * math.sqrt(4) * _ns_reference(g)
    np.testing.assert_allclose(np.asarray(updates["h"][0]["mlp"]["c_fc"]["kernel"][...]), want, rtol=1e-3, atol=1e-6)
    # Adam's first step is lr * sign(g) (bias-corrected m/sqrt(v)), up to eps.
    ge = np.asarray(grads["wte"]["embedding"][...])
    ue = np.asarray(updates["wte"]["embedding"][...])
    big = np.abs(ge) > 1e-3  # where eps (1e-8) is negligible next to |g|
    np.testing.assert_allclose(ue[big], -ocfg.lr * (1 / 4) * np.sign(ge[big]), rtol=1e-4)


def test_schedule_shapes():
    cfg = OptimConfig(warmup_steps=10, plateau_steps=20, min_lr_ratio=0.1)
    f = lr_multiplier(cfg, 100)
    assert float(f(0)) == pytest.approx(0.1)  # the first update is never at lr 0
    assert float(f(9)) == pytest.approx(1.0)
    assert float(f(10)) == pytest.approx(1.0) and float(f(30)) == pytest.approx(1.0)  # plateau
    assert float(f(99)) == pytest.approx(0.1)  # the floor at the last step
    mid = float(f(30 + (99 - 30) // 2))
    assert 0.5 < mid < 0.6  # cosine halfway: 0.1 + 0.9 * ~0.5
    wsd = lr_multiplier(OptimConfig(schedule="wsd", warmup_steps=10, plateau_steps=70, min_lr_ratio=0.0), 100)
    assert float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(89)) == pytest.approx(1 - 9 / 19, rel=1e-5)  # linear decay
    assert float(wsd(99)) == pytest.approx(0.0, abs=1e-7)
    vals = [float(f(s)) for s in range(100)]
    assert all(a >= b - 1e-7 for a, b in zip(vals[30:], vals[31:]))  # monotone decay


@pytest.mark.parametrize("kwargs,err", [
    (dict(name="sgd"), "name"), (dict(lr=0.0), "lr"), (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(schedule="step"), "schedule"),
])
def test_optim_config_validation(kwargs, err):
    with pytest.raises(ValueError, match=err):
        OptimConfig(**kwargs)
