"""transformers' GPT2Config as config.json: read and checked on import, written on export.

A checkpoint's config.json is user input: every key is checked for its type first (a string, a
null or a list where a number belongs is one line naming the file and the key, not a TypeError
deep in the import), then for a value our architecture supports. Keys it leaves out take
transformers' GPT2Config defaults, as `from_pretrained` would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fgpt_jax.errors import UserError
from fgpt_jax.model import GPTConfig
from fgpt_jax.tokenizer import EOT, SPECIAL_TOKENS


class HFError(UserError, ValueError):
    """A checkpoint or argument that does not fit; one line: `<file/flag/tensor>: <what was expected>`."""


GPT2_VOCAB = 50257  # OpenAI's vocabulary, <|endoftext|> included
OUR_VOCAB = GPTConfig().vocab_size  # 50304: chat tokens + padding to a multiple of 64
# transformers' GPT2Config defaults: what from_pretrained assumes for a key config.json leaves out.
HF_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    add_cross_attention=False,
    tie_word_embeddings=True,
)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation our MLP uses


def _show(value) -> str:
    """A config value as JSON spells it (null, "text", [..]), for messages."""
    return json.dumps(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def read_hf_config(directory: Path) -> dict:
    """config.json with transformers' defaults filled in, checked key by key (type, then value):
    refused, with one line naming the file and the key, unless it describes our architecture."""
    path = directory / "config.json"
    if not path.is_file():
        raise HFError(f"{path}: not found (expected a transformers GPT-2 checkpoint directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path}: expected a JSON object of GPT2Config keys, got {type(raw).__name__} {_show(raw)[:60]}")
    if raw.get("model_type") != "gpt2":
        raise HFError(
            f'{path}: model_type={_show(raw.get("model_type"))}: expected "gpt2" (GPT2LMHeadModel); '
            f"other architectures are not supported"
        )
    archs = raw.get("architectures")
    archs = ["GPT2LMHeadModel"] if archs is None else archs
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)) or not set(archs) <= {
        "GPT2LMHeadModel",
        "GPT2Model",
    }:
        raise HFError(f'{path}: architectures={_show(archs)}: expected ["GPT2LMHeadModel"]')
    cfg = {**HF_DEFAULTS, **raw}
    if "n_positions" not in raw and "n_ctx" in raw:
        cfg["n_positions"] = raw["n_ctx"]
    # Types first, so the value checks below can compute with them (and null is never a value).
    types = [
        (k, lambda v: _is_int(v) and v >= 1, "a positive integer")
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    ]
    types += [
        ("n_inner", lambda v: v is None or (_is_int(v) and v >= 1), "null or a positive integer"),
        ("activation_function", lambda v: isinstance(v, str), "a string"),
        ("layer_norm_epsilon", lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a number"),
    ]
    types += [
        (k, lambda v: isinstance(v, bool), "true or false")
        for k in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention", "tie_word_embeddings")
    ]
    for key, ok, expected in types:
        if not ok(cfg[key]):
            where = "n_ctx" if key == "n_positions" and "n_positions" not in raw and "n_ctx" in raw else key
            raise HFError(f"{path}: {where}={_show(cfg[key])}: expected {expected}")
    checks = [
        ("n_head", cfg["n_embd"] % cfg["n_head"] == 0, f"a divisor of n_embd={cfg['n_embd']}"),
        ("activation_function", cfg["activation_function"] in TANH_GELUS, f"one of {', '.join(TANH_GELUS)}"),
        ("layer_norm_epsilon", abs(float(cfg["layer_norm_epsilon"]) - 1e-5) < 1e-12, "1e-05"),
        ("n_inner", cfg["n_inner"] in (None, 4 * cfg["n_embd"]), f"null or 4 * n_embd = {4 * cfg['n_embd']}"),
        ("scale_attn_weights", cfg["scale_attn_weights"] is True, "true"),
        ("scale_attn_by_inverse_layer_idx", cfg["scale_attn_by_inverse_layer_idx"] is False, "false"),
        ("add_cross_attention", cfg["add_cross_attention"] is False, "false"),
        ("tie_word_embeddings", cfg["tie_word_embeddings"] is True, "true (our LM head is the embedding)"),
        (
            "vocab_size",
            GPT2_VOCAB <= cfg["vocab_size"] <= OUR_VOCAB,
            f"between {GPT2_VOCAB} (GPT-2's tokenizer, which this code uses) and {OUR_VOCAB}",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise HFError(f"{path}: {key}={_show(cfg[key])}: expected {expected}")
    return cfg


def hf_config(gcfg: GPTConfig, vocab_size: int) -> dict:
    """config.json of GPT2LMHeadModel for `gcfg` (dropout 0: our model trains without it)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": gcfg.block_size,
        "n_ctx": gcfg.block_size,
        "n_embd": gcfg.n_embd,
        "n_layer": gcfg.n_layer,
        "n_head": gcfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": SPECIAL_TOKENS[EOT],
        "eos_token_id": SPECIAL_TOKENS[EOT],
        "torch_dtype": "float32",
    }
