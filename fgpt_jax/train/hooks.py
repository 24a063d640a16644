"""Periodic work in the training loop, as small hook objects with a cadence.

The trainer runs the hooks that are due after a step, in the order it holds them, and only after
that step's loss and gradient norm have been read and found finite (so nothing reads or saves a
diverged state). The order is

    ValLoss (PreferenceVal in DPO runs) -> Checkpoint -> HellaSwag -> Core -> TextSample

validation first, so the checkpoint can record the val loss for the best-checkpoint policy; then
the checkpoint, so the slower and more fragile work (a 10k-item benchmark, generation) never stands
between a step and its checkpoint. If any hook fails, the trainer still runs a due checkpoint
before it stops. Adding periodic work is adding a hook: subclass `Hook`, give it a cadence, and pass
it to `train(cfg, run_dir, hooks=[MyHook(every=500)])` (it runs after the built-in hooks), or add it
to the built-in list in `fgpt_jax.train.start`.

A hook returns the metrics it produced ({tag: value}, logged to metrics.jsonl and TensorBoard) and
optionally a line for the console and train.log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import Checkpoints
from fgpt_jax.data import Batch
from fgpt_jax.data.core import download_bundle, load_items, read_bundle
from fgpt_jax.data.loader import BatchLoader
from fgpt_jax.eval.core import CoreEvaluator
from fgpt_jax.eval.dpo import preference_metrics
from fgpt_jax.eval.perplexity import evaluate_loss
from fgpt_jax.inference.generator import Generator
from fgpt_jax.loss import DPO_METRICS
from fgpt_jax.tokenizer import get_tokenizer

# FGPT's fixed questions: their greedy answers are logged during instruction tuning.
CHAT_EVAL_PROMPTS = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "Define 'cat'.",
    "Say hello.",
    "Where is the White House located?",
    "Who wrote Romeo and Juliet?",
    "Summarise the novel 1984 in one sentence.",
)


@dataclass
class Result:
    """What a hook reports: metrics to log, and an optional line for the console and train.log."""

    metrics: dict = field(default_factory=dict)
    line: str | None = None


class Hook:
    """Work due every `every` steps (0: never periodically) and, if `at_end`, after the last step."""

    name = "hook"
    at_end = True
    on_stop = False  # also due when a stop signal ends the run early

    def __init__(self, every: int):
        self.every = int(every)

    def due(self, step: int, last_step: int, stopping: bool) -> bool:
        return (
            (self.every > 0 and step % self.every == 0)
            or (self.at_end and step == last_step)
            or (self.on_stop and stopping)
        )

    def __call__(self, step: int, state, results: dict) -> Result:
        """Run at `step` on the live train `state`; `results` holds the metrics of the hooks that
        ran before this one at the same step."""
        raise NotImplementedError


class ValLoss(Hook):
    """Mean masked loss and bits per byte over the fixed validation batches (also run before the
    first step): val/loss, val/bpb."""

    name = "val/loss"

    def __init__(self, every: int, eval_step: Callable, batches: Sequence[Batch], mesh):
        super().__init__(every)
        self.eval_step, self.batches = eval_step, batches
        self.sharding = shd.batch_sharding(mesh, 2)

    def __call__(self, step, state, results) -> Result:
        m = evaluate_loss(self.eval_step, state.params, self.batches, self.sharding)
        return Result(
            {"val/loss": m["loss"], "val/bpb": m["bpb"]}, f"step {step}: val/loss {m['loss']:.4f} bpb {m['bpb']:.4f}"
        )


class PreferenceVal(Hook):
    """DPO runs' validation: the DPO metrics over the fixed validation pairs, tagged val/dpo/loss,
    val/rewards/*, val/logps/* (also run before the first step, where policy = reference). val/loss
    repeats val/dpo/loss, so the best-checkpoint policy and the curves work as for every run."""

    name = "val/loss"

    def __init__(self, every: int, eval_step: Callable, batches: Sequence, mesh):
        super().__init__(every)
        self.eval_step, self.batches, self.mesh = eval_step, batches, mesh

    def __call__(self, step, state, results) -> Result:
        m = preference_metrics(self.eval_step, state.params, self.batches, self.mesh)
        line = (
            f"step {step}: val/dpo/loss {m['dpo/loss']:.4f} rewards/accuracy {m['rewards/accuracy']:.3f} "
            f"rewards/margin {m['rewards/margin']:.4f} ({m['pairs']} pairs)"
        )
        return Result({"val/loss": m["dpo/loss"], **{f"val/{k}": m[k] for k in DPO_METRICS}}, line)


class Checkpoint(Hook):
    """An asynchronous orbax save of the train state and the loader's position."""

    name = "checkpoint"
    on_stop = True

    def __init__(self, every: int, checkpoints: Checkpoints, loader: BatchLoader):
        super().__init__(every)
        self.checkpoints, self.loader = checkpoints, loader

    def __call__(self, step, state, results) -> Result:
        done = self.checkpoints.save(step, state, self.loader.get_state(), val_loss=results.get("val/loss"))
        # The save just started finishes in the background; the trainer says so when it has.
        return Result(line=None if done is None else f"checkpoint {done} saved")


class HellaSwag(Hook):
    """HellaSwag accuracy of the live parameters (the scorer compiles once, at its first call)."""

    name = "hellaswag"
    KEYS = ("acc", "acc_norm", "acc_token_avg")

    def __init__(self, every: int, scorer, graphdef):
        super().__init__(every)
        self.scorer, self.graphdef = scorer, graphdef

    def __call__(self, step, state, results) -> Result:
        r = self.scorer(self.graphdef, state.params)  # on every process: an SPMD computation
        line = (
            f"step {step}: hellaswag acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} "
            f"acc_token_avg {r['acc_token_avg']:.4f} (n={r['n']})"
        )
        return Result({f"hellaswag/{k}": r[k] for k in self.KEYS}, line)


class Core(Hook):
    """nanochat's CORE metric of the live parameters (fgpt_jax.eval.core): the bundle's tasks are
    read, tokenised and packed once, when the hook is built (before the run directory is written,
    so a bad bundle stops the run before it starts), and scored every `train.core_every` steps.
    Logged as `eval/core` (the mean centered accuracy) and `eval/core/<task>` (each task's centered
    accuracy), as nanochat's base_train logs core_metric and centered_results."""

    name = "core"

    def __init__(self, every: int, evaluator, graphdef):
        super().__init__(every)
        self.evaluator, self.graphdef = evaluator, graphdef

    @classmethod
    def from_config(cls, t, block_size: int, graphdef, mesh, rows: int, console=print) -> Core | None:
        """The hook for TrainConfig `t` (None when `t.core_every` is 0)."""
        if not t.core_every:
            return None
        bundle = read_bundle(t.core_data or download_bundle())
        missing = bundle.missing()
        if missing:
            console(f"core: {len(missing)} task file(s) missing, not scored: {', '.join(x.label for x in missing)}")
        present = [x for x in bundle.tasks if x not in missing]
        max_items = t.core_max_per_task or None
        evaluator = CoreEvaluator(
            [(x, load_items(x, max_items)) for x in present],
            block_size,
            rows,
            mesh=mesh,
            n_total=len(bundle.tasks),
            missing=[x.label for x in missing],
            max_per_task=max_items,
        )
        return cls(t.core_every, evaluator, graphdef)

    def __call__(self, step, state, results) -> Result:
        r = self.evaluator(self.graphdef, state.params)  # on every process: an SPMD computation
        metrics = {"eval/core": r["core"], **{f"eval/core/{k}": v["centered"] for k, v in r["tasks"].items()}}
        n = sum(v["n"] for v in r["tasks"].values())
        return Result(metrics, f"step {step}: {r['label']} {r['core']:.4f} ({r['n_tasks']} tasks, {n} items)")


class TextSample(Hook):
    """Generated text, logged as `samples`: a continuation of `prompt` (temperature 1, top-k 50, a
    seed from the run's PRNG key and the step), or in chat runs the greedy answers to FGPT's fixed
    questions, so steps compare."""

    name = "samples"

    def __init__(self, every: int, graphdef, prompt: str, max_new_tokens: int, chat: bool):
        super().__init__(every)
        self.graphdef, self.prompt, self.max_new_tokens, self.chat = graphdef, prompt, max_new_tokens, chat

    def __call__(self, step, state, results) -> Result:
        tok = get_tokenizer()
        gen = Generator(self.graphdef, state.params)  # params are global arrays: every process runs this
        if self.chat:
            prompts = [
                tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
                for q in CHAT_EVAL_PROMPTS
            ]
            answers = gen.generate(prompts, self.max_new_tokens, temperature=0)
            text = "\n\n".join(
                f"Q: {q}\nA: {tok.decode([i for i in a if i not in tok.stop_ids])}"
                for q, a in zip(CHAT_EVAL_PROMPTS, answers)
            )
        else:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
            ids = gen.generate([tok.encode(self.prompt)], self.max_new_tokens, temperature=1.0, top_k=50, seed=seed)[0]
            text = self.prompt + tok.decode([i for i in ids if i not in tok.stop_ids])
        return Result({"samples": text}, f"step {step} sample: {text!r}")
