"""lm-evaluation-harness in process (fgpt_jax.eval.harness) against lm-eval's own `hf` backend run on
the model's Hugging Face export: the three request types on real task files (tests/data/harness),
prompts cropped to the context, the empty-context prefix token, the chat template, the CLI's JSON line
and files, and its one-line errors.

The model is a random tiny GPT whose padded vocabulary rows past the tokenizer's 50,261 ids hold the
import fill, as an imported GPT-2's do: its export keeps 50,261 rows, so the scores must use exactly
those. The hf-parity tests need torch + transformers + accelerate and are skipped without them.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.utils import sanitize_model_name

from fgpt_jax.checkpoint import save_model
from fgpt_jax.config import Config
from fgpt_jax.eval import Loaded
from fgpt_jax.eval.__main__ import main
from fgpt_jax.eval.harness import FgptJaxLM, HarnessError, evaluate_harness, resolve_tasks
from fgpt_jax.hf import to_hf
from fgpt_jax.hf.weights import vocab_fill
from fgpt_jax.inference.generator import Generator
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.tokenizer import N_VOCAB, get_tokenizer

HARNESS = Path(__file__).parent / "data" / "harness"
TASKS = ["arc_easy_local", "arc_easy_noctx", "shakespeare_rolling", "qa_wikidata_gen"]
BLOCK = 64
FEWSHOT = 2  # arc_easy_local only (the other YAMLs fix 0): 2-shot prompts are longer than the context


@pytest.fixture(scope="module")
def tasks_env(tmp_path_factory):
    """The task YAMLs' data_files are relative to the working directory (as lm-eval resolves them), and
    datasets' Arrow cache goes to a private directory, never ~/.cache."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(HARNESS)
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield HARNESS


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig.preset("tiny", block_size=BLOCK)
    m = GPT(cfg, rngs=nnx.Rngs(0))
    w = np.array(m.wte.embedding[...])
    w[N_VOCAB:] = vocab_fill(w)
    m.wte.embedding[...] = w
    return m, cfg


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model[0], nnx.Param)


@pytest.fixture(scope="module")
def loaded(model):
    return Loaded.of(model[0])


@pytest.fixture(scope="module")
def lm(split):
    return FgptJaxLM(*split, BLOCK, batch_size=8)


