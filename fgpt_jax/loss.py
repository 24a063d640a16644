"""The language-modelling loss, shared by the train step, validation and evaluation.

Cross-entropy is taken in float32 on float32 logits (the model's head accumulates in float32), so
a bf16 forward pass never rounds the loss. Losses are returned as (sum, count) pairs, not means:
summing both over micro-batches, devices and validation batches and dividing once gives the exact
token-weighted mean however the tokens were split, also when a mask makes batches unequal.

With `GPTConfig.loss_chunk = C > 0` the LM head and the cross-entropy are fused and computed C
sequence positions at a time (`fused_loss_sum`), so the [B, T, V] float32 logits (13 GB for
GPT-2 at 64 x 1024) and their gradient never exist whole: at most [B, C, V] at a time.

Objectives (`Objective`): the language-modelling loss (pretraining, SFT) and DPO (preference
tuning) as (loss sum, count, metric sums), the form the train step and validation add up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fgpt_jax.data import Batch
from fgpt_jax.model import tied_head
from fgpt_jax.tokenizer import get_tokenizer


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32 (the cast guards custom models with 16-bit logits)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def lm_loss_sums(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked next-token losses, sum of the mask) of one batch.

    A model whose config sets `loss_chunk` (a GPT) takes the fused chunked path: the same numbers
    without the whole logits. Any other model is called as `model(tokens) -> logits`."""
    mask_BT = batch.mask.astype(jnp.float32)
    chunk = getattr(getattr(model, "config", None), "loss_chunk", 0)
    if chunk:
        h_BTD = model.hidden_states(batch.tokens[:, :-1])
        return fused_loss_sum(h_BTD, model.head_weight(), batch.tokens[:, 1:], mask_BT, chunk), jnp.sum(mask_BT)
    losses_BT = token_losses(model(batch.tokens[:, :-1]), batch.tokens[:, 1:])
    return jnp.sum(losses_BT * mask_BT), jnp.sum(mask_BT)


def fused_loss_sum(
    h_BTD: jax.Array, w_VD: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, chunk: int
) -> jax.Array:
    """sum over tokens of weights * cross-entropy(h @ w.T, targets), `chunk` positions at a time.

    Equal to `sum(token_losses(tied_head(h, w), targets) * weights)` and differentiable in h and
    w (not in targets or weights). Chunks run along T, so the batch axis and its sharding over
    devices are untouched; T is padded to a multiple of `chunk` with weight 0. The gradient is
    computed in the forward pass of differentiation (a custom VJP), chunk by chunk, from the
    logits already in hand, so the head's matmul is not recomputed: the backward pass only
    scales the saved dh [B, T, D] and dw [V, D] (float32) by the incoming cotangent. This is
    exact because the output is a single weighted sum. Without differentiation (evaluation) only
    the loss is computed.
    """
    B, T, D = h_BTD.shape
    C = max(1, min(chunk, T))
    n = -(-T // C)
    pad = n * C - T
    weights_BT = weights_BT.astype(jnp.float32)
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT, weights_BT = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets_BT, weights_BT))
    # [n, B, C, ...]: the scan runs over chunks of positions, each chunk keeps the whole batch.
    h_nBCD = h_BTD.reshape(B, n, C, D).swapaxes(0, 1)
    t_nBC, wt_nBC = (x.reshape(B, n, C).swapaxes(0, 1) for x in (targets_BT, weights_BT))
    return _fused(h_nBCD, w_VD, t_nBC, wt_nBC)


def _chunk(h_BCD, w_VD, t_BC, wt_BC):
    """(logits [B, C, V] float32, log-sum-exp [B, C], weighted loss sum) of one chunk."""
    logits_BCV = tied_head(h_BCD, w_VD)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    return logits_BCV, lse_BC, jnp.sum(wt_BC * (lse_BC - target_BC))


@jax.custom_vjp
def _fused(h_nBCD, w_VD, t_nBC, wt_nBC):
    def step(total, xs):
        h_BCD, t_BC, wt_BC = xs
        return total + _chunk(h_BCD, w_VD, t_BC, wt_BC)[2], None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (h_nBCD, t_nBC, wt_nBC))
    return total


