"""How a run starts: `prepare(cfg, run, resume, resume_step) -> Prepared`, everything the loop
(`fgpt_jax.train.trainer.Trainer`) needs, built in this order:

    1. checks       the config against the devices, the run directory, init_from (nothing is read but
                    configs and checkpoint lists; a refused run costs nothing)
    2. start point  fresh, from another run's weights (`init_from`), resumed from its own checkpoint
    and data        (`--resume [--step N]`), or warm-restarted from another run's weights, optimizer
                    moments and data position (`init_mode="warm"`); then the data opened from there
                    (for DPO the reference model scores every row first, and is freed)
    3. state and    the jitted setup, the state restored or initialised, the evaluation hooks built
       hooks        (HellaSwag tokenises and packs its items once)
    ---------------  every check has passed: only now is the run directory written
    4. the run      checkpoints set aside when resuming from an earlier step, the checkpoint writer,
       directory    config.json, train.log, metrics.jsonl and TensorBoard, the reference file

so a run refused at any of 1-3 (a bad config, a missing shard, a broken checkpoint) leaves the run
directory exactly as it was.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import Checkpoints, load_model
from fgpt_jax.config import Config, instruction_tuned
from fgpt_jax.data.pipeline import Data, open_data
from fgpt_jax.errors import UserError
from fgpt_jax.eval.dpo import Reference, dpo_eval_step
from fgpt_jax.loss import make_eval_step
from fgpt_jax.metrics import Console, MetricsWriter, Throughput, peak_flops
from fgpt_jax.optim import OptimConfig, learning_rates, restart_schedule
from fgpt_jax.rundir import RunDir
from fgpt_jax.tokenizer import N_VOCAB
from fgpt_jax.train import hooks as H
from fgpt_jax.train.step import Setup, TrainState, build_setup

SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
# What the learning rate at a step depends on, besides train.steps.
SCHEDULE_FIELDS = ("lr", "muon_lr", "schedule", "warmup_steps", "plateau_steps", "min_lr_ratio")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (bad setup or a diverged loss); the message says why in one line."""


@dataclasses.dataclass
class Prepared:
    """A run ready for its first step: what `prepare` built, what `Trainer` runs."""

    cfg: Config
    run: RunDir
    console: Console
    mesh: Mesh
    setup: Setup  # the model graph, optimizer and jitted step
    state: TrainState  # restored, warm-started or initialised, on the mesh
    start: int  # the last step already taken (0: a fresh run)
    data: Data  # the training loader and the validation batches
    hooks: list  # the periodic work, in the order it runs (see hooks.py)
    val: H.Hook | None  # the validation hook, also run before a fresh run's first step
    checkpoints: Checkpoints  # the writer (the run's checkpoints/)
    writer: MetricsWriter
    throughput: Throughput


@dataclasses.dataclass
class _Origin:
    """Where the run's state and data come from (step 2)."""

    resume_step: int | None  # the run's own checkpoint to continue from
    warm_step: int | None = None  # init_from's checkpoint a warm restart continues
    warm_data: dict | None = None  # ... and its loader state
    first_row: int = 0  # the first global row the loader reads


def prepare(
    cfg: Config, run: RunDir, resume: bool = False, resume_step: int | None = None, hooks: Sequence = ()
) -> Prepared:
    """Steps 1-4 of the module docstring. `cfg` is resolved (fgpt_jax.config.resolve_config);
    `hooks` are extra `fgpt_jax.train.hooks.Hook`s, run after the built-in ones."""
    console = Console(run, jax.process_index() == 0)
    mesh = shd.make_mesh()
    # 1. checks
    origin = _Origin(check(cfg, run, resume, resume_step, mesh))
    if note := schedule_change(cfg, run, origin.resume_step):  # read before config.json is rewritten
        console(note)
    # 2. start point and data
    if cfg.init_from and cfg.init_mode == "warm" and not resume:  # the data continues where init_from's stopped
        origin.warm_step, origin.warm_data = warm_source(cfg)
        origin.first_row = rows_read(origin.warm_data)
    data, reference = _open_data(cfg, run, mesh, origin, console)
    # 3. state and hooks
    setup = build_setup(cfg, mesh)
    state = _initial_state(cfg, run, setup, origin, data)
    val, evals = _eval_hooks(cfg, setup, data, mesh, console)
    # ---- Every check has passed: from here on the run directory is written. ----
    return _open_run(cfg, run, console, mesh, setup, state, origin, data, reference, val, evals + list(hooks))


