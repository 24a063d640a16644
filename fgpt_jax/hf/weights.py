"""transformers GPT-2 checkpoints <-> our parameters: import OpenAI's checkpoints, export ours.

Both directions are plain tensor renames, no torch needed (safetensors' numpy API): transformers'
GPT-2 uses Conv1D, whose weight is (in, out) like a Flax kernel, so no matrix is transposed, and
c_attn holds q, k, v concatenated in that order as ours does. Everything else is the same
architecture (pre-LN, tanh GELU, LayerNorm eps 1e-5, tied head).

Vocabulary. A GPT-2 checkpoint has 50257 rows; our table has 50304 (chat tokens + padding). The
missing rows are set to the mean of the 50257 real rows: each new token's logit is then the average
of the real logits, so by Jensen its probability is at most 1/50257 of the real mass, and the loss
on real text changes by at most log(1 + 47/50257) < 0.001 nats (zeros would give logit 0, which
beats GPT-2's usually negative logits and would swamp the distribution). Export drops trailing rows
that still hold exactly that fill, so an imported checkpoint exports at its original size, while a
trained model exports every row and gives the same logits in transformers as here.

Attention buffers. OpenAI's files carry `h.{i}.attn.bias` (the causal mask) and sometimes
`attn.masked_bias`. They are checked on import (they must be the causal mask) and not written on
export: transformers ignores them on load and builds the mask itself, as its own save does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.config import Config
from fgpt_jax.data import DataConfig
from fgpt_jax.hf.gpt2_config import GPT2_VOCAB, OUR_VOCAB, HFError, hf_config, read_hf_config
from fgpt_jax.hf.tokenizer_files import tokenizer_files
from fgpt_jax.model import GPT, GPTConfig, abstract_model, named_leaves, param_name
from fgpt_jax.tokenizer import END, EOT, SPECIAL_TOKENS

PREFIX = "transformer."
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def name_map(n_layer: int) -> dict[str, str]:
    """{our parameter name: transformers name without the `transformer.` prefix}."""
    names = {
        "wte/embedding": "wte.weight",
        "wpe/embedding": "wpe.weight",
        "ln_f/scale": "ln_f.weight",
        "ln_f/bias": "ln_f.bias",
    }
    for i in range(n_layer):
        for ours, theirs in [
            ("ln_1/scale", "ln_1.weight"),
            ("ln_1/bias", "ln_1.bias"),
            ("ln_2/scale", "ln_2.weight"),
            ("ln_2/bias", "ln_2.bias"),
        ]:
            names[f"h/{i}/{ours}"] = f"h.{i}.{theirs}"
        for mod in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            dotted = mod.replace("/", ".")
            names[f"h/{i}/{mod}/kernel"] = f"h.{i}.{dotted}.weight"
            names[f"h/{i}/{mod}/bias"] = f"h.{i}.{dotted}.bias"
    return names


def hf_shapes(vocab_size: int, n_positions: int, n_embd: int, n_layer: int) -> dict[str, tuple]:
    """{transformers name (unprefixed): shape} of GPT2LMHeadModel's parameters; Conv1D is (in, out)."""
    D, shapes = (
        n_embd,
        {
            "wte.weight": (vocab_size, n_embd),
            "wpe.weight": (n_positions, n_embd),
            "ln_f.weight": (n_embd,),
            "ln_f.bias": (n_embd,),
        },
    )
    for i in range(n_layer):
        for ln in ("ln_1", "ln_2"):
            shapes[f"h.{i}.{ln}.weight"] = shapes[f"h.{i}.{ln}.bias"] = (D,)
        for mod, (d_in, d_out) in [
            ("attn.c_attn", (D, 3 * D)),
            ("attn.c_proj", (D, D)),
            ("mlp.c_fc", (D, 4 * D)),
            ("mlp.c_proj", (4 * D, D)),
        ]:
            shapes[f"h.{i}.{mod}.weight"], shapes[f"h.{i}.{mod}.bias"] = (d_in, d_out), (d_out,)
    return shapes