@pytest.fixture(scope="module")
def hf_lm(model, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    out = to_hf(*model, tmp_path_factory.mktemp("export") / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == N_VOCAB  # the fill rows are cut
    return HFLM(pretrained=str(out), backend="causal", device="cpu", batch_size=16, dtype="float32")


@pytest.fixture(scope="module")
def gen_kwargs(split):
    """Stop strings the model really produces: the 3rd and 5th greedy tokens of the first two prompts
    (a random model never writes the YAML's "\\n" or "."), so `until` cuts generations on both sides."""
    tok = get_tokenizer()
    prompts = [json.loads(line)["context"] for line in (HARNESS / "qa_wikidata_12.jsonl").read_text().splitlines()]
    raw = Generator(*split, stop_ids=()).generate([tok.encode(p) for p in prompts[:2]], 8, temperature=0)
    until = [tok.decode(raw[0][2:3]), tok.decode(raw[1][4:5])]
    return {"until": until + ["\n"], "max_gen_toks": 8, "do_sample": False}


def _run_ours(loaded, gen_kwargs, **kw):
    return evaluate_harness(
        loaded,
        kw.pop("tasks", TASKS),
        include_path=HARNESS,
        batch_size=8,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs=gen_kwargs,
        **kw,
    )


def _run_hf(hf_lm, gen_kwargs, tasks=TASKS, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(HARNESS), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=hf_lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, gen_kwargs=gen_kwargs, **kw
    )


@pytest.fixture(scope="module")
def ours(tasks_env, loaded, gen_kwargs):
    return _run_ours(loaded, gen_kwargs, num_fewshot=FEWSHOT)


@pytest.fixture(scope="module")
def reference(tasks_env, hf_lm, gen_kwargs):
    return _run_hf(hf_lm, gen_kwargs, num_fewshot=FEWSHOT)


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


def _assert_same_samples(ours, theirs, task):
    mine, ref = _by_doc(ours["samples"][task]), _by_doc(theirs["samples"][task])
    assert mine.keys() == ref.keys() and mine
    for d in ref:
        assert mine[d]["arguments"] == ref[d]["arguments"], (task, d)  # the same prompts were asked
        for a, b in zip(mine[d]["resps"], ref[d]["resps"], strict=True):
            a, b = a[0], b[0]
            if isinstance(b, str):  # generate_until: the same text, exactly
                assert a == b, (task, d)
            elif isinstance(b, tuple | list):  # loglikelihood: (log-prob, is_greedy)
                assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4) and a[1] == b[1], (task, d, a, b)
            else:  # loglikelihood_rolling: the document's total log-prob
                assert a == pytest.approx(b, rel=1e-5, abs=1e-4), (task, d)


@pytest.mark.slow
def test_all_three_request_types_match_the_hf_backend(ours, reference, lm, hf_lm):
    for task in TASKS:
        _assert_same_samples(ours, reference, task)
        mine, ref = ours["results"][task], reference["results"][task]
        for key, value in ref.items():
            if key.endswith(("acc,none", "acc_norm,none", "exact_match,none")):
                assert mine[key] == value, (task, key)  # accuracies: exactly
            elif "perplexity" in key or key.startswith("bits_per_byte"):
                if isinstance(value, float):
                    assert mine[key] == pytest.approx(value, rel=1e-5), (task, key)
    # What was exercised: 2-shot ARC prompts longer than the context (cropped to block_size + 1 tokens),
    # documents scored in several windows, and generations cut by a stop string.
    arc = [lm.tok_encode(c + x) for s in ours["samples"]["arc_easy_local"] for c, x in s["arguments"]]
    assert sum(len(ids) > BLOCK + 1 for ids in arc) > len(arc) // 2
    docs = [lm.tok_encode(s["arguments"][0][0]) for s in ours["samples"]["shakespeare_rolling"]]
    assert sum(len(ids) > BLOCK for ids in docs) >= 3
    gens = [s["resps"][0][0] for s in ours["samples"]["qa_wikidata_gen"]]
    assert any(len(lm.tok_encode(g)) < 8 for g in gens) and any(gens)
    # The same token ids for every string asked (GPT-2 BPE through tiktoken vs the export's tokenizer files).
    for task in TASKS:
        for s in ours["samples"][task]:
            for arg in s["arguments"]:
                text = arg[0] + (arg[1] if len(arg) > 1 and isinstance(arg[1], str) else "")
                assert lm.tok_encode(text) == hf_lm.tok_encode(text)


@pytest.mark.slow
def test_loglikelihood_at_the_context_edge_matches_the_hf_backend(lm, hf_lm, split):
    """Token-level requests around the context's length (BLOCK + 1 tokens fill it exactly), a continuation of
    the whole context, and greedy continuations (the model's own argmax tokens) that must be flagged."""
    tok = get_tokenizer()
    text = tok.encode(json.loads((HARNESS / "shakespeare_6.jsonl").read_text().splitlines()[0])["text"])
    shapes = [(1, 1), (3, 5), (BLOCK - 10, 10), (BLOCK - 9, 10), (BLOCK - 8, 10), (BLOCK, 10), (100, 20), (5, BLOCK)]
    requests = [(("", ""), text[:c], text[c : c + n]) for c, n in shapes]
    # Continuations of 6 argmax tokens (a plain forward pass, right-padded to one shape; causal, so the
    # padding is never seen); the last request is cropped.
    forward = jax.jit(lambda graphdef, params, x: nnx.merge(graphdef, params)(x)[0, :, :N_VOCAB])
    for c in (8, BLOCK - 5, 100):
        seq = text[:c][-(BLOCK + 1 - 6) :]  # the window the scorer sees (the oldest context falls off)
        for _ in range(6):
            logits = forward(*split, np.asarray([seq + [0] * (BLOCK - len(seq))], np.int32))
            seq = seq + [int(np.argmax(logits[len(seq) - 1]))]
        requests.append((("", ""), text[:c], seq[-6:]))
    mine, ref = lm._loglikelihood_tokens(requests), hf_lm._loglikelihood_tokens(requests)
    for (lp, g), (ref_lp, ref_g) in zip(mine, ref, strict=True):
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4) and g == ref_g
    assert [g for _, g in ref] == [False] * len(shapes) + [True] * 3


