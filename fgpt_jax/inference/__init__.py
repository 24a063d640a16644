"""The inference stage: sampling from a trained model. Front-ends: `python -m fgpt_jax.generate`,
`python -m fgpt_jax.chat`, `python -m fgpt_jax.serve` (and the trainer's text samples).

  sampling   temperature / top-k / top-p as pure functions of (logits, key)
  generator  the KV-cache Generator: batched generation in one jitted loop, and token streaming
  session    ChatSession: a multi-turn conversation kept within the context
  engine     Engine: continuous batching of concurrent requests in one jitted decode step (the server's)
  row_sampling  temperature / top-k / top-p / PRNG key per row, for the engine's shared batches
  protocol   OpenAI's wire format: request models, error object, a choice's text deltas
  server     the ASGI app (OpenAI-compatible API + the chat page in web/)
  connections  the HTTP server's limits (request deadline, connection cap) for uvicorn
"""
