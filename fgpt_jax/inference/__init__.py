"""The inference stage: sampling from a trained model. Front-ends: `python -m fgpt_jax.generate`,
`python -m fgpt_jax.chat` (and the trainer's text samples).

  sampling   temperature / top-k / top-p as pure functions of (logits, key)
  generator  the KV-cache Generator: batched generation in one jitted loop, and token streaming
  session    ChatSession: a multi-turn conversation kept within the context
"""