def vocab_fill(wte_VD: np.ndarray) -> np.ndarray:
    """The row given to vocabulary entries a GPT-2 checkpoint lacks: the mean of its 50257 rows
    (accumulated in float64 so the value is deterministic and the export test can recompute it)."""
    return wte_VD[:GPT2_VOCAB].astype(np.float64).mean(axis=0).astype(np.float32)


# ----------------------------------------------------------------------------------------- reading


def resolve_checkpoint(path_or_name: str, revision: str | None = None) -> Path:
    """A local checkpoint directory (or a file inside one), else a Hub name downloaded to the HF cache."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path.parent if path.is_file() else path
    if not HUB_NAME.fullmatch(path_or_name):
        raise HFError(
            f"--hf {path_or_name}: no such directory (expected a local directory with config.json "
            f"and model.safetensors, or a Hub name such as openai-community/gpt2)"
        )
    return _download(path_or_name, revision)


def _download(name: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                name, revision=revision, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"]
            )
        )
        if not any(path.glob("*.safetensors")):
            # Only repos without safetensors cost the (torch-only) pickle download.
            path = Path(snapshot_download(name, revision=revision, allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repo, gated, network: all end the same way for the user
        first = (str(e).strip().splitlines() or [""])[0]
        reason = re.split(r"(?<=\.)\s", first)[0][:200]
        raise HFError(
            f"--hf {name}: could not download from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"offline? pass a local directory holding config.json and model.safetensors"
        ) from None
    return path


class _Tensors:
    """Name -> (shape, loader) over a checkpoint's files, so names and shapes are checked before any
    array is read and only one tensor is in host memory at a time."""

    def __init__(self, directory: Path):
        self.shapes: dict[str, tuple] = {}
        self.loaders: dict[str, Callable[[], np.ndarray]] = {}
        index = directory / "model.safetensors.index.json"
        if (directory / "model.safetensors").is_file():
            self.source = directory / "model.safetensors"
            self._add_safetensors(self.source)
        elif index.is_file():
            self.source = index
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
                first = (str(e).strip().splitlines() or [""])[0][:160]
                raise HFError(
                    f"{index}: expected a JSON object with a weight_map ({type(e).__name__}: {first})"
                ) from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise HFError(f"{index}: weight_map: expected an object of tensor name -> file name")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                self._add_safetensors(directory / shard)
        elif (directory / "pytorch_model.bin").is_file():
            self.source = directory / "pytorch_model.bin"
            self._add_torch(self.source)
        else:
            raise HFError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _add(self, name: str, shape, loader, where: Path) -> None:
        if name in self.loaders:
            raise HFError(f"{where}: tensor {name} appears twice")
        self.shapes[name], self.loaders[name] = tuple(int(s) for s in shape), loader

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise HFError(f"{path}: not found (listed in model.safetensors.index.json)")
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._add(
                        name, sl.get_shape(), lambda p=path, n=name, d=sl.get_dtype(): _read_safetensor(p, n, d), path
                    )
        except HFError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise HFError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def _add_torch(self, path: Path) -> None:
        try:
            import torch
        except ImportError:
            raise HFError(
                f"{path}: reading pytorch_model.bin needs torch; install torch (CPU is enough) "
                f"or convert the checkpoint to model.safetensors"
            ) from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch's unpickler raises many types for corrupt or foreign files
            raise HFError(
                f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:160]})"
            ) from None
        if not isinstance(state, dict):
            raise HFError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
        for name, t in state.items():
            # numpy has no bfloat16; every dtype GPT-2 ships in is exact in float32.
            self._add(name, t.shape, lambda t=t: (t.float() if t.dtype == torch.bfloat16 else t).numpy(), path)


def _read_safetensor(path: Path, name: str, dtype: str) -> np.ndarray:
    if dtype != "BF16":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(name)
    # safetensors' numpy API cannot build bfloat16 arrays: read the raw bytes and widen them.
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def _check_buffers(tensors: _Tensors, key: dict[str, str], n_layer: int, n_positions: int) -> None:
    """OpenAI's attention buffers are not parameters, but a file whose mask is not causal is not GPT-2."""
    causal = np.tril(np.ones((n_positions, n_positions), dtype=bool))
    for i in range(n_layer):
        for short, check, expected in [
            (
                f"h.{i}.attn.bias",
                lambda x: x.shape == (1, 1, n_positions, n_positions) and np.array_equal(x[0, 0] != 0, causal),
                f"the causal mask, shape (1, 1, {n_positions}, {n_positions})",
            ),
            (f"h.{i}.attn.masked_bias", lambda x: x.shape == () and float(x) <= -1e4, "a scalar <= -1e4"),
        ]:
            if short in key:
                x = tensors.loaders[key[short]]()
                if not check(x):
                    raise HFError(f"{key[short]}: shape {tuple(x.shape)}: expected {expected}")


