"""Orbax checkpoints of a run: save, resume exactly, and load a model for evaluation or sampling.

Each checkpoint step directory holds four items:
  params  the model parameters (StandardSave of the nnx.State) — all that `load_model` reads
  train   every other field of the TrainState (optimizer state, step, PRNG key data), saved generically
  data    the loader's iterator state (JSON), so batch k after a restore is batch k of a straight run
  meta    step, val loss and the time, for humans and for the best-by-val-loss policy

Orbax writes every step into a temporary directory and renames it when complete, so a crash or a
full disk mid-save leaves only a temporary directory that is never listed or restored; the
previous checkpoint is deleted by the keep-last-K policy only after the new one is finalised.
Saves are asynchronous: the train loop continues while the arrays are written.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from fgpt_jax.config import Config
from fgpt_jax.model import GPT, abstract_model, named_leaves
from fgpt_jax.rundir import RunDir


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message says which and why."""


class Checkpoints:
    """The `checkpoints/` directory of a run."""

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_best: bool = True, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` for readers (evaluation, generation): never creates, deletes or cleans up, so
        it is safe next to a training process that is writing checkpoints in the same directory."""
        self.directory = Path(directory).absolute()
        policies = [LatestN(n=max(keep_last, 1))]
        if keep_best:
            # Lowest validation loss; checkpoints saved without one are kept only by LatestN.
            policies.append(BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # the writer removes what an interrupted save left behind
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front, so a manager that only reads (load_model) can read metadata too.
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, val_loss: float | None = None) -> None:
        """Start an async save of `state` (a TrainState) at `step`; returns once arrays are copied."""
        meta = {"step": int(step), "time": time.time()}
        metrics = None
        if val_loss is not None and np.isfinite(val_loss):
            meta["val_loss"] = metrics_val = float(val_loss)
            metrics = {"val_loss": metrics_val}
        self.manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_fields(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ), metrics=metrics, force=True)

    def save_params(self, step: int, params, meta: dict | None = None) -> None:
        """A params-only checkpoint (an imported or exported model): loadable, not resumable."""
        self.manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({"step": int(step), "time": time.time(), **(meta or {})}),
        ), force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore (TrainState, data_state) at `step` into the shapes/shardings of `abstract_state`."""
        check_shapes(self.item_shapes(step, "params"), abstract_state.params, self.directory / str(step))
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(_train_fields(abstract_state)),
            data=ocp.args.JsonRestore(),
        ))
        return abstract_state.replace(params=out["params"], **out["train"]), out["data"]

    def restore_params(self, step: int, abstract_params):
        check_shapes(self.item_shapes(step, "params"), abstract_params, self.directory / str(step))
        out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def item_shapes(self, step: int, item: str) -> dict[str, tuple]:
        """{path: shape} of a saved item, read from its metadata (no arrays loaded)."""
        meta = self.manager.item_metadata(step)[item]
        tree = getattr(meta, "tree", meta)
        return {k: tuple(m.shape) for k, m in named_leaves(tree).items() if hasattr(m, "shape")}

    def wait(self) -> None:
        """Block until every pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _train_fields(state) -> dict:
    """Every field of a TrainState but its params: the `train` item."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "params"}


def check_shapes(saved: dict[str, tuple], abstract_params, where) -> None:
    """Refuse to restore into a model of another shape, naming the parameters that differ."""
    want = {k: tuple(x.shape) for k, x in named_leaves(abstract_params).items()}
    diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs model {want.get(k, 'missing')}"
             for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(f"{where}: checkpoint does not fit this model config: {'; '.join(diffs[:3])}{more}")


def save_model(run_dir: str | Path, model: GPT, cfg: Config, step: int = 0, meta: dict | None = None) -> Path:
    """Write `model` as a run directory (config.json + a params-only checkpoint at `step`).

    What `load_model`, evaluation, generation and `--config.init_from` read; `--resume` needs a
    checkpoint written by training (it also holds optimizer and loader state).
    """
    run = RunDir(run_dir)
    if cfg.model != model.config:
        raise CheckpointError(f"{run}: cfg.model does not describe this model")
    with run.lock():
        if run.has_checkpoints():
            raise CheckpointError(f"{run}: already holds checkpoints; choose another directory")
        run.write_config(cfg)
        ckpts = Checkpoints(run.checkpoints, async_save=False)
        try:
            ckpts.save_params(step, nnx.state(model, nnx.Param), meta)
        finally:
            ckpts.close()
    return run.path


def load_model(run_dir: str | Path, step: int | None = None) -> tuple[GPT, Config]:
    """The model of a run directory at `step` (default: the latest), parameters only.

    The model config comes from the run's config.json, so no flag has to be repeated.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    steps = run.checkpoint_steps()
    if not steps:
        raise CheckpointError(f"{run.checkpoints}: no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"--step {step}: not in {run.checkpoints} (available: {', '.join(map(str, steps))})")
    ckpts = Checkpoints(run.checkpoints, read_only=True)
    try:
        graphdef, abstract_params = nnx.split(abstract_model(cfg.model), nnx.Param)
        params = ckpts.restore_params(step, abstract_params)
    finally:
        ckpts.close()
    return nnx.merge(graphdef, params), cfg
