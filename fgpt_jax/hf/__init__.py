"""Interop with Hugging Face transformers' GPT-2 format: import OpenAI's checkpoints, export ours.

  python -m fgpt_jax.hf import --hf openai-community/gpt2 --run runs/gpt2-hf
  python -m fgpt_jax.hf export --run runs/sft --out hf/sft

weights          tensor renames both ways (no torch needed), vocabulary padding, config checks
tokenizer_files  GPT-2's vocab.json/merges.txt derived from the shipped ranks file, tokenizer configs
"""

from fgpt_jax.hf.weights import HFError, from_hf, to_hf

__all__ = ["from_hf", "to_hf", "HFError"]