def from_hf(path_or_name: str, revision: str | None = None) -> tuple[GPT, Config]:
    """A transformers GPT-2 checkpoint (directory, or Hub name when online) as (GPT, run Config)."""
    directory = resolve_checkpoint(path_or_name, revision)
    hf = read_hf_config(directory)
    tensors = _Tensors(directory)
    L, V = hf["n_layer"], hf["vocab_size"]
    gcfg = GPTConfig(
        vocab_size=OUR_VOCAB,
        block_size=hf["n_positions"],
        n_layer=L,
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
    )
    prefix = PREFIX if any(n.startswith(PREFIX) for n in tensors.shapes) else ""
    key = {n.removeprefix(PREFIX): n for n in tensors.shapes}  # unprefixed -> name in the file
    if len(key) != len(tensors.shapes):
        dup = next(n for n in tensors.shapes if n.startswith(PREFIX) and n.removeprefix(PREFIX) in tensors.shapes)
        raise HFError(f"{tensors.source}: tensor {dup} also appears without the '{PREFIX}' prefix")
    want = hf_shapes(V, hf["n_positions"], hf["n_embd"], L)
    buffers = {f"h.{i}.attn.{b}" for i in range(L) for b in ("bias", "masked_bias")}
    for short, shape in want.items():
        if short not in key:
            raise HFError(f"{prefix}{short}: missing from {tensors.source} (expected shape {shape})")
        if tensors.shapes[key[short]] != shape:
            raise HFError(
                f"{key[short]}: shape {tensors.shapes[key[short]]}: expected {shape} (from {directory / 'config.json'})"
            )
    for short in key:
        if short not in want and short not in buffers and short != "lm_head.weight":
            raise HFError(f"{key[short]}: unexpected tensor in {tensors.source} (not part of GPT2LMHeadModel)")
    _check_buffers(tensors, key, L, hf["n_positions"])

    arrays = {}
    for ours, short in name_map(L).items():
        arrays[ours] = x = np.asarray(tensors.loaders[key[short]](), dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            raise HFError(
                f"{key[short]}: {bad} of {x.size} values are NaN or inf: expected finite weights "
                f"(a diverged or corrupted checkpoint)"
            )
    if "lm_head.weight" in key:
        head = tensors.loaders[key["lm_head.weight"]]()
        if head.shape != want["wte.weight"] or not np.array_equal(head, arrays["wte/embedding"]):
            raise HFError(
                f"{key['lm_head.weight']}: expected tied to {prefix}wte.weight (shape {want['wte.weight']}, "
                f"equal values): our LM head is the embedding"
            )
    wte = arrays["wte/embedding"]
    arrays["wte/embedding"] = np.concatenate([wte, np.broadcast_to(vocab_fill(wte), (OUR_VOCAB - V, wte.shape[1]))])
    # data.path "": the run records no training data, so `eval val` asks for --data instead of guessing.
    return _build(gcfg, arrays), Config(name=_run_name(path_or_name), model=gcfg, data=DataConfig(path=""))


def _run_name(path_or_name: str) -> str:
    """ "gpt2" for openai-community/gpt2, for its HF-cache snapshot directory, or for a local ./gpt2."""
    cache = re.search(r"models--[^/]*--([^/]+)/snapshots/", str(Path(path_or_name).expanduser().absolute()))
    name = cache.group(1) if cache else Path(str(path_or_name).rstrip("/")).name
    return re.sub(r"[^\w.-]+", "-", name) or "hf"


def _build(gcfg: GPTConfig, arrays: dict[str, np.ndarray]) -> GPT:
    """A GPT whose parameters are `arrays`, built without a random init (gpt2-xl would double memory)."""
    graphdef, abstract = nnx.split(abstract_model(gcfg), nnx.Param)

    def fill(path, leaf):
        x = arrays.pop(param_name(path))  # pop: the numpy copy is freed as soon as it is on device
        assert x.shape == tuple(leaf.shape), (param_name(path), x.shape, leaf.shape)
        return jnp.asarray(x, dtype=leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


# ----------------------------------------------------------------------------------------- writing


def export_vocab_size(wte_VD: np.ndarray) -> int:
    """Rows to export: all, minus the trailing rows that still hold the import fill exactly."""
    fill, n = vocab_fill(wte_VD), wte_VD.shape[0]
    while n > GPT2_VOCAB and np.array_equal(wte_VD[n - 1], fill):
        n -= 1
    return n


def to_hf(model: GPT, config: Config | GPTConfig, path: str | os.PathLike, vocab_size: int | None = None) -> Path:
    """Write `model` as a transformers GPT-2 directory: config.json, generation_config.json, tokenizer
    files and model.safetensors (float32, tied head not duplicated).

    `vocab_size`: rows of the embedding to write (default: see `export_vocab_size`). The directory is
    assembled under a temporary name and renamed into place, so it never looks complete half-written.
    """
    from safetensors.numpy import save_file

    gcfg = config.model if isinstance(config, Config) else config
    if gcfg != model.config:
        raise HFError("config: does not describe this model (config.model != model.config)")
    if gcfg.vocab_size < GPT2_VOCAB:
        raise HFError(f"model.vocab_size={gcfg.vocab_size}: expected >= {GPT2_VOCAB} (the GPT-2 tokenizer's ids)")
    if not gcfg.bias:
        raise HFError("model.bias=False: expected True (GPT-2's format has a bias in every Linear and LayerNorm)")
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFError(f"--out {out}: already exists and is not empty; choose another directory")
    params = {k: np.asarray(v, dtype=np.float32) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()}
    V = export_vocab_size(params["wte/embedding"]) if vocab_size is None else vocab_size
    if not GPT2_VOCAB <= V <= gcfg.vocab_size:
        raise HFError(f"--vocab-size {V}: expected between {GPT2_VOCAB} and the model's {gcfg.vocab_size}")
    params["wte/embedding"] = params["wte/embedding"][:V]
    tensors = {PREFIX + theirs: np.ascontiguousarray(params[ours]) for ours, theirs in name_map(gcfg.n_layer).items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        eot, end = SPECIAL_TOKENS[EOT], SPECIAL_TOKENS[END]
        eos = [eot, end] if V > end else eot  # <|end|> closes a chat turn when the model has its row
        files = {
            "config.json": json.dumps(hf_config(gcfg, V), indent=2) + "\n",
            "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eos}, indent=2) + "\n",
            **tokenizer_files(V, gcfg.block_size),
        }
        for fname, text in files.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        # transformers refuses safetensors files without format metadata.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates the file 0600; a directory meant for publishing gets the umask's mode.
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
