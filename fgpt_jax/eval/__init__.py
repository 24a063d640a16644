"""The eval stage: how good a model is, during training (hooks) and after it, as a library.

    from fgpt_jax import eval as ev
    model = ev.load("runs/gpt2_124m")                      # the one loader: a run's checkpoint, replicated
    batches, info = ev.validation_batches(model.cfg, model.mesh)
    ev.evaluate_val(model, batches)                        # {"loss", "ppl", "bpb", "tokens", "bytes"}
    ev.evaluate_hellaswag(model, load_examples(path))      # {"n", "acc", "acc_norm", "acc_token_avg"}

Every `evaluate_*` takes a loaded model (`Loaded`: graphdef, params, config, step, mesh) and its data,
and returns a dict of metrics; `python -m fgpt_jax.eval` (eval/__main__.py) only parses arguments,
loads, calls one of them and prints. The modules:

  scoring     the batched, jitted, sharded span scorer every likelihood evaluation shares
  perplexity  validation loss, perplexity and bits per byte (the trainer's val/* too)
  hellaswag   HellaSwag accuracy (acc, acc_norm, acc_token_avg)
  core        nanochat's CORE metric (22 in-context tasks), item for item, batched
  dpo         DPO metrics over preference pairs, and the reference log-probabilities a DPO run keeps
  harness     lm-evaluation-harness in process: the model as an lm-eval TemplateLM (the optional [eval] extra)
  harness_tasks  its task names, --include-path and result files, checked before anything runs

The names below are imported on first use (PEP 562), so `import fgpt_jax.eval` (and the CLI's
`--help`) does not start JAX.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module imports JAX
    from fgpt_jax.config import Config

_LAZY = {
    "evaluate_val": "fgpt_jax.eval.perplexity",
    "evaluate_loss": "fgpt_jax.eval.perplexity",
    "validation_batches": "fgpt_jax.eval.perplexity",
    "evaluate_hellaswag": "fgpt_jax.eval.hellaswag",
    "HellaSwagScorer": "fgpt_jax.eval.hellaswag",
    "evaluate_dpo": "fgpt_jax.eval.dpo",
    "preference_batches": "fgpt_jax.eval.dpo",
    "evaluate_core": "fgpt_jax.eval.core",
    "evaluate_harness": "fgpt_jax.eval.harness",
    "SpanScorer": "fgpt_jax.eval.scoring",
    "Span": "fgpt_jax.eval.scoring",
}

__all__ = ["Loaded", "load", *_LAZY]


@dataclass
class Loaded:
    """A run's model ready to evaluate: its graph, its parameters replicated on `mesh`, the run's
    config (config.json) and the checkpoint step they come from (None: an imported model's)."""

    graphdef: Any
    params: Any
    cfg: Config
    step: int | None
    mesh: Any

    @property
    def block_size(self) -> int:
        return self.cfg.model.block_size

    @classmethod
    def of(cls, model, cfg=None, step: int | None = None, mesh=None) -> Loaded:
        """An in-memory GPT (a notebook's, a test's) as a `Loaded`; `cfg` defaults to a Config around
        the model's own GPTConfig."""
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from fgpt_jax import sharding as shd
        from fgpt_jax.config import Config

        mesh = mesh if mesh is not None else shd.make_mesh()
        graphdef, params = nnx.split(model, nnx.Param)
        cfg = cfg if cfg is not None else Config(model=model.config)
        return cls(graphdef, jax.device_put(params, NamedSharding(mesh, P())), cfg, step, mesh)


def load(run: str | os.PathLike, step: int | None = None, mesh=None) -> Loaded:
    """The checkpoint `step` of run directory `run` (default: its latest), parameters only, replicated
    on `mesh` (default: every device). The one model loader of the eval stage."""
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.rundir import RunDir

    steps = RunDir(run).checkpoint_steps()
    step = steps[-1] if step is None and steps else step
    model, cfg = load_model(run, step)
    return Loaded.of(model, cfg, step, mesh)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fgpt_jax.eval' has no attribute {name!r}")
