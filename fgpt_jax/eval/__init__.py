"""The eval stage: how good a model is, during training (hooks) and after it (`python -m fgpt_jax.eval`).

perplexity  validation loss and perplexity: the one implementation the trainer and the CLI share
hellaswag   HellaSwag accuracy (acc, acc_norm, acc_token_avg) with a bucketed, jitted, sharded scorer
dpo         DPO metrics over preference pairs, and the reference log-probabilities a DPO run keeps
harness     lm-evaluation-harness in process: the model as an lm-eval TemplateLM (the optional [eval] extra)
harness_tasks  its task names, --include-path and result files, checked before anything runs
"""
