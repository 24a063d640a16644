"""CORE (fgpt_jax.data.core, fgpt_jax.eval.core) against an independent one-prompt-per-forward
implementation of nanochat's procedure run through transformers on the model's HF export; the
pure pieces (prompts byte for byte, few-shot draws, prefix/suffix, cropping, NaN/tie rules,
centering); the bundle's errors; the download; the CLI (table, JSON, CSV, missing tasks, 2 devices
= 1); the training hook.

tests/data/core_eval is a 4-task bundle: the first lines of three real CORE files (multiple choice
10-shot, language modelling 10-shot, schema) and squad, whose file is absent (tests/data/SOURCES.md).
The model is the tiny preset with a 64-token context, random weights (seed 0): most prompts are
cropped, winograd's are not.
"""

import http.server
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hostdevices import device_flags

from fgpt_jax.config import apply_overrides, load_config
from fgpt_jax.data import core as dcore
from fgpt_jax.data.core import CoreError, Task, load_items, read_bundle
from fgpt_jax.data.download import fetch
from fgpt_jax.eval import Loaded
from fgpt_jax.eval import core as ecore
from fgpt_jax.eval.__main__ import main as eval_main
from fgpt_jax.model import GPT
from fgpt_jax.tokenizer import get_tokenizer

DATA = Path(__file__).parent / "data" / "core_eval"
BLOCK = 64
ROWS = 16
ITEMS = 12  # per task: the few-shot tasks need 11


