"""The CORE metric (DCLM's 22 in-context tasks) scored item for item as nanochat does, batched.

nanochat (`nanochat/core_eval.py`, `scripts/base_eval.py`) scores one item per forward pass; the
same decisions come here from the shared span scorer (fgpt_jax.eval.scoring: length buckets, a
fixed set of compiled shapes, the LM head on scored positions only, sharded over the devices).
Per task, with its items already shuffled and cut (fgpt_jax.data.core.load_items):

- Few-shot: item i's examples are `random.Random(1234 + i).sample(the other indices, k)`.
- Prompts (`render_prompts`), as nanochat's jinja templates render them: each few-shot example,
  then a blank line ("\\n\\n"), then the item:
    multiple_choice    one prompt per choice: `query + delimiter + choice` (examples: their gold choice)
    schema             one prompt per context option: `option + delimiter + continuation`
    language_modeling  `context.strip() + delimiter + continuation`, and the same without the
                       continuation, whole-stripped (`.strip()`), which must tokenise as its prefix
  They are plain string joins here rather than jinja2 (not a dependency): with whitespace control
  the templates reduce to these; the tests render nanochat's templates and compare byte for byte.
- Tokens: `<|endoftext|>` (GPT-2's BOS, `tokenizer.eot_id`) + `encode(prompt)`. The scored part
  starts at the common token prefix of the choices (multiple choice), at the common suffix of the
  options (schema), after the prompt without continuation (language modelling), and runs to the end.
- Longer than the context: the oldest tokens are cropped (the last block_size kept), the scored part
  moving with them; see `_span` for the scored part that does not fit (nanochat stops there).
- Multiple choice and schema: the option with the lowest mean loss over its scored tokens wins,
  ties to the first; an option with no scored token has a NaN mean, which Python's `min` over
  nanochat's list passes over unless it comes first (`lowest_mean_loss`).
  Language modelling: correct when every scored token is the model's argmax.
- accuracy per task; centered = (accuracy - b/100) / (1 - b/100), b the random baseline in percent;
  CORE = the mean of the centered accuracies.

`CoreEvaluator(tasks, block_size)` renders, tokenises and packs every task once; calling it with
(graphdef, params) scores them (the trainer's hook calls it every N steps, compiling only on the
first call). `evaluate_core` does both once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fgpt_jax.data.core import FEWSHOT_SEED, CoreError, Item, Task
from fgpt_jax.eval.scoring import Packed, Span, SpanScorer
from fgpt_jax.tokenizer import get_tokenizer

N_CORE_TASKS = 22  # DCLM's CORE ensemble, nanochat's leaderboard metric


# -- prompts ---------------------------------------------------------------------------------------


def fewshot_indices(i: int, n: int, k: int) -> list[int]:
    """The few-shot examples of item i of n (nanochat: Random(1234 + i).sample of the others)."""
    if k <= 0:
        return []
    return random.Random(FEWSHOT_SEED + i).sample([j for j in range(n) if j != i], k)


def render_prompts(kind: str, item: dict, fewshot: Sequence[dict], delimiter: str) -> list[str]:
    """The prompts of one item, byte for byte as nanochat's templates render them (the module
    docstring); for language modelling [without continuation, with continuation]."""
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ("left") or suffix ("right") of the sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        idx = i if direction == "left" else -1 - i
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return i
    return n


def lowest_mean_loss(mean_losses: Sequence[float]) -> int:
    """`mean_losses.index(min(mean_losses))` as Python computes it: the first of the smallest, and a
    NaN wins only in first place (no value compares less than it; it compares less than none)."""
    best = 0
    for i in range(1, len(mean_losses)):
        if mean_losses[i] < mean_losses[best]:
            best = i
    return best


def centered(accuracy: float, baseline_percent: float) -> float:
    """Accuracy rescaled so the random baseline is 0 and a perfect score 1."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def core_label(n_scored: int, n_total: int = N_CORE_TASKS) -> str:
    """ "CORE" for all 22 of CORE's tasks, else what was scored and that it does not compare."""
    if n_scored == n_total == N_CORE_TASKS:
        return "CORE"
    return f"CORE over {n_scored} of {n_total} tasks (not comparable with the leaderboard)"


# -- tokens and spans ------------------------------------------------------------------------------


def _span(tokens: list[int], start: int, block_size: int) -> Span | None:
    """The scored span of one prompt: tokens[start:] predicted from what precedes, the oldest
    tokens cropped to fit block_size. None when nothing is scored: an empty scored part, or one of
    block_size tokens or more, which cropping leaves no room to predict (nanochat scores an empty
    slice there at exactly block_size tokens and stops with an assertion beyond; both are counted
    as `too_long` in the result)."""
    cut = max(len(tokens) - block_size, 0)
    if start - cut < 1 or start >= len(tokens):
        return None
    return Span(tokens[cut:], start - cut)


