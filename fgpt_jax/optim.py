"""The optimizer: Muon for hidden matrices, AdamW for everything else, as one optax chain.

    clip_by_global_norm -> partition by label:
        "muon":  Nesterov momentum -> Newton-Schulz orthogonalisation -> shape scale -> weight decay -> -muon_lr(t)
        "adamw": Adam(b1, b2) -> weight decay (matrices only, or every parameter) -> -lr(t)

Labels are explicit, by parameter path (never by ndim alone: optax.contrib.muon's default would
send the token embedding, a 2-D matrix, to Muon): attention qkv and output projections and the
MLP in/out kernels are Muon; token and position embeddings (the tied head), LayerNorms and biases
are AdamW. `optimizer="adamw"` puts everything on AdamW: the build-nanogpt baseline.

Muon's momentum follows one of two rules (`muon_momentum_rule`); both keep the same EMA buffer
mu <- b * mu + (1 - b) * g in the same optax `MuonState`, and differ only in the Nesterov step:
    "torch":  (1 - b) * g + b * mu                                 torch.optim.Muon, Keller Jordan's Muon
    "optax":  b * mu / (1 - b^(t+1)) + (1 - b) * g / (1 - b^t)     optax.contrib.scale_by_muon (bias-corrected)
The Newton-Schulz normalisation makes the update scale-free, so the rules agree at step 1 and differ
by ~9-12% at step 2; the difference decays as b^t (< 0.6% after 100 steps at b = 0.95). Because the
state is the same, a run may switch rule on resume: the moments keep their meaning, only the next
steps' bias correction changes.

Newton-Schulz is the quintic iteration, orthogonalising over (reduction axis 0, output axis 1) =
Flax's (in, out) kernels: optax's iteration in float32, or `newton_schulz_bf16`, which repeats
torch.optim.Muon's bf16 iteration operation by operation.
The shape scale sqrt(max(1, fan_out / fan_in)) (torch's `adjust_lr_fn="original"`, max(1, rows / cols)
on its (out, in) weights) is written here because optax keeps its `scale_by_shape` private.
The attention qkv kernel (D, 3D) is orthogonalised as one matrix, as in FGPT.

Weight decay is decoupled and multiplied by the learning rate before any shape scale, as in
torch.optim.AdamW and torch.optim.Muon: theta <- theta * (1 - lr * wd). build-nanogpt (the GPT-2
presets) decays matrices only; FGPT built `torch.optim.Muon(hidden, lr=0.03)` and
`torch.optim.AdamW(rest, 3e-4, betas=(0.9, 0.95), weight_decay=0.1)`, i.e. PyTorch's default Muon
(momentum 0.95, Nesterov, decoupled decay 0.1, bf16 Newton-Schulz) and AdamW decay on every parameter
it holds, LayerNorms and biases included: the `fgpt` preset sets `muon_momentum_rule="torch",
ns_dtype="bfloat16", muon_weight_decay=0.1, weight_decay_on="all"` (tests/test_optim.py checks the
chain against torch's two optimizers step by step).

`ns_dtype` changes only the arithmetic, never the optimizer state (momentum stays float32), so it
can change between resumes too.

The schedule is shared: both learning rates follow the same multiplier, linear warmup, an optional
plateau, then cosine (or linear for warmup-stable-decay) to `min_lr_ratio`. `restart_schedule`
resets the schedules' step counters in an optimizer state and keeps the moments (and Adam's bias
correction counts): a warm restart with a new schedule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers, MuonState, scale_by_muon

from fgpt_jax.errors import ConfigError
from fgpt_jax.model import param_name

# Kernels of the hidden matrices, by path inside GPT: h/<i>/attn/c_attn/kernel, ...
MUON_PATTERN = re.compile(r"^h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel$")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["muon", "adamw"] = "muon"  # "muon": Muon for hidden matrices + AdamW; "adamw": AdamW for all
    lr: float = 6e-4  # AdamW peak learning rate (embeddings, LayerNorms, biases; everything with "adamw")
    muon_lr: float = 0.02  # Muon peak learning rate (hidden matrices)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_momentum_rule: Literal["optax", "torch"] = "optax"  # Nesterov step: "optax" bias-corrects it
    # (optax.contrib.scale_by_muon); "torch" does not (torch.optim.Muon, Keller Jordan's Muon; the fgpt presets).
    # Same optimizer state either way: a run may switch on resume
    ns_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0  # decoupled weight decay on Muon matrices (multiplied by muon_lr)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW decoupled weight decay (multiplied by lr)
    weight_decay_on: Literal["matrices", "all"] = "matrices"  # AdamW decay on matrices only (build-nanogpt) or on every
    # AdamW parameter (FGPT, torch)
    ns_dtype: Literal["float32", "bfloat16"] = "float32"  # Newton-Schulz compute dtype; "bfloat16" repeats
    # torch.optim.Muon's bf16 iteration (the fgpt presets). Momentum stays float32: a run may switch on resume
    grad_clip: float = 1.0  # global-norm clipping threshold (0 disables)
    schedule: Literal["cosine", "wsd"] = "cosine"  # decay shape after warmup and plateau: cosine or linear (WSD)
    warmup_steps: int = 715  # linear warmup from 0 to the peak
    plateau_steps: int = 0  # steps held at the peak after warmup, before the decay starts
    min_lr_ratio: float = 0.1  # the floor, as a fraction of the peak, reached at the last step

    def __post_init__(self):
        problems = []
        if self.name not in ("muon", "adamw"):
            problems.append(f"name={self.name!r} must be 'muon' or 'adamw'")
        if self.schedule not in ("cosine", "wsd"):
            problems.append(f"schedule={self.schedule!r} must be 'cosine' or 'wsd'")
        if self.weight_decay_on not in ("matrices", "all"):
            problems.append(f"weight_decay_on={self.weight_decay_on!r} must be 'matrices' or 'all'")
        if self.muon_momentum_rule not in ("optax", "torch"):
            problems.append(f"muon_momentum_rule={self.muon_momentum_rule!r} must be 'optax' or 'torch'")
        if self.ns_dtype not in ("float32", "bfloat16"):
            problems.append(f"ns_dtype={self.ns_dtype!r} must be 'float32' or 'bfloat16'")
        for f in ("lr", "muon_lr"):  # `not x > 0` also refuses nan
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) > 0):
                problems.append(f"{f}={getattr(self, f)} must be a finite number > 0")
        for f in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, f) < 1:
                problems.append(f"{f}={getattr(self, f)} must be in [0, 1)")
        for f in ("eps", "grad_clip", "weight_decay", "muon_weight_decay"):
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                problems.append(f"{f}={getattr(self, f)} must be a finite number >= 0")
        for f in ("warmup_steps", "plateau_steps"):
            if getattr(self, f) < 0:
                problems.append(f"{f}={getattr(self, f)} must be >= 0")
        if self.ns_steps < 1:
            problems.append(f"ns_steps={self.ns_steps} must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if problems:
            raise ConfigError("OptimConfig: " + "; ".join(problems))


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Schedule multiplier in [min_lr_ratio, 1]: warmup, plateau, then cosine or linear decay.

    Step s (0-based) is the update being applied; warmup reaches the peak at s = warmup_steps
    (the first update uses 1/warmup_steps, never 0) and the floor is reached at s = total_steps - 1.
    """
    warmup = min(cfg.warmup_steps, total_steps)
    decay_start = min(warmup + cfg.plateau_steps, total_steps)
    decay_len = max(total_steps - 1 - decay_start, 1)
    floor = cfg.min_lr_ratio

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = (s + 1) / max(warmup, 1)
        t = jnp.clip((s - decay_start) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(math.pi * t))
        else:
            decay = 1 - (1 - floor) * t
        return jnp.where(s < warmup, warm, decay)

    return schedule


