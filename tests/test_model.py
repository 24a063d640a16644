import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgpt_jax.model import GPT, GPTConfig, abstract_model, causal_attention, count_params, resolve_attention

# Exact counts with the padded vocabulary (50304) ...
COUNTS = {
    "tiny": 7_248_640,
    "gpt2": 124_475_904,
    "gpt2-medium": 354_871_296,
    "gpt2-large": 774_090_240,
    "gpt2-xl": 1_557_686_400,
    "fgpt": 662_660_544,
}
# ... and with GPT-2's own vocabulary (50257): the counts transformers reports for OpenAI's checkpoints.
HF_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.slow
@pytest.mark.parametrize("name", COUNTS)
def test_param_counts_from_shapes(name):
    cfg = GPTConfig.preset(name)
    model = abstract_model(cfg)  # nnx.eval_shape: nothing is allocated
    assert count_params(model) == COUNTS[name] == cfg.num_params()


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_COUNTS)
def test_param_counts_match_openai_gpt2(name):
    cfg = GPTConfig.preset(name, vocab_size=50257)
    assert count_params(abstract_model(cfg)) == HF_COUNTS[name]


def test_fgpt_shape():
    cfg = GPTConfig.preset("fgpt")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.head_dim) == (
        32,
        24,
        1248,
        1024,
        50304,
        52,
    )


def test_logits_shape_dtype(tiny_model, tiny_config):
    tokens = jnp.zeros((2, 16), jnp.int32)
    logits = tiny_model(tokens)
    assert logits.shape == (2, 16, tiny_config.vocab_size) and logits.dtype == jnp.float32


def test_causality(tiny_model, tiny_config):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50257, (1, tiny_config.block_size), dtype=np.int32)
    t = 11
    b = a.copy()
    b[0, t + 1 :] = rng.integers(0, 50257, tiny_config.block_size - t - 1)
    la, lb = tiny_model(jnp.asarray(a)), tiny_model(jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(la[0, : t + 1]), np.asarray(lb[0, : t + 1]))
    assert not np.allclose(la[0, t + 1 :], lb[0, t + 1 :])


def _reference_attention(q, k, v):
    """Plain numpy causal attention, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, H = q.shape[1], q.shape[-1]
    s = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(H)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknh->bqnh", p, v)


def test_padded_head_attention_equals_unpadded():
    """FGPT's head_dim 52 takes cuDNN's path padded to 56; the result must not change."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, 24, 3, 52)  # B, T, N, H
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kv))
    plain = causal_attention(q, k, v, implementation="xla", pad_multiple=1)
    padded = causal_attention(q, k, v, implementation="xla", pad_multiple=8)
    assert padded.shape == plain.shape == shape
    rel = float(jnp.linalg.norm(padded - plain) / jnp.linalg.norm(plain))
    assert rel <= 1e-5
    ref = _reference_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(plain), ref, rtol=1e-4, atol=1e-5)


