"""GPT-2 124M on FineWeb-Edu sample-10BT: the build-nanogpt reproduction (AdamW).

524,288-token batches (512 x 1024, micro-batches of 64), 19,073 steps = 10B tokens = one epoch of
sample-10BT; lr 6e-4, 715 warmup steps, cosine to 10%, weight decay 0.1, clipping at 1.0; validation loss and
HellaSwag every 250 steps, as build-nanogpt does.
The Muon variant is configs/gpt2_124m_muon.py.
"""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="gpt2_124m",
        model=GPTConfig.preset("gpt2", dtype="bfloat16"),  # bf16 compute, float32 params and logits
        data=DataConfig(path="data/fineweb_edu_10B"),  # python -m fgpt_jax.data fineweb --out data/fineweb_edu_10B
        optim=OptimConfig(name="adamw", lr=6e-4, warmup_steps=715, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(
            steps=19_073,
            batch_size=512,
            grad_accum=8,
            log_every=10,
            eval_every=250,
            ckpt_every=1000,
            sample_every=1000,
            hellaswag_every=250,
            # nanochat's CORE on 500 items per task (its base_train setting) every 1000 steps: 2.5e15 forward
            # FLOPs per eval (scripts/bench_core.py --layout-only), 6-13 s on one H100 at 40-20% of its bf16
            # peak (an estimate, not measured), about 0.6% of the training compute between two evals.
            core_every=1000,
            core_max_per_task=500,
        ),  # all 10,042 items
    )
