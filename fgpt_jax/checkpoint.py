"""Orbax checkpoints of a run: save, resume exactly, and load a model for evaluation or sampling.

Each checkpoint step directory holds four items:
  params  the model parameters (StandardSave of the nnx.State) — all that `load_model` reads
  train   every other field of the TrainState (optimizer state, step, PRNG key data), saved generically
  data    the loader's iterator state (JSON), so batch k after a restore is batch k of a straight run
  meta    step, val loss, the time, and a checksum of `params` and of `train`

Orbax writes every step into a temporary directory and renames it when complete, so a crash or a
full disk mid-save leaves only a temporary directory that is never listed or restored; the
previous checkpoint is deleted by the keep-last-K policy only after the new one is finalised.
Saves are asynchronous: the train loop continues while the arrays are written, and `poll()` (called
every step) reports the save's completion, or its failure as one line naming the step and the cause.

Checksums. Orbax stores arrays without a content check, so a flipped bit would restore silently.
Every save records, per item, a sha256 over per-array position-weighted sums of the raw bits
(computed on the device, one small transfer); every restore recomputes it and refuses a mismatch,
naming the step and the earlier checkpoints to fall back to. Checkpoints written before 0.2 carry
no checksum and are restored unchecked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from fgpt_jax.config import Config
from fgpt_jax.errors import UserError
from fgpt_jax.model import GPT, abstract_model, named_leaves
from fgpt_jax.rundir import RunDir
from fgpt_jax.sharding import make_mesh


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used here; the message says which and why."""


def _bits_u32(x: jax.Array) -> jax.Array:
    """The raw bits of an array as a flat uint32 vector (16-bit and 8-bit types widened)."""
    width = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    if width == 8:  # two uint32 words per element
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _leaf_sums(tree) -> jax.Array:
    """One uint32 per leaf: sum over elements of bits * (2654435761 * i + 1), wrapping. A flipped bit
    or two swapped elements change it."""

    def one(x):
        bits = _bits_u32(jnp.asarray(x))
        weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    leaves = jax.tree.leaves(tree)
    return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def checksum(tree) -> str:
    """A short hex digest of every array in `tree` (see the module docstring)."""
    sums = np.asarray(jax.device_get(_leaf_sums(tree)), dtype="<u4")
    return hashlib.sha256(sums.tobytes()).hexdigest()[:32]


