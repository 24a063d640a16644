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


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(name="sgd"), "name"),
        (dict(lr=0.0), "lr"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(schedule="step"), "schedule"),
    ],
)
def test_optim_config_validation(kwargs, err):
    with pytest.raises(ValueError, match=err):
        OptimConfig(**kwargs)


# -- FGPT's optimizer, step for step against torch.optim.Muon + torch.optim.AdamW ------------------


def _fgpt_optim(**overrides) -> OptimConfig:
    """The fgpt preset's optimizer at a constant learning rate (the schedule is tested elsewhere)."""
    import dataclasses

    from fgpt_jax.config import load_config

    cfg = load_config("fgpt").optim
    return dataclasses.replace(cfg, warmup_steps=0, plateau_steps=0, min_lr_ratio=1.0, **overrides)


def _torch_vs_ours(ocfg: OptimConfig, steps: int = 110, compare_from: int = 100):
    """Run our chain and FGPT's torch optimizers on the same weights and gradients; return the
    relative difference of their parameter updates over the last steps, per label group."""
    torch = pytest.importorskip("torch")
    cfg = GPTConfig.preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    labels = named_leaves(param_labels(params))
    names = sorted(labels)
    tx = make_optimizer(ocfg, steps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    # torch keeps Linear weights as (out, in): transpose our (in, out) kernels.
    flip = lambda name: name.endswith("/kernel")  # noqa: E731
    tp = {
        n: torch.nn.Parameter(torch.tensor(np.asarray(x).T.copy() if flip(n) else np.asarray(x)))
        for n, x in named_leaves(params).items()
    }
    muon = torch.optim.Muon(
        [tp[n] for n in names if labels[n] == "muon"], lr=ocfg.muon_lr, weight_decay=0.1, momentum=0.95
    )  # FGPT: torch.optim.Muon(hidden, lr=0.03)
    adamw = torch.optim.AdamW(
        [tp[n] for n in names if labels[n] == "adamw"], lr=ocfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    rng = np.random.default_rng(0)
    diffs = {"muon": [], "adamw_matrix": [], "adamw_vector": []}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    for k in range(steps):
        g = {n: rng.normal(0, 0.02, np.asarray(x).shape).astype(np.float32) for n, x in named_leaves(params).items()}
        grads = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params), [jnp.asarray(g[n]) for n in named_leaves(params)]
        )
        before_t = {n: p.detach().numpy().copy() for n, p in tp.items()}
        for n, p in tp.items():
            p.grad = torch.tensor(g[n].T.copy() if flip(n) else g[n])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), ocfg.grad_clip)
        muon.step()
        adamw.step()
        updates, state = update(grads, state, params)
        new = optax.apply_updates(params, updates)
        if k >= compare_from:
            ours, before = named_leaves(new), named_leaves(params)
            for n in names:
                d_ours = np.asarray(ours[n]) - np.asarray(before[n])
                d_t = tp[n].detach().numpy() - before_t[n]
                d_t = d_t.T if flip(n) else d_t
                group = "muon" if labels[n] == "muon" else "adamw_matrix" if d_t.ndim == 2 else "adamw_vector"
                diffs[group].append(np.linalg.norm(d_ours - d_t) / np.linalg.norm(d_t))
        params = new
    return {k: float(np.max(v)) for k, v in diffs.items()}


def test_fgpt_preset_is_fgpts_torch_optimizer():
    """FGPT built torch.optim.Muon(hidden, lr=0.03) (PyTorch's default decoupled weight decay 0.1) and
    AdamW(rest, 3e-4, (0.9, 0.95), weight_decay=0.1) on every other parameter. After optax's
    bias-corrected momentum has caught up with torch's plain EMA (0.95^100 < 0.6%), the updates
    agree up to torch's bfloat16 Newton-Schulz rounding."""
    d = _torch_vs_ours(_fgpt_optim())
    assert d["muon"] < 0.03, d
    assert d["adamw_matrix"] < 1e-3 and d["adamw_vector"] < 1e-3, d


def test_the_old_fgpt_preset_was_not_fgpts_optimizer():
    """The 0.1 preset (no Muon weight decay, AdamW decay on matrices only) is caught by the comparison."""
    d = _torch_vs_ours(_fgpt_optim(muon_weight_decay=0.0, weight_decay_on="matrices"))
    assert d["muon"] > 0.05 and d["adamw_vector"] > 0.2, d


def test_bf16_newton_schulz_stays_close_to_float32():
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 0.01, params)
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = make_optimizer(OptimConfig(ns_dtype=dtype, warmup_steps=0), 10)
        st = tx.init(params)
        out[dtype] = named_leaves(tx.update(grads, st, params)[0])
        assert jax.tree.structure(st) == jax.tree.structure(make_optimizer(OptimConfig(), 10).init(params))
    for name, label in named_leaves(param_labels(params)).items():
        a, b = np.asarray(out["float32"][name]), np.asarray(out["bfloat16"][name])
        assert b.dtype == np.float32
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert rel < (0.03 if label == "muon" else 1e-6), (name, rel)  # bf16 rounding, as torch's (~2%)


def test_restart_schedule_resets_schedules_only():
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(OptimConfig(warmup_steps=2), 10)
    st = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, st = tx.update(grads, st, params)
    restarted = optim.restart_schedule(st)
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    scheds = [x for x in jax.tree.leaves(restarted, is_leaf=is_sched) if is_sched(x)]
    assert len(scheds) == 2 and all(int(x.count) == 0 for x in scheds)  # Muon's and AdamW's schedules
    kept = [x for x in jax.tree.leaves(st, is_leaf=is_sched) if not is_sched(x)]
    again = [x for x in jax.tree.leaves(restarted, is_leaf=is_sched) if not is_sched(x)]
    for a, b in zip(kept, again):  # moments and Adam/Muon counts unchanged
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(int(np.asarray(x)) == 3 for x in kept if np.ndim(x) == 0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", float("nan")),
        ("muon_lr", float("inf")),
        ("beta1", 1.5),
        ("beta2", -0.1),
        ("eps", -1e-8),
        ("weight_decay", float("nan")),
        ("ns_steps", 0),
        ("muon_momentum", 1.0),
    ],
)
def test_optim_config_refuses_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**{field: value})
