"""The run directory: the one place that knows its layout, and the lock that gives it one writer.

    RUN/
      config.json      the resolved Config: enough to rebuild the model, resume, evaluate or sample
      checkpoints/N/   orbax checkpoints (see checkpoint.py)
      tb/              TensorBoard event files
      metrics.jsonl    one JSON object per logged step, the same tags as TensorBoard
      train.log        the trainer's console lines
      eval.jsonl       one JSON object per `python -m fgpt_jax.eval` result
      .lock            held (flock) by the trainer writing the run

The lock is an advisory `flock` on RUN/.lock: the kernel releases it when its holder exits, however
it exits (kill -9 included), so a lock is never stale. A second trainer on the same directory is
refused with one line naming the holder. Readers (eval, generate, chat, serve) take no lock: they
open checkpoints read-only and never write into checkpoints/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from fgpt_jax.config import Config, ConfigError, load_run_config, save_config
from fgpt_jax.errors import UserError


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used as asked; the message is one line naming it."""


class RunDir:
    CONFIG, CHECKPOINTS, TB, METRICS, LOG, EVAL, LOCK = (
        "config.json",
        "checkpoints",
        "tb",
        "metrics.jsonl",
        "train.log",
        "eval.jsonl",
        ".lock",
    )

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()

    def __str__(self) -> str:
        return str(self.path)

    config_path = property(lambda self: self.path / self.CONFIG)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    tb = property(lambda self: self.path / self.TB)
    metrics = property(lambda self: self.path / self.METRICS)
    log_path = property(lambda self: self.path / self.LOG)
    eval_log = property(lambda self: self.path / self.EVAL)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the finalised checkpoints (orbax renames a save to its step number only when it is
        complete, so in-flight or interrupted saves are never listed)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit() and p.is_dir())

    def has_checkpoints(self) -> bool:
        return bool(self.checkpoint_steps())

    def read_config(self) -> Config:
        """The run's config.json, checked (a one-line ConfigError names the file otherwise)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path}: expected a run directory holding {self.CONFIG}")
        return load_run_config(self.config_path)

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)

    def append_log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def append_eval(self, record: dict) -> None:
        """One JSON line in eval.jsonl, with the wall-clock time."""
        with open(self.eval_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's writer lock; refuse with RunDirError if another process holds it.

        A directory this call created is removed again on exit if nothing but the lock was written
        into it (a run refused by a later check leaves no trace)."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"--run {self.path}: cannot create the run directory ({e.strerror})") from None
        lock_path = self.path / self.LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunDirError(
                    f"--run {self.path}: in use by {holder}; wait for it to finish, stop it, "
                    f"or choose another run directory"
                ) from None
            info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the flock
            if created and {p.name for p in self.path.iterdir()} <= {self.LOCK}:
                lock_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()