def micro_batch(cfg: Config) -> int:
    """Sequences (DPO: pairs) per micro-batch, over all devices: the validation batch too."""
    return cfg.train.batch_size // cfg.train.grad_accum


def seq_len_of(cfg: Config) -> int:
    return cfg.train.seq_len or cfg.model.block_size


def check(cfg: Config, run: RunDir, resume: bool, resume_step: int | None, mesh: Mesh) -> int | None:
    """Step 1: every check that needs no data, state or model. Returns the step to resume from."""
    if seq_len_of(cfg) > cfg.model.block_size:
        raise TrainingError(f"train.seq_len={seq_len_of(cfg)} exceeds model.block_size={cfg.model.block_size}")
    if cfg.model.vocab_size < N_VOCAB:
        raise TrainingError(f"model.vocab_size={cfg.model.vocab_size}: must be >= {N_VOCAB}, the tokenizer's ids")
    if micro_batch(cfg) % mesh.size:
        raise TrainingError(
            f"train.batch_size / train.grad_accum = {micro_batch(cfg)} sequences per micro-batch must be "
            f"divisible by the {mesh.size} devices"
        )
    if cfg.data.format == "preference" and (not cfg.init_from or cfg.init_mode != "params"):
        raise TrainingError(
            "data.format=preference (DPO): set init_from=RUN_DIR, the run to start from and "
            "compare with (an SFT run), and init_mode=params"
        )
    if cfg.init_from and not resume:
        check_base(cfg)
    return check_run(cfg, run, resume, resume_step)


def _open_data(cfg: Config, run: RunDir, mesh: Mesh, origin: _Origin, console: Console):
    """Step 2's data: the loader from the start point, the validation batches, the notes for the log.
    DPO: the reference scores every row before the policy's state exists, then is freed."""
    t = cfg.train
    preference = cfg.data.format == "preference"
    reference = None
    if preference:
        reuse = origin.resume_step is not None
        reference = Reference(run.path, cfg.init_from, cfg.dpo, mesh, micro_batch(cfg), reuse=reuse)
    data = open_data(
        cfg.data,
        seq_len_of(cfg),
        t.batch_size,
        micro_batch(cfg),
        jax.process_index(),
        jax.process_count(),
        first_row=origin.first_row,
        reference=reference,
    )
    if reference is not None:
        reference.release()
    if data.stats:
        console(f"data {cfg.data.path}: " + ", ".join(f"{k} {v}" for k, v in data.stats.items()))
        unit = "pairs" if preference else "rows"
        rows = data.stats.get(f"train_{unit}")
        if rows:
            epochs = t.steps * t.batch_size / rows
            console(f"{t.steps} steps x {t.batch_size} {unit} = {epochs:.1f} epochs of the {rows} training {unit}")
    for note in data.notes + (reference.notes if reference is not None else []):
        console(note)
    return data, reference


def _initial_state(cfg: Config, run: RunDir, setup: Setup, origin: _Origin, data: Data) -> TrainState:
    """Step 3's state: the run's checkpoint (and the loader's position), a warm restart, init_from's
    weights with a fresh optimizer, or a fresh initialisation."""
    if origin.resume_step is not None:
        reader = Checkpoints(run.checkpoints, read_only=True)  # the writer is opened once every check passed
        try:
            state, loader_state = reader.restore(origin.resume_step, setup.abstract_state)
        finally:
            reader.close()
        data.loader.set_state(loader_state)
        return state
    if origin.warm_step is not None:
        return warm_state(cfg, setup, origin.warm_step, origin.warm_data, data.loader.identity())
    base = nnx.state(load_model(cfg.init_from)[0], nnx.Param) if cfg.init_from else None
    if base is not None:  # loaded on one device; init's output spans the mesh (jit refuses the mix)
        base = jax.device_put(base, setup.state_shardings.params)
    return setup.init(base)