@pytest.mark.slow
def test_chat_template_matches_the_hf_backend(tasks_env, split, loaded, hf_lm, gen_kwargs):
    chat_lm = FgptJaxLM(*split, BLOCK, apply_chat_template=True)
    tok = get_tokenizer()
    histories = [
        [{"role": "user", "content": "2+2?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer:"}],
    ]
    for history in histories:
        for prompt in (True, False):
            text = chat_lm.apply_chat_template(history, add_generation_prompt=prompt)
            assert text == hf_lm.apply_chat_template(history, add_generation_prompt=prompt)
            assert chat_lm.tok_encode(text) == hf_lm.tok_encode(text)
        ids = chat_lm.tok_encode(chat_lm.apply_chat_template(history))
        assert ids == tok.render_chat(history, add_generation_prompt=True)[0]
    tasks = ["arc_easy_local", "qa_wikidata_gen"]
    kw = dict(tasks=tasks, apply_chat_template=True, num_fewshot=1, limit=4)
    mine, theirs = _run_ours(loaded, gen_kwargs, **kw), _run_hf(hf_lm, gen_kwargs, **kw)
    assert "<|user|>" in mine["samples"]["arc_easy_local"][0]["arguments"][0][0]
    for task in tasks:
        _assert_same_samples(mine, theirs, task)
        assert mine["results"][task] == theirs["results"][task]


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    m, cfg = model
    return save_model(tmp_path_factory.mktemp("run") / "run", m, Config(name="harness-test", model=cfg), step=5)


