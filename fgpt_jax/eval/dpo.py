"""Preference metrics (DPO): rows' reply log-probabilities under a model, the reference log-probabilities
a DPO run keeps in its run directory, and the DPO metrics over preference pairs.

One implementation for the trainer (its reference at the start, its val/ metrics) and for
`python -m fgpt_jax.eval dpo`, so both print the same numbers for the same batches. The metrics are
means over pairs: dpo/loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy (chosen
reward strictly above rejected), logps/chosen, logps/rejected (fgpt_jax.loss.dpo_objective).

The reference. DPO measures the policy against the model training started from (`init_from`).
Instead of keeping that model on the device beside the policy (twice the parameters, and a second
forward pass per step), a DPO run scores every train and validation row with it once, before the
policy's optimizer state exists, frees it, and carries the numbers in the batches. They are stored
in RUN/reference_logps.npz (temp file + rename, once the run's checks have passed): one float32
array per row table, keyed by the table's content hash, plus the run and checkpoint they came
from. A resumed run reads them back instead of recomputing; the train loader's saved state records
their hash, so resuming onto different reference numbers is refused rather than silently diverging.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import load_model
from fgpt_jax.config import DPOConfig
from fgpt_jax.data import PreferenceBatch
from fgpt_jax.data.loader import Rows
from fgpt_jax.data.preferences import val_pairs
from fgpt_jax.data.sources import DataError
from fgpt_jax.loss import DPO_METRICS, make_dpo_eval_step
from fgpt_jax.rundir import RunDir
from fgpt_jax.tokenizer import get_tokenizer

REFERENCE_FILE = "reference_logps.npz"


def dpo_eval_step(graphdef: nnx.GraphDef, dpo: DPOConfig, mesh: Mesh) -> Callable:
    """The DPO eval program (fgpt_jax.loss.make_dpo_eval_step), outputs replicated on `mesh` (every
    process reads them). The reference pass and validation both run it, so they agree bit for bit;
    it is cached by (model graph, dpo settings, mesh), so a run compiles it once for both."""
    return _eval_step(graphdef, dpo.beta, dpo.label_smoothing, dpo.loss, mesh)


@functools.lru_cache(maxsize=8)
def _eval_step(graphdef, beta, label_smoothing, loss, mesh) -> Callable:
    return make_dpo_eval_step(graphdef, beta, label_smoothing, loss, NamedSharding(mesh, P()))


def row_logps(
    eval_step: Callable, params, rows: Rows, batch_pairs: int, mesh: Mesh, progress: Callable | None = None
) -> np.ndarray:
    """[N] float32: each row's reply log-probability under the model, in the batches `val_pairs` makes
    (`batch_pairs` pairs, the last one padded): the very batches validation scores.

    Every process passes the same rows and gets all N numbers back; they are read once, at the end."""
    if rows.num_rows == 0:
        return np.zeros(0, np.float32)
    out = []
    for batch in val_pairs(rows, np.zeros(rows.num_rows, np.float32), batch_pairs, get_tokenizer().eot_id):
        # Every process holds all rows: each device takes its slice (no process-local layout needed).
        arrays = PreferenceBatch(
            *(
                jax.make_array_from_callback(x.shape, shd.batch_sharding(mesh, x.ndim), lambda idx, x=x: x[idx])
                for x in batch
            )
        )
        out.append(eval_step(params, arrays)[3])
        if progress is not None:
            progress(1)
    return np.asarray(jax.device_get(jnp.concatenate(out)), np.float32)[: rows.num_rows]


def preference_metrics(
    eval_step: Callable, params, batches: Sequence[PreferenceBatch], mesh: Mesh, progress: Callable | None = None
) -> dict:
    """{"pairs": n, "dpo/loss": ..., "rewards/...": ..., "logps/...": ...}: means over the real pairs
    of `batches` (this process's rows; padding pairs count for nothing).

    `eval_step` is `dpo_eval_step(...)`. Sums are added on the device and read once (one host sync
    for the whole pass)."""
    if not batches:
        raise ValueError("no preference pairs to score")
    count, sums = jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in DPO_METRICS}
    for batch in batches:
        arrays = PreferenceBatch(*(shd.global_batch(x, shd.batch_sharding(mesh, x.ndim)) for x in batch))
        _, n, s, _ = eval_step(params, arrays)
        count, sums = count + n, {k: sums[k] + s[k] for k in DPO_METRICS}
        if progress is not None:
            progress(1)
    count, sums = jax.device_get((count, sums))  # the one host sync
    n = float(count)
    return {"pairs": int(n), **{k: float(sums[k]) / max(n, 1.0) for k in DPO_METRICS}}


def load_params(run: str | os.PathLike, step: int | None, mesh: Mesh):
    """(graphdef, params replicated on `mesh`, config, step) of a run's checkpoint (default: latest)."""
    steps = RunDir(run).checkpoint_steps()
    step = steps[-1] if step is None and steps else step
    model, cfg = load_model(run, step)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, jax.device_put(params, NamedSharding(mesh, P())), cfg, step


class Reference:
    """The reference log-probabilities of a DPO run's rows: `reference(rows) -> [N] float32`.

    With `reuse` (a resumed run), rows whose hash RUN/reference_logps.npz holds are read from it;
    others are scored with `init_from`'s latest checkpoint (in batches of `batch_pairs`, the run's
    validation batches, with the run's DPO settings: the same program as validation), loaded on
    first need and dropped by `release()`. `save()` writes the file when something was scored;
    nothing is written before.
    `notes` says what was read or scored, for the run's log."""

    def __init__(
        self, run_dir: str | os.PathLike, init_from: str, dpo: DPOConfig, mesh: Mesh, batch_pairs: int, reuse: bool
    ):
        self.path = Path(run_dir) / REFERENCE_FILE
        self.init_from, self.dpo, self.mesh, self.batch_pairs = init_from, dpo, mesh, batch_pairs
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict = {}
        self.notes: list[str] = []
        self._model = None  # (eval step, params) of init_from while scoring
        self._scored = False
        if reuse and self.path.is_file():
            self.arrays, self.meta = read_reference(self.path)

    def __call__(self, rows: Rows) -> np.ndarray:
        key = rows.content_hash
        if key in self.arrays:
            logps = self.arrays[key]
            if logps.shape != (rows.num_rows,):
                raise DataError(
                    f"{self.path}: holds {logps.shape[0]} log-probs for rows {key}, which have "
                    f"{rows.num_rows}; delete it to score the reference again"
                )
            self.notes.append(f"reference: log-probs of {rows.num_rows} rows read from {self.path}")
            return logps
        if self._model is None:
            graphdef, params, _, step = load_params(self.init_from, None, self.mesh)
            self._model = dpo_eval_step(graphdef, self.dpo, self.mesh), params
            self.meta = {"init_from": str(self.init_from), "step": step}
        t0 = time.perf_counter()
        logps = row_logps(*self._model, rows, self.batch_pairs, self.mesh)
        self.arrays[key], self._scored = logps, True
        self.notes.append(
            f"reference: {rows.num_rows} rows scored with {self.init_from} step {self.meta['step']} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        return logps

    def release(self) -> None:
        """Drop the reference model (its device buffers go with the last reference)."""
        self._model = None

    def save(self) -> None:
        """Write RUN/reference_logps.npz (process 0; temp file + rename) if anything was scored."""
        if self._scored and jax.process_index() == 0:
            write_reference(self.path, self.arrays, self.meta)
            self._scored = False


def write_reference(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f, meta=np.array(json.dumps(meta)), **{f"logp_{k}": np.asarray(v, np.float32) for k, v in arrays.items()}
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_reference(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(row-table hash -> log-probs, meta) of a reference_logps.npz; ValueError in one line if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k.removeprefix("logp_"): np.asarray(z[k], np.float32) for k in z.files if k.startswith("logp_")}
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{path}: unreadable ({' '.join(str(e).split()) or type(e).__name__}); delete it to "
            f"score the reference again"
        ) from None
    return arrays, meta