def param_labels(params) -> dict:
    """ "muon" or "adamw" for every parameter of a GPT state, by its path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "muon" if MUON_PATTERN.match(param_name(path)) else "adamw", params
    )


def scale_by_shape() -> optax.GradientTransformation:
    """Scale each (in, out) update by sqrt(max(1, out / in)): Muon's width transfer rule."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * math.sqrt(max(1.0, u.shape[1] / u.shape[0])), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _kernel_dims(updates):
    # Flax kernels are (in, out): reduce over axis 0, output axis 1. Masked (AdamW) leaves are
    # optax MaskedNodes, which have no leaves, so tree.map leaves them untouched.
    return jax.tree.map(lambda _: MuonDimensionNumbers(reduction_axis=0, output_axis=1), updates)


def _matrices(params):
    # Matrices (embeddings and kernels); LayerNorm scales and biases are 1-D.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def newton_schulz_bf16(x: jax.Array, steps: int, eps: float = 1e-7) -> jax.Array:
    """torch.optim.Muon's `_zeropower_via_newtonschulz`, operation by operation: every tensor bf16,
    each matmul accumulated in float32 and rounded to bf16 once, together with the term `addmm` adds
    to it (torch's addmm, like cuBLAS's epilogue, rounds alpha * A @ B + beta * C once), and the
    Frobenius norm rounded to bf16 before the division, as torch's bf16 `norm()` returns it. On
    torch's CPU kernels this gives torch's bits on every non-square test shape (tests/test_optim.py).
    Written here because optax's iteration on bf16 inputs rounds differently (and lets XLA accumulate
    in bf16 on some backends: 3-4x less accurate)."""
    a, b, c = NS_COEFFS
    bf16, f32 = jnp.bfloat16, jnp.float32
    mm = lambda p, q: jnp.dot(p, q, preferred_element_type=f32)  # noqa: E731
    X = x.astype(bf16)
    # torch iterates on its (out, in) weight, our kernel's transpose, or on the kernel itself when
    # out > in (the wide orientation: the smaller Gram matrix). Square matrices too, as torch does:
    # X X^T and X^T X round differently.
    transposed = X.shape[0] >= X.shape[1]
    if transposed:
        X = X.T
    norm = jnp.linalg.norm(X.astype(f32)).astype(bf16).astype(f32)
    X = (X.astype(f32) / jnp.maximum(norm, eps)).astype(bf16)
    for _ in range(steps):
        A = mm(X, X.T).astype(bf16)
        B = (b * A.astype(f32) + c * mm(A, A)).astype(bf16)  # torch.addmm(A, A, A, beta=b, alpha=c)
        X = (a * X.astype(f32) + mm(B, X)).astype(bf16)  # torch.addmm(X, B, X, beta=a)
    return (X.T if transposed else X).astype(f32)


