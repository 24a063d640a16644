"""Preference tuning (DPO) of an instruction-tuned run: chosen/rejected pairs, the SFT run as reference.

    python -m fgpt_jax.train --config dpo --config.init_from=runs/sft --config.data.path=pairs.json
    python -m fgpt_jax.train --config dpo --config.init_from=runs/sft \
        --config.data.path=HuggingFaceH4/ultrafeedback_binarized:train_prefs

The model and the reference both come from `init_from` (an SFT run): the reference's log-probabilities
of every reply are computed once at the start and kept in RUN/reference_logps.npz. `train.batch_size`
counts pairs (each pair is two rows of the forward pass). `data.path` is a ShareGPT preference file
(LLaMA-Factory's dpo_en_demo.json), or `prompt`/`chosen`/`rejected` records as message lists
(HuggingFaceH4/ultrafeedback_binarized) or transcripts (Anthropic/hh-rlhf), local or from the Hub
(docs/dpo.md). The default limits fit GPT-2's 1,024-token context: a prompt keeps its last 512
tokens, a reply its first 512 (`data.truncate`); with a shorter context, lower them so that
prompt + reply fits train.seq_len + 1, or over-long pairs are dropped (and counted in train.log).

beta 0.1 and the peak learning rate 1e-6 are the DPO paper's and TRL's defaults; AdamW, as for SFT.
With no `data.path` override the pairs come from the Hub (HuggingFaceH4/ultrafeedback_binarized).
"""

from fgpt_jax.config import Config, DPOConfig, TrainConfig
from fgpt_jax.data import DataConfig
from fgpt_jax.optim import OptimConfig


def get_config() -> Config:
    return Config(
        name="dpo",
        init_from="",  # the SFT run to start from; also the reference model
        model=None,  # the init_from run's model (shape and numerics); model.* overrides apply on top
        data=DataConfig(
            format="preference",
            path="HuggingFaceH4/ultrafeedback_binarized:train_prefs",
            max_prompt_tokens=512,
            max_response_tokens=512,
            truncate=True,
            val_fraction=0.05,
        ),
        dpo=DPOConfig(beta=0.1, label_smoothing=0.0, loss="sigmoid"),
        optim=OptimConfig(name="adamw", lr=1e-6, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(
            steps=1000, batch_size=32, log_every=10, eval_every=100, ckpt_every=250, sample_every=250, sample_tokens=64
        ),
    )
