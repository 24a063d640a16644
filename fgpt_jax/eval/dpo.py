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
from. A resumed run reads them back instead of recomputing. The train loader's saved state (in every
checkpoint) records their hash and the reference model (init_from and its checkpoint step), so on
resume a file that does not belong to the run is refused in one line naming it and the fix: an
unreadable or truncated file, non-finite numbers, another source model, other numbers for the train
rows. The fix is always the same: delete the file and resume again; the reference is then scored
again with the checkpoint the run recorded (not init_from's latest, which may have moved on), and
checked against the recorded hash.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import CheckpointError, Checkpoints
from fgpt_jax.config import DPOConfig
from fgpt_jax.data import PreferenceBatch
from fgpt_jax.data.loader import Rows
from fgpt_jax.data.preferences import build_preference_data, load_pairs, reference_hash, val_pairs
from fgpt_jax.data.sources import DataError
from fgpt_jax.errors import UserError
from fgpt_jax.eval import Loaded, load
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


def describe(source: dict) -> str:
    """'init_from RUN step N': the model reference log-probs come from."""
    return f"init_from {source.get('init_from')} step {source.get('step')}"


def same_source(a: dict, b: dict) -> bool:
    """The same checkpoint of the same run directory (however the path was spelled)."""
    return a.get("step") == b.get("step") and os.path.realpath(str(a.get("init_from"))) == os.path.realpath(
        str(b.get("init_from"))
    )


def saved_data_state(run_dir: str | os.PathLike) -> dict:
    """The loader state in a run's latest checkpoint ({} without one): what a resumed DPO run trained
    with (its rows' content hash, the reference's hash and model)."""
    run = RunDir(run_dir)
    steps = run.checkpoint_steps()
    if not steps:
        return {}
    ckpts = Checkpoints(run.checkpoints, read_only=True)
    try:
        return ckpts.read_json(steps[-1], "data")
    finally:
        ckpts.close()


class Reference:
    """The reference log-probabilities of a DPO run's rows: `reference(rows) -> [N] float32`.

    With `reuse` (a resumed run), rows whose hash RUN/reference_logps.npz holds are read from it;
    others are scored with the run's reference model: the init_from checkpoint its saved loader state
    records (init_from's latest for a new run), in batches of `batch_pairs` (the run's validation
    batches) with the run's DPO settings, the same program as validation. The model is loaded on
    first need and dropped by `release()`. `save()` writes the file when something was scored;
    nothing is written before.

    On resume every number is checked against what the run trained with (see the module docstring):
    a DataError names the file and the fix. `source` is the reference model ({"init_from", "step"}),
    known once something was read or scored; the train loader records it in its state.
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
        self._saved = saved_data_state(run_dir) if reuse else {}  # what the resumed run trained with
        # The run's reference model, as its checkpoints record it (absent in runs of fgpt-jax <= 0.2.0).
        self.source: dict | None = self._saved.get("reference_model")
        if reuse and self.path.is_file():
            self.arrays, self.meta = read_reference(self.path, self._fix())
            found = {"init_from": self.meta.get("init_from"), "step": self.meta.get("step")}
            expected = self.source or {"init_from": str(init_from), "step": found["step"]}
            if not same_source(found, expected):
                raise DataError(
                    f"{self.path}: scored with {describe(found)}, but this run's reference is {describe(expected)}; "
                    f"{self._fix(expected)}"
                )
            self.source = self.source or found

    def _fix(self, source: dict | None = None) -> str:
        source = source or self.source
        model = describe(source) if source else f"init_from {self.init_from}"
        return f"delete it and resume again: the reference is then scored again with {model}"

    def __call__(self, rows: Rows) -> np.ndarray:
        key = rows.content_hash
        if key in self.arrays:
            logps = self.arrays[key]
            if logps.shape != (rows.num_rows,):
                raise DataError(
                    f"{self.path}: holds {logps.shape[0]} log-probs for rows {key}, which have "
                    f"{rows.num_rows}; {self._fix()}"
                )
            self._check_hash(rows, logps, read=True)
            self.notes.append(f"reference: log-probs of {rows.num_rows} rows read from {self.path}")
            return logps
        if self._model is None:
            step = self.source["step"] if self.source else None
            if step is not None and step not in RunDir(self.init_from).checkpoint_steps():
                raise DataError(
                    f"init_from {self.init_from}: has no checkpoint {step}, this run's reference model, to score "
                    f"{rows.num_rows} rows missing from {self.path}; put back the file this run wrote, or start a "
                    f"new run"
                )
            ref = load(self.init_from, step, self.mesh)
            self._model = dpo_eval_step(ref.graphdef, self.dpo, self.mesh), ref.params
            self.source = {"init_from": str(self.init_from), "step": ref.step}
            self.meta = dict(self.source)
        t0 = time.perf_counter()
        logps = row_logps(*self._model, rows, self.batch_pairs, self.mesh)
        bad = int(np.count_nonzero(~np.isfinite(logps)))
        if bad:
            raise CheckpointError(
                f"init_from {self.init_from}: checkpoint {self.source['step']} gives non-finite log-probs for "
                f"{bad} of {rows.num_rows} rows (a diverged run?); DPO needs a finite reference: start from "
                f"another run or checkpoint"
            )
        self._check_hash(rows, logps, read=False)
        self.arrays[key], self._scored = logps, True
        self.notes.append(
            f"reference: {rows.num_rows} rows scored with {self.init_from} step {self.source['step']} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        return logps

    def _check_hash(self, rows: Rows, logps: np.ndarray, read: bool) -> None:
        """On resume: the train rows' log-probs must be the ones the run's loader state records."""
        saved = self._saved
        if saved.get("content_hash") != rows.content_hash or "reference_hash" not in saved:
            return  # not the train rows the run trained on (the loader refuses those), or nothing recorded
        got = reference_hash(logps)
        if got == saved["reference_hash"]:
            return
        what = (
            f"{self.path}: its log-probs of the {rows.num_rows} train rows differ from the ones this run trained "
            f"with (hash {got}; its checkpoint records {saved['reference_hash']})"
        )
        if read:
            raise DataError(f"{what}; put back the file this run wrote, or {self._fix()}")
        raise DataError(
            f"{what}, scored again just now with {describe(self.source)}: was init_from trained further or "
            f"replaced? Put back the file this run wrote, or start a new run"
        )

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


def read_reference(
    path: Path, fix: str = "delete it to score the reference again"
) -> tuple[dict[str, np.ndarray], dict]:
    """(row-table hash -> log-probs, meta) of a reference_logps.npz. DataError in one line, naming the
    file and ending with `fix`, if it is unreadable (truncated, not an .npz, no meta) or holds a
    non-finite number."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k.removeprefix("logp_"): np.asarray(z[k], np.float32) for k in z.files if k.startswith("logp_")}
            meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict):
            raise ValueError(f"meta is a {type(meta).__name__}, expected an object")
    # zipfile.BadZipFile and EOFError: a truncated file (numpy reads .npz through zipfile)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split()) or type(e).__name__}); {fix}") from None
    bad = sum(int(np.count_nonzero(~np.isfinite(v))) for v in arrays.values())
    if bad:
        raise DataError(f"{path}: holds {bad} non-finite log-prob{'s' if bad > 1 else ''} (NaN or inf); {fix}")
    return arrays, meta


