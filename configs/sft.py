"""Instruction tuning (SFT) of a pretrained run: multi-turn chat data, loss on assistant tokens only.

    python -m fgpt_jax.train --config sft --config.init_from=runs/gpt2_124m
    python -m fgpt_jax.train --config sft --config.init_from=runs/tiny \
        --config.data.path=instruction-data.json

FGPT instruction-tunes on single-turn pairs of at most 300 tokens and trains on the prompt too;
here the loss is masked to the assistant's tokens and conversations may have many turns. The model
comes from the base run (`init_from`); the optimizer starts fresh. `data.path` is a local Alpaca
(instruction/input/output) or `messages` JSON/JSONL/parquet file, or a Hub dataset of either
schema (default: yahma/alpaca-cleaned; HuggingFaceTB/smol-smoltalk for multi-turn chats).
"""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="sft",
        init_from="",  # the base run directory (pretrained here, or imported with python -m fgpt_jax.hf import)
        model=None,  # the base run's model (shape and numerics); model.* overrides apply on top
        data=DataConfig(
            format="chat",
            path="yahma/alpaca-cleaned",
            max_prompt_tokens=300,
            max_response_tokens=300,
            pack=True,
            val_fraction=0.05,
        ),
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(
            steps=2000, batch_size=32, log_every=10, eval_every=100, ckpt_every=500, sample_every=250, sample_tokens=64
        ),
    )
