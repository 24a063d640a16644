"""GPT-2 / FGPT in Flax NNX.

Architecture (GPT-2): learned positions, pre-LayerNorm blocks, tanh-GELU 4x MLP, embedding tied
to the LM head, init N(0, 0.02) with residual projections scaled by 1/sqrt(2 * n_layer).
Parameters live in `param_dtype` (float32); matmuls run in `dtype` (bfloat16 on GPU); logits
come out in float32 so the loss and sampling never see bf16 rounding.

Shape names used in this module: B batch, T sequence, D model width (n_embd), N heads,
H head dim, P padded head dim, F MLP width (4D), V vocabulary (padded).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from fgpt_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class GPTConfig:
    """Model shape and numerics. Frozen (hashable: jit keys on it) and JSON-friendly, so a run
    directory can rebuild the model."""

    vocab_size: int = 50304  # GPT-2's 50257 + chat tokens, padded up to a multiple of 64 for fast matmuls
    block_size: int = 1024  # context length (learned positions)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head_dim = n_embd // n_head
    n_embd: int = 768  # model width
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    dtype: str = "float32"  # compute dtype: "bfloat16" on GPU, "float32" on CPU/tests
    param_dtype: str = "float32"  # parameter storage dtype (optimizer state follows it)
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN on GPU in bf16/fp16, XLA otherwise
    remat: bool = False  # recompute each block in the backward pass: less memory, ~30% more FLOPs
    attention_pad: int = 8  # cuDNN path: head_dim zero-padded up to a multiple of this (FGPT's 52 -> 56; 64 -> 64)
    scan_layers: bool = False  # training/scoring forward as one lax.scan over the blocks (one block in the program)
    loss_chunk: int = 0  # positions per chunk of the fused LM head + cross-entropy; 0: the whole [B, T, V] logits

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {sorted(DTYPES)}")
        if self.attention not in ("auto", "xla", "cudnn"):
            problems.append(f"attention={self.attention!r} must be 'auto', 'xla' or 'cudnn'")
        if self.attention_pad <= 0 or self.attention_pad % 8:
            problems.append(f"attention_pad={self.attention_pad} must be a positive multiple of 8 (cuDNN's head dims)")
        if self.loss_chunk < 0:
            problems.append(f"loss_chunk={self.loss_chunk} must be >= 0")
        if problems:
            raise ConfigError("GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """Named model shapes: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl, fgpt."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(cls(**PRESETS[name]), **overrides)

    def num_params(self) -> int:
        """Exact parameter count from the architecture (tied head counted once)."""
        D, L, V, T = self.n_embd, self.n_layer, self.vocab_size, self.block_size
        b = int(self.bias)
        ln = D * (1 + b)
        block = 2 * ln + (3 * D * D + 3 * D * b) + (D * D + D * b) + (4 * D * D + 4 * D * b) + (4 * D * D + D * b)
        return V * D + T * D + L * block + ln

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B convention:
        6 * N_matmul + 12 * n_layer * n_embd * T (attention scores and values, causal not halved).
        N_matmul excludes the position table (a lookup, not a matmul) but includes the LM head."""
        T = seq_len or self.block_size
        n_matmul = self.num_params() - self.block_size * self.n_embd
        return 6 * n_matmul + 12 * self.n_layer * self.n_embd * T


PRESETS: dict[str, dict] = {
    # 4 layers x 128 wide: compiles in seconds and learns Tiny Shakespeare on 2 CPU cores.
    "tiny": dict(block_size=128, n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # FGPT: head_dim 52 (1248 / 24), not a multiple of 8 -> padded for cuDNN, see causal_attention.
    "fgpt": dict(n_layer=32, n_head=24, n_embd=1248),
}


def resolve_attention(config: GPTConfig) -> str:
    """The attention implementation to use on this backend ("auto" picks cuDNN on GPU in 16-bit)."""
    if config.attention != "auto":
        return config.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.dtype in ("bfloat16", "float16") else "xla"


def causal_attention(
    q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, *, implementation: str = "xla", pad_multiple: int = 1
) -> jax.Array:
    """Causal softmax attention through `jax.nn.dot_product_attention`.

    cuDNN's fused kernels need head_dim % 8 == 0. For other head dims (FGPT: 52) q, k and v are
    zero-padded to P = next multiple of `pad_multiple`: the extra zeros add nothing to q.k, the
    softmax scale stays 1/sqrt(H) of the true head dim, and the padded output columns (zeros,
    since v's padding is zero) are sliced away. Exact, at the cost of P/H more attention FLOPs.
    Which P is fastest (56, the least work, or 64, a power of two the kernels may prefer) is a
    GPU measurement: `GPTConfig.attention_pad` chooses, and scripts/bench_train.py compares.
    """
    H = q_BTNH.shape[-1]
    P = -(-H // pad_multiple) * pad_multiple
    if P != H:
        pad = [(0, 0)] * (q_BTNH.ndim - 1) + [(0, P - H)]
        q_BTNP, k_BTNP, v_BTNP = (jnp.pad(x, pad) for x in (q_BTNH, k_BTNH, v_BTNH))
    else:
        q_BTNP, k_BTNP, v_BTNP = q_BTNH, k_BTNH, v_BTNH
    out_BTNP = jax.nn.dot_product_attention(
        q_BTNP, k_BTNP, v_BTNP, scale=1.0 / math.sqrt(H), is_causal=True, implementation=implementation
    )
    return out_BTNP[..., :H]


def tied_head(x_BTD: jax.Array, w_VD: jax.Array) -> jax.Array:
    """x @ w.T in x's dtype with float32 accumulation and output: the one definition of the
    head, shared by `GPT.logits` and the fused cross-entropy in loss.py."""
    return jnp.einsum("...d,vd->...v", x_BTD, w_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        D = config.n_embd
        dt, pdt = DTYPES[config.dtype], DTYPES[config.param_dtype]
        self.n_head = config.n_head
        self.implementation = resolve_attention(config)
        # cuDNN needs head_dim % 8 == 0; XLA does not, so only the cuDNN path is padded.
        self.pad_multiple = config.attention_pad if self.implementation == "cudnn" else 1
        self.c_attn = nnx.Linear(
            D, 3 * D, use_bias=config.bias, dtype=dt, param_dtype=pdt, kernel_init=_normal(0.02), rngs=rngs
        )
        # Residual projection: std scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth (GPT-2 paper, section 2.3).
        self.c_proj = nnx.Linear(
            D,
            D,
            use_bias=config.bias,
            dtype=dt,
            param_dtype=pdt,
            kernel_init=_normal(0.02 / math.sqrt(2 * config.n_layer)),
            rngs=rngs,
        )

    def __call__(self, x_BTD: jax.Array, kv=None):
        """Training/scoring: causal attention over x. With `kv` = (k_LBSNH, v_LBSNH, layer, mask_BTS,
        index): decoding against a KV cache; writes this chunk's keys/values into layer `layer` at
        slot `index` and returns (y, k_LBSNH, v_LBSNH)."""
        B, T, D = x_BTD.shape
        N = self.n_head
        q_BTD, k_BTD, v_BTD = jnp.split(self.c_attn(x_BTD), 3, axis=-1)
        q_BTNH, k_BTNH, v_BTNH = (t.reshape(B, T, N, D // N) for t in (q_BTD, k_BTD, v_BTD))
        if kv is None:
            y_BTNH = causal_attention(
                q_BTNH, k_BTNH, v_BTNH, implementation=self.implementation, pad_multiple=self.pad_multiple
            )
            return self.c_proj(y_BTNH.reshape(B, T, D))
        k_LBSNH, v_LBSNH, layer, mask_BTS, index = kv
        # Written in place into the whole [L, B, S, N, H] buffers: no per-step copy of the cache.
        k_LBSNH = jax.lax.dynamic_update_slice(k_LBSNH, k_BTNH[None].astype(k_LBSNH.dtype), (layer, 0, index, 0, 0))
        v_LBSNH = jax.lax.dynamic_update_slice(v_LBSNH, v_BTNH[None].astype(v_LBSNH.dtype), (layer, 0, index, 0, 0))
        k_BSNH, v_BSNH = k_LBSNH[layer].astype(q_BTNH.dtype), v_LBSNH[layer].astype(q_BTNH.dtype)
        # Decoding is memory-bound and masked per row (left padding): XLA's kernel, any head dim.
        y_BTNH = jax.nn.dot_product_attention(
            q_BTNH, k_BSNH, v_BSNH, mask=mask_BTS[:, None], scale=1.0 / math.sqrt(D // N)
        )
        return self.c_proj(y_BTNH.reshape(B, T, D)), k_LBSNH, v_LBSNH


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        D = config.n_embd
        dt, pdt = DTYPES[config.dtype], DTYPES[config.param_dtype]
        self.c_fc = nnx.Linear(
            D, 4 * D, use_bias=config.bias, dtype=dt, param_dtype=pdt, kernel_init=_normal(0.02), rngs=rngs
        )
        self.c_proj = nnx.Linear(
            4 * D,
            D,
            use_bias=config.bias,
            dtype=dt,
            param_dtype=pdt,
            kernel_init=_normal(0.02 / math.sqrt(2 * config.n_layer)),
            rngs=rngs,
        )

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x_BTD), approximate=True))


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        dt, pdt = DTYPES[config.dtype], DTYPES[config.param_dtype]
        # epsilon 1e-5 as in GPT-2 / torch (flax's default is 1e-6).
        self.ln_1 = nnx.LayerNorm(
            config.n_embd, epsilon=1e-5, use_bias=config.bias, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.attn = CausalSelfAttention(config, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(
            config.n_embd, epsilon=1e-5, use_bias=config.bias, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, kv=None):
        if kv is None:
            x_BTD = x_BTD + self.attn(self.ln_1(x_BTD))
            return x_BTD + self.mlp(self.ln_2(x_BTD))
        y_BTD, k_LBSNH, v_LBSNH = self.attn(self.ln_1(x_BTD), kv)
        x_BTD = x_BTD + y_BTD
        return x_BTD + self.mlp(self.ln_2(x_BTD)), k_LBSNH, v_LBSNH


def _run_block(block: Block, x_BTD: jax.Array) -> jax.Array:
    return block(x_BTD)


# Per-block rematerialisation: activations inside a block are recomputed in the backward pass,
# so only the residual stream between blocks is kept (memory O(n_layer * B*T*D)).
_run_block_remat = nnx.remat(_run_block)


def _scan_blocks(blocks, x_BTD: jax.Array, remat: bool) -> jax.Array:
    """The blocks applied in order as one `lax.scan`: the program holds one block instead of n_layer.

    The parameters stay where they are (`h/<i>/...`, so checkpoints, the optimizer's labels and
    the Hugging Face mapping do not change): each leaf is stacked along a new layer axis inside
    the trace, and the scan body rebuilds one block from its slice. The stack is a copy of the
    block parameters per forward pass and its transpose slices the gradients back per layer.
    All blocks share one graph definition (one GPTConfig), which the scan requires. Whether it
    compiles faster depends on the backend (XLA:CPU: slower, see benchmarks/RESULTS.md), and what
    it costs per step is a GPU measurement (scripts/bench_train.py, variant `scan`): off by default.
    """
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))

    def body(x_BTD, state):
        return nnx.merge(graphdef, state)(x_BTD), None

    if remat:  # the same policy as nnx.remat above: keep only each block's input
        body = jax.checkpoint(body, prevent_cse=False)
    x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
    return x_BTD


class GPT(nnx.Module):
    """GPT-2-style decoder. `model(tokens_BT int32) -> logits_BTV float32`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, pdt = DTYPES[config.dtype], DTYPES[config.param_dtype]
        self.wte = nnx.Embed(
            config.vocab_size, config.n_embd, dtype=dt, param_dtype=pdt, embedding_init=_normal(0.02), rngs=rngs
        )
        self.wpe = nnx.Embed(
            config.block_size, config.n_embd, dtype=dt, param_dtype=pdt, embedding_init=_normal(0.02), rngs=rngs
        )
        self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(
            config.n_embd, epsilon=1e-5, use_bias=config.bias, dtype=dt, param_dtype=pdt, rngs=rngs
        )

    def hidden_states(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """Final-LayerNorm output [B, T, D] in the compute dtype (blocks unrolled, or scanned
        with `config.scan_layers`: the same function)."""
        B, T = tokens_BT.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.wte(tokens_BT) + self.wpe(positions_BT)
        if self.config.scan_layers:
            x_BTD = _scan_blocks(list(self.h), x_BTD, self.config.remat)
        else:
            run = _run_block_remat if self.config.remat else _run_block
            for block in self.h:
                x_BTD = run(block, x_BTD)
        return self.ln_f(x_BTD)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Tied LM head. Inputs stay in the compute dtype (bf16 tensor cores) but accumulate and
        return float32, so softmax/cross-entropy never see bf16 rounding."""
        return tied_head(x_BTD, self.head_weight())

    def head_weight(self) -> jax.Array:
        """The LM head's [V, D] matrix (the token embedding, tied): what loss.py's fused
        cross-entropy differentiates with respect to."""
        return self.wte.embedding[...]

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return self.logits(self.hidden_states(tokens_BT))

    def decode(self, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Run `tokens_BT` (a prompt chunk, or one new token per row) against a KV cache.

        `cache` (see `init_cache`) holds keys/values for slots [0, index) and each row's first
        real slot `start_B` (prompts are left-padded). The chunk is written at slots
        [index, index + T); row b's tokens get positions slot - start_B[b], and attend to slots
        start_B[b] .. their own. Returns (logits_BTV float32, the updated cache).
        """
        B, T = tokens_BT.shape
        S = cache["k"].shape[2]
        index, start_B1 = cache["index"], cache["start"][:, None]
        slots_T = index + jnp.arange(T, dtype=jnp.int32)
        positions_BT = jnp.maximum(slots_T[None, :] - start_B1, 0)
        keys_S = jnp.arange(S, dtype=jnp.int32)
        mask_BTS = (keys_S[None, None, :] <= slots_T[None, :, None]) & (keys_S[None, None, :] >= start_B1[:, :, None])
        x_BTD = self.wte(tokens_BT) + self.wpe(positions_BT)
        k_LBSNH, v_LBSNH = cache["k"], cache["v"]
        for layer, block in enumerate(self.h):
            x_BTD, k_LBSNH, v_LBSNH = block(x_BTD, (k_LBSNH, v_LBSNH, layer, mask_BTS, index))
        cache = {"k": k_LBSNH, "v": v_LBSNH, "start": cache["start"], "index": index + T}
        return self.logits(self.ln_f(x_BTD)), cache


def init_cache(config: GPTConfig, batch: int, length: int, start_B: jax.Array | None = None) -> dict:
    """An empty KV cache: keys/values [n_layer, B, length, N, H] in the compute dtype.

    `start_B` is each row's first real slot (its left padding); `index` the next slot to write.
    """
    shape = (config.n_layer, batch, length, config.n_head, config.head_dim)
    dt = DTYPES[config.dtype]
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "start": start_B, "index": jnp.zeros((), jnp.int32)}


def abstract_model(config: GPTConfig) -> GPT:
    """The model's shapes and dtypes without allocating it (for parameter counts, restores)."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))


def param_name(keypath) -> str:
    """ "h/0/attn/c_attn/kernel" for a jax key path into the model's state.

    Only dict keys and list indices name a parameter: the `.value` attribute of an nnx.Variable
    and the {"value": ...} level orbax stores it under are not part of the name.
    """
    parts = [str(k.key if hasattr(k, "key") else k.idx) for k in keypath if hasattr(k, "key") or hasattr(k, "idx")]
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def named_leaves(tree) -> dict:
    """{param_name: leaf} of a params-shaped pytree."""
    return {param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count_params(model: GPT) -> int:
    """Parameters actually present in a (possibly abstract) model."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
