import importlib
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
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # jitted: eager op-by-op is 10x slower
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
        (dict(muon_momentum_rule="keller"), "muon_momentum_rule"),
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


def _torch_vs_ours(ocfg: OptimConfig, steps: int = 8) -> list[dict]:
    """Run our chain and FGPT's torch optimizers on the same weights and gradients (a fixed direction
    plus fresh noise each step, so momentum matters) for `steps` updates. Per step: {parameter:
    (relative difference of the two updates, relative difference of the parameters after it)}."""
    torch = pytest.importorskip("torch")
    cfg = GPTConfig.preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    labels = named_leaves(param_labels(params))
    names = list(named_leaves(params))
    tx = make_optimizer(ocfg, steps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    # torch keeps Linear weights as (out, in): transpose our (in, out) kernels.
    to_torch = lambda n, x: x.T.copy() if n.endswith("/kernel") else x  # noqa: E731
    tp = {n: torch.nn.Parameter(torch.tensor(to_torch(n, np.asarray(x)))) for n, x in named_leaves(params).items()}
    muon = torch.optim.Muon(
        [tp[n] for n in names if labels[n] == "muon"], lr=ocfg.muon_lr, weight_decay=0.1, momentum=0.95
    )  # FGPT: torch.optim.Muon(hidden, lr=0.03); PyTorch's defaults: Nesterov, bf16 Newton-Schulz
    adamw = torch.optim.AdamW(
        [tp[n] for n in names if labels[n] == "adamw"], lr=ocfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    rng = np.random.default_rng(0)
    direction = {n: rng.normal(0, 0.02, np.shape(x)) for n, x in named_leaves(params).items()}
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    out = []
    for _ in range(steps):
        g = {n: (d + rng.normal(0, 0.02, d.shape)).astype(np.float32) for n, d in direction.items()}
        grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [jnp.asarray(g[n]) for n in names])
        before = {n: p.detach().numpy().copy() for n, p in tp.items()}
        mine_before = {n: to_torch(n, np.asarray(x)) for n, x in named_leaves(params).items()}
        for n, p in tp.items():
            p.grad = torch.tensor(to_torch(n, g[n]))
        torch.nn.utils.clip_grad_norm_(list(tp.values()), ocfg.grad_clip)
        muon.step()
        adamw.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ours = named_leaves(params)
        step = {}
        for n in names:
            theirs = tp[n].detach().numpy()
            mine = to_torch(n, np.asarray(ours[n]))
            step[n] = (rel(mine - mine_before[n], theirs - before[n]), rel(mine, theirs))
        out.append(step)
    return out


def _groups(step: dict, labels: dict, which: int) -> dict[str, list[float]]:
    """A step's differences (0: updates, 1: parameters) by group: muon, adamw."""
    out = {"muon": [], "adamw": []}
    for n, d in step.items():
        out[labels[n]].append(d[which])
    return out


@pytest.fixture(scope="module")
def tiny_labels():
    cfg = GPTConfig.preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    return named_leaves(param_labels(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)))


@pytest.mark.slow
def test_fgpt_preset_is_fgpts_torch_optimizer(tiny_labels):
    """FGPT built torch.optim.Muon(hidden, lr=0.03) (PyTorch's defaults: momentum 0.95 without bias
    correction, Nesterov, bf16 Newton-Schulz, decoupled weight decay 0.1) and AdamW(rest, 3e-4,
    (0.9, 0.95), weight_decay=0.1) on every other parameter. The preset's chain follows them from the
    first step, every step, updates and parameters.

    Tolerances, from what was measured (8 steps; 2-core x86 CPU VM, torch 2.13, jax 0.10):
    - Muon updates (8 matrices): many agree to float32 rounding (1e-5), since the momentum repeats
      torch's lerp and newton_schulz_bf16 its bf16 roundings op by op. Where the float32 sums of a
      matmul (torch's kernels and XLA's add in another order) or of the clipping norm round one bf16
      element the other way, the iteration carries that one ulp to up to 0.9% of the matrix's update.
      Measured: max 0.90%, mean over the matrices <= 0.28% each step. Bounds: max < 1.5% (one such
      rounding; torch's own bf16 iteration is 1.4% from exact float32) and mean < 0.5%, which
      float32 Newton-Schulz (mean 1.4%, next test) and optax's momentum (7.5% at step 2) fail.
    - AdamW updates: to float32 resolution. Seen as a parameter difference, an update of lr = 3e-4
      on a LayerNorm scale of 1.0 is known to one float32 ulp (1.2e-7), 4e-4 relative (measured max
      2.6e-4): < 1e-3. AdamW parameters: measured 2.4e-7, < 1e-6.
    - Muon parameters: measured 0.18% at most (an update here is ~19% of the matrix): < 0.4%."""
    steps = _torch_vs_ours(_fgpt_optim())
    assert len(steps) >= 5
    for k, step in enumerate(steps, 1):
        upd, par = _groups(step, tiny_labels, 0), _groups(step, tiny_labels, 1)
        assert max(upd["muon"]) < 1.5e-2 and float(np.mean(upd["muon"])) < 5e-3, (k, upd["muon"])
        assert max(upd["adamw"]) < 1e-3 and max(par["adamw"]) < 1e-6, (k, upd["adamw"], par["adamw"])
        assert max(par["muon"]) < 4e-3, (k, par["muon"])


