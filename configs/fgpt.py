"""FGPT, phase 1: 662.7M (32 layers, 24 heads of 52, 1248 wide) on FineWeb-Edu, as FGPT's reported run did it.

Batches of 84 x 1024 tokens with 6 micro-batches (516,096 tokens per update) for 41,667 updates
(~21.5B tokens); FGPT's optimizer: torch.optim.Muon(hidden, lr=0.03) with PyTorch's defaults
(momentum 0.95, Nesterov, no bias correction: `muon_momentum_rule="torch"`; Newton-Schulz in bf16:
`ns_dtype="bfloat16"`; decoupled weight decay 0.1) and AdamW 3e-4 (betas 0.9/0.95, eps 1e-8, weight
decay 0.1 on every parameter it holds, LayerNorms and biases included); clipping at 1.0; warmup over
4% of the updates, a plateau of 20%, then cosine to 0.1x. Checked against torch's two optimizers step
by step (tests/test_optim.py): AdamW agrees to float32 rounding; Muon's updates agree on average
within 0.3%, the differences being single bf16 roundings in Newton-Schulz that fall the other way
(torch's kernels sum in another order than XLA's; up to 0.9% on one matrix): close, not bit for bit.
Phase 2 (configs/fgpt_anneal.py) continues from this run's last checkpoint with a warm restart.
"""

from fgpt_jax.config import Config, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig

STEPS = 41_667


def get_config() -> Config:
    return Config(
        name="fgpt",
        model=GPTConfig.preset("fgpt", dtype="bfloat16"),  # cuDNN attention with head_dim 52 padded to 56
        data=DataConfig(path="data/fineweb_edu_100B"),  # python -m fgpt_jax.data fineweb --name sample-100BT ...
        optim=OptimConfig(
            name="muon",
            muon_lr=0.03,
            muon_momentum=0.95,
            muon_momentum_rule="torch",  # torch.optim.Muon's Nesterov step (no bias correction)
            ns_dtype="bfloat16",  # torch.optim.Muon's Newton-Schulz precision
            muon_weight_decay=0.1,
            lr=3e-4,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            weight_decay_on="all",
            grad_clip=1.0,
            warmup_steps=round(STEPS * 0.04),
            plateau_steps=round(STEPS * 0.20),
            min_lr_ratio=0.1,
        ),
        train=TrainConfig(
            steps=STEPS,
            batch_size=84 * 6,
            grad_accum=6,
            log_every=10,
            eval_every=250,
            ckpt_every=1000,
            sample_every=1000,
            hellaswag_every=1000,
            # nanochat's CORE on 500 items per task (its base_train setting) every 1000 steps: 1.7e16 forward
            # FLOPs per eval (scripts/bench_core.py --layout-only), 42-84 s on one H100 at 40-20% of its bf16
            # peak (an estimate, not measured), about 0.6% of the training compute between two evals.
            core_every=1000,
            core_max_per_task=500,
        ),
    )
