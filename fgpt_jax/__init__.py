"""fgpt-jax: GPT-2-class language models trained from scratch with JAX/Flax NNX.

Where things live: `model` (GPT), `tokenizer` (GPT-2 BPE + chat tokens), `config` (typed run
configs and CLI overrides), `data/` (token shards and the sampler).
"""

__version__ = "0.2.0"
