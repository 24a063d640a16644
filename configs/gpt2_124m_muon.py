"""GPT-2 124M on FineWeb-Edu sample-10BT with Muon for the hidden matrices (AdamW for the rest).

Same data, batch and length as configs/gpt2_124m.py; Muon lr 0.02 with momentum 0.95, the
embeddings/LayerNorms/biases on AdamW at 6e-4.
"""

import dataclasses

from fgpt_jax.config import load_config


def get_config():
    cfg = load_config("gpt2_124m")
    return dataclasses.replace(
        cfg, name="gpt2_124m_muon", optim=dataclasses.replace(cfg.optim, name="muon", muon_lr=0.02, muon_momentum=0.95)
    )
