"""The training loop: `train(cfg, run_dir)` wires data, setup and hooks; `Trainer.run` steps.

One loop for pretraining, fine-tuning and DPO (the batch always carries its loss mask; DPO's also
carries the reference log-probabilities, scored once at the start: fgpt_jax.eval.dpo). The loop
never waits on the device inside a step: it dispatches step t, then reads step t-1's metrics
(finished by then) to log them and to stop on a NaN/inf loss or gradient norm before anything bad
is saved.
When hooks are due (validation, checkpoint, HellaSwag, text sample; see hooks.py) the pending
step's metrics are checked first, then the hooks run in their fixed order. A SIGTERM or Ctrl-C
finishes the current step, saves a checkpoint and exits with status 130 (SIGINT) or 143 (SIGTERM);
`--resume` continues from the latest checkpoint exactly as if the run had never stopped.

Nothing is written into the run directory (config.json, metrics, logs) until every check has
passed: the lock is held, the config resolved, the data opened and the checkpoint restored.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx
from tqdm import tqdm

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import Checkpoints, load_model
from fgpt_jax.config import Config, resolve_config
from fgpt_jax.data import Batch
from fgpt_jax.data.pipeline import open_data
from fgpt_jax.eval.dpo import Reference, dpo_eval_step
from fgpt_jax.loss import make_eval_step
from fgpt_jax.metrics import MetricsWriter, Throughput, format_line, peak_flops
from fgpt_jax.rundir import RunDir
from fgpt_jax.tokenizer import N_VOCAB
from fgpt_jax.train import hooks as H
from fgpt_jax.train.start import TrainingError, check_base, check_run, rows_read, warm_source, warm_state
from fgpt_jax.train.step import build_setup


class StopSignal:
    """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint is intact)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Console:
    """Lines for the user: printed (above the progress bar on a terminal) and appended to train.log.
    Lines logged before the run directory may be written (while checks run) are held back."""

    def __init__(self, run: RunDir, enabled: bool):
        self.run, self.enabled, self.open, self._held = run, enabled, False, []
        self.tty = enabled and sys.stdout.isatty()

    def __call__(self, text: str, file_only: bool = False) -> None:
        if not self.enabled:
            return
        if not file_only:
            tqdm.write(text)
        if self.open:
            self.run.append_log(text)
        else:
            self._held.append(text)

    def start(self) -> None:
        """The checks passed: the run directory is ours to write."""
        self.open = True
        for text in self._held:
            self.run.append_log(text)
        self._held = []


