"""The train stage: the jitted step, the hook-driven loop, and `python -m fgpt_jax.train`.

  step     TrainState, the jitted donated train step (scanned micro-batches), `build_setup`
  start    how a run starts: fresh, init_from, resumed, warm restart (and the checks before it)
  hooks    periodic work: validation loss, checkpoint, HellaSwag, text samples
  trainer  `train(cfg, run_dir)`: wires data, setup and hooks, and runs the loop

`from fgpt_jax.train import train` is the Python entry point; the CLI is `__main__`.
"""

from fgpt_jax.train.start import TrainingError
from fgpt_jax.train.trainer import Trainer, train

__all__ = ["train", "Trainer", "TrainingError"]