def _fused_fwd(h_nBCD, w_VD, t_nBC, wt_nBC):
    V = w_VD.shape[0]
    dt = h_nBCD.dtype
    w_c = w_VD.astype(dt)

    def step(carry, xs):
        total, dw_VD = carry
        h_BCD, t_BC, wt_BC = xs
        logits_BCV, lse_BC, loss = _chunk(h_BCD, w_VD, t_BC, wt_BC)
        # d(loss)/d(logits) = weight * (softmax - onehot(target)), in float32, then the head's dtype.
        g_BCV = jnp.exp(logits_BCV - lse_BC[..., None]) - jax.nn.one_hot(t_BC, V, dtype=jnp.float32)
        g_BCV = (g_BCV * wt_BC[..., None]).astype(dt)
        dh_BCD = jnp.einsum("bcv,vd->bcd", g_BCV, w_c, preferred_element_type=jnp.float32).astype(dt)
        dw_VD = dw_VD + jnp.einsum("bcv,bcd->vd", g_BCV, h_BCD, preferred_element_type=jnp.float32)
        return (total + loss, dw_VD), dh_BCD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_VD.shape, jnp.float32))
    (total, dw_VD), dh_nBCD = jax.lax.scan(step, init, (h_nBCD, t_nBC, wt_nBC))
    return total, (dh_nBCD, dw_VD.astype(w_VD.dtype))


