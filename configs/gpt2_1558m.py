"""GPT-2 XL, 1558M (48 layers, 1600 wide), on FineWeb-Edu sample-100BT: 30B tokens (~19 per parameter).

The GPT-3 paper's learning rate for this size (2e-4); micro-batches of 8 with per-block remat."""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="gpt2_1558m",
        model=GPTConfig.preset("gpt2-xl", dtype="bfloat16", remat=True),  # bf16 compute, float32 params and logits
        data=DataConfig(path="data/fineweb_edu_100B"),  # python -m fgpt_jax.data fineweb --out data/fineweb_edu_100B
        optim=OptimConfig(name="adamw", lr=2e-4, warmup_steps=715, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(
            steps=57_220,
            batch_size=512,
            grad_accum=64,
            log_every=10,
            eval_every=250,
            ckpt_every=1000,
            sample_every=1000,
            hellaswag_every=1000,
            # nanochat's CORE on 500 items per task (its base_train setting) every 1000 steps: 4.0e16 forward
            # FLOPs per eval (scripts/bench_core.py --layout-only), 100-200 s on one H100 at 40-20% of its bf16
            # peak (an estimate, not measured), about 0.6% of the training compute between two evals.
            core_every=1000,
            core_max_per_task=500,
        ),
    )
