"""GPT-2 medium, 350M (24 layers, 1024 wide), on FineWeb-Edu sample-10BT: 10B tokens, 524,288-token batches.

The GPT-3 paper's learning rate for this size (3e-4); micro-batches of 32 for an 80 GB GPU."""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="gpt2_350m",
        model=GPTConfig.preset("gpt2-medium", dtype="bfloat16", remat=False),  # bf16 compute, float32 params and logits
        data=DataConfig(path="data/fineweb_edu_10B"),  # python -m fgpt_jax.data fineweb --out data/fineweb_edu_10B
        optim=OptimConfig(name="adamw", lr=3e-4, warmup_steps=715, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(
            steps=19_073,
            batch_size=512,
            grad_accum=16,
            log_every=10,
            eval_every=250,
            ckpt_every=1000,
            sample_every=1000,
            hellaswag_every=1000,
            # nanochat's CORE on 500 items per task (its base_train setting) every 1000 steps: 8.6e15 forward
            # FLOPs per eval (scripts/bench_core.py --layout-only), 22-43 s on one H100 at 40-20% of its bf16
            # peak (an estimate, not measured), about 0.6% of the training compute between two evals.
            core_every=1000,
            core_max_per_task=500,
        ),
    )
