"""fgpt-jax: GPT-2-class language models trained from scratch with JAX/Flax NNX.

The package reads as the data flows (the README's "Layout" has a line per module):

    data/  ->  train/  ->  eval/  ->  inference/          plus interop: hf/

    data/       documents -> token shards -> batches; conversations and preference pairs -> rows
    train/      the jitted step, how a run starts (start.prepare), the hook-driven loop (train.train)
    eval/       validation loss and bits per byte, HellaSwag, DPO metrics, the shared span scorer
    inference/  the KV-cache generator, chat sessions, the batching engine and the HTTP server
    hf/         Hugging Face transformers' GPT-2 format, both ways

with the shared nouns at the top: `model` (GPT), `tokenizer` (GPT-2 BPE + chat tokens), `config`
(typed run configs and overrides), `optim` (Muon + AdamW), `loss`, `checkpoint`, `sharding`,
`metrics`, `rundir`, `errors` (UserError) and `cli`. Each stage's command is its package's
`__main__` (`python -m fgpt_jax.data`, `.train`, `.eval`, `.hf`); `generate`, `chat`, `serve` and
`plot` are top-level modules of their own. docs/design.md holds the rules.
"""

__version__ = "0.2.0"
