"""FGPT, phase 2: a warm restart from phase 1's last checkpoint that anneals the learning rates.

    python -m fgpt_jax.train --config fgpt                      # phase 1 -> runs/fgpt
    python -m fgpt_jax.train --config fgpt_anneal               # phase 2 -> runs/fgpt_anneal

`init_mode="warm"` takes phase 1's parameters AND optimizer moments, starts a new schedule and step
counter, and continues phase 1's data stream where it stopped (no batch seen twice): FGPT needed this
to break its loss plateau. Muon 0.003 cosine to 0.0005 and AdamW 3e-5 to 5e-6 (both 1/6 of the peak),
no warmup, over 16,666 updates (~8.6B tokens), clipping at 0.5. The model must be phase 1's shape
(a run of another shape is refused); everything else is as in phase 1, FGPT's torch.optim.Muon
rule included (configs/fgpt.py).
"""

import dataclasses

from fgpt_jax.config import Config, load_config

STEPS = 16_666


def get_config() -> Config:
    phase1 = load_config("fgpt")
    return dataclasses.replace(
        phase1,
        name="fgpt_anneal",
        init_from="runs/fgpt",
        init_mode="warm",
        optim=dataclasses.replace(
            phase1.optim,
            muon_lr=0.003,
            lr=3e-5,
            min_lr_ratio=0.0005 / 0.003,
            warmup_steps=0,
            plateau_steps=0,
            grad_clip=0.5,
        ),
        train=dataclasses.replace(phase1.train, steps=STEPS),
    )