# -- shared fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory holding the tiny model (random init, seed 0, 64-token context)."""
    from fgpt_jax.checkpoint import save_model

    cfg = apply_overrides(load_config("tiny"), [f"model.block_size={BLOCK}"])
    model = GPT(cfg.model, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("core") / "run"
    save_model(path, model, cfg)
    return path, model, cfg


@pytest.fixture(scope="module")
def bundle_tasks():
    bundle = read_bundle(DATA)
    return bundle, [(t, load_items(t, ITEMS)) for t in bundle.tasks if t.path.is_file()]


@pytest.fixture(scope="module")
def evaluator(bundle_tasks):
    bundle, tasks = bundle_tasks
    return ecore.CoreEvaluator(tasks, BLOCK, ROWS, n_total=len(bundle.tasks), missing=["squad"], max_per_task=ITEMS)


# -- the reference: nanochat's procedure, one item per forward, in torch + transformers -----------

# nanochat's jinja templates (nanochat/core_eval.py), whose whitespace control defines the prompts.
MC_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
SCHEMA_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
LM_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}\
""".strip()


def jinja_prompts(kind, item, shots, delimiter):
    jinja2 = pytest.importorskip("jinja2")
    ctx = {"fewshot_examples": shots, "continuation_delimiter": delimiter, "item": item}
    if kind == "multiple_choice":
        t = jinja2.Template(MC_TEMPLATE)
        return [t.render(choice=c, **ctx) for c in item["choices"]]
    if kind == "schema":
        t = jinja2.Template(SCHEMA_TEMPLATE)
        return [t.render(context=c, **ctx) for c in item["context_options"]]
    t = jinja2.Template(LM_TEMPLATE)
    return [t.render(include_continuation=False, **ctx).strip(), t.render(include_continuation=True, **ctx)]


def reference_task(task: Task, docs: list[dict], hf_tok, model, torch):
    """Per item: (correct, [per option: (-losses of the scored slice, argmax == target)]), as
    nanochat's evaluate_example computes them (BOS-padded batch of the item's prompts, left crop,
    roll-by-one targets, a NaN last column, the slice [start-1, end-1))."""
    F = torch.nn.functional
    bos = hf_tok.bos_token_id
    out = []
    for i, item in enumerate(docs):
        shots = []
        if task.num_fewshot:
            rng = random.Random(1234 + i)
            shots = [docs[j] for j in rng.sample([j for j in range(len(docs)) if j != i], task.num_fewshot)]
        prompts = jinja_prompts(task.task_type, item, shots, task.delimiter)
        toks = [[bos] + hf_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if task.task_type == "language_modeling":
            start, end = [len(toks[0])], [len(toks[1])]
            assert toks[1][: start[0]] == toks[0]
            toks = [toks[1]]
        else:
            n = min(map(len, toks))
            if task.task_type == "multiple_choice":
                common = next((k for k in range(n) if len({t[k] for t in toks}) > 1), n)
                start, end = [common] * len(toks), [len(t) for t in toks]
            else:
                common = next((k for k in range(n) if len({t[-1 - k] for t in toks}) > 1), n)
                end = [len(t) for t in toks]
                start = [e - common for e in end]
        for r, t in enumerate(toks):
            if len(t) > BLOCK:
                crop = len(t) - BLOCK
                toks[r], start[r], end[r] = t[-BLOCK:], start[r] - crop, end[r] - crop
        width = max(map(len, toks))
        ids = torch.full((len(toks), width), bos, dtype=torch.long)
        for r, t in enumerate(toks):
            ids[r, : len(t)] = torch.tensor(t)
        with torch.no_grad():
            logits = model(ids).logits.float()
        targets = torch.roll(ids, shifts=-1, dims=1)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        losses = losses.view(len(toks), width)
        losses[:, -1] = float("nan")
        preds = logits.argmax(-1)
        options = [
            (-losses[r, s - 1 : e - 1].numpy(), (preds[r, s - 1 : e - 1] == ids[r, s:e]).numpy())
            for r, (s, e) in enumerate(zip(start, end))
        ]
        if task.task_type == "language_modeling":
            correct = bool(torch.all(preds[0, start[0] - 1 : end[0] - 1] == ids[0, start[0] : end[0]]).item())
        else:
            means = [losses[r, s - 1 : e - 1].mean().item() for r, (s, e) in enumerate(zip(start, end))]
            correct = means.index(min(means)) == item["gold"]
        out.append((correct, options))
    return out


@pytest.mark.slow
def test_batched_scorer_equals_nanochat_reference_item_for_item(run, evaluator, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fgpt_jax.hf import to_hf

    _, model, cfg = run
    hf_dir = to_hf(model, cfg, tmp_path / "hf")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    graphdef, params = nnx.split(model, nnx.Param)
    checked = 0
    for prep in evaluator.tasks:
        docs = [it.data for it in load_items(prep.task, ITEMS)]
        ref = reference_task(prep.task, docs, hf_tok, hf_model, torch)
        scores = evaluator.scorer(graphdef, params, prep.packed)
        correct, means = ecore.decide(prep, scores.logprobs, scores.greedy)
        np.testing.assert_array_equal(correct, [c for c, _ in ref], err_msg=prep.task.label)
        for i, (_, options) in enumerate(ref):
            spans = prep.opt_span[prep.first[i] : prep.first[i + 1]]
            assert len(spans) == len(options)
            for s, (logp, greedy) in zip(spans, options):
                assert s >= 0  # nothing in this data is too long for the context
                np.testing.assert_allclose(scores.logprobs[s], logp, atol=2e-4, err_msg=f"{prep.task.label} {i}")
                np.testing.assert_array_equal(scores.greedy[s], greedy)
                checked += 1
            if prep.task.task_type != "language_modeling":
                want = [-float(np.mean(lp, dtype=np.float64)) for lp, _ in options]
                np.testing.assert_allclose(means[prep.first[i] : prep.first[i + 1]], want, atol=2e-4)
    assert checked == evaluator.n_prompts == 4 * ITEMS + ITEMS + 2 * ITEMS
    assert [p.cropped for p in evaluator.tasks] == [4 * ITEMS, ITEMS, 0]  # the crop path is exercised, not only it


def test_prompts_render_as_nanochats_templates_on_the_real_items(bundle_tasks):
    pytest.importorskip("jinja2")
    _, tasks = bundle_tasks
    for task, items in tasks:
        docs = [it.data for it in items]
        for i, doc in enumerate(docs):
            shots = [docs[j] for j in ecore.fewshot_indices(i, len(docs), task.num_fewshot)]
            ours = ecore.render_prompts(task.task_type, doc, shots, task.delimiter)
            assert ours == jinja_prompts(task.task_type, doc, shots, task.delimiter), (task.label, i)


# -- pure pieces -----------------------------------------------------------------------------------


def test_prompts_byte_exact():
    shots = [
        {"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0},
        {"query": "Q: 3+3?", "choices": ["9", "6"], "gold": 1},
    ]
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    assert ecore.render_prompts("multiple_choice", item, shots, "\nAnswer: ") == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 3+3?\nAnswer: 6\n\nQ: 2+2?\nAnswer: 3",
        "Q: 1+1?\nAnswer: 2\n\nQ: 3+3?\nAnswer: 6\n\nQ: 2+2?\nAnswer: 4",
    ]
    assert ecore.render_prompts("multiple_choice", item, [], " ") == ["Q: 2+2? 3", "Q: 2+2? 4"]
    schema_shot = [{"context_options": ["Ann sang so Bob", "Ann sang so Ann"], "continuation": "clapped.", "gold": 0}]
    schema = {"context_options": ["Tom ran as Tom", "Tom ran as Sue"], "continuation": "was late.", "gold": 1}
    assert ecore.render_prompts("schema", schema, schema_shot, " ") == [
        "Ann sang so Bob clapped.\n\nTom ran as Tom was late.",
        "Ann sang so Bob clapped.\n\nTom ran as Sue was late.",
    ]
    # Language modelling: contexts `| trim`med, the prompt without continuation `.strip()`ped whole.
    lm_shots = [{"context": " Germany's capital is \n", "continuation": "Berlin"}]
    lm = {"context": "  France's capital is \t", "continuation": "Paris"}
    assert ecore.render_prompts("language_modeling", lm, lm_shots, " ") == [
        "Germany's capital is Berlin\n\nFrance's capital is",
        "Germany's capital is Berlin\n\nFrance's capital is Paris",
    ]
    assert ecore.render_prompts("language_modeling", lm, [], "\nAnswer: ") == [
        "France's capital is\nAnswer:",
        "France's capital is\nAnswer: Paris",
    ]
    assert ecore.render_prompts("language_modeling", {"context": "", "continuation": " x "}, [], " ") == ["", "  x "]


def test_fewshot_draws():
    # Fixed values: nanochat's random.Random(1234 + i).sample over the other indices, for 30 items.
    assert ecore.fewshot_indices(0, 30, 10) == [25, 15, 4, 1, 3, 19, 2, 22, 29, 27]
    assert ecore.fewshot_indices(7, 30, 10) == [20, 29, 16, 25, 6, 10, 9, 26, 27, 18]
    assert ecore.fewshot_indices(3, 30, 0) == []
    for i in range(12):
        got = ecore.fewshot_indices(i, 12, 11)
        assert sorted(got) == [j for j in range(12) if j != i]


def test_shuffle_and_cut_follow_nanochat(tmp_path):
    task = read_bundle(DATA).select(["arc_easy"]).tasks[0]
    raw = [json.loads(line) for line in task.path.read_text().splitlines()]
    random.Random(1337).shuffle(raw)
    assert [it.data for it in load_items(task)] == raw
    assert [it.data for it in load_items(task, 12)] == raw[:12]
    assert load_items(task, 12)[0].where.startswith(f"{task.path}:")


def test_common_prefix_suffix():
    assert ecore.common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert ecore.common_length([[1, 2, 3], [1, 2, 3]], "left") == 3
    assert ecore.common_length([[1, 2, 3], [7, 2]], "left") == 0
    assert ecore.common_length([[9, 5, 6], [1, 8, 5, 6]], "right") == 2
    assert ecore.common_length([[5, 6], [8, 5, 6]], "right") == 2
    assert ecore.common_length([[5, 6], [5, 7]], "right") == 0


def test_lowest_mean_loss_is_pythons_index_of_min():
    nan = math.nan
    cases = [[2.0, 1.0, 1.0], [1.0, 2.0], [nan, 0.5, 0.1], [0.5, nan, 0.1], [0.1, nan], [nan, nan], [3.0], [1, 1, 1]]
    for means in cases:
        assert ecore.lowest_mean_loss(means) == means.index(min(means)), means
    assert [ecore.lowest_mean_loss(m) for m in cases] == [1, 0, 0, 2, 0, 0, 0, 0]


def test_cropping_keeps_the_last_block_and_moves_the_scored_part():
    t = list(range(100, 110))  # 10 tokens, scored from 7
    assert ecore._span(t, 7, 16) == ecore.Span(t, 7)
    assert ecore._span(t, 7, 6) == ecore.Span(t[4:], 3)  # 4 oldest cropped
    assert ecore._span(t, 4, 6) is None  # 6 scored tokens in a 6-token context: none can be predicted
    assert ecore._span(t, 2, 6) is None  # nanochat's assertion case
    assert ecore._span(t, 10, 16) is None  # nothing to score


def test_decide_rules():
    def prep(kind, gold, options):
        first = np.cumsum([0] + [len(o) for o in options])
        flat = [s for o in options for s in o]
        task = Task("t", kind, DATA, 0, " ", 25.0)
        return ecore._Prepared(task, np.array(gold), first, np.array(flat), 0, 0)

    lp = [np.array([-1.0, -3.0]), np.array([-2.5]), np.array([-2.0, -2.0]), np.array([-0.1])]
    gr = [np.array([True, True]), np.array([False]), np.array([True, False]), np.array([True])]
    # Mean losses of the spans: 2.0, 2.5, 2.0, 0.1. Items: (2.0, 2.5) -> 0; (2.5, 2.0) -> 1;
    # the tie (2.0, 2.0) -> the first; (no scored token = NaN, 0.1) -> the NaN, in first place.
    p = prep("multiple_choice", [0, 1, 0, 1], [[0, 1], [1, 2], [2, 0], [-1, 3]])
    correct, means = ecore.decide(p, lp, gr)
    np.testing.assert_array_equal(means[:6], [2.0, 2.5, 2.5, 2.0, 2.0, 2.0])
    assert math.isnan(means[6]) and means[7] == pytest.approx(0.1)
    np.testing.assert_array_equal(correct, [True, True, True, False])
    lm = prep("language_modeling", [0, 0, 0], [[0], [2], [-1]])
    np.testing.assert_array_equal(ecore.decide(lm, lp, gr)[0], [True, False, True])


def test_centered_and_core_arithmetic(evaluator, run, bundle_tasks):
    assert ecore.centered(0.5, 50.0) == 0.0
    assert ecore.centered(1.0, 25.0) == 1.0
    assert ecore.centered(0.62, 62.0) == pytest.approx(0.0)
    assert ecore.centered(0.25, 0.0) == 0.25
    assert ecore.centered(0.1, 20.0) == pytest.approx(-0.125)
    _, model, _ = run
    r = evaluator(*nnx.split(model, nnx.Param))
    tasks = r["tasks"]
    for label, baseline in [("arc_easy", 25.0), ("bigbench_qa_wikidata", 0.0), ("winograd", 50.0)]:
        assert tasks[label]["centered"] == pytest.approx(
            (tasks[label]["accuracy"] - baseline / 100) / (1 - baseline / 100)
        )
        assert tasks[label]["accuracy"] * tasks[label]["n"] == pytest.approx(
            round(tasks[label]["accuracy"] * tasks[label]["n"])
        )
    assert r["core"] == pytest.approx(np.mean([t["centered"] for t in tasks.values()]))
    assert r["n_tasks"] == 3 and r["missing"] == ["squad"] and r["comparable"] is False
    assert r["label"] == "CORE over 3 of 4 tasks (not comparable with the leaderboard)"
    assert (
        ecore.core_label(22) == "CORE"
        and ecore.core_label(20) == "CORE over 20 of 22 tasks (not comparable with the leaderboard)"
        and ecore.core_label(4, 4) == "CORE over 4 of 4 tasks (not comparable with the leaderboard)"
    )
    # One program per (bucket, K, argmax or not) in use, K from scoring.gathered_k's grid: a few per
    # bucket for all tasks together (here one bucket, 64 tokens; only language modelling takes the
    # argmax), and none added by a second call.
    # (The module's evaluator is shared: other tests may have traced more programs on it already.)
    shapes = {
        (L, K, prep.task.task_type == "language_modeling")
        for prep in evaluator.tasks
        for _, _, L, K in evaluator.scorer.shapes(prep.packed)
    }
    fresh = ecore.CoreEvaluator(bundle_tasks[1], BLOCK, ROWS)  # the same tasks, traced only here
    fresh(*nnx.split(model, nnx.Param))
    assert fresh.compiles == len(shapes) <= 4
    compiled = evaluator.compiles
    again = evaluator(*nnx.split(model, nnx.Param))
    timeless = lambda res: {k: {f: x for f, x in v.items() if f != "seconds"} for k, v in res["tasks"].items()}  # noqa: E731
    assert timeless(again) == timeless(r) and again["core"] == r["core"]
    assert evaluator.compiles == compiled  # no retrace


# -- the bundle's errors ---------------------------------------------------------------------------


def bundle_copy(tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(DATA, dest)
    return dest


def test_bundle_errors(tmp_path):
    b = bundle_copy(tmp_path)
    with pytest.raises(CoreError, match="expected an eval bundle directory"):
        read_bundle(tmp_path / "nowhere")
    (b / "core.yaml").rename(b / "core.yml")
    with pytest.raises(CoreError, match=r"core.yaml: file not found"):
        read_bundle(b)
    (b / "core.yaml").write_text("icl_tasks:\n- label: [unclosed\n")
    with pytest.raises(CoreError, match=r"core.yaml:\d+: expected YAML"):
        read_bundle(b)
    (b / "core.yaml").write_text("tasks: []\n")
    with pytest.raises(CoreError, match="expected a mapping with a non-empty list 'icl_tasks'"):
        read_bundle(b)
    good = (b / "core.yml").read_text()
    (b / "core.yaml").write_text(good.replace("icl_task_type: schema", "icl_task_type: cloze"))
    with pytest.raises(
        CoreError, match="task 'winograd': expected icl_task_type one of multiple_choice, .* got 'cloze'"
    ):
        read_bundle(b)
    (b / "core.yaml").write_text(good.replace("num_fewshot: [0]", "num_fewshot: [-1]"))
    with pytest.raises(CoreError, match="task 'winograd': expected num_fewshot"):
        read_bundle(b)
    (b / "core.yaml").write_text(good.replace("world_knowledge/arc_easy.jsonl", "../../etc/passwd"))
    with pytest.raises(CoreError, match="task 'arc_easy': expected 'dataset_uri', a relative path"):
        read_bundle(b)
    (b / "core.yaml").write_text(good)
    meta = (b / "eval_meta_data.csv").read_text()
    (b / "eval_meta_data.csv").write_text(meta.replace("Random baseline", "Baseline"))
    with pytest.raises(CoreError, match=r"eval_meta_data.csv:1: expected a CSV header with columns"):
        read_bundle(b)
    (b / "eval_meta_data.csv").write_text(meta.replace("winograd,language_understanding,schema,0,50.0\n", ""))
    with pytest.raises(CoreError, match=r"eval_meta_data.csv: no 'Eval Task' row for 'winograd'"):
        read_bundle(b)
    (b / "eval_meta_data.csv").write_text(meta.replace(",50.0", ",fifty"))
    with pytest.raises(CoreError, match=r"eval_meta_data.csv:4: expected a random baseline in percent"):
        read_bundle(b)
    (b / "eval_meta_data.csv").unlink()
    with pytest.raises(CoreError, match=r"eval_meta_data.csv: file not found"):
        read_bundle(b)


def test_items_errors(tmp_path):
    b = bundle_copy(tmp_path)
    bundle = read_bundle(b)
    with pytest.raises(
        CoreError,
        match=r"--tasks: unknown task 'arc', 'hellaswag'; the bundle .* has arc_easy, bigbench_qa_wikidata, "
        "winograd, squad",
    ):
        bundle.select(["arc", "winograd", "hellaswag"])
    arc, _, wino, squad = bundle.tasks
    assert bundle.missing() == [squad]
    with pytest.raises(CoreError, match=r"squad.jsonl: file not found"):
        load_items(squad)
    with pytest.raises(CoreError, match="--max-per-task: expected a positive number of items, got 0"):
        load_items(wino, 0)
    with pytest.raises(
        CoreError, match=r"--max-per-task 10: task 'arc_easy' draws 10 few-shot examples .* at least 11 items, got 10"
    ):
        load_items(arc, 10)
    assert len(load_items(arc, 11)) == 11
    lines = arc.path.read_text().splitlines()
    arc.path.write_text("\n".join(lines[:4] + ['{"query": "q", "choices": ["a"], "gold": 0'] + lines[4:]) + "\n")
    with pytest.raises(CoreError, match=rf"{arc.path}:5: expected one JSON object per line"):
        load_items(arc)
    arc.path.write_text("\n".join(lines[:6] + ['{"query": "q", "choices": ["a", "b"], "gold": 2}']) + "\n")
    with pytest.raises(CoreError, match=rf"{arc.path}:7: expected 'gold', an index 0..1, got 2"):
        load_items(arc)
    arc.path.write_text('{"query": "q", "choices": "ab", "gold": 0}\n')
    with pytest.raises(CoreError, match=rf"{arc.path}:1: expected 'choices', a non-empty list of strings"):
        load_items(arc)
    wino.path.write_text('{"context_options": ["a", "b"], "gold": true, "continuation": "c"}\n')
    with pytest.raises(CoreError, match=rf"{wino.path}:1: expected 'gold', an index 0..1, got True"):
        load_items(wino)
    wino.path.write_text("\n\n")
    with pytest.raises(CoreError, match="expected items of task 'winograd', found none"):
        load_items(wino)


def test_lm_prefix_that_does_not_tokenise_as_prefix_is_refused(tmp_path):
    task = Task("t", "language_modeling", tmp_path / "t.jsonl", 0, "", 0.0)
    for line in ('{"context": "hel", "continuation": "lo"}', '{"context": "a", "continuation": ""}'):
        task.path.write_text(line + "\n")  # "hello" is one token, not "hel" + more; "" adds no token
        with pytest.raises(CoreError, match=rf"{task.path}:1: the prompt without its continuation does not tokenise"):
            ecore.prepare_task(task, load_items(task), BLOCK)
    task.path.write_text('{"context": "hel", "continuation": " lo"}\n')
    prep, spans = ecore.prepare_task(task, load_items(task), BLOCK)
    assert [list(s.tokens[s.start :]) for s in spans] == [get_tokenizer().encode(" lo")]


# -- the CLI ---------------------------------------------------------------------------------------


def run_state(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    "change, argv, message",
    [
        (None, ["--tasks", "arc_easy,lambada"], "--tasks: unknown task 'lambada'; the bundle .* has arc_easy, "),
        (None, ["--max-per-task", "5"], "--max-per-task 5: task 'arc_easy' draws 10 few-shot examples"),
        (None, ["--tasks", "squad"], r"no data file for squad \(.*squad.jsonl\)"),
        (("core.yaml", "icl_tasks", "icl_taskz"), [], "core.yaml: expected a mapping with a non-empty list"),
        (("eval_meta_data.csv", "arc_easy,", "arc-easy,"), [], "no 'Eval Task' row for 'arc_easy'"),
        (
            ("eval_data/world_knowledge/bigbench_qa_wikidata.jsonl", '"Russia"}', '"Russia"'),
            [],
            r"bigbench_qa_wikidata.jsonl:2: expected one JSON",
        ),
    ],
)
def test_cli_bad_input_one_line_nothing_written(run, tmp_path, capsys, change, argv, message):
    path, _, _ = run
    b = bundle_copy(tmp_path)
    if change:
        f = b / change[0]
        f.write_text(f.read_text().replace(change[1], change[2], 1))
    before = run_state(path)
    assert eval_main(["core", "--run", str(path), "--data", str(b), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert __import__("re").search(message, err[0]), err[0]
    assert run_state(path) == before


def test_cli_max_per_task_below_one(run, capsys):
    path, _, _ = run
    with pytest.raises(SystemExit) as e:
        eval_main(["core", "--run", str(path), "--data", str(DATA), "--max-per-task", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: argument --max-per-task: expected a positive integer, got '0'"


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_table_json_csv_and_missing_tasks(run, evaluator, capsys):
    path, model, _ = run
    argv = ["--no-progress", "--batch-size", str(ROWS), "--max-per-task", str(ITEMS)]
    assert eval_main(["core", "--run", str(path), "--data", str(DATA), *argv]) == 0
    out, err = capsys.readouterr()
    rec = last_json(out)
    label = "CORE over 3 of 4 tasks (not comparable with the leaderboard)"
    assert rec["label"] == label and rec["missing"] == ["squad"] and rec["n_tasks"] == 3 and rec["step"] == 0
    want = evaluator(*nnx.split(model, nnx.Param))
    for k, v in want["tasks"].items():
        assert {f: rec["tasks"][k][f] for f in ("accuracy", "centered", "n")} == {
            f: v[f] for f in ("accuracy", "centered", "n")
        }
    assert rec["core"] == want["core"]
    assert f"{label}: {rec['core']:.4f}" in err and "missing task files, not scored: squad" in err
    assert "note: 1 task file(s) missing, not scored: squad" in err
    for k in rec["tasks"]:
        assert any(line.startswith(k) for line in err.splitlines())
    csv = (path / "core_000000.csv").read_text()
    assert rec["csv"] == str(path / "core_000000.csv")
    lines = csv.splitlines()
    assert lines[0] == f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"
    arc = rec["tasks"]["arc_easy"]
    assert lines[1] == f"{'arc_easy':<35}, {arc['accuracy']:<10.6f}, {arc['centered']:<10.6f}"
    assert lines[-1] == f"{label:<35}, {'':<10}, {rec['core']:<10.6f}"
    logged = [json.loads(line) for line in (path / "eval.jsonl").read_text().splitlines()]
    assert logged[-1]["task"] == "core" and logged[-1]["core"] == rec["core"]
    assert not list(path.glob(".*.tmp"))


@pytest.mark.slow
def test_two_devices_equal_one(run, capsys):
    path, _, _ = run
    argv = ["core", "--run", str(path), "--data", str(DATA), "--no-progress", "--batch-size", str(ROWS)]
    argv += ["--max-per-task", str(ITEMS)]
    assert eval_main(argv) == 0
    one = last_json(capsys.readouterr().out)
    env = {
        **os.environ,
        "XLA_FLAGS": device_flags(2),
        "JAX_PLATFORMS": "cpu",
    }
    # The flag reaches the process (XLA ignores it silently after a malformed XLA_FLAGS entry).
    count = [sys.executable, "-c", "import jax; print(jax.device_count())"]
    assert subprocess.run(count, env=env, capture_output=True, text=True, timeout=120).stdout.strip() == "2"
    proc = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.eval", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    two = last_json(proc.stdout)
    strip = lambda r: {k: {f: v[f] for f in ("accuracy", "centered", "n")} for k, v in r["tasks"].items()}  # noqa: E731
    assert strip(two) == strip(one) and two["core"] == one["core"]


# -- the download ----------------------------------------------------------------------------------


def bundle_zip(corrupt: bool = False, layout: str = "eval_bundle") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(DATA.rglob("*")):
            if p.is_file():
                z.writestr(f"{layout}/{p.relative_to(DATA)}", p.read_bytes())
    data = bytearray(buf.getvalue())
    if corrupt:  # flip a byte inside the stored data of the first member: its CRC-32 no longer holds
        i = data.index(b"icl_tasks")
        data[i] ^= 0x20
    return bytes(data)


class Server:
    """A local HTTP server for one file, honouring Range requests (or not), optionally cutting the
    body short after `cut` bytes while announcing the full length."""

    def __init__(self, body: bytes):
        self.body, self.cut, self.ranges, self.honour_range = body, None, [], True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.split("=")[1].rstrip("-")) if rng and outer.honour_range else 0
                body = outer.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if outer.cut is None else body[: outer.cut])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGPT_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "core"


def same_tree(a: Path, b: Path) -> bool:
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


def test_download_resumes_an_interrupted_transfer(cache):
    body = bundle_zip()
    server = Server(body)
    try:
        server.cut = 5000
        with pytest.raises(CoreError, match=r"download stopped at 5,000 of [\d,]+ bytes; run again to resume"):
            dcore.download_bundle(server.url)
        part = cache / "eval_bundle.zip.part"
        assert part.read_bytes() == body[:5000] and not (cache / "eval_bundle").exists()
        server.cut = None
        got = dcore.download_bundle(server.url)
        assert server.ranges == [None, "bytes=5000-"]  # the second request asked only for the rest
        assert got == cache / "eval_bundle" and same_tree(got, DATA)
        assert sorted(p.name for p in cache.iterdir()) == [".eval_bundle.lock", "eval_bundle"]  # no zip, part, temp
        assert read_bundle(got).labels == read_bundle(DATA).labels
        server.close()
        assert dcore.download_bundle(server.url) == got  # cached: no request
    finally:
        server.close()


def test_download_restarts_when_the_server_ignores_the_range(cache):
    body = bundle_zip()
    cache.mkdir(parents=True)
    (cache / "eval_bundle.zip.part").write_bytes(b"x" * 100)  # a stale part from elsewhere
    server = Server(body)
    server.honour_range = False
    try:
        got = dcore.download_bundle(server.url)
    finally:
        server.close()
    assert server.ranges == ["bytes=100-"] and same_tree(got, DATA)


def test_download_refuses_a_corrupt_or_foreign_archive_and_keeps_nothing(cache, tmp_path):
    for body, message in [
        (bundle_zip(corrupt=True), r"member eval_bundle/core.yaml fails its CRC-32 check"),
        (b"<html>not found</html>", "not a readable zip archive"),
        (bundle_zip(layout="other"), "expected nanochat's eval bundle, with eval_bundle/core.yaml"),
    ]:
        src = tmp_path / "eval_bundle.zip"
        src.write_bytes(body)
        with pytest.raises(CoreError, match=message):
            dcore.download_bundle(src.as_uri())  # file:// (no ranges) works like http://
        # No zip, part or folder; only the locks (a failed download keeps its lock file: see download.py).
        assert {p.name for p in cache.iterdir()} <= {".eval_bundle.lock", ".eval_bundle.zip.lock"}
    src.write_bytes(bundle_zip())
    assert same_tree(dcore.download_bundle(src.as_uri()), DATA)
    src.unlink()
    with pytest.raises(CoreError, match=r"gone.zip: download failed"):
        fetch((tmp_path / "gone.zip").as_uri(), tmp_path / "x.zip", error=CoreError)


# -- the training hook -----------------------------------------------------------------------------


@pytest.mark.slow
def test_core_inside_training(tmp_path):
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.train import train

    cfg = apply_overrides(
        load_config("tiny"),
        [
            "model.n_layer=2",
            "model.n_embd=64",
            "model.n_head=2",
            "model.block_size=32",
            "train.steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.sample_tokens=4",
            "data.val_windows=8",
            "optim.warmup_steps=1",
            "train.core_every=2",
            f"train.core_data={DATA}",
            "train.core_max_per_task=12",
        ],
    )
    last = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "eval/core" in r]
    assert [r["step"] for r in rows] == [2]
    keys = {"eval/core", "eval/core/arc_easy", "eval/core/bigbench_qa_wikidata", "eval/core/winograd"}
    assert keys <= set(rows[0]) and last["eval/core"] == rows[0]["eval/core"]
    # The logged number is the CORE of the saved parameters, scored afresh.
    model, saved = load_model(tmp_path)
    bundle = read_bundle(DATA)
    tasks = [(t, load_items(t, 12)) for t in bundle.tasks if t.path.is_file()]
    again = ecore.evaluate_core(Loaded.of(model, saved), tasks, batch_size=4)
    assert again["core"] == rows[0]["eval/core"]
    assert {f"eval/core/{k}": v["centered"] for k, v in again["tasks"].items()} == {
        k: rows[0][k] for k in keys - {"eval/core"}
    }
    assert "core: 1 task file(s) missing, not scored: squad" in (tmp_path / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", [])) | set(acc.Tags().get("tensors", []))
    assert keys <= tags
