"""How a run starts: from scratch, from another run's weights (`init_from`), resumed from its own
checkpoint (`--resume [--step N]`), or warm-restarted from another run's weights, optimizer moments
and data position (`init_mode="warm"`). The checks here run before anything is written."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgpt_jax.checkpoint import Checkpoints
from fgpt_jax.config import Config
from fgpt_jax.errors import UserError
from fgpt_jax.optim import OptimConfig, learning_rates, restart_schedule
from fgpt_jax.rundir import RunDir

SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
# What the learning rate at a step depends on, besides train.steps.
SCHEDULE_FIELDS = ("lr", "muon_lr", "schedule", "warmup_steps", "plateau_steps", "min_lr_ratio")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (bad setup or a diverged loss); the message says why in one line."""


def check_base(cfg: Config) -> None:
    base = RunDir(cfg.init_from).read_config().model
    diffs = [
        f"{f} {getattr(cfg.model, f)} vs {getattr(base, f)}"
        for f in SHAPE_FIELDS
        if getattr(cfg.model, f) != getattr(base, f)
    ]
    if diffs:
        raise TrainingError(
            f"init_from {cfg.init_from}: model shape differs from the base run ({', '.join(diffs)}); "
            f"set model to None in the config (take the base run's model) or match it"
        )


def check_run(cfg: Config, run: RunDir, resume: bool, resume_step: int | None) -> int | None:
    """Refuse to overwrite a run without --resume, to resume nothing, or to resume another model.
    Returns the step to resume from."""
    steps = run.checkpoint_steps()
    if steps and not resume:
        raise TrainingError(
            f"--run {run}: already holds checkpoints; pass --resume to continue it, or choose another run directory"
        )
    if not resume:
        return None
    if not steps:
        raise TrainingError(f"--resume: no checkpoint in {run.checkpoints}")
    if resume_step is not None and resume_step not in steps:
        raise TrainingError(
            f"--step {resume_step}: not a checkpoint of {run} (available: {', '.join(map(str, steps))})"
        )
    if run.read_config().model != cfg.model:
        raise TrainingError(
            f"--resume: the model config differs from {run.config_path}; "
            f"resume with the run's own config (drop the model overrides)"
        )
    return steps[-1] if resume_step is None else resume_step


def warm_source(cfg: Config) -> tuple[int, dict]:
    """(step, loader state) of the checkpoint a warm restart continues: init_from's latest, which must
    hold optimizer state for this config's optimizer."""
    base = RunDir(cfg.init_from)
    ckpts = Checkpoints(base.checkpoints, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise TrainingError(f"init_from {cfg.init_from}: no complete checkpoint")
        if not (base.checkpoints / str(step) / "train").exists():
            raise TrainingError(
                f"init_from {cfg.init_from}: checkpoint {step} holds parameters only (an imported "
                f"model?): init_mode=warm needs optimizer state; use init_mode=params"
            )
        base_optim = base.read_config().optim.name
        if base_optim != cfg.optim.name:
            raise TrainingError(
                f"init_mode=warm: init_from used optim.name={base_optim}, this config "
                f"{cfg.optim.name}; the moments must belong to the same optimizer"
            )
        return step, ckpts.read_json(step, "data")
    finally:
        ckpts.close()


def warm_state(cfg: Config, setup, step: int, data_state: dict, loader_identity: dict):
    """The state a warm restart begins with: init_from's parameters and optimizer moments at `step`,
    a step counter and schedules at 0, a PRNG stream from this config's seed."""
    diffs = [
        f"{k} {data_state.get(k)!r} vs {v!r}"
        for k, v in loader_identity.items()
        if k not in ("global_batch_size", "first_row") and data_state.get(k) != v
    ]
    if diffs:
        raise TrainingError(
            f"init_mode=warm continues init_from's data stream, but the data differs "
            f"({', '.join(diffs)}); use the same data.path, data.seed and train.seq_len"
        )
    ckpts = Checkpoints(RunDir(cfg.init_from).checkpoints, read_only=True)
    try:
        state, _ = ckpts.restore(step, setup.abstract_state)
    finally:
        ckpts.close()
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1))
    return state.replace(
        step=jnp.zeros_like(state.step),
        opt_state=restart_schedule(state.opt_state),
        rng=jax.device_put(key, state.rng.sharding),
    )


def rows_read(data_state: dict) -> int:
    """Where a loader with this saved state would read next, as a global row of its stream."""
    return data_state.get("first_row", 0) + int(data_state["step"]) * int(data_state["global_batch_size"])


def _schedule(optim: OptimConfig, steps: int) -> str:
    decay = "cosine" if optim.schedule == "cosine" else "linear decay"
    plateau = f", plateau {optim.plateau_steps}" if optim.plateau_steps else ""
    return f"{steps} steps, warmup {optim.warmup_steps}{plateau}, {decay} to {optim.min_lr_ratio:g}x"


def _rates(optim: OptimConfig, steps: int, step: int) -> str:
    return ", ".join(f"{k} {float(v):.2e}" for k, v in learning_rates(optim, steps, step).items())  # as step lines


def schedule_change(cfg: Config, run: RunDir, start: int | None) -> str | None:
    """The console line for a resume that changes the learning-rate schedule (`--resume
    --config.train.steps=N` extends or shortens a run; a new warmup, floor or peak), or None.

    The schedule is a function of (optim, train.steps) evaluated at the optimizer's step count, so
    a new length moves the learning rate at once: the line gives the saved and the new schedule, and
    the rates the next update gets under each. Call it before config.json is rewritten: it reads the
    saved config to compare."""
    if start is None:
        return None
    saved = run.read_config()
    old, new = (saved.optim, saved.train.steps), (cfg.optim, cfg.train.steps)
    same = old[1] == new[1] and all(getattr(old[0], f) == getattr(new[0], f) for f in SCHEDULE_FIELDS)
    if same:
        return None
    what = (
        f"train.steps {old[1]} -> {new[1]} ({'extended' if new[1] > old[1] else 'shortened'})"
        if new[1] != old[1]
        else "optim schedule changed"
    )
    if start >= new[1]:
        return (
            f"--resume: {what}: checkpoint {start} is already at or past the new end ({new[1]} steps); nothing to train"
        )
    return (
        f"--resume: {what}; the learning-rate schedule is recomputed: was {_schedule(*old)}, now "
        f"{_schedule(*new)}. Step {start + 1} uses {_rates(*new, start)} "
        f"(the saved schedule would give {_rates(*old, start)})"
    )
