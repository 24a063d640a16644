"""Hugging Face GPT-2 interop: import/export round trips, layout, bad inputs, tokenizer files.

The checkpoints here are written by the test in transformers' exact GPT2LMHeadModel layout
(names spelled out below, not taken from fgpt_jax.hf), with tiny shapes and GPT-2's real vocab.
The parity tests at the end need torch + transformers and are skipped without them.
"""

import hashlib
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fgpt_jax import hf
from fgpt_jax.checkpoint import load_model, save_model
from fgpt_jax.hf import HFError
from fgpt_jax.hf.__main__ import main as hf_main

L, D, NH, NP, V = 2, 64, 2, 32, 50257  # layers, width, heads, positions, GPT-2 vocab
IDS = np.array([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]], dtype=np.int32)


def gpt2_params(seed=0, vocab=V) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel parameters, unprefixed names, Conv1D weights (in, out). Large enough
    values that a transposed or swapped tensor changes the logits visibly."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    t = {"wte.weight": w(vocab, D), "wpe.weight": w(NP, D), "ln_f.weight": 1 + w(D), "ln_f.bias": w(D)}
    for i in range(L):
        t |= {
            f"h.{i}.ln_1.weight": 1 + w(D),
            f"h.{i}.ln_1.bias": w(D),
            f"h.{i}.attn.c_attn.weight": w(D, 3 * D),
            f"h.{i}.attn.c_attn.bias": w(3 * D),
            f"h.{i}.attn.c_proj.weight": w(D, D),
            f"h.{i}.attn.c_proj.bias": w(D),
            f"h.{i}.ln_2.weight": 1 + w(D),
            f"h.{i}.ln_2.bias": w(D),
            f"h.{i}.mlp.c_fc.weight": w(D, 4 * D),
            f"h.{i}.mlp.c_fc.bias": w(4 * D),
            f"h.{i}.mlp.c_proj.weight": w(4 * D, D),
            f"h.{i}.mlp.c_proj.bias": w(D),
        }
    return t


def hf_config_json(**overrides) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": V,
        "n_positions": NP,
        "n_ctx": NP,
        "n_embd": D,
        "n_layer": L,
        "n_head": NH,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        **overrides,
    }


def causal_buffer() -> np.ndarray:
    return np.tril(np.ones((NP, NP), dtype=np.float32)).reshape(1, 1, NP, NP)