@dataclass
class _Prepared:
    """One task's items as spans: option o of item i is spans[opt_span[first[i] + o]] (-1: none)."""

    task: Task
    gold: np.ndarray  # [n] the gold option (0 for language modelling: one option)
    first: np.ndarray  # [n + 1] offsets of each item's options
    opt_span: np.ndarray  # [options] index into the packed spans, -1 when nothing is scored
    too_long: int  # options whose scored part does not fit the context
    cropped: int  # prompts cropped from the left to fit
    packed: Packed | None = None
    prepare_seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.gold)


def prepare_task(task: Task, items: Sequence[Item], block_size: int, tokenizer=None) -> tuple[_Prepared, list[Span]]:
    """Render and tokenise every item of `task` (see the module docstring) into spans."""
    tok = tokenizer or get_tokenizer()
    docs = [it.data for it in items]
    prompts, owner = [], []
    for i, doc in enumerate(docs):
        shots = [docs[j] for j in fewshot_indices(i, len(docs), task.num_fewshot)]
        ps = render_prompts(task.task_type, doc, shots, task.delimiter)
        prompts += ps
        owner += [i] * len(ps)
    bos = tok.eot_id
    encoded = [[bos, *ids] for ids in tok.encode_batch(prompts)]
    gold, first, opt_span, spans = [], [0], [], []
    too_long = cropped = 0
    at = 0
    for i, doc in enumerate(docs):
        group = []
        while at < len(encoded) and owner[at] == i:
            group.append(encoded[at])
            at += 1
        if task.task_type == "language_modeling":
            without, with_ = group
            if not (len(without) < len(with_) and with_[: len(without)] == without):
                raise CoreError(
                    f"{items[i].where}: the prompt without its continuation does not tokenise as a prefix of "
                    f"the prompt with it (nanochat's CORE asserts the same); expected a non-empty continuation"
                )
            group, starts = [with_], [len(without)]
        elif task.task_type == "multiple_choice":
            starts = [common_length(group, "left")] * len(group)
        else:
            suffix = common_length(group, "right")
            starts = [len(t) - suffix for t in group]
        gold.append(0 if task.task_type == "language_modeling" else doc["gold"])
        for t, s in zip(group, starts):
            span = _span(t, s, block_size)
            if span is None:
                too_long += len(t) - s >= block_size
                opt_span.append(-1)
                continue
            cropped += len(t) > block_size
            opt_span.append(len(spans))
            spans.append(span)
        first.append(len(opt_span))
    prep = _Prepared(
        task, np.array(gold, np.int64), np.array(first, np.int64), np.array(opt_span, np.int64), too_long, cropped
    )
    return prep, spans


