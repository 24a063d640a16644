"""lm-evaluation-harness in process: a run's model as an lm-eval `TemplateLM`, and `evaluate_harness`,
which runs `lm_eval.simple_evaluate` over it. lm-eval is an optional extra (`pip install "fgpt-jax[eval]"`);
importing this module without it raises a one-line `HarnessError` saying so.

The three request types, each answered as lm-eval's own `hf` backend answers them on the model's
Hugging Face export (`fgpt_jax.hf.to_hf`), so the numbers are the same (tests/test_eval_harness.py):
  loglikelihood          (context, continuation) -> (sum of the continuation's token log-probs, whether
                         every continuation token is the argmax). lm-eval's TemplateLM tokenises: the
                         whole string once, the context's trailing spaces moved to the continuation;
                         an empty context is the prefix token <|endoftext|>. A pair longer than the
                         context keeps its last block_size + 1 tokens (the last one is only a target),
                         as the hf backend crops.
  loglikelihood_rolling  a document -> its total log-likelihood, in lm-eval's own disjoint windows of
                         the model's context (lm_eval.utils.get_rolling_token_windows, the first one
                         conditioned on <|endoftext|>), every token predicted exactly once.
  generate_until         (context, generation kwargs) -> text: the context's last block_size -
                         max_gen_toks tokens, greedy decoding through the KV-cache `Generator`
                         (sampling when the task asks for do_sample), the text cut at the first `until`
                         string (lm-eval adds "<|endoftext|>"), special tokens dropped.

Every likelihood goes through the shared `SpanScorer` (fgpt_jax.eval.scoring): all requests of a
call are packed once into length buckets and scored in fixed-shape, device-sharded batches of
`batch_size` rows (never one forward per request); identical spans are scored once. Log-softmax and
argmax run over the rows `to_hf` exports (the padded vocabulary rows that still hold the import
fill are left out), so an imported GPT-2 scores as it does in transformers. Generation batches
`batch_size` prompts of one set of generation kwargs, longest first; a row also stops at any single
token whose text contains an `until` string (which cannot change the cut text), so rows finish
early instead of always running max_gen_toks.

With `apply_chat_template`, lm-eval renders prompts through `apply_chat_template` below: the chat
template of docs/design.md (what `Tokenizer.render_chat` and the export's Jinja template write) as a
string, whose special tokens are then parsed back into their ids. Without it, text is ordinary text:
a document containing "<|endoftext|>" is scored as those characters (the hf backend would parse it
as the special token).
"""

from __future__ import annotations

# isort: off
# First: without lm-eval this raises the one-line HarnessError with the install command.
from fgpt_jax.eval.harness_tasks import (
    HarnessError,
    check_output_path,
    jsonable,
    names_of,
    resolve_tasks,
    write_outputs,
)

# isort: on
import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Sequence

import jax
import lm_eval
import numpy as np
from flax import nnx
from lm_eval import evaluator as lm_evaluator
from lm_eval import utils as lm_utils
from lm_eval.api import task as lm_task
from lm_eval.api.model import TemplateLM
from lm_eval.loggers import EvaluationTracker
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from fgpt_jax.eval.scoring import Span, SpanScorer, crop_left
from fgpt_jax.hf.tokenizer_files import CHAT_TEMPLATE
from fgpt_jax.hf.weights import export_vocab_size
from fgpt_jax.inference.generator import Generator
from fgpt_jax.tokenizer import END, EOT, ROLE_TOKENS, SPECIAL_TOKENS, get_tokenizer

__all__ = ["FgptJaxLM", "HarnessError", "evaluate_harness", "jsonable", "resolve_tasks", "check_output_path"]