def write_checkpoint(directory, params, *, prefix="transformer.", buffers=False, lm_head=False, config=None):
    """A transformers-style checkpoint: `transformer.`-prefixed names (save_pretrained), or OpenAI's
    hub layout (no prefix, attention mask buffers, a tied lm_head copy)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v for k, v in params.items()}
    if buffers:
        for i in range(L):
            tensors[f"{prefix}h.{i}.attn.bias"] = causal_buffer()
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    if lm_head:
        tensors["lm_head.weight"] = params["wte.weight"].copy()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config or hf_config_json()))
    return tensors


def reference_logits(t: dict, ids: np.ndarray) -> np.ndarray:
    """GPT-2's forward pass in float64 numpy, straight from transformers' tensors (independent of ours)."""

    def ln(x, w, b):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b

    T, H = len(ids), D // NH
    t = {k: v.astype(np.float64) for k, v in t.items()}
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]
    for i in range(L):
        p = lambda n: t[f"h.{i}.{n}"]  # noqa: E731
        qkv = ln(x, p("ln_1.weight"), p("ln_1.bias")) @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (m.reshape(T, NH, H).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(H) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(T, D)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = ln(x, p("ln_2.weight"), p("ln_2.bias")) @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return ln(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T


@pytest.fixture(scope="module")
def params():
    return gpt2_params()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, params):
    """(model, cfg) imported from a save_pretrained-layout checkpoint, shared by several tests."""
    d = tmp_path_factory.mktemp("hf_src")
    write_checkpoint(d, params)
    return hf.from_hf(str(d))


def test_import_matches_reference_forward(imported, params):
    model, cfg = imported
    assert (
        cfg.model.vocab_size,
        cfg.model.block_size,
        cfg.model.n_layer,
        cfg.model.n_head,
        cfg.model.n_embd,
        cfg.model.bias,
    ) == (50304, NP, L, NH, D, True)
    logits = np.asarray(model(jnp.asarray(IDS)))[0]
    np.testing.assert_allclose(logits[:, :V], reference_logits(params, IDS[0]), atol=1e-4, rtol=1e-4)
    # Rows GPT-2 lacks hold the mean embedding, so each new token's logit is the mean real logit,
    # which keeps its probability below 1/V of the real mass (Jensen) instead of swamping it.
    wte = np.asarray(model.wte.embedding[...])
    assert np.array_equal(wte[:V], params["wte.weight"])
    assert np.array_equal(
        wte[V:], np.broadcast_to(params["wte.weight"].astype(np.float64).mean(0).astype(np.float32), (50304 - V, D))
    )
    lse = np.log(np.exp(logits[:, :V].astype(np.float64)).sum(-1))
    assert (logits[:, V:] <= lse[:, None] - np.log(V) + 1e-4).all()


@pytest.mark.parametrize("layout", ["save_pretrained", "openai_hub"])
def test_round_trip_is_bit_for_bit(tmp_path, params, layout):
    """import -> run dir -> export gives every parameter back unchanged, under transformers' names."""
    src = tmp_path / "src"
    openai = layout == "openai_hub"
    original = write_checkpoint(src, params, prefix="" if openai else "transformer.", buffers=openai, lm_head=openai)
    model, cfg = hf.from_hf(str(src))
    save_model(tmp_path / "run", model, cfg)
    model2, cfg2 = load_model(tmp_path / "run")
    out = hf.to_hf(model2, cfg2, tmp_path / "export")

    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == {"transformer." + k for k in params}
    for name, x in original.items():
        short = name.removeprefix("transformer.")
        if short in params:
            y = exported["transformer." + short]
            assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x), name
        elif short == "lm_head.weight":  # tied: transformers rebuilds it from wte
            assert np.array_equal(x, exported["transformer.wte.weight"])
        else:  # attention buffers: transformers ignores them on load and builds the same causal mask
            assert short.endswith(("attn.bias", "attn.masked_bias")), name
    with open(out / "config.json") as f:
        conf = json.load(f)
    assert conf["architectures"] == ["GPT2LMHeadModel"] and conf["model_type"] == "gpt2"
    assert {
        k: conf[k]
        for k in (
            "vocab_size",
            "n_positions",
            "n_embd",
            "n_layer",
            "n_head",
            "tie_word_embeddings",
            "activation_function",
            "layer_norm_epsilon",
        )
    } == {
        "vocab_size": V,
        "n_positions": NP,
        "n_embd": D,
        "n_layer": L,
        "n_head": NH,
        "tie_word_embeddings": True,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
    }
    # A 50257-row GPT-2 gets OpenAI's tokenizer unchanged: no chat tokens past its embedding table.
    assert not (out / "added_tokens.json").exists()
    with open(out / "tokenizer_config.json") as f:
        assert set(json.load(f)["added_tokens_decoder"]) == {"50256"}