def _np_layernorm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * g + b


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_forward_matches_numpy_reference(tiny_model, tiny_config):
    """The GPT-2 forward pass written out in numpy from the model's own parameters."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param)))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50257, (2, 20))
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][np.arange(20)]
    N = tiny_config.n_head
    for i in range(tiny_config.n_layer):
        blk = p["h"][i]
        h = _np_layernorm(x, blk["ln_1"]["scale"], blk["ln_1"]["bias"])
        qkv = h @ blk["attn"]["c_attn"]["kernel"] + blk["attn"]["c_attn"]["bias"]
        q, k, v = (t.reshape(2, 20, N, -1) for t in np.split(qkv, 3, axis=-1))
        y = _reference_attention(q, k, v).reshape(2, 20, -1)
        x = x + y @ blk["attn"]["c_proj"]["kernel"] + blk["attn"]["c_proj"]["bias"]
        h = _np_layernorm(x, blk["ln_2"]["scale"], blk["ln_2"]["bias"])
        h = _np_gelu(h @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"])
        x = x + h @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
    x = _np_layernorm(x, p["ln_f"]["scale"], p["ln_f"]["bias"])
    want = x @ p["wte"]["embedding"].T
    got = np.asarray(tiny_model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init_statistics():
    cfg = GPTConfig.preset("tiny", n_layer=8, n_embd=256)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(model.wte.embedding[...])) - 0.02) < 5e-4
    assert abs(float(jnp.std(model.wpe.embedding[...])) - 0.02) < 2e-3
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for blk in model.h:
        assert abs(float(jnp.std(blk.attn.c_attn.kernel[...])) - 0.02) < 1e-3
        assert abs(float(jnp.std(blk.attn.c_proj.kernel[...])) - resid_std) < 3e-4
        assert abs(float(jnp.std(blk.mlp.c_proj.kernel[...])) - resid_std) < 2e-4
        assert float(jnp.abs(blk.mlp.c_fc.bias[...]).max()) == 0.0
        assert float(jnp.abs(blk.ln_1.scale[...] - 1).max()) == 0.0
    # The head is tied: no separate output matrix exists.
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("lm_head" in n for n in names)


def test_init_is_deterministic_in_seed(tiny_config):
    a = GPT(tiny_config, rngs=nnx.Rngs(3)).wte.embedding[...]
    b = GPT(tiny_config, rngs=nnx.Rngs(3)).wte.embedding[...]
    c = GPT(tiny_config, rngs=nnx.Rngs(4)).wte.embedding[...]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _loss_and_grads(model, tokens):
    def loss_fn(m):
        logits = m(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    return nnx.jit(nnx.value_and_grad(loss_fn))(model)


@pytest.mark.slow
def test_remat_same_loss_and_grads(tiny_config):
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50257, (2, 17)), jnp.int32)
    plain = GPT(tiny_config, rngs=nnx.Rngs(0))
    remat = GPT(dataclasses.replace(tiny_config, remat=True), rngs=nnx.Rngs(0))
    l1, g1 = _loss_and_grads(plain, tokens)
    l2, g2 = _loss_and_grads(remat, tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), nnx.to_pure_dict(g1), nnx.to_pure_dict(g2)
    )


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_config):
    cfg = dataclasses.replace(tiny_config, dtype="bfloat16")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50257, (2, 16)), jnp.int32)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = GPT(tiny_config, rngs=nnx.Rngs(0))(tokens)
    assert float(jnp.abs(logits - ref).max()) < 0.1  # bf16 rounding, same function


def test_attention_resolution_on_cpu(tiny_config):
    assert resolve_attention(tiny_config) == "xla"
    assert resolve_attention(dataclasses.replace(tiny_config, dtype="bfloat16")) == "xla"  # no GPU here
    assert resolve_attention(dataclasses.replace(tiny_config, attention="cudnn")) == "cudnn"


def test_too_long_sequence(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(jnp.zeros((1, tiny_config.block_size + 1), jnp.int32))


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(n_embd=100, n_head=3), "divisible"),
        (dict(dtype="fp8"), "dtype"),
        (dict(attention="flash"), "attention"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_validation(kwargs, err):
    with pytest.raises(ValueError, match=err):
        GPTConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny, gpt2"):
        GPTConfig.preset("gpt3")


def test_flops_per_token_gpt2():
    # 6 * (N - position table) + 12 * L * D * T, the nanoGPT/PaLM estimate.
    cfg = GPTConfig.preset("gpt2")
    assert cfg.flops_per_token() == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("H,multiple,P", [(52, 8, 56), (52, 64, 64), (64, 8, 64)])
def test_attention_padding_is_exact(H, multiple, P):
    """`attention_pad`'s choices for cuDNN (FGPT's 52 -> 56 or 64), checked through the XLA kernel with
    the same zero padding: outputs and gradients equal the unpadded attention."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    shape = (2, 24, 3, H)
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kv, kc))

    def out_and_grads(pad_multiple):
        f = lambda q, k, v: causal_attention(q, k, v, implementation="xla", pad_multiple=pad_multiple)  # noqa: E731
        return jax.jit(lambda q, k, v, ct: (lambda out, vjp: (out, *vjp(ct)))(*jax.vjp(f, q, k, v)))(q, k, v, ct)

    plain, padded = out_and_grads(1), out_and_grads(multiple)
    assert -(-H // multiple) * multiple == P
    for a, b in zip(plain, padded):
        assert a.shape == shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_attention_pad_applies_to_the_cudnn_path_only(tiny_config):
    cfg = dataclasses.replace(tiny_config, n_head=2, n_embd=104)  # head_dim 52, as FGPT
    assert GPT(cfg, rngs=nnx.Rngs(0)).h[0].attn.pad_multiple == 1  # XLA on CPU: no padding needed
    for pad in (8, 64):
        cudnn = GPT(dataclasses.replace(cfg, attention="cudnn", attention_pad=pad), rngs=nnx.Rngs(0))
        assert cudnn.h[0].attn.pad_multiple == pad
    with pytest.raises(ValueError, match="attention_pad"):
        GPTConfig(attention_pad=12)


def _loss_and_grads_fn(cfg):
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, tokens):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens[:, :-1]))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    return params, jax.jit(jax.value_and_grad(loss_fn))


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_same_logits_and_grads(tiny_config, remat):
    """scan_layers runs the blocks as one lax.scan over their stacked parameters: the same function,
    the same gradients, and the same parameter layout (h/<i>/... as before)."""
    cfg = dataclasses.replace(tiny_config, n_layer=3, remat=remat)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 50257, (2, 17)), jnp.int32)
    params, f = _loss_and_grads_fn(cfg)
    params_s, f_s = _loss_and_grads_fn(dataclasses.replace(cfg, scan_layers=True))
    assert jax.tree.structure(params) == jax.tree.structure(params_s)  # same paths, same shapes
    (l1, g1), (l2, g2) = f(params, tokens), f_s(params, tokens)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_scan_layers_model_decodes_like_its_forward(tiny_config):
    """decode (the KV-cache path, an unrolled loop) and the scanned training forward agree."""
    from fgpt_jax.model import init_cache

    model = GPT(dataclasses.replace(tiny_config, n_layer=2, scan_layers=True), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 50257, (2, 9)), jnp.int32)
    full = model(tokens)
    stepped, _ = model.decode(tokens, init_cache(model.config, 2, 16))
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=1e-4, atol=1e-4)