def _lerp(start: jax.Array, end: jax.Array, weight: float) -> jax.Array:
    """start + weight * (end - start) in float32 as torch's `lerp` computes it (ATen's formula, which
    switches form at weight 0.5 for accuracy), so the momentum buffer has torch's bits, not just its
    value: a last-bit difference can round a bf16 Newton-Schulz input the other way."""
    w = np.float32(weight)
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (np.float32(1) - w)


def scale_by_muon_momentum(
    ns_steps: int, beta: float, rule: Literal["optax", "torch"], ns_dtype: Literal["float32", "bfloat16"]
) -> optax.GradientTransformation:
    """Muon's momentum and Newton-Schulz step (see the module docstring), with optax's `MuonState`
    whatever the rule or dtype, so the state restores across either setting. The optax rule in
    float32 is optax's own `scale_by_muon`."""
    base = scale_by_muon(
        ns_coeffs=NS_COEFFS, ns_steps=ns_steps, beta=beta, nesterov=True, weight_dimension_numbers=_kernel_dims
    )
    if rule == "optax" and ns_dtype == "float32":
        return base

    # optax's float32 iteration alone: with beta 0 and no Nesterov its momentum is the input itself
    # (optax exports the iteration only inside scale_by_muon).
    ns_f32 = scale_by_muon(
        ns_coeffs=NS_COEFFS, ns_steps=ns_steps, beta=0.0, nesterov=False, weight_dimension_numbers=_kernel_dims
    )

    def orthogonalize(tree):
        if ns_dtype == "bfloat16":
            return jax.tree.map(lambda x: newton_schulz_bf16(x, ns_steps), tree)
        return ns_f32.update(tree, ns_f32.init(tree))[0]

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        if rule == "torch":  # buf.lerp_(grad, 1 - b); update = grad.lerp(buf, b): torch's very roundings
            mu = jax.tree.map(lambda m, g: _lerp(m, g, 1 - beta), state.mu, updates)
            nesterov = jax.tree.map(lambda m, g: _lerp(g, m, beta), mu, updates)
        else:
            mu = optax.tree.update_moment(updates, state.mu, beta, 1)
            nesterov = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                optax.tree.bias_correction(updates, beta, count),
            )
        return (
            orthogonalize(nesterov),
            MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs),
        )

    return optax.GradientTransformation(base.init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The full chain for `total_steps` updates, over a GPT's Params (`nnx.state(model, nnx.Param)`)."""
    mult = lr_multiplier(cfg, total_steps)
    decay_mask = _matrices if cfg.weight_decay_on == "matrices" else (lambda p: jax.tree.map(lambda _: True, p))
    adamw = optax.chain(
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),  # masked either way: one state layout
        optax.scale_by_learning_rate(lambda s: cfg.lr * mult(s)),
    )
    if cfg.name == "adamw":
        inner = adamw
    else:
        core = scale_by_muon_momentum(cfg.ns_steps, cfg.muon_momentum, cfg.muon_momentum_rule, cfg.ns_dtype)
        muon = optax.chain(
            core,
            scale_by_shape(),
            optax.add_decayed_weights(cfg.muon_weight_decay),
            optax.scale_by_learning_rate(lambda s: cfg.muon_lr * mult(s)),
        )
        inner = optax.partition({"muon": muon, "adamw": adamw}, param_labels)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, inner)


def restart_schedule(opt_state):
    """`opt_state` with every schedule's step counter at 0 and everything else kept (the moments, and
    Adam's/Muon's own counts, whose bias corrections must not restart on warm moments)."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(
        lambda x: x._replace(count=jnp.zeros_like(x.count)) if is_schedule(x) else x, opt_state, is_leaf=is_schedule
    )


def learning_rates(cfg: OptimConfig, total_steps: int, step) -> dict[str, jax.Array]:
    """The learning rates applied at `step`, per group (for logging)."""
    m = lr_multiplier(cfg, total_steps)(step)
    rates = {"lr": cfg.lr * m}
    if cfg.name == "muon":
        rates["lr_muon"] = cfg.muon_lr * m
    return rates