def test_optax_momentum_rule_is_not_torchs(tiny_labels):
    """optax's bias-corrected Nesterov step (the fgpt preset's before 0.3) is caught: at step 1 both
    rules are proportional to the gradient, so only bf16 rounding of a differently scaled input
    separates them (measured mean 1.8%); from step 2 the direction differs (measured max 12%,
    mean 7.5% at step 2)."""
    steps = _torch_vs_ours(_fgpt_optim(muon_momentum_rule="optax"), steps=3)
    muon = [_groups(step, tiny_labels, 0)["muon"] for step in steps]
    assert float(np.mean(muon[0])) < 3e-2, muon[0]
    assert max(muon[1]) > 0.08 and float(np.mean(muon[1])) > 0.04, muon[1]


def test_newton_schulz_float32_is_not_torchs(tiny_labels):
    """`ns_dtype=float32` with torch's momentum: torch's bf16 rounding apart (measured mean 1.39-1.49%,
    max 1.57%), so the mean bound of the preset's test above can tell the two precisions apart."""
    steps = _torch_vs_ours(_fgpt_optim(ns_dtype="float32"), steps=3)
    for step in steps:
        muon = _groups(step, tiny_labels, 0)["muon"]
        assert max(muon) < 2.5e-2 and float(np.mean(muon)) > 1e-2, muon


def test_the_old_fgpt_preset_was_not_fgpts_optimizer(tiny_labels):
    """The 0.1 preset (no Muon weight decay, AdamW decay on matrices only) is caught by the comparison
    (measured: Muon mean 1.7%, AdamW max 10-14%)."""
    steps = _torch_vs_ours(_fgpt_optim(muon_weight_decay=0.0, weight_decay_on="matrices"), steps=3)
    for step in steps:
        upd = _groups(step, tiny_labels, 0)
        assert float(np.mean(upd["muon"])) > 1e-2 and max(upd["adamw"]) > 5e-2, upd


def test_newton_schulz_bf16_is_torchs():
    """newton_schulz_bf16 against torch.optim.Muon's own iteration (`_zeropower_via_newtonschulz`, a
    private function: skipped if torch renames it), on torch's (out, in) layout of our kernels: wide,
    tall and square (where the orientation decides the rounding): bitwise equal, or up to ~0.5% where
    one bf16 rounding differs (float32 summation order in the matmuls); torch's bf16 vs exact
    float32 is 1.4%. Measured on these 12 inputs: 7 bitwise equal, max 0.53%, mean 0.08%."""
    torch = pytest.importorskip("torch")
    zeropower = getattr(importlib.import_module("torch.optim._muon"), "_zeropower_via_newtonschulz", None)
    if zeropower is None:
        pytest.skip("torch.optim._muon._zeropower_via_newtonschulz not in this torch")
    rng = np.random.default_rng(0)
    ns = jax.jit(lambda x: optim.newton_schulz_bf16(x, 5))
    diffs = []
    for shape in [(64, 192), (192, 64), (64, 64), (64, 256), (256, 64), (48, 48)]:
        for scale in (1.0, 0.02):
            g = (rng.normal(0, scale, shape)).astype(np.float32)  # our (in, out) kernel
            want = zeropower(torch.tensor(g.T.copy()), NS_COEFFS, 5, 1e-7).float().numpy().T
            got = np.asarray(ns(jnp.asarray(g)))
            diffs.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
            exact = _ns_reference(g)
            assert np.linalg.norm(want - exact) / np.linalg.norm(exact) > 5e-3  # torch's is bf16 indeed
    assert max(diffs) < 1e-2 and float(np.mean(diffs)) < 2.5e-3, diffs
    assert sum(d == 0 for d in diffs) >= 3, diffs  # torch's bits, not only its accuracy