def preference_batches(
    cfg,
    ref: str | os.PathLike,
    ref_step: int | None,
    mesh: Mesh,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    progress: Callable | None = None,
    run: object = "RUN",
) -> tuple[list[PreferenceBatch], dict]:
    """(this process's preference batches with the reference's log-probs, what they are) for the DPO
    metrics of the run `cfg` against the reference run `ref` (loaded, used and freed here).

    Default: the run's own validation pairs, batched as the trainer batches them (its val/ metrics);
    `data`: every pair of a preference file (its first `limit` records) that fits both models'
    context, whole (no prompt/reply limits, no truncation), so any tool can recompute the numbers.
    `run` names the run in error messages."""
    from fgpt_jax.data.pipeline import open_data

    ref_cfg = RunDir(ref).read_config()  # a bad reference fails before any model loads
    if data is None and cfg.data.format != "preference":
        raise UserError(f"--run {run}: trained on {cfg.data.format} data, not preference pairs; pass --data FILE")
    pairs = batch_size or cfg.train.batch_size // cfg.train.grad_accum  # the trainer's micro-batch
    pairs = -(-pairs // mesh.size) * mesh.size
    reference: dict = {}

    def ref_logps(rows):  # the reference model loads once the data has been read and checked
        if not reference:
            loaded = load(ref, ref_step, mesh)
            reference.update(
                step=loaded.step, eval_step=dpo_eval_step(loaded.graphdef, cfg.dpo, mesh), params=loaded.params
            )
        return row_logps(reference["eval_step"], reference["params"], rows, pairs, mesh, progress)

    if data is None:
        seq_len = cfg.train.seq_len or cfg.model.block_size
        data_cfg = dataclasses.replace(cfg.data, limit=limit or cfg.data.limit)
        opened = open_data(
            data_cfg, seq_len, pairs, pairs, jax.process_index(), jax.process_count(), train=False, reference=ref_logps
        )
        if not opened.val:
            raise UserError(f"--run {run}: no preference pair in its validation split ({data_cfg.path})")
        batches, stats, path = opened.val, opened.stats, data_cfg.path
    else:
        seq_len = min(cfg.model.block_size, ref_cfg.model.block_size)
        built = build_preference_data(load_pairs(data, limit), seq_len, val_fraction=0.0)
        stats, path = built.stats, data
        if not built.train.num_rows:
            raise UserError(
                f"--data {data}: no pair fits the {seq_len}-token context ({stats['dropped_too_long']} too long, "
                f"{stats['dropped_empty']} empty, {stats['dropped_identical']} identical)"
            )
        batches = val_pairs(
            built.train, ref_logps(built.train), pairs, get_tokenizer().eot_id, jax.process_index(), jax.process_count()
        )
    counts = {k: v for k, v in stats.items() if k == "loaded" or k.startswith(("dropped_", "truncated_"))}
    reference.pop("params")  # the reference's device buffers go before the caller loads the policy
    return batches, {"ref": str(ref), "ref_step": reference["step"], "data": path, "seq_len": seq_len, **counts}


def evaluate_dpo(model: Loaded, batches: Sequence[PreferenceBatch], progress: Callable | None = None) -> dict:
    """The DPO metrics of a loaded policy (`fgpt_jax.eval.Loaded`, its run's dpo.* settings) over
    `batches` (from `preference_batches`): {"pairs", "dpo/loss", "rewards/*", "logps/*", "beta",
    "loss_type", "label_smoothing"}."""
    dpo = model.cfg.dpo
    metrics = preference_metrics(
        dpo_eval_step(model.graphdef, dpo, model.mesh), model.params, batches, model.mesh, progress
    )
    return {**metrics, "beta": dpo.beta, "loss_type": dpo.loss, "label_smoothing": dpo.label_smoothing}