_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
# generation kwargs this backend understands (after lm-eval's normalize_gen_kwargs).
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class FgptJaxLM(TemplateLM):
    """A model (graphdef, params) as an lm-eval language model. See the module docstring.

    `batch_size` rows per scoring call and prompts per generation call (rounded up to a multiple of
    the devices for scoring); `vocab_size` the logits scored (default: the rows `to_hf` exports);
    `apply_chat_template` parses the chat template's special tokens in prompts; `progress` shows a
    bar per call on stderr; `seed` seeds sampling (greedy decoding ignores it)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params,
        block_size: int,
        batch_size: int = 32,
        vocab_size: int | None = None,
        apply_chat_template: bool = False,
        progress: bool = False,
        max_gen_toks: int = 256,
        seed: int = 1234,
        mesh=None,
    ):
        super().__init__()
        self.graphdef, self.params = graphdef, params
        self.tok = get_tokenizer()
        self.block_size = int(block_size)
        if vocab_size is None:
            wte = nnx.merge(graphdef, params).wte.embedding[...]
            vocab_size = export_vocab_size(np.asarray(jax.device_get(wte)))
        self.vocab_size = int(vocab_size)
        self.scorer = SpanScorer(self.block_size, rows=batch_size, mesh=mesh, vocab_size=self.vocab_size)
        self._batch_size = max(1, int(batch_size))
        self.chat = apply_chat_template
        self.progress = progress
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self._generators: dict[tuple[int, ...], Generator] = {}
        self._stop_tokens: dict[tuple[str, ...], tuple[int, ...]] = {}

    # -- what lm-eval asks of a TemplateLM -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eot_id  # <|endoftext|>: the export's bos_token, which the hf backend uses

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template's Jinja text (what the export's tokenizer_config.json holds), for lm-eval's logs."""
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as `render_chat` does, as text. Without a generation prompt the last
        message is left open (no closing <|end|>) for the continuation to extend, as transformers'
        `continue_final_message` does for the hf backend."""
        text = EOT
        for i, m in enumerate(chat_history):
            role, content = m.get("role"), m.get("content")
            if role not in ROLE_TOKENS or not isinstance(content, str):
                raise HarnessError(f"chat message {i}: expected a role in {sorted(ROLE_TOKENS)} and text content")
            text += ROLE_TOKENS[role] + content + END
        if add_generation_prompt:
            return text + ROLE_TOKENS["assistant"]
        return text[: -len(END)] if chat_history else text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ordinary text (no BOS added, as GPT-2's tokenizer); chat-template prompts keep their special tokens."""
        if not self.chat:
            return self.tok.encode(string)
        ids: list[int] = []
        for i, piece in enumerate(_SPECIAL_SPLIT.split(string)):
            if i % 2:
                ids.append(SPECIAL_TOKENS[piece])
            elif piece:
                ids += self.tok.encode(piece)
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (the hf backend decodes with skip_special_tokens)."""
        special = set(SPECIAL_TOKENS.values())
        return self.tok.decode([int(i) for i in ids if int(i) not in special])

    def get_model_info(self) -> dict:
        cfg = nnx.merge(self.graphdef, self.params).config
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return {"model_num_parameters": n, "model_dtype": cfg.dtype, "block_size": cfg.block_size}

    # -- scoring ------------------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(
            total=total, desc=desc, unit="batch", file=sys.stderr, disable=disable or not self.progress or total == 0
        )

    def _score(self, spans: list[Span], desc: str, disable: bool) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) per span; each distinct span is scored once."""
        index: dict[tuple, int] = {}
        unique: list[Span] = []
        where = []
        for s in spans:
            key = (tuple(s.tokens), s.start)
            if key not in index:
                index[key] = len(unique)
                unique.append(s)
            where.append(index[key])
        if not unique:
            return []
        packed = self.scorer.pack(unique)
        with self._bar(packed.n_batches, desc, disable) as bar:
            scores = self.scorer(self.graphdef, self.params, packed, bar.update)
        out = [(float(lp.astype(np.float64).sum()), bool(g.all())) for lp, g in zip(scores.logprobs, scores.greedy)]
        return [out[i] for i in where]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        spans = []
        for (context, continuation), ctx, cont in requests:
            if not ctx:  # a context of spaces only: condition on the prefix token, as an empty one
                ctx = [self.prefix_token_id]
            if not cont:
                raise HarnessError(f"loglikelihood request {context[-40:]!r} + {continuation!r}: empty continuation")
            if len(cont) > self.block_size:
                raise HarnessError(
                    f"loglikelihood request {continuation[:40]!r}...: continuation of {len(cont)} tokens, "
                    f"longer than the model's context ({self.block_size})"
                )
            spans.append(crop_left(ctx + cont, len(ctx), self.block_size + 1))
        results = self._score(spans, "loglikelihood", disable_tqdm)
        for ((context, continuation), _, _), answer in zip(requests, results):
            if context is not None:
                self.cache_hook.add_partial("loglikelihood", (context, continuation), answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        spans, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.block_size,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, windows):
                spans.append(Span(list(ctx) + list(cont), len(ctx)))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (lp, _) in zip(owner, self._score(spans, "loglikelihood_rolling", disable_tqdm or not self.progress)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # -- generation ---------------------------------------------------------------------------------------
    def _stops(self, until: Sequence[str]) -> tuple[int, ...]:
        """The stop tokens (<|end|>, <|endoftext|>) plus every ordinary token whose own text (valid UTF-8)
        contains an `until` string: stopping there cannot change the text cut at the first `until`."""
        key = tuple(sorted(u for u in until if u))
        if key not in self._stop_tokens:
            stops = set(self.tok.stop_ids)
            if key:
                for i in range(SPECIAL_TOKENS[EOT]):
                    try:
                        text = self.tok.decode_bytes([i]).decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    if any(u in text for u in key):
                        stops.add(i)
            self._stop_tokens[key] = tuple(sorted(stops))
        return self._stop_tokens[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        prompts = [self.tok_encode(context) for context, _ in args]
        out: list[str | None] = [None] * len(args)
        n_batches = sum(-(-len(m) // self._batch_size) for m in groups.values())
        with self._bar(n_batches, "generate_until", disable_tqdm) as bar:
            for members in groups.values():
                gen_kwargs = args[members[0]][1]
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                unknown = sorted(set(kwargs) - _GEN_KEYS)
                if unknown:
                    raise HarnessError(
                        f"generation_kwargs {unknown}: not supported by fgpt-jax (it understands "
                        f"{sorted(_GEN_KEYS)} and lm-eval's aliases of max_gen_toks)"
                    )
                until = handle_stop_sequences(kwargs["until"], eos=EOT)
                n_new = kwargs["max_gen_toks"]
                if not 1 <= n_new < self.block_size:
                    raise HarnessError(
                        f"max_gen_toks {n_new}: expected 1 to {self.block_size - 1} (the model's context "
                        f"{self.block_size} holds the prompt and the new tokens)"
                    )
                sampling = {"temperature": 0.0}
                if kwargs["do_sample"] and kwargs.get("temperature", 0.0) > 0:
                    sampling = {
                        "temperature": float(kwargs["temperature"]),
                        "top_k": int(kwargs.get("top_k") or 0),
                        "top_p": float(kwargs.get("top_p") or 1.0),
                    }
                stops = self._stops(until)
                gen = self._generators.get(stops)
                if gen is None:
                    gen = self._generators[stops] = Generator(self.graphdef, self.params, stop_ids=stops)
                keep = self.block_size - n_new
                # Longest first, as the hf backend orders them: similar lengths share a padded shape.
                order = sorted(members, key=lambda i: -len(prompts[i]))
                rows = min(self._batch_size, _pow2_at_least(len(order)))
                for b in range(0, len(order), rows):
                    chunk = order[b : b + rows]
                    batch = [prompts[i][-keep:] or [self.prefix_token_id] for i in chunk]
                    batch += [batch[-1]] * (rows - len(batch))  # a full batch: one compiled shape
                    new = gen.generate(batch, max_new_tokens=n_new, seed=self.seed + b, **sampling)
                    for i, ids in zip(chunk, new):
                        text = postprocess_generated_text(self.tok_decode(ids), until, None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
                    bar.update(1)
        return out  # type: ignore[return-value]


# -- the entry point ------------------------------------------------------------------------------------
def _jax_env_info(storage: dict) -> None:
    """Stands in for lm-eval's `add_env_info` during `evaluate_harness`: that one describes a torch
    install (torch.utils.collect_env: imports torch and runs pip and nvidia-smi, 10-15 s when torch is
    present) that plays no part here. Same keys; the environment described is JAX's."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "N/A"

    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    storage.update(
        pretty_env_info=f"fgpt-jax {v('fgpt-jax')}, jax {jax.__version__}, jaxlib {v('jaxlib')}, flax {v('flax')}; "
        f"{jax.device_count()} device(s) ({devices}), {jax.process_count()} process(es)",
        transformers_version=v("transformers"),
        lm_eval_version=v("lm_eval"),
        upper_git_hash=None,
    )


@contextlib.contextmanager
def _lm_eval_patched(progress: bool):
    """Two of lm-eval's module globals swapped for one evaluation, and restored: `add_env_info` for
    `_jax_env_info`, and, without `progress`, the tqdm bar its tasks show while building requests
    (lm-eval offers no switch for it) for a disabled one."""
    saved = lm_evaluator.add_env_info, lm_task.tqdm
    lm_evaluator.add_env_info = _jax_env_info
    if not progress:
        lm_task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        lm_evaluator.add_env_info, lm_task.tqdm = saved


def evaluate_harness(
    model,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 32,
    include_path: str | os.PathLike | None = None,
    task_manager=None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = True,
    system_instruction: str | None = None,
    gen_kwargs: dict | None = None,
    log_samples: bool = False,
    output_path: str | os.PathLike | None = None,
    model_args: dict | None = None,
    bootstrap_iters: int = 100_000,
    progress: bool = False,
    vocab_size: int | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on a loaded model (`fgpt_jax.eval.Loaded`): its results dictionary ("results",
    "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", ... and
    "samples" with `log_samples`), plus "output_files" when `output_path` is given.

    `tasks`: names (see `resolve_tasks`), or already resolved names with their `task_manager`.
    `num_fewshot`, `limit`, `apply_chat_template`, `fewshot_as_multiturn`, `system_instruction`,
    `gen_kwargs` (overrides every generate_until task's settings) and `bootstrap_iters` (stderr
    resamples; 0 = none) are simple_evaluate's; its seeds keep their defaults (random 0, numpy and
    few-shot 1234), so few-shot examples are the ones lm-eval's CLI picks.
    `output_path` receives lm-eval's result files (and per-sample files with `log_samples`) as its
    CLI writes them, under DIR/<model_args["model"]>/. Everything is checked before the first request
    is scored; nothing is written if the evaluation fails."""
    if task_manager is None:
        task_manager, names = resolve_tasks(tasks, include_path)
    else:
        names = names_of(tasks)
    out = check_output_path(output_path)
    lm = FgptJaxLM(
        model.graphdef,
        model.params,
        model.block_size,
        batch_size=batch_size,
        vocab_size=vocab_size,
        apply_chat_template=apply_chat_template,
        progress=progress,
        mesh=model.mesh,
    )
    model_args = dict(model_args or {"model": "fgpt-jax"})
    tracker, tmp = None, None
    if out is not None:
        base = out.parent if out.suffix == ".json" else out
        tmp = base / f".harness-tmp-{os.getpid()}"
        tracker = EvaluationTracker(output_path=str(tmp / out.name if out.suffix == ".json" else tmp))
    with _lm_eval_patched(progress):
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=lm.batch_size,
            log_samples=log_samples,
            evaluation_tracker=tracker,
            system_instruction=system_instruction,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn,
            gen_kwargs=gen_kwargs,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            torch_random_seed=None,  # nothing here uses torch; seeding it would import it (seconds)
        )
    if out is not None and results is not None and jax.process_index() == 0:  # one writer per run
        samples = results.pop("samples", None) if log_samples else None
        results["output_files"] = write_outputs(tracker, results, samples, out, tmp)
        if samples is not None:
            results["samples"] = samples
    return results
