"""The quickstart: a 7M-parameter GPT on the bundled Tiny Shakespeare, a few minutes on 2 CPU cores.

`python -m fgpt_jax.train` with no arguments runs this config. Almost all of its compute is the
50,304-way output layer, so it is sized by tokens/s on a laptop CPU, not by what it could learn.
"""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="tiny",
        model=GPTConfig.preset("tiny"),  # 4 layers, 4 heads, 128 wide, context 128, float32
        data=DataConfig(path="tinyshakespeare", val_windows=64),  # the bundled Tiny Shakespeare, tokenised on first use
        optim=OptimConfig(name="muon", lr=3e-3, muon_lr=0.05, warmup_steps=20, min_lr_ratio=0.1),
        train=TrainConfig(
            steps=200, batch_size=16, log_every=10, eval_every=25, ckpt_every=100, keep_checkpoints=2, sample_tokens=48
        ),
    )
