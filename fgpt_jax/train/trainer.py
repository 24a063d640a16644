"""The training loop: `Trainer(prepared).run(stop)` steps a run that `fgpt_jax.train.start.prepare`
built; `train(cfg, run_dir)` does both.

One loop for pretraining, fine-tuning and DPO (the batch always carries its loss mask; DPO's also
carries the reference log-probabilities, scored once at the start: fgpt_jax.eval.dpo). The loop
never waits on the device inside a step: it dispatches step t, then reads step t-1's metrics
(finished by then) to log them and to stop on a NaN/inf loss or gradient norm before anything bad
is saved.
When hooks are due (validation, checkpoint, HellaSwag, text sample, and any passed to `train`; see
hooks.py) the pending step's metrics are checked first, then the hooks run in their fixed order. A
SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits with status 130 (SIGINT) or
143 (SIGTERM); `--resume` continues from the latest checkpoint exactly as if the run had never stopped.

Nothing is written into the run directory (config.json, metrics, logs) until every check has
passed: the lock is held, the config resolved, the data opened and the checkpoint restored (the
order is start.py's).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from tqdm import tqdm

from fgpt_jax import sharding as shd
from fgpt_jax.config import Config, resolve_config
from fgpt_jax.data import Batch
from fgpt_jax.metrics import format_line
from fgpt_jax.rundir import RunDir
from fgpt_jax.train import hooks as H
from fgpt_jax.train.start import Prepared, TrainingError, prepare


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


class Trainer:
    """The loop over one prepared run: steps, the one-step-behind metrics, the hooks, the stop."""

    def __init__(self, prepared: Prepared, on_step: Callable[[int, dict], None] | None = None):
        self.p, self.cfg, self.on_step = prepared, prepared.cfg, on_step
        self.state, self.start = prepared.state, prepared.start
        self.console, self.writer, self.throughput = prepared.console, prepared.writer, prepared.throughput
        self.checkpoints, self.hooks, self.data = prepared.checkpoints, prepared.hooks, prepared.data
        self.batch_sharding = shd.batch_sharding(prepared.mesh, 3, batch_axis=1)
        self.last: dict = {}

    def run(self, stop: StopSignal) -> dict:
        """The loop; returns the last logged metrics. `stop` is installed before the run is prepared,
        so a signal during setup (data, compilation, restore) ends the run before its first step,
        with nothing to save."""
        t = self.cfg.train
        self.bar = tqdm(
            total=t.steps,
            initial=self.start,
            desc=self.cfg.name,
            unit="step",
            dynamic_ncols=True,
            disable=not self.console.tty,
        )
        stopped, step = stop.signal, self.start
        try:
            if stopped is not None:
                self.console(f"stopped by signal {stopped} before the first step; nothing to save")
                return {"stopped_by_signal": stopped}
            if self.start == 0 and self.p.val is not None and t.eval_every:
                self.console("step 0: validation before training (its first call compiles the eval step)...")
                self._report(0, self.p.val(0, self.state, {}))  # the untrained baseline: curves start at 0
            step, stopped = self._steps(stop)
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

    def _steps(self, stop: StopSignal) -> tuple[int, int | None]:
        """Steps start+1.. until the last or a signal; (the last step taken, the signal or None)."""
        t = self.cfg.train
        pending = None  # (step, metrics on device) of the step dispatched before the current one
        step = self.start
        for step in range(self.start + 1, t.steps + 1):
            first = step == self.start + 1  # jit compiles at the first call: tens of seconds of silence otherwise
            if first:
                self.console("compiling the train step (first step)...")
                t0 = time.perf_counter()
            self.state, metrics = self.p.setup.train_step(self.state, self._device_batch(next(self.data.loader)))
            if first:
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
                return step, stop.signal
        if pending is not None:
            self._finish(*pending)
        return step, None

    def _saved(self, step: int | None) -> None:
        if step is not None:
            self.console(f"checkpoint {step} saved", file_only=self.console.tty)

    def _device_batch(self, batch: Batch) -> Batch:
        """This process's rows, split into micro-batches [A, B/A, ...], as one global sharded array each
        (a `PreferenceBatch` too: its pairs stay adjacent, and its ref_logp is [A, B/A])."""
        A = self.cfg.train.grad_accum

        def put(x):
            x = x.reshape(A, -1, *x.shape[1:])
            sharding = self.batch_sharding if x.ndim == 3 else shd.batch_sharding(self.p.mesh, x.ndim, batch_axis=1)
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
    hooks: Sequence[H.Hook] = (),
) -> dict:
    """Train `cfg` in `run_dir` (created if needed). Returns the last logged metrics.

    `resume` continues from the latest checkpoint, or from `resume_step` (later checkpoints, e.g.
    broken ones, are then moved to RUN/checkpoints.set-aside/, not deleted).

    `cfg` goes through `resolve_config` (a fine-tuning config with `model=None` takes its
    `init_from` run's model), exactly as the CLI's does. `on_step(step, metrics)` runs on the host
    after each step's metrics arrive (one step behind the device): a place for custom logging or
    early stopping from a notebook. `hooks` adds periodic work without editing the library:
    `fgpt_jax.train.hooks.Hook` subclasses, run after the built-in hooks when due, their metrics
    logged like the others (see hooks.py).
    """
    cfg = resolve_config(cfg)
    shd.initialize_distributed()
    run = RunDir(run_dir)
    # Process 0 holds the lock; the others write nothing but their share of each checkpoint.
    with StopSignal() as stop, run.lock() if jax.process_index() == 0 else contextlib.nullcontext():
        return Trainer(prepare(cfg, run, resume, resume_step, hooks), on_step).run(stop)


__all__ = ["train", "Trainer", "TrainingError", "StopSignal"]