def _fused_bwd(residuals, g):
    dh_nBCD, dw_VD = residuals
    return (g.astype(dh_nBCD.dtype) * dh_nBCD, g.astype(dw_VD.dtype) * dw_VD, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def per_token_losses(model, tokens_BT: jax.Array) -> jax.Array:
    """[B, T-1] float32: the next-token loss at every position of `tokens_BT`. A model whose config
    sets `loss_chunk` computes the logits `loss_chunk` positions at a time (never [B, T, V] at once)."""
    chunk = getattr(getattr(model, "config", None), "loss_chunk", 0)
    if not chunk:
        return token_losses(model(tokens_BT[:, :-1]), tokens_BT[:, 1:])
    h_BTD, targets_BT = model.hidden_states(tokens_BT[:, :-1]), tokens_BT[:, 1:]
    B, T, D = h_BTD.shape
    C = max(1, min(chunk, T))
    n, pad = -(-T // C), -(-T // C) * C - T
    h_nBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
    t_nBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)
    w_VD = model.head_weight()
    losses_nBC = jax.lax.map(lambda xs: token_losses(tied_head(xs[0], w_VD), xs[1]), (h_nBCD, t_nBC))
    return losses_nBC.swapaxes(0, 1).reshape(B, n * C)[:, :T]


class EvalSums(NamedTuple):
    """What one validation batch adds up (summed over batches, then divided once at the end)."""

    loss: jax.Array  # float32: summed masked next-token loss (nats)
    tokens: jax.Array  # float32: masked target tokens
    nats: jax.Array  # float32: summed loss of the masked targets that are text (not special tokens)
    bytes: jax.Array  # int32: UTF-8 bytes of those targets


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """`eval_step(params, batch) -> EvalSums`, jitted once per batch shape. Bits per byte = nats / ln 2
    / bytes, over the targets that are text (each id's UTF-8 length from the tokenizer; special ids
    count 0 bytes and are left out, as nanochat's evaluate_bpb), so runs with different vocabularies
    compare."""

    def eval_step(params, batch: Batch):
        model = nnx.merge(graphdef, params)
        losses_BT = per_token_losses(model, batch.tokens)
        mask_BT = batch.mask.astype(jnp.float32)
        table_V = jnp.asarray(_token_bytes(model.config.vocab_size))  # a constant of the program
        bytes_BT = table_V[batch.tokens[:, 1:]] * batch.mask.astype(jnp.int32)
        return EvalSums(
            jnp.sum(losses_BT * mask_BT),
            jnp.sum(mask_BT),
            jnp.sum(jnp.where(bytes_BT > 0, losses_BT, 0.0)),
            jnp.sum(bytes_BT),
        )

    return jax.jit(eval_step)


@functools.cache
def _token_bytes(vocab_size: int) -> np.ndarray:
    return get_tokenizer().token_bytes(vocab_size)


# -- objectives: what the train step and validation sum up ------------------------------------------
class Objective(NamedTuple):
    """A training objective as sums, so micro-batches, devices and validation batches add up exactly.

    sums(model, batch) -> (loss_sum, count, metric_sums): the loss summed over the batch's units
    (target tokens for language modelling, pairs for DPO), how many units it holds, and metric sums
    over the same units. count(batch): the same count without the model, so the train step can
    divide each micro-batch's loss by the whole batch's count before adding them up. `metrics`
    names the scalar metric sums. Chosen once, statically, per run
    (`fgpt_jax.train.step.objective_for`): each is its own jitted program."""

    sums: Callable
    count: Callable
    metrics: tuple[str, ...] = ()


def _lm_sums(model, batch: Batch):
    loss_sum, count = lm_loss_sums(model, batch)
    return loss_sum, count, {}


LM_OBJECTIVE = Objective(_lm_sums, lambda batch: jnp.sum(batch.mask.astype(jnp.float32)))


def sequence_logps(logits_BTV: jax.Array, tokens_BT1: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """[B] float32: each row's log-probability of its masked targets, the sum over its reply's tokens."""
    return -jnp.sum(token_losses(logits_BTV, tokens_BT1[:, 1:]) * mask_BT.astype(jnp.float32), axis=-1)


def dpo_losses(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair (loss, chosen reward, rejected reward) from the replies' summed log-probabilities.

    The implicit rewards are beta * (log pi - log pi_ref). With h = the chosen reply's log-ratio minus
    the rejected one's:
      sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO, Rafailov et al. 2023;
               eps = label_smoothing > 0 is conservative DPO, labels flipped with probability eps)
      ipo      (h - 1 / (2 beta))^2                                         (IPO, Azar et al. 2023)
    Both on summed log-probabilities, as in the papers (TRL's IPO averages them per token instead).
    At policy = reference h = 0: the sigmoid loss is ln 2, the rewards are 0."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h
        )
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses, beta * chosen_ratio, beta * rejected_ratio


DPO_METRICS = (
    "dpo/loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def _pair_weights(mask_BT: jax.Array) -> jax.Array:
    """[B/2]: 1 for a pair with a reply, 0 for a padding pair (all-zero mask)."""
    return (jnp.sum(mask_BT.astype(jnp.float32).reshape(-1, 2 * mask_BT.shape[-1]), axis=-1) > 0).astype(jnp.float32)


def dpo_sums(logps: jax.Array, batch, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """(loss_sum, count, metric_sums) of a `PreferenceBatch` from its rows' reply log-probabilities [2P].

    Sums over the real pairs (padding pairs, all-zero mask, count for nothing). metric_sums holds
    DPO_METRICS: the loss again, the rewards, their margin, how often the chosen reward is strictly
    higher (a tie, as at step 0, counts as wrong), and the policy's reply log-probabilities (both
    falling together is DPO's known failure mode)."""
    logps = logps.reshape(-1, 2)
    ref = batch.ref_logp.astype(jnp.float32).reshape(-1, 2)
    w = _pair_weights(batch.mask)
    losses, chosen, rejected = dpo_losses(
        logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta, label_smoothing, loss_type
    )
    per_pair = (
        losses,
        chosen,
        rejected,
        chosen - rejected,
        (chosen > rejected).astype(jnp.float32),
        logps[:, 0],
        logps[:, 1],
    )
    return jnp.sum(w * losses), jnp.sum(w), {k: jnp.sum(w * v) for k, v in zip(DPO_METRICS, per_pair)}


def dpo_objective(beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> Objective:
    """DPO over a `PreferenceBatch`: chosen and rejected rows in one forward pass, sums over pairs."""
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")

    def sums(model, batch):
        logps = sequence_logps(model(batch.tokens[:, :-1]), batch.tokens, batch.mask)
        return dpo_sums(logps, batch, beta, label_smoothing, loss_type)

    return Objective(sums, lambda batch: jnp.sum(_pair_weights(batch.mask)), DPO_METRICS)


def make_dpo_eval_step(
    graphdef: nnx.GraphDef, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid", out_sharding=None
) -> Callable:
    """`eval_step(params, batch) -> (loss_sum, count, metric_sums, row log-probs [2P])`, jitted.

    The one program that scores a DPO run's reference (the row log-probs) and its policy on the
    validation pairs (the sums): at policy = reference they agree bit for bit, so step 0 reads
    exactly ln 2, rewards 0 and accuracy 0 rather than float noise around them."""
    dpo_objective(beta, label_smoothing, loss_type)  # checks the arguments

    def eval_step(params, batch):
        logps = sequence_logps(nnx.merge(graphdef, params)(batch.tokens[:, :-1]), batch.tokens, batch.mask)
        return (*dpo_sums(logps, batch, beta, label_smoothing, loss_type), logps)

    return jax.jit(eval_step, out_shardings=out_sharding)


__all__ = [
    "token_losses",
    "lm_loss_sums",
    "fused_loss_sum",
    "per_token_losses",
    "EvalSums",
    "make_eval_step",
    "Objective",
    "LM_OBJECTIVE",
    "sequence_logps",
    "dpo_losses",
    "dpo_sums",
    "dpo_objective",
    "make_dpo_eval_step",
    "DPO_METRICS",
]