def _write_safetensors_raw(path, tensors: dict[str, np.ndarray], dtype_name: str):
    """safetensors' numpy API cannot write bfloat16; the format is a JSON header and raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "sharded"])
def test_import_storage_variants(tmp_path, params, storage):
    """Half-precision files are widened exactly; sharded files are read through their index."""
    import ml_dtypes

    tensors = {"transformer." + k: v for k, v in params.items()}
    if storage == "float16":
        tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    elif storage == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
        _write_safetensors_raw(tmp_path / "model.safetensors", tensors, "BF16")
    else:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for fname, part in shards.items():
            save_file({k: tensors[k] for k in part}, str(tmp_path / fname), metadata={"format": "pt"})
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}})
        )
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json()))
    model, _ = hf.from_hf(str(tmp_path))
    got = {
        k: np.asarray(v)
        for k, v in {
            "transformer.wte.weight": model.wte.embedding[...][:V],
            "transformer.h.1.mlp.c_proj.weight": model.h[1].mlp.c_proj.kernel[...],
            "transformer.ln_f.weight": model.ln_f.scale[...],
        }.items()
    }
    for name, x in got.items():
        assert x.dtype == np.float32 and np.array_equal(x, tensors[name].astype(np.float32)), name


@pytest.mark.slow
def test_cli_import_export(tmp_path, params, capsys):
    src = tmp_path / "src"
    write_checkpoint(src, params, prefix="", buffers=True, lm_head=True)
    assert hf_main(["import", "--hf", str(src), "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_layer"] == L
    # `python -m` for real once (the entry point), in-process otherwise (a subprocess costs ~4 s of imports).
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "fgpt_jax.hf", *map(str, a)],  # noqa: E731
        capture_output=True,
        text=True,
        timeout=120,
    )
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["name"] == "src"
    r = run("export", "--run", tmp_path / "run", "--out", tmp_path / "hf", "--step", 0)
    assert r.returncode == 0, r.stderr
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(np.array_equal(exported["transformer." + k], v) for k, v in params.items())
    # Errors: exit 2 and one line, no traceback.
    assert hf_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "not empty" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["import", "--hf", "x"], "--run"),
        (["export", "--run", "nowhere", "--out", "y"], "--run nowhere"),
        (["import", "--hf", "/no/such/dir", "--out", "y"], "--hf /no/such/dir: no such directory"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_arguments_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        sys.exit(hf_main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and err.strip().count("\n") == 0


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        hf_main(["export", "--help"])
    assert e.value.code == 0


def _drop(name):
    return lambda t, c: t.pop(name)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda t, c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]), 'model_type="llama"'),
        (lambda t, c: c.update(architectures=["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
        (lambda t, c: c.update(activation_function="gelu"), 'activation_function="gelu"'),
        (lambda t, c: c.update(vocab_size=32000), "vocab_size=32000"),
        (_drop("transformer.h.1.mlp.c_fc.bias"), "transformer.h.1.mlp.c_fc.bias: missing"),
        (
            lambda t, c: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((3 * D, D), np.float32)}),
            "transformer.h.0.attn.c_attn.weight: shape (192, 64): expected (64, 192)",
        ),
        (
            lambda t, c: t.update({"transformer.wpe.weight": np.zeros((NP + 1, D), np.float32)}),
            "transformer.wpe.weight: shape",
        ),
        (lambda t, c: t.update({"score.weight": np.zeros((2, D), np.float32)}), "score.weight: unexpected tensor"),
        (lambda t, c: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}), "lm_head.weight: expected tied"),
        (
            lambda t, c: t.update({"transformer.h.1.attn.bias": np.ones((1, 1, NP, NP), np.float32)}),
            "transformer.h.1.attn.bias",
        ),
    ],
)
def test_bad_checkpoints_name_the_problem(tmp_path, params, edit, needle):
    tensors, conf = {"transformer." + k: v for k, v in params.items()}, hf_config_json()
    edit(tensors, conf)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(HFError) as e:
        hf.from_hf(str(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "conf,needle",
    [
        ([hf_config_json()], "config.json: expected a JSON object of GPT2Config keys, got list"),
        ("gpt2", 'config.json: expected a JSON object of GPT2Config keys, got str "gpt2"'),
        (hf_config_json(n_embd="64"), 'config.json: n_embd="64": expected a positive integer'),
        (hf_config_json(n_layer=None), "config.json: n_layer=null: expected a positive integer"),
        (hf_config_json(n_head=2.0), "config.json: n_head=2.0: expected a positive integer"),
        (hf_config_json(n_head=3), "config.json: n_head=3: expected a divisor of n_embd=64"),
        (hf_config_json(n_head=0), "config.json: n_head=0: expected a positive integer"),
        (hf_config_json(vocab_size=True), "config.json: vocab_size=true: expected a positive integer"),
        (
            {k: v for k, v in hf_config_json(n_ctx="32").items() if k != "n_positions"},
            'config.json: n_ctx="32": expected a positive integer',
        ),
        (hf_config_json(n_inner="x"), 'config.json: n_inner="x": expected null or a positive integer'),
        (hf_config_json(layer_norm_epsilon=None), "config.json: layer_norm_epsilon=null: expected a number"),
        (hf_config_json(layer_norm_epsilon="1e-5"), 'config.json: layer_norm_epsilon="1e-5": expected a number'),
        (hf_config_json(activation_function=None), "config.json: activation_function=null: expected a string"),
        (hf_config_json(activation_function=["gelu_new"]), 'activation_function=["gelu_new"]: expected a string'),
        (hf_config_json(tie_word_embeddings=None), "config.json: tie_word_embeddings=null: expected true or false"),
        (hf_config_json(scale_attn_weights="yes"), 'config.json: scale_attn_weights="yes": expected true or false'),
        (
            hf_config_json(architectures="GPT2LMHeadModel"),
            'architectures="GPT2LMHeadModel": expected ["GPT2LMHeadModel"]',
        ),
        (hf_config_json(model_type=None), 'config.json: model_type=null: expected "gpt2"'),
    ],
)
def test_bad_config_json_names_the_key(tmp_path, params, conf, needle):
    """config.json is checked key by key: a wrong type, a null, or a non-object is one HFError line,
    never a TypeError / AttributeError / ValueError from the code that would have used it."""
    write_checkpoint(tmp_path, params)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(HFError) as e:
        hf.from_hf(str(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, params, bad):
    broken = dict(params)
    broken["h.1.mlp.c_fc.weight"] = params["h.1.mlp.c_fc.weight"].copy()
    broken["h.1.mlp.c_fc.weight"][3, 5] = bad
    write_checkpoint(tmp_path, broken)
    with pytest.raises(HFError, match=r"^transformer\.h\.1\.mlp\.c_fc\.weight: 1 of 16384 values are NaN or inf"):
        hf.from_hf(str(tmp_path))


def test_cli_import_bad_config_is_one_line(tmp_path, params):
    """The real `python -m fgpt_jax.hf import`: exit 2, one line naming the file and the key, no run written."""
    write_checkpoint(tmp_path / "src", params, config=hf_config_json(n_head=3))
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.hf", "import", "--hf", str(tmp_path / "src"), "--run", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'src' / 'config.json'}: n_head=3: expected a divisor of n_embd=64"
    ]
    assert not (tmp_path / "run").exists()


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(HFError, match="config.json: not found"):
        hf.from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json()))
    with pytest.raises(HFError, match="no model.safetensors"):
        hf.from_hf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(HFError, match="model.safetensors: not a readable safetensors file"):
        hf.from_hf(str(tmp_path))


def test_pytorch_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(HFError, match="pytorch_model.bin: reading pytorch_model.bin needs torch; install torch"):
        hf.from_hf(str(tmp_path))


def test_hub_name_offline_suggests_local_directory():
    # HF_HUB_OFFLINE=1 (conftest): huggingface_hub answers from its cache, never the network.
    with pytest.raises(HFError, match=r"--hf fgpt-jax-tests/no-such-model: could not download .*local directory"):
        hf.from_hf("fgpt-jax-tests/no-such-model")


def test_hub_download_patterns_and_bin_fallback(tmp_path, monkeypatch, params):
    import huggingface_hub

    safetensors_repo, bin_repo = tmp_path / "st", tmp_path / "bin"
    write_checkpoint(safetensors_repo, params)
    bin_repo.mkdir()
    (bin_repo / "config.json").write_text(json.dumps(hf_config_json()))
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id.endswith("gpt2"):
            return str(safetensors_repo)
        return str(bin_repo if "pytorch_model.bin" in allow_patterns else tmp_path / "empty")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, cfg = hf.from_hf("openai-community/gpt2", revision="main")
    assert cfg.name == "gpt2" and calls == [
        ("openai-community/gpt2", "main", ("config.json", "*.safetensors", "model.safetensors.index.json"))
    ]
    calls.clear()
    with pytest.raises(HFError, match="pytorch_model.bin"):  # fallback found no weights file here
        hf.from_hf("someone/old-model")
    assert [c[2] for c in calls] == [
        ("config.json", "*.safetensors", "model.safetensors.index.json"),
        ("config.json", "pytorch_model.bin"),
    ]


def test_export_vocab_rows(tmp_path, imported):
    """Trailing rows still holding the import fill are dropped, so the exported vocabulary ends at the
    last row the model has learned; the chat tokens it covers become added tokens of its tokenizer."""
    from flax import nnx

    model, cfg = imported
    trained = nnx.clone(model)
    trained.wte.embedding[...] = trained.wte.embedding[...].at[50303].add(0.5)
    out = hf.to_hf(trained, cfg, tmp_path / "full")
    assert load_file(str(out / "model.safetensors"))["transformer.wte.weight"].shape == (50304, D)
    with open(out / "added_tokens.json") as f:
        assert json.load(f) == {"<|user|>": 50257, "<|assistant|>": 50258, "<|system|>": 50259, "<|end|>": 50260}
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [50256, 50260]
    trained.wte.embedding[...] = model.wte.embedding[...].at[50258].add(0.5)
    out = hf.to_hf(trained, cfg, tmp_path / "two_chat_rows")
    assert load_file(str(out / "model.safetensors"))["transformer.wte.weight"].shape == (50259, D)
    with open(out / "added_tokens.json") as f:
        assert json.load(f) == {"<|user|>": 50257, "<|assistant|>": 50258}
    out = hf.to_hf(model, cfg, tmp_path / "v50261", vocab_size=50261)
    wte = load_file(str(out / "model.safetensors"))["transformer.wte.weight"]
    assert wte.shape == (50261, D) and np.array_equal(wte, np.asarray(model.wte.embedding[...])[:50261])
    with pytest.raises(HFError, match="--vocab-size 50000: expected between 50257"):
        hf.to_hf(model, cfg, tmp_path / "bad", vocab_size=50000)


def test_export_never_leaves_a_complete_looking_directory(tmp_path, imported, monkeypatch):
    import safetensors.numpy

    model, cfg = imported
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(HFError, match="busy: already exists and is not empty"):
        hf.to_hf(model, cfg, tmp_path / "busy")

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError):
        hf.to_hf(model, cfg, tmp_path / "crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_derived_bpe_files_are_openais():
    """vocab.json/merges.txt derived from the shipped ranks are byte-for-byte OpenAI's encoder.json
    and vocab.bpe: the sha256 tiktoken's gpt2() pins for them."""
    from fgpt_jax.hf.tokenizer_files import gpt2_bpe_files

    encoder_json, vocab_bpe = gpt2_bpe_files()
    assert (
        hashlib.sha256(encoder_json.encode()).hexdigest()
        == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    )
    assert (
        hashlib.sha256(vocab_bpe.encode()).hexdigest()
        == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    )