class Checkpoints:
    """The `checkpoints/` directory of a run."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        keep_best: bool = True,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """`read_only` for readers (evaluation, generation): never creates, deletes or cleans up, so
        it is safe next to a training process that is writing checkpoints in the same directory."""
        self.directory = Path(directory).absolute()
        policies = [LatestN(n=max(keep_last, 1))]
        if keep_best:
            # Lowest validation loss; checkpoints saved without one are kept only by LatestN.
            policies.append(
                BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False)
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # the writer removes what an interrupted save left behind
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front, so a manager that only reads (load_model) can read metadata too.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step of the async save in flight

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # -- writing -----------------------------------------------------------------------------------
    def save(self, step: int, state, data_state: dict, val_loss: float | None = None) -> int | None:
        """Start an async save of `state` (a TrainState) at `step`; returns once arrays are copied.
        A save still in flight is waited for first (its failure raises here); returns its step."""
        done = self.poll(wait=True)
        train = _train_fields(state)
        meta = {
            "step": int(step),
            "time": time.time(),
            "checksum": {"params": checksum(state.params), "train": checksum(train)},
        }
        metrics = None
        if val_loss is not None and np.isfinite(val_loss):
            meta["val_loss"] = float(val_loss)
            metrics = {"val_loss": float(val_loss)}
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    train=ocp.args.StandardSave(train),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=metrics,
                force=True,
            )
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._pending = int(step)
        return done

    def poll(self, wait: bool = False) -> int | None:
        """The step whose async save has completed since the last call (None if none, or if it is still
        running and `wait` is False). A failed save raises CheckpointError naming the step and the cause."""
        if self._pending is None or (not wait and self.manager.is_saving_in_progress()):
            return None
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(step, e) from e
        return step

    def _save_failed(self, step: int, e: Exception) -> CheckpointError:
        kept = [s for s in self.steps() if s != step]
        cause = _cause(e)
        return CheckpointError(
            f"checkpoint {step}: save failed ({cause}); "
            f"{f'checkpoint {kept[-1]} is intact' if kept else 'no earlier checkpoint'}"
        )

    def save_params(self, step: int, params, meta: dict | None = None) -> None:
        """A params-only checkpoint (an imported or exported model): loadable, not resumable."""
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                meta=ocp.args.JsonSave(
                    {"step": int(step), "time": time.time(), **(meta or {}), "checksum": {"params": checksum(params)}}
                ),
            ),
            force=True,
        )

    # -- reading -----------------------------------------------------------------------------------
    def read_json(self, step: int, item: str) -> dict:
        """The `meta` or `data` item of a checkpoint ({} when absent)."""
        if not (self.directory / str(step) / item).exists():
            return {}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        except Exception as e:
            raise self._unreadable(step, e) from e
        return out[item] or {}

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore (TrainState, loader state) at `step` into the shapes/shardings of `abstract_state`,
        checked against the checksums saved with it."""
        out = self._restore(step, abstract_state.params, train=_train_fields(abstract_state), data=None)
        return abstract_state.replace(params=out["params"], **out["train"]), out["data"]

    def restore_params(self, step: int, abstract_params):
        """The `params` item at `step` (generation, evaluation, init_from) in `abstract_params`' shardings,
        checked likewise; leaves without one (an abstract model, as `load_model` passes) land on this
        process's first device, so a checkpoint written on any device count loads."""
        return self._restore(step, _on_this_host(abstract_params))["params"]

    def _restore(self, step: int, abstract_params, **more) -> dict:
        """The one restore path: the parameters' shapes checked against the config first (a clear error
        instead of orbax's), then `params` and the items of `more` ({name: abstract tree, or None for a
        JSON item}) read, then every array item checked against its saved checksum."""
        check_shapes(self.item_shapes(step, "params"), abstract_params, self.directory / str(step))
        sums = self.read_json(step, "meta").get("checksum", {})
        args = {"params": ocp.args.StandardRestore(abstract_params)}
        args.update({k: ocp.args.JsonRestore() if v is None else ocp.args.StandardRestore(v) for k, v in more.items()})
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise self._unreadable(step, e) from e
        for name in ["params", *(k for k, v in more.items() if v is not None)]:
            if name in sums and checksum(out[name]) != sums[name]:
                raise CheckpointError(
                    f"checkpoint {step}: {name} do not match their checksum (corrupt: changed "
                    f"on disk after saving); {self._fallback(step)}"
                )
        return out

    def _unreadable(self, step: int, e: Exception) -> CheckpointError:
        cause = _cause(e)
        return CheckpointError(f"checkpoint {step}: unreadable (truncated or corrupt: {cause}); {self._fallback(step)}")

    def _fallback(self, step: int) -> str:
        earlier = [s for s in self.steps() if s < step]
        if not earlier:
            return "no earlier checkpoint to fall back to"
        return (
            f"earlier checkpoints: {', '.join(map(str, earlier))} (resume from one with --resume --step "
            f"{earlier[-1]}; evaluate one with --step {earlier[-1]})"
        )

    def item_shapes(self, step: int, item: str) -> dict[str, tuple]:
        """{path: shape} of a saved item, read from its metadata (no arrays loaded)."""
        try:
            meta = self.manager.item_metadata(step)[item]
        except Exception as e:
            raise self._unreadable(step, e) from e
        if meta is None:
            raise CheckpointError(f"checkpoint {step}: has no '{item}' item ({self.directory / str(step)})")
        tree = getattr(meta, "tree", meta)
        return {k: tuple(m.shape) for k, m in named_leaves(tree).items() if hasattr(m, "shape")}

    def close(self) -> None:
        try:
            self.poll(wait=True)
        finally:
            self.manager.close()


def _cause(e: BaseException) -> str:
    """The reason an orbax/tensorstore operation failed, short: an OS error's own words when there is
    one (tensorstore buries "No space left on device" at the end of a 400-character message)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    return (text[:160] + "...") if len(text) > 160 else text or type(e).__name__


def _on_this_host(tree):
    """`tree` with every ShapeDtypeStruct that has no sharding given one: this process's first device,
    or, in a multi-process run, every device replicated (each process must hold the same global
    array, which the trainer then lays out on its mesh). Without a target sharding orbax restores onto
    the topology the checkpoint was saved from, and refuses ("Topology mismatch") when that had other
    devices: a run trained on 4 GPUs, read on 1."""
    if jax.process_count() > 1:
        target = NamedSharding(make_mesh(), PartitionSpec())
    else:
        target = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target) if getattr(x, "sharding", None) is None else x
        ),
        tree,
    )


def _train_fields(state) -> dict:
    """Every field of a TrainState but its params: the `train` item."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "params"}


def check_shapes(saved: dict[str, tuple], abstract_params, where) -> None:
    """Refuse to restore into a model of another shape, naming the parameters that differ."""
    want = {k: tuple(x.shape) for k, x in named_leaves(abstract_params).items()}
    diffs = [
        f"{k}: checkpoint {saved.get(k, 'missing')} vs model {want.get(k, 'missing')}"
        for k in sorted(set(saved) | set(want))
        if saved.get(k) != want.get(k)
    ]
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
    """The model of a run directory at `step` (default: the latest), parameters only, on this process's
    first device whatever device count the run was trained on (replicated over all devices in a
    multi-process run).

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