class Trainer:
    """One run in progress: its state, data, jitted step and hooks. Built by `train`."""

    def __init__(
        self, cfg: Config, run: RunDir, resume: bool, on_step: Callable | None, resume_step: int | None = None
    ):
        self.cfg, self.rundir, self.on_step = cfg, run, on_step
        t = cfg.train
        self.is_main = jax.process_index() == 0
        self.console = Console(run, self.is_main)
        self.seq_len = t.seq_len or cfg.model.block_size
        if self.seq_len > cfg.model.block_size:
            raise TrainingError(f"train.seq_len={self.seq_len} exceeds model.block_size={cfg.model.block_size}")
        if cfg.model.vocab_size < N_VOCAB:
            raise TrainingError(f"model.vocab_size={cfg.model.vocab_size}: must be >= {N_VOCAB}, the tokenizer's ids")
        self.mesh = shd.make_mesh()
        micro = t.batch_size // t.grad_accum
        if micro % self.mesh.size:
            raise TrainingError(
                f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch must be "
                f"divisible by the {self.mesh.size} devices"
            )
        warm = cfg.init_from and cfg.init_mode == "warm" and not resume
        preference = cfg.data.format == "preference"
        if preference and (not cfg.init_from or cfg.init_mode != "params"):
            raise TrainingError(
                "data.format=preference (DPO): set init_from=RUN_DIR, the run to start from and "
                "compare with (an SFT run), and init_mode=params"
            )
        if cfg.init_from and not resume:
            check_base(cfg)
        start = check_run(cfg, run, resume, resume_step)

        first_row = 0
        if warm:  # the data continues where init_from's loader stopped
            base_step, base_data = warm_source(cfg)
            first_row = rows_read(base_data)
        # DPO: the reference scores every row before the policy's state exists, then is freed.
        reference = (
            Reference(run.path, cfg.init_from, cfg.dpo, self.mesh, micro, reuse=start is not None)
            if preference
            else None
        )
        data = open_data(
            cfg.data,
            self.seq_len,
            t.batch_size,
            micro,
            jax.process_index(),
            jax.process_count(),
            first_row=first_row,
            reference=reference,
        )
        if reference is not None:
            reference.release()
        if data.stats:
            self.console(f"data {cfg.data.path}: " + ", ".join(f"{k} {v}" for k, v in data.stats.items()))
            unit = "pairs" if preference else "rows"
            rows = data.stats.get(f"train_{unit}")
            if rows:
                self.console(
                    f"{t.steps} steps x {t.batch_size} {unit} = {t.steps * t.batch_size / rows:.1f} epochs "
                    f"of the {rows} training {unit}"
                )
        for note in data.notes + (reference.notes if reference is not None else []):
            self.console(note)
        self.data, self.loader = data, data.loader
        self.setup = build_setup(cfg, self.mesh)
        if start is not None:
            reader = Checkpoints(run.checkpoints, read_only=True)  # the writer is opened once every check passed
            try:
                self.state, loader_state = reader.restore(start, self.setup.abstract_state)
            finally:
                reader.close()
            self.loader.set_state(loader_state)
        elif warm:
            self.state = warm_state(cfg, self.setup, base_step, base_data, self.loader.identity())
        else:
            base = nnx.state(load_model(cfg.init_from)[0], nnx.Param) if cfg.init_from else None
            if base is not None:  # loaded on one device; init's output spans the mesh (jit refuses the mix)
                base = jax.device_put(base, self.setup.state_shardings.params)
            self.state = self.setup.init(base)
        self.start = start or 0
        self.batch_sharding = shd.batch_sharding(self.mesh, 3, batch_axis=1)
        val_hook, eval_step = (
            (H.PreferenceVal, dpo_eval_step(self.setup.graphdef, cfg.dpo, self.mesh))
            if preference
            else (H.ValLoss, make_eval_step(self.setup.graphdef))
        )
        self.val = val_hook(t.eval_every, eval_step, data.val, self.mesh) if data.val else None
        scorer = self._hellaswag_scorer(micro)

        # Every check has passed: from here on the run directory is written.
        if start is not None and start != run.checkpoint_steps()[-1]:
            self._set_aside_after(start)
        self.checkpoints = Checkpoints(run.checkpoints, keep_last=t.keep_checkpoints)
        self.hooks = self._hooks(scorer)
        if self.is_main:
            run.write_config(cfg)
            self.console.start()
        if reference is not None:
            reference.save()  # RUN/reference_logps.npz, when it was scored now
        if start is not None:
            self.console(f"resumed from step {start} ({run.checkpoints / str(start)})")
        elif warm:
            self.console(
                f"warm restart from {cfg.init_from} step {base_step}: its parameters, optimizer moments "
                f"and data position (row {first_row}); a new schedule from step 0"
            )
        elif cfg.init_from:
            self.console(f"initialised from {cfg.init_from}")
        self.writer = MetricsWriter(run, keep_through=self.start if start is not None else -1, enabled=self.is_main)
        tokens_per_step = t.batch_size * (2 if preference else 1) * self.seq_len  # a pair is two rows
        self.throughput = Throughput(
            tokens_per_step, cfg.model.flops_per_token(self.seq_len), self.mesh.size, peak_flops()
        )
        self.last: dict = {}
        self.console(
            f"{cfg.name}: {cfg.model.num_params() / 1e6:.2f}M parameters, {t.steps} steps of "
            f"{tokens_per_step:,} tokens ({t.grad_accum} x {micro}{' pairs x 2' if preference else ''} x "
            f"{self.seq_len}), {self.mesh.size} device(s) [{jax.devices()[0].device_kind}], {t.sharding}, "
            f"optimizer {cfg.optim.name}"
        )

    def _hellaswag_scorer(self, micro: int):
        t = self.cfg.train
        if not t.hellaswag_every:
            return None
        from fgpt_jax.eval.hellaswag import HellaSwagScorer  # tokenises and packs the items once

        return HellaSwagScorer.from_file(
            t.hellaswag_data or None,
            block_size=self.cfg.model.block_size,
            limit=t.hellaswag_limit or None,
            batch_size=micro,
            mesh=self.mesh,
        )

    def _hooks(self, scorer) -> list[H.Hook]:
        """The periodic work, in the order it runs (see hooks.py)."""
        cfg, t = self.cfg, self.cfg.train
        hooks: list[H.Hook] = [
            h for h in (self.val, H.Checkpoint(t.ckpt_every, self.checkpoints, self.loader)) if h is not None
        ]
        if scorer is not None:
            hooks.append(H.HellaSwag(t.hellaswag_every, scorer, self.setup.graphdef))
        hooks.append(
            H.TextSample(
                t.sample_every,
                self.setup.graphdef,
                t.sample_prompt,
                t.sample_tokens,
                chat=cfg.data.format in ("chat", "preference"),
            )
        )
        return hooks

    def _set_aside_after(self, step: int) -> None:
        """Resuming from an earlier checkpoint (the later ones broken): move the later ones out of
        checkpoints/ (nothing is deleted), so new saves can take their step numbers."""
        if not self.is_main:
            return
        aside = self.rundir.path / "checkpoints.set-aside"
        aside.mkdir(exist_ok=True)
        for later in [s for s in self.rundir.checkpoint_steps() if s > step]:
            target = aside / f"{later}-{int(time.time())}"
            (self.rundir.checkpoints / str(later)).rename(target)
            self.console(f"checkpoint {later} moved to {target} (resuming from {step})")

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: StopSignal) -> dict:
        """The loop. `stop` is installed before the Trainer is built, so a signal during setup (data,
        compilation, restore) ends the run before its first step, with nothing to save."""
        t = self.cfg.train
        self.bar = tqdm(
            total=t.steps,
            initial=self.start,
            desc=self.cfg.name,
            unit="step",
            dynamic_ncols=True,
            disable=not self.console.tty,
        )
        pending = None  # (step, metrics on device) of the step dispatched before the current one
        stopped = stop.signal
        try:
            if stopped is not None:
                self.console(f"stopped by signal {stopped} before the first step; nothing to save")
                return {"stopped_by_signal": stopped}
            if self.start == 0 and self.val is not None and t.eval_every:
                self.console("step 0: validation before training (its first call compiles the eval step)...")
                self._report(0, self.val(0, self.state, {}))  # the untrained baseline: curves start at 0
            for step in range(self.start + 1, t.steps + 1):
                if step == self.start + 1:  # jit compiles at the first call: tens of seconds of silence otherwise
                    self.console("compiling the train step (first step)...")
                    t0 = time.perf_counter()
                self.state, metrics = self.setup.train_step(self.state, self._device_batch(next(self.loader)))
                if step == self.start + 1:
                    self.console(f"train step compiled in {time.perf_counter() - t0:.1f} s")
                if pending is not None:
                    self._finish(*pending)
                pending = (step, metrics)
                due = [h for h in self.hooks if h.due(step, t.steps, stop.signal is not None)]
                if not due:
                    continue
                self._finish(*pending)  # the state is about to be read or saved: check this step first
                pending = None
                self._run_hooks(step, due)
                if stop.signal is not None:
                    stopped = stop.signal
                    break
            if pending is not None:
                self._finish(*pending)
            self._saved(self.checkpoints.poll(wait=True))  # the last save, on disk before we say so
            if stopped is not None:
                self.console(f"stopped by signal {stopped} at step {step}; checkpoint saved. Continue with --resume")
        finally:
            self.bar.close()
            try:
                self.checkpoints.close()  # waits for a save still in flight (an error path)
            finally:
                self.writer.close()
        if stopped is not None:
            self.last["stopped_by_signal"] = stopped
        return self.last

    def _saved(self, step: int | None) -> None:
        if step is not None:
            self.console(f"checkpoint {step} saved", file_only=self.console.tty)

    def _device_batch(self, batch: Batch) -> Batch:
        """This process's rows, split into micro-batches [A, B/A, ...], as one global sharded array each
        (a `PreferenceBatch` too: its pairs stay adjacent, and its ref_logp is [A, B/A])."""
        A = self.cfg.train.grad_accum

        def put(x):
            x = x.reshape(A, -1, *x.shape[1:])
            sharding = self.batch_sharding if x.ndim == 3 else shd.batch_sharding(self.mesh, x.ndim, batch_axis=1)
            return shd.global_batch(x, sharding)

        return type(batch)(*map(put, batch))

    def _finish(self, step: int, metrics) -> None:
        """Host side of `step`: NaN check, throughput, logging. Runs one step behind the device."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # A finite loss with a non-finite gradient has already written NaNs into the parameters:
        # either way, stop before anything from this step is saved.
        bad = [k for k in ("train/loss", "grad_norm") if not math.isfinite(values[k])]
        if bad:
            raise TrainingError(
                f"step {step}: {bad[0]} is {values[bad[0]]}; stopping. The last good checkpoint "
                f"({self.checkpoints.latest_step()}) is intact: lower optim.lr / optim.muon_lr "
                f"and --resume, or restart"
            )
        self._saved(self.checkpoints.poll())  # a failed async save surfaces here, one step after it failed
        self.data.check()  # raises if the background shard verification found a corrupt shard
        t = self.cfg.train
        logged = step % t.log_every == 0 or step == t.steps
        values.update(self.throughput.tick(step, report=logged))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{self.throughput.rate:,.0f}", refresh=False)
        if self.on_step is not None:
            self.on_step(step, values)
        if logged:
            self.writer.log(step, values)
            self.last.update(step=step, **values)
            tps = values.get("tokens_per_sec")
            eta = (t.steps - step) * self.throughput.tokens_per_step / tps if tps else None
            self.console(format_line(step, t.steps, values, eta), file_only=self.console.tty)

    def _run_hooks(self, step: int, due: list[H.Hook]) -> None:
        results: dict = {}
        done: list[H.Hook] = []
        try:
            for hook in due:
                result = hook(step, self.state, results)
                done.append(hook)
                self._report(step, result, results)
        except BaseException:
            # Whatever failed, a due checkpoint is still written before the error propagates.
            failed = next((h for h in due if h not in done), None)
            for hook in due:
                if isinstance(hook, H.Checkpoint) and hook not in done and hook is not failed:
                    hook(step, self.state, results)
            raise
        finally:
            self.writer.flush()
            self.throughput.pause()  # evaluation, sampling and saving are not training throughput

    def _report(self, step: int, result: H.Result, results: dict | None = None) -> None:
        if result.metrics:
            self.writer.log(step, result.metrics)
            self.last.update({k: v for k, v in result.metrics.items()})
            if results is not None:
                results.update(result.metrics)
        if result.line:
            self.console(result.line)


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    resume_step: int | None = None,
) -> dict:
    """Train `cfg` in `run_dir` (created if needed). Returns the last logged metrics.

    `resume` continues from the latest checkpoint, or from `resume_step` (later checkpoints, e.g.
    broken ones, are then moved to RUN/checkpoints.set-aside/, not deleted).

    `cfg` goes through `resolve_config` (a fine-tuning config with `model=None` takes its
    `init_from` run's model), exactly as the CLI's does. `on_step(step, metrics)` runs on the host
    after each step's metrics arrive (one step behind the device): a place for custom logging or
    early stopping from a notebook.
    """
    cfg = resolve_config(cfg)
    shd.initialize_distributed()
    run = RunDir(run_dir)
    # Process 0 holds the lock; the others write nothing but their share of each checkpoint.
    with StopSignal() as stop, run.lock() if jax.process_index() == 0 else contextlib.nullcontext():
        return Trainer(cfg, run, resume, on_step, resume_step).run(stop)


__all__ = ["train", "Trainer", "TrainingError", "StopSignal"]
