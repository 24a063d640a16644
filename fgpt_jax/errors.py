"""The one base class for errors a user can fix, so every command turns them into one line.

`UserError` is raised for bad input (a file, a flag, a config key or value, a run directory that does
not fit the request, a diverged run) with a message of one line that names what is wrong and what was
expected: `<file or flag or key>: <what was expected>`. `fgpt_jax.cli.run` prints any `UserError` (and
any `OSError`, in the OS's words) as `error: <message>` with exit status 2; every other exception is a
bug and keeps its traceback.

The classes below it are defined where their noun lives (ConfigError here, because the config
dataclasses of model.py, optim.py and data/ raise it and cannot import config.py):

    UserError
      ConfigError      fgpt_jax.errors (re-exported by fgpt_jax.config): config files, keys, values
      DataError        fgpt_jax.data.sources: documents, records, data files, loader state
      ShardError       fgpt_jax.data.shards: shard directories and manifests
      HellaSwagError   fgpt_jax.data.hellaswag: HellaSwag files
      CoreError        fgpt_jax.data.core: CORE eval bundles (core.yaml, eval_meta_data.csv, task files)
      RunDirError      fgpt_jax.rundir: run directories and their lock
      CheckpointError  fgpt_jax.checkpoint: checkpoints
      TrainingError    fgpt_jax.train.start: a run that cannot start or go on
      HFError          fgpt_jax.hf.gpt2_config: Hugging Face checkpoints and configs
      HarnessError     fgpt_jax.eval.harness_tasks: lm-evaluation-harness tasks, include paths, settings

Most of them also derive from ValueError (or RuntimeError), as they did before this base existed, so
code that catches those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one line naming the file, flag or key."""


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""