def test_tokenizer_files_special_tokens(tok):
    from fgpt_jax.hf.tokenizer_files import tokenizer_files

    files = tokenizer_files(50304, 1024)
    vocab = json.loads(files["vocab.json"])
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == tok.eot_id and vocab["Ġthe"] == tok.encode(" the")[0]
    conf = json.loads(files["tokenizer_config.json"])
    assert {int(i): t["content"] for i, t in conf["added_tokens_decoder"].items()} == {
        i: t for t, i in tok.special_ids.items()
    }
    assert conf["eos_token"] == conf["bos_token"] == "<|endoftext|>" and conf["model_max_length"] == 1024
    assert json.loads(files["special_tokens_map.json"])["additional_special_tokens"] == [
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
    ]


# ------------------------------------------------- parity with transformers (needs torch + transformers)


def _perturbed_hf_model(seed, safetensors_dir=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=NP, n_embd=D, n_layer=L, n_head=NH)
    ).eval()
    with torch.no_grad():  # move LayerNorms off (1, 0) so a swapped scale/bias would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return torch, transformers, m


@pytest.mark.slow
def test_transformers_checkpoints_import_with_same_logits(tmp_path):
    torch, transformers, m = _perturbed_hf_model(0)
    m.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the legacy format, with lm_head
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    with torch.no_grad():
        want = m(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    for d in ("st", "bin"):
        model, _ = hf.from_hf(str(tmp_path / d))
        got = np.asarray(model(jnp.asarray(IDS)))
        np.testing.assert_allclose(got[..., :V], want, atol=1e-4, rtol=1e-4, err_msg=d)
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not a zip or a pickle")
    with pytest.raises(HFError, match="pytorch_model.bin: not a readable PyTorch state dict"):
        hf.from_hf(str(tmp_path / "bin"))


@pytest.mark.slow
def test_export_loads_in_transformers_with_same_logits_and_tokens(tmp_path, tok):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from fgpt_jax.config import Config
    from fgpt_jax.model import GPT, GPTConfig

    g = GPTConfig(block_size=NP, n_layer=L, n_head=NH, n_embd=D)
    model = GPT(g, rngs=nnx.Rngs(1))
    out = hf.to_hf(model, Config(name="t", model=g), tmp_path / "hf")
    m, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.array([[50256, 50257, 15496, 995, 50260, 50258, 100, 50303]], dtype=np.int32)
    with torch.no_grad():
        theirs = m.eval()(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["Hello world", " héllo  wörld\n\n 123 🙂\tend", "a'll've  \n x"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    # transformers parses special-token strings out of text (ours never does): ids must agree.
    assert hf_tok("<|user|>hi<|end|><|assistant|><|system|><|endoftext|>")["input_ids"] == [
        50257,
        tok.encode("hi")[0],
        50260,
        50258,
        50259,
        50256,
    ]
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == 50256
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    rendered = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert list(rendered) == tok.render_chat(msgs, add_generation_prompt=True)[0]