@pytest.mark.slow
def test_bf16_newton_schulz_stays_close_to_float32():
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 0.01, params)
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = make_optimizer(OptimConfig(ns_dtype=dtype, warmup_steps=0), 10)
        st = tx.init(params)
        out[dtype] = named_leaves(jax.jit(tx.update)(grads, st, params)[0])
        assert jax.tree.structure(st) == jax.tree.structure(make_optimizer(OptimConfig(), 10).init(params))
    for name, label in named_leaves(param_labels(params)).items():
        a, b = np.asarray(out["float32"][name]), np.asarray(out["bfloat16"][name])
        assert b.dtype == np.float32
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert rel < (0.03 if label == "muon" else 1e-6), (name, rel)  # bf16 rounding, as torch's (~2%)


def test_torch_momentum_rule_against_numpy():
    """Without torch: three steps of the torch rule on c_fc (in D, out 4D) against a float64 NumPy
    reference, buf = b buf + (1 - b) g, update = -muon_lr * sqrt(4) * NS((1 - b) g + b buf).
    The optax rule differs from it from step 2 on."""
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    b, lr = 0.95, 0.02
    keys = jax.random.split(jax.random.key(3), 3)
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape) * 0.01, params) for k in keys]
    got = {}
    for rule in ("torch", "optax"):
        ocfg = OptimConfig(muon_momentum_rule=rule, muon_lr=lr, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0)
        tx = make_optimizer(ocfg, 10)
        st, update = tx.init(params), jax.jit(tx.update)
        got[rule] = []
        for g in grads:
            u, st = update(g, st, params)
            got[rule].append(np.asarray(u["h"][0]["mlp"]["c_fc"]["kernel"][...]))
    buf = 0.0
    for k, g in enumerate(grads):
        gk = np.asarray(g["h"][0]["mlp"]["c_fc"]["kernel"][...], np.float64)
        buf = b * buf + (1 - b) * gk
        want = -lr * 2.0 * _ns_reference((1 - b) * gk + b * buf)
        np.testing.assert_allclose(got["torch"][k], want, rtol=1e-3, atol=1e-6)
        rel = np.linalg.norm(got["optax"][k] - want) / np.linalg.norm(want)
        assert rel < 1e-3 if k == 0 else rel > 0.03, (k, rel)


@pytest.mark.slow
def test_momentum_rules_share_one_resumable_state():
    """Both rules and both Newton-Schulz dtypes keep the same state (structure, shapes, dtypes) and the
    same momentum buffer (the EMA of the gradients), so a run may switch either on resume; a state
    written under one rule steps on under the other."""
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512)
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape) * 0.01, params)
    variants = [(r, d) for r in ("optax", "torch") for d in ("float32", "bfloat16")]
    states = {}
    for rule, dtype in variants:
        tx = make_optimizer(OptimConfig(muon_momentum_rule=rule, ns_dtype=dtype, warmup_steps=0), 10)
        st = tx.init(params)
        for _ in range(3):
            _, st = tx.update(grads, st, params)
        states[rule, dtype] = st
    ref = states["optax", "float32"]
    shape = lambda t: jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), t)  # noqa: E731
    for key, st in states.items():
        assert jax.tree.structure(st) == jax.tree.structure(ref), key
        assert shape(st) == shape(ref), key
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    tx = make_optimizer(OptimConfig(muon_momentum_rule="optax", warmup_steps=0), 10)
    u, _ = tx.update(grads, states["torch", "bfloat16"], params)  # torch's state, optax's rule
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))


@pytest.mark.slow
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