def decide(
    prep: _Prepared, logprobs: Sequence[np.ndarray], greedy: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(correct [n] bool, mean loss per option [options] float64) from the spans' scores (see the
    module docstring); language modelling has no mean loss (NaN)."""
    out = np.zeros(prep.n, bool)
    means = np.full(len(prep.opt_span), math.nan)
    lm = prep.task.task_type == "language_modeling"
    for i in range(prep.n):
        lo, hi = prep.first[i], prep.first[i + 1]
        opts = prep.opt_span[lo:hi]
        if lm:  # torch.all over an empty slice is True, as in nanochat at exactly block_size tokens
            out[i] = opts[0] < 0 or bool(np.all(greedy[opts[0]]))
            continue
        # Mean loss per option in float64 from the float32 log-probs; an empty slice's mean is NaN.
        for o, s in enumerate(opts):
            if s >= 0:
                means[lo + o] = -float(np.mean(logprobs[s], dtype=np.float64))
        out[i] = lowest_mean_loss(means[lo:hi].tolist()) == prep.gold[i]
    return out, means


# -- evaluation ------------------------------------------------------------------------------------


class CoreEvaluator:
    """Every task rendered, tokenised and packed once; `evaluator(graphdef, params) -> result`.

    `tasks`: (Task, items) pairs, items as `fgpt_jax.data.core.load_items` returns them.
    `batch_size`: prompts (rows) per device call, rounded up to a multiple of the devices.
    `n_total`: the number of tasks a full CORE has (the bundle's core.yaml: 22), for the label.
    Each task is packed on its own (so it is scored and timed on its own) into one `SpanScorer`,
    whose K grid (`gathered_k`) gives a bucket at most seven programs for all tasks together."""

    def __init__(
        self,
        tasks: Sequence[tuple[Task, Sequence[Item]]],
        block_size: int,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        n_total: int = N_CORE_TASKS,
        missing: Sequence[str] = (),
        max_per_task: int | None = None,
        tokenizer=None,
    ):
        if not tasks:
            raise CoreError("CORE: no task to score")
        self.scorer = SpanScorer(block_size, rows=batch_size, mesh=mesh)
        self.block_size, self.n_total = block_size, n_total
        self.missing, self.max_per_task = list(missing), max_per_task
        self.tasks: list[_Prepared] = []
        for task, items in tasks:
            t0 = time.perf_counter()
            prep, spans = prepare_task(task, items, block_size, tokenizer)
            prep.packed = self.scorer.pack(spans)
            prep.prepare_seconds = time.perf_counter() - t0
            self.tasks.append(prep)

    @property
    def n_batches(self) -> int:
        return sum(p.packed.n_batches for p in self.tasks)

    @property
    def n_prompts(self) -> int:
        return sum(p.packed.n for p in self.tasks)

    @property
    def compiles(self) -> int:
        return self.scorer.compiles

    def score_items(self, graphdef: nnx.GraphDef, params, progress=None, on_task=None):
        """Per task, in order: (its _Prepared, `decide`'s (correct, mean losses), seconds)."""
        for prep in self.tasks:
            if on_task is not None:
                on_task(prep.task.label)
            t0 = time.perf_counter()
            lm = prep.task.task_type == "language_modeling"  # only these read the argmax flags
            scores = self.scorer(graphdef, params, prep.packed, progress, with_greedy=lm)
            decided = decide(prep, scores.logprobs, scores.greedy)
            yield prep, decided, time.perf_counter() - t0

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params,
        progress: Callable[[int], object] | None = None,
        on_task: Callable[[str], object] | None = None,
    ) -> dict:
        """Score every task with the model (graphdef, params); `progress(1)` per batch and
        `on_task(label)` as each task starts. Returns (the JSON record of `eval core`):
        {"tasks": {label: {accuracy, centered, n, seconds, ...}}, "core", "n_tasks", "label", ...}."""
        per_task = {}
        for prep, (correct, _), seconds in self.score_items(graphdef, params, progress, on_task):
            acc = float(np.mean(correct))
            per_task[prep.task.label] = {
                "accuracy": acc,
                "centered": centered(acc, prep.task.baseline),
                "n": prep.n,
                "seconds": round(seconds, 3),
                "type": prep.task.task_type,
                "shots": prep.task.num_fewshot,
                "cropped": prep.cropped,
                "too_long": prep.too_long,
            }
        core = float(np.mean([r["centered"] for r in per_task.values()]))
        return {
            "task": "core",
            "tasks": per_task,
            "core": core,
            "n_tasks": len(per_task),
            "label": core_label(len(per_task), self.n_total),
            "comparable": len(per_task) == self.n_total == N_CORE_TASKS and self.max_per_task is None,
            "missing": self.missing,
            "max_per_task": self.max_per_task,
            "block_size": self.block_size,
            "prompts": self.n_prompts,
        }


def evaluate_core(
    model,
    tasks: Sequence[tuple[Task, Sequence[Item]]],
    batch_size: int = 64,
    progress: Callable[[int], object] | None = None,
    **kwargs,
) -> dict:
    """CORE of a loaded model (`fgpt_jax.eval.Loaded`) on `tasks` ((Task, items) pairs, e.g. from
    `fgpt_jax.data.core.read_bundle` + `load_items`): pack once, score once. Keyword arguments go to
    `CoreEvaluator` (n_total, missing, max_per_task, tokenizer)."""
    evaluator = CoreEvaluator(tasks, model.block_size, batch_size, mesh=model.mesh, **kwargs)
    return evaluator(model.graphdef, model.params, progress)


def format_table(result: dict) -> str:
    """The per-task table (accuracy, centered, items, seconds), then the CORE line with its label."""
    head = f"{'task':<34} {'type':<17} {'shots':>5} {'accuracy':>9} {'centered':>9} {'items':>6} {'seconds':>8}"
    rows = [head, "-" * len(head)]
    for label, r in result["tasks"].items():
        rows.append(
            f"{label:<34} {r['type']:<17} {r['shots']:>5} {r['accuracy']:>9.4f} {r['centered']:>9.4f} "
            f"{r['n']:>6} {r['seconds']:>8.2f}"
        )
    n = sum(r["n"] for r in result["tasks"].values())
    s = sum(r["seconds"] for r in result["tasks"].values())
    rows += ["-" * len(head), f"{result['label']}: {result['core']:.4f} ({n} items, {s:.2f} s)"]
    if result.get("missing"):
        rows.append(f"missing task files, not scored: {', '.join(result['missing'])}")
    return "\n".join(rows)


def format_csv(result: dict) -> str:
    """nanochat's CSV (scripts/base_eval.py): Task, Accuracy, Centered per task, then the CORE row."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, r in result["tasks"].items():
        lines.append(f"{label:<35}, {r['accuracy']:<10.6f}, {r['centered']:<10.6f}")
    lines.append(f"{result['label']:<35}, {'':<10}, {result['core']:<10.6f}")
    return "\n".join(lines) + "\n"


__all__ = [
    "N_CORE_TASKS",
    "CoreEvaluator",
    "evaluate_core",
    "render_prompts",
    "fewshot_indices",
    "common_length",
    "lowest_mean_loss",
    "centered",
    "core_label",
    "prepare_task",
    "decide",
    "format_table",
    "format_csv",
]