def _main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_prints_results_and_writes_lm_evals_files(tasks_env, run_dir, ours, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["harness", "--run", str(run_dir), "--tasks", "arc_easy_local,shakespeare_rolling"]
    argv += ["--include-path", str(HARNESS), "--num-fewshot", str(FEWSHOT), "--limit", "4", "--batch-size", "8"]
    argv += ["--output-path", str(out), "--log-samples", "--no-progress"]
    code, stdout, stderr = _main(argv, capsys)
    assert code == 0 and stderr == ""  # no progress bars, no library chatter
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["task"] == "harness" and record["step"] == 5
    assert record["tasks"] == ["arc_easy_local", "shakespeare_rolling"] and record["n-samples"]["arc_easy_local"]
    # The first 4 documents, scored as in the full run above (other batches, same numbers).
    first = [s for s in ours["samples"]["arc_easy_local"] if s["doc_id"] < 4]
    acc = np.mean([np.argmax([r[0][0] for r in s["resps"]]) == s["target"] for s in first])
    assert record["results"]["arc_easy_local"]["acc,none"] == pytest.approx(acc)
    saved = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert saved["results"] == record["results"] and saved["task"] == "harness"
    # lm-eval's own layout: OUT/<model>/results_<date>.json and samples_<task>_<date>.jsonl.
    files = sorted(Path(p).relative_to(out) for p in record["output_files"])
    model_dir = sanitize_model_name(str(run_dir))
    assert [f.parent.name for f in files] == [model_dir] * 3 and sorted(p.name for p in out.rglob("*.json*")) == [
        f.name for f in files
    ]
    results_file = next(out / f for f in files if f.name.startswith("results_"))
    written = json.loads(results_file.read_text())
    assert written["results"]["arc_easy_local"]["acc,none"] == record["results"]["arc_easy_local"]["acc,none"]
    samples_file = next(out / f for f in files if f.name.startswith("samples_shakespeare_rolling_"))
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    want = {s["doc_id"]: s["resps"][0][0] for s in ours["samples"]["shakespeare_rolling"]}
    assert len(rows) == 4 and all(float(r["resps"][0][0]) == pytest.approx(want[r["doc_id"]], rel=1e-6) for r in rows)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staging directory is gone


def _bad_yaml_dir(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "broken":
        (d / "bad.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    else:  # YAML, but no task or group in it
        (d / "settings.yaml").write_text("batch: 3\n")
    return d


RUN_ARGS = ["--tasks", "arc_easy_local", "--include-path", str(HARNESS)]


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--tasks", "arc_easy_local", "--include-path", "/nonexistent"],
            "--include-path /nonexistent: no such directory",
        ),
        (["--tasks", "arc_easy_local", "--include-path", "@broken"], "--include-path @broken: @broken/bad.yaml: "),
        (["--tasks", "arc_easy_local", "--include-path", "@empty"], "--include-path @empty: no lm-eval task YAML"),
        (["--tasks", "arc_easy_local,,x"], "--tasks 'arc_easy_local,,x': expected task names separated by commas"),
        (["--tasks", "missing.yaml"], "--tasks missing.yaml: no such task YAML file"),
        (RUN_ARGS + ["--log-samples"], "--log-samples: needs --output-path DIR"),
        (RUN_ARGS + ["--output-path", "@file"], "--output-path @file: @file exists and is not a directory"),
        (RUN_ARGS + ["--num-fewshot", "-1"], "argument --num-fewshot: expected a non-negative integer"),
        (RUN_ARGS + ["--limit", "0"], "argument --limit: expected a positive integer"),
        (["--include-path", str(HARNESS)], "the following arguments are required: --tasks"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, args, expected):
    subst = {"@broken": _bad_yaml_dir(tmp_path, "broken"), "@empty": _bad_yaml_dir(tmp_path, "empty")}
    subst["@file"] = tmp_path / "a_file"
    subst["@file"].write_text("x")
    for key, value in subst.items():
        args = [str(value) if a == key else a for a in args]
        expected = expected.replace(key, str(value))
    eval_log = run_dir / "eval.jsonl"
    before = eval_log.read_text() if eval_log.exists() else None
    listing = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _main(["harness", "--run", str(run_dir), *args], capsys)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert (eval_log.read_text() if eval_log.exists() else None) == before
    assert sorted(tmp_path.rglob("*")) == listing


def test_cli_without_lm_eval_says_how_to_install(run_dir, monkeypatch, capsys):
    import fgpt_jax.eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the [eval] extra sees
    for name in ("harness", "harness_tasks"):  # imported fresh, as in a new process
        monkeypatch.delitem(sys.modules, f"fgpt_jax.eval.{name}")
        monkeypatch.delattr(fgpt_jax.eval, name)
    code, stdout, stderr = _main(["harness", "--run", str(run_dir), "--tasks", "arc_easy_local"], capsys)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("error: lm_eval: cannot be imported") and 'pip install "fgpt-jax[eval]"' in stderr


@pytest.mark.slow
def test_unknown_task_lists_the_valid_ones(tasks_env):
    with pytest.raises(HarnessError) as e:
        resolve_tasks("arc_easy_locall", HARNESS)  # not under --include-path: lm-eval's registry is indexed too
    msg = str(e.value)
    assert msg.startswith("--tasks arc_easy_locall: not a task, group or tag")
    assert "under --include-path: arc_easy_local, arc_easy_noctx, qa_wikidata_gen, shakespeare_rolling" in msg
    assert "closest of lm-eval's" in msg and "arc_easy_local" in msg.split("closest")[1]
    manager, names = resolve_tasks(["arc_easy", "qa_wikidata_gen"], HARNESS)  # registry + local, one manager
    assert names == ["arc_easy", "qa_wikidata_gen"] and "hellaswag" in manager.all_tasks
    assert "\n" not in msg


def test_local_tasks_index_only_the_include_path(tasks_env):
    manager, names = resolve_tasks("arc_easy_*,shakespeare_rolling", HARNESS)
    assert names == ["arc_easy_local", "arc_easy_noctx", "shakespeare_rolling"]
    assert "hellaswag" not in manager.all_tasks  # the registry was not indexed


def test_generation_settings_the_model_cannot_honour(tasks_env, loaded):
    tasks = ["qa_wikidata_gen"]
    with pytest.raises(HarnessError, match=f"max_gen_toks {BLOCK}: expected 1 to {BLOCK - 1}"):
        evaluate_harness(loaded, tasks, include_path=HARNESS, limit=1, gen_kwargs={"max_gen_toks": BLOCK})
    with pytest.raises(HarnessError, match=r"generation_kwargs \['num_beams'\]: not supported"):
        evaluate_harness(loaded, tasks, include_path=HARNESS, limit=1, gen_kwargs={"num_beams": 4})


@pytest.mark.slow
def test_sampling_when_a_task_asks_for_it_is_seeded(tasks_env, loaded):
    tasks = ["qa_wikidata_gen"]
    runs = [
        evaluate_harness(loaded, tasks, include_path=HARNESS, limit=4, log_samples=True, gen_kwargs=kw)
        for kw in ({"do_sample": True, "temperature": 1.0}, {"do_sample": True, "temperature": 1.0}, None)
    ]
    texts = [[s["resps"][0][0] for s in r["samples"]["qa_wikidata_gen"]] for r in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2] and all(isinstance(t, str) for t in texts[0])