def _eval_hooks(cfg: Config, setup: Setup, data: Data, mesh: Mesh, console: Console) -> tuple[H.Hook | None, list]:
    """Step 3's hooks that need no run directory: validation, and the benchmarks' scorers (built now,
    so a bad benchmark file refuses the run before anything is written)."""
    t = cfg.train
    if cfg.data.format == "preference":
        val = H.PreferenceVal(t.eval_every, dpo_eval_step(setup.graphdef, cfg.dpo, mesh), data.val, mesh)
    else:
        val = H.ValLoss(t.eval_every, make_eval_step(setup.graphdef), data.val, mesh)
    evals = []
    if t.hellaswag_every:
        from fgpt_jax.eval.hellaswag import HellaSwagScorer  # tokenises and packs the items once

        scorer = HellaSwagScorer.from_file(
            t.hellaswag_data or None,
            block_size=cfg.model.block_size,
            limit=t.hellaswag_limit or None,
            batch_size=micro_batch(cfg),
            mesh=mesh,
        )
        evals.append(H.HellaSwag(t.hellaswag_every, scorer, setup.graphdef))
    core = H.Core.from_config(t, cfg.model.block_size, setup.graphdef, mesh, micro_batch(cfg), console)
    if core is not None:  # packs its items once; its notes (missing tasks) go to the log
        evals.append(core)
    chat = instruction_tuned(cfg)  # chat runs sample answers to fixed questions
    evals.append(H.TextSample(t.sample_every, setup.graphdef, t.sample_prompt, t.sample_tokens, chat=chat))
    return (val if data.val else None), evals


def _open_run(cfg, run, console, mesh, setup, state, origin, data, reference, val, later_hooks) -> Prepared:
    """Step 4: the run directory is written (process 0), in an order that loses nothing on a crash."""
    start = origin.resume_step
    if start is not None and start != run.checkpoint_steps()[-1]:
        set_aside_after(run, start, console)
    checkpoints = Checkpoints(run.checkpoints, keep_last=cfg.train.keep_checkpoints)
    # Validation first (the checkpoint records its loss for the best-checkpoint policy), then the
    # checkpoint, then the slower and more fragile work.
    hooks = [h for h in (val, H.Checkpoint(cfg.train.ckpt_every, checkpoints, data.loader)) if h is not None]
    hooks += later_hooks
    if jax.process_index() == 0:
        run.write_config(cfg)
        console.start()
    if reference is not None:
        reference.save()  # RUN/reference_logps.npz, when it was scored now
    if start is not None:
        console(f"resumed from step {start} ({run.checkpoints / str(start)})")
    elif origin.warm_step is not None:
        console(
            f"warm restart from {cfg.init_from} step {origin.warm_step}: its parameters, optimizer moments "
            f"and data position (row {origin.first_row}); a new schedule from step 0"
        )
    elif cfg.init_from:
        console(f"initialised from {cfg.init_from}")
    writer = MetricsWriter(run, keep_through=start if start is not None else -1, enabled=jax.process_index() == 0)
    preference = cfg.data.format == "preference"
    tokens_per_step = cfg.train.batch_size * (2 if preference else 1) * seq_len_of(cfg)  # a pair is two rows
    throughput = Throughput(tokens_per_step, cfg.model.flops_per_token(seq_len_of(cfg)), mesh.size, peak_flops())
    t = cfg.train
    console(
        f"{cfg.name}: {cfg.model.num_params() / 1e6:.2f}M parameters, {t.steps} steps of {tokens_per_step:,} "
        f"tokens ({t.grad_accum} x {micro_batch(cfg)}{' pairs x 2' if preference else ''} x {seq_len_of(cfg)}), "
        f"{mesh.size} device(s) [{jax.devices()[0].device_kind}], {t.sharding}, optimizer {cfg.optim.name}"
    )
    return Prepared(
        cfg, run, console, mesh, setup, state, start or 0, data, hooks, val, checkpoints, writer, throughput
    )


def set_aside_after(run: RunDir, step: int, console: Console) -> None:
    """Resuming from an earlier checkpoint (the later ones broken): move the later ones out of
    checkpoints/ into checkpoints.set-aside/ (nothing is deleted), so new saves can take their numbers."""
    if jax.process_index() != 0:
        return
    aside = run.path / "checkpoints.set-aside"
    aside.mkdir(exist_ok=True)
    for later in [s for s in run.checkpoint_steps() if s > step]:
        target = aside / f"{later}-{int(time.time())}"
        (run.checkpoints / str(later)).rename(target)
        console(f"checkpoint {later} moved to {target} (resuming from {step})")


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
