"""The train state and the jitted train step: one XLA program per run, state donated.

The model is split once into a static graph definition and its parameters (`nnx.split`); the step
merges them inside the trace, so the whole update (forward, backward over every micro-batch,
clipping, Muon/AdamW) is one XLA program with no Python in the loop. Gradient accumulation is a
`lax.scan` over micro-batches; each micro-batch's loss is its masked token-loss sum divided by the
mask's sum over the *whole* batch, so k micro-batches give exactly the gradient of one k-times
larger batch, also when micro-batches hold different numbers of target tokens.

The objective is chosen statically by the config (`objective_for`): the language-modelling loss
(sums over target tokens), or DPO for preference data (sums over pairs, `PreferenceBatch`).
Both are `fgpt_jax.loss.Objective`s, summed the same way; their metric sums are averaged too.

Shapes: A micro-batches (gradient accumulation), B sequences per micro-batch (global), T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from fgpt_jax import sharding as shd
from fgpt_jax.config import Config
from fgpt_jax.data import Batch
from fgpt_jax.loss import LM_OBJECTIVE, Objective, dpo_objective
from fgpt_jax.model import GPT, abstract_model
from fgpt_jax.optim import learning_rates, make_optimizer


@struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it can be jitted, donated, sharded and checkpointed.
    Checkpoints save `params` as their own item (what `load_model` reads) and every other field
    together, so a field added here is saved and restored without touching checkpoint.py."""

    params: Any  # nnx.State of the model's Params (float32)
    opt_state: Any  # optax state (float32 moments)
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    rng: jax.Array  # uint32[2] raw key data: a PRNG stream for anything random the run does


def init_train_state(model: GPT, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh TrainState for `model`'s parameters."""
    params = nnx.state(model, nnx.Param)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=key)


def objective_for(cfg: Config) -> Objective:
    """The run's objective: DPO (cfg.dpo) for preference data, else the language-modelling loss."""
    if cfg.data.format == "preference":
        return dpo_objective(cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.loss)
    return LM_OBJECTIVE


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], dict],
    state_shardings=None,
    objective: Objective = LM_OBJECTIVE,
) -> Callable:
    """Build `step(state, batch) -> (state, metrics)`; `batch` is a `Batch` (a `PreferenceBatch` for
    DPO) of [A, B, ...] arrays.

    Jitted with `state` donated: the old parameters and optimizer state are overwritten in place
    instead of doubling device memory. Metrics are device scalars (read them a step later):
    train/loss, grad_norm, the learning rates, and the objective's metrics (DPO: dpo/loss, rewards/*,
    logps/*), each a mean over the whole batch.
    """

    def step(state: TrainState, batch: Batch):
        count = jnp.maximum(objective.count(batch), 1.0)  # target tokens, or pairs

        def micro(carry, micro_batch):
            grads_acc, loss_acc, metrics_acc = carry

            def loss_fn(params):
                loss_sum, _, metric_sums = objective.sums(nnx.merge(graphdef, params), micro_batch)
                return loss_sum / count, metric_sums

            (loss, metric_sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return (
                jax.tree.map(jnp.add, grads_acc, grads),
                loss_acc + loss,
                jax.tree.map(jnp.add, metrics_acc, metric_sums),
            ), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        metric_zeros = {k: jnp.zeros((), jnp.float32) for k in objective.metrics}
        (grads, loss, metric_sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), metric_zeros), batch)
        grad_norm = optax.tree.norm(grads)  # before clipping: what clipping acts on
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": loss,
            "grad_norm": grad_norm,
            **lr_fn(state.step),
            **{k: v / count for k, v in metric_sums.items()},
        }
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)


@dataclasses.dataclass
class Setup:
    """What a run trains: the model graph, the optax chain, the state's shardings, and the jitted
    init and train step. Shared by the trainer and scripts/bench_train.py, so the benchmark times
    the same program."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the restore target
    init: Callable  # init(base_params or None) -> TrainState, created directly in its shardings
    train_step: Callable  # (state, Batch[A, B, ...]) -> (state, metrics); state donated


def build_setup(cfg: Config, mesh) -> Setup:
    """Model, optimizer and state for `cfg` on `mesh` (never materialised whole on one device)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    lr_fn = functools.partial(learning_rates, cfg.optim, cfg.train.steps)

    def fresh_state(base_params=None):
        model = GPT(cfg.model, rngs=nnx.Rngs(cfg.seed))
        if base_params is not None:  # fine-tuning: the base run's weights, a fresh optimizer
            nnx.update(model, base_params)
        return init_train_state(model, tx, cfg.seed)

    abstract = jax.eval_shape(fresh_state)
    graphdef = nnx.graphdef(abstract_model(cfg.model))
    shardings = shd.tree_shardings(abstract, mesh, cfg.train.sharding)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    init = jax.jit(fresh_state, out_shardings=shardings)
    return Setup(
        graphdef, tx, shardings, abstract, init, make_train_step(graphdef, tx, lr_fn, shardings, objective_for(cfg))
    )
