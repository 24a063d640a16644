"""Every command as a new user meets it: the README's own commands work with their defaults, stderr
carries no library chatter, and bad values of every flag end in one `error:` line with status 2.

The commands run as real subprocesses (`python -m fgpt_jax.<command>`), as a user runs them, on a
run directory written by `save_model` (an untrained model of the quickstart's context, 128 tokens).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from fgpt_jax.checkpoint import save_model
from fgpt_jax.config import Config
from fgpt_jax.data import DataConfig
from fgpt_jax.model import GPT, GPTConfig

DATA = Path(__file__).parent / "data"
# The quickstart's context (128) with a body small enough to compile in seconds.
MODEL = GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=32)
CHATTER = re.compile(r"^(WARNING|INFO|W\d{4}|I\d{4})|WARNING:|INFO:|UserWarning|DeprecationWarning|Traceback")


def cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained-looking run (data.format tokens) and an instruction-tuned-looking one (chat)."""
    root = tmp_path_factory.mktemp("runs")
    model = GPT(MODEL, rngs=nnx.Rngs(0))
    base = save_model(root / "tiny", model, Config(name="tiny", model=MODEL), step=3)
    chat = save_model(
        root / "sft",
        model,
        Config(name="sft", model=MODEL, data=DataConfig(format="chat", path=str(DATA / "instruction-examples.json"))),
        step=5,
    )
    return base, chat


def quiet(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CHATTER.search(line)]


@pytest.mark.slow
def test_readme_quickstart_generate_with_defaults(runs):
    """`python -m fgpt_jax.generate --run runs/tiny --prompt "ROMEO:"`: the default --max-new-tokens
    (128) on a 128-token context used to be refused; now the window slides. Nothing else on stderr."""
    base, _ = runs
    r = cli("fgpt_jax.generate", "--run", base, "--prompt", "ROMEO:")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:\n")


@pytest.mark.slow
def test_generate_top_k_past_the_vocabulary_and_an_empty_prompt(runs):
    """--top-k 100000 was a JAX shape error (it now keeps every token); an empty prompt (no token)
    was refused (it now starts a new document)."""
    base, _ = runs
    r = cli(
        "fgpt_jax.generate",
        "--run",
        base,
        "--prompt",
        "",
        "--top-k",
        "100000",
        "--max-new-tokens",
        "4",
        "--num-samples",
        "2",
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert [json.loads(line)["sample"] for line in r.stdout.splitlines()] == [0, 1]


@pytest.mark.slow
def test_chat_on_a_pretrained_run_says_so_once(runs):
    base, chat = runs
    r = cli("fgpt_jax.chat", "--run", base, "--prompt", "Hello", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.endswith("\n")
    assert r.stderr.splitlines() == [
        f"note: {base} was not instruction-tuned (data.format 'tokens'): answers will be text continuations; "
        f"fine-tune it first with python -m fgpt_jax.train --config sft --config.init_from={base}"
    ]
    # An instruction-tuned run: no note; the chat default (256 new tokens) on a 128-token context works.
    r = cli("fgpt_jax.chat", "--run", chat, stdin="Who are you?\n")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.endswith("\n"), r.stderr[-3000:]


@pytest.mark.slow
def test_chat_on_stdin_prints_one_json_line_per_turn(runs):
    """Not a terminal: each input line is a turn and each answer one JSON line (it was the raw text,
    spread over as many lines as the answer had), the same answers as a ChatSession in this process."""
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.inference.generator import Generator
    from fgpt_jax.inference.session import ChatSession

    _, chat = runs
    sampling = ["--max-new-tokens", "6", "--temperature", "0.9", "--seed", "3"]
    r = cli("fgpt_jax.chat", "--run", chat, *sampling, stdin="Hi there\n\n/reset\nWhat is 2+2?\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert r.stdout.endswith("\n") and len(lines) == 2, r.stdout
    turns = [json.loads(line) for line in lines]
    session = ChatSession(Generator.from_model(load_model(chat)[0]), max_new_tokens=6, temperature=0.9, seed=3)
    first = "".join(session.reply("Hi there"))
    session.reset()  # the /reset line
    second = "".join(session.reply("What is 2+2?"))
    assert turns == [
        {"turn": 1, "user": "Hi there", "assistant": first},
        {"turn": 2, "user": "What is 2+2?", "assistant": second},
    ]


@pytest.mark.slow
def test_eval_and_export_print_no_library_chatter(runs, tmp_path):
    """orbax/absl warnings ("Given directory is read only", "setting save_interval_steps=0") used to
    appear on every command that reads a checkpoint; a user reads them as errors."""
    from fgpt_jax.data.bundled import corpus_dir

    corpus_dir()  # `eval val` reads the bundled corpus: its one-time tokenising lines are ours, tested elsewhere
    base, _ = runs
    for args in (
        ["fgpt_jax.eval", "val", "--run", base, "--max-tokens", "512"],
        ["fgpt_jax.eval", "hellaswag", "--run", base, "--data", DATA / "hellaswag_val_200.txt", "--limit", "4"],
        ["fgpt_jax.hf", "export", "--run", base, "--out", tmp_path / "hf"],
    ):
        r = cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert quiet(r.stderr) == [] and r.stderr == "", (args[0], r.stderr[-3000:])
        assert "\r" not in r.stdout + r.stderr  # no progress bar when not on a terminal


@pytest.mark.slow
def test_eval_hellaswag_records_the_preprocessing_done(runs, tmp_path):
    """llama.cpp's text file was recorded as "preprocess": "harness", a flag that does not apply to it."""
    base, _ = runs
    r = cli("fgpt_jax.eval", "hellaswag", "--run", base, "--data", DATA / "hellaswag_val_200.txt", "--limit", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["preprocess"] == "harness, by the file's producer (llama.cpp text)" and result["n"] == 4
    saved = [json.loads(line) for line in (base / "eval.jsonl").read_text().splitlines()]
    assert saved[-1]["preprocess"] == result["preprocess"]


@pytest.mark.slow
def test_train_says_what_it_does_before_the_first_step(tmp_path):
    """The quickstart sat silent for minutes on a loaded machine: tokenising the bundled corpus on first
    use (now announced on stderr, before and after) and compiling the eval and train steps (now a line
    before each, and the train step's compile time after), in that order, before step 1's line."""
    import os

    env = {**os.environ, "FGPT_JAX_CACHE": str(tmp_path / "empty-cache")}
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "train.steps=2", "train.log_every=1"]
    tiny += ["data.val_windows=16", "train.sample_tokens=4"]
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", "--run", str(tmp_path / "run"), *[f"--config.{o}" for o in tiny]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr.splitlines()
    assert len(err) == 2 and err[0].startswith("tokenising the bundled Tiny Shakespeare into "), r.stderr
    assert re.fullmatch(r"tokenised the bundled Tiny Shakespeare: [\d,]+ tokens in \d+\.\d s", err[1]), err[1]
    out = r.stdout.splitlines()
    where = lambda prefix: next(i for i, line in enumerate(out) if line.startswith(prefix))
    assert (
        where("step 0: validation before training (its first call compiles the eval step)...")
        < where("step 0: val/loss")
        < where("compiling the train step (first step)...")
        < where("train step compiled in ")
        < where("step 1/2")
    ), r.stdout
    assert re.fullmatch(r"train step compiled in \d+\.\d s", out[where("train step compiled in ")])
    # a second run finds the corpus cached: nothing on stderr
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", "--run", str(tmp_path / "run2"), *[f"--config.{o}" for o in tiny]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]


BAD = [
    # generate: checked types for every number (--seed past 2^63 was an OverflowError, nan was accepted)
    (["fgpt_jax.generate", "--seed", str(2**64)], "argument --seed: expected an integer in [0, 4294967295]"),
    (["fgpt_jax.generate", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["fgpt_jax.generate", "--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
    (["fgpt_jax.generate", "--temperature", "inf"], "argument --temperature: expected a finite number"),
    (["fgpt_jax.generate", "--temperature", "-0.5"], "argument --temperature: expected a number in [0.0, 100.0]"),
    (["fgpt_jax.generate", "--top-k", "-1"], "argument --top-k: expected a non-negative integer"),
    (["fgpt_jax.generate", "--top-k", "1.5"], "argument --top-k: expected an integer, got '1.5'"),
    (["fgpt_jax.generate", "--top-p", "0"], "argument --top-p: expected a number in (0.0, 1.0]"),
    (["fgpt_jax.generate", "--top-p", "nan"], "argument --top-p: expected a finite number"),
    (["fgpt_jax.generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer"),
    (["fgpt_jax.generate", "--num-samples", "0"], "argument --num-samples: expected an integer in [1, 1024]"),
    (["fgpt_jax.generate", "--step", "-3"], "argument --step: expected a non-negative integer"),
    # chat: the same checked sampling flags
    (["fgpt_jax.chat", "--seed", str(2**63)], "argument --seed: expected an integer in [0, 4294967295]"),
    (["fgpt_jax.chat", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["fgpt_jax.chat", "--top-p", "1.5"], "argument --top-p: expected a number in (0.0, 1.0]"),
    (["fgpt_jax.chat", "--max-new-tokens", "-5"], "argument --max-new-tokens: expected a positive integer"),
    # eval
    (["fgpt_jax.eval", "val", "--step", "-1"], "argument --step: expected a non-negative integer"),
    (["fgpt_jax.eval", "val", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    (["fgpt_jax.eval", "val", "--max-tokens", "nan"], "argument --max-tokens: expected an integer, got 'nan'"),
    (["fgpt_jax.eval", "hellaswag", "--limit", "1e9"], "argument --limit: expected an integer, got '1e9'"),
    # hf
    (["fgpt_jax.hf", "export", "--out", "x", "--step", "nan"], "argument --step: expected an integer, got 'nan'"),
    (
        ["fgpt_jax.hf", "export", "--out", "x", "--vocab-size", "100"],
        "argument --vocab-size: expected an integer in [50257, 50304]",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a[0][1:3] + a[0][-2:]) for a in BAD])
def test_bad_values_exit_2_with_one_line(runs, tmp_path, argv, expected):
    base, _ = runs
    module, rest = argv[0], argv[1:]
    sub = [rest.pop(0)] if module in ("fgpt_jax.eval", "fgpt_jax.hf") else []
    extra = ["--prompt", "x"] if module == "fgpt_jax.generate" else []
    r = cli(module, *sub, "--run", base, *extra, *rest)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), r.stderr[-3000:]


@pytest.mark.parametrize(
    "preset, content, expected",
    [
        ("sft", "[]", "{f}: no records in this file"),
        ("dpo", "", "{f}: no records in this file"),
        ("sft", '[{"instruction": "caf\xe9", "output": "x"}]', "{f}: line 1: not UTF-8 text"),
        ("dpo", '[{"prompt": "Q", "chosen": "caf\xe9", "rejected": "B"}]', "{f}: line 1: not UTF-8 text"),
        ("tiny", "[]", "data.path {f}: a file, but pretraining (data.format=tokens) reads a shard directory"),
    ],
)
@pytest.mark.slow
def test_train_on_a_bad_data_file_is_one_line(runs, tmp_path, preset, content, expected):
    """An empty SFT/DPO file said "raise train.seq_len"; a Latin-1 one gave a traceback naming no file;
    a .json file as pretraining data said "shard directory not found". Nothing is written."""
    _, chat = runs
    data = tmp_path / "data.json"
    data.write_bytes(content.encode("latin-1"))
    base = [] if preset == "tiny" else [f"--config.init_from={chat}"]
    r = cli("fgpt_jax.train", "--config", preset, "--run", tmp_path / "run", *base, f"--config.data.path={data}")
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    assert r.stderr.startswith("error: " + expected.format(f=data)) and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_plot_bad_out_exits_2_with_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    r = cli("fgpt_jax.plot", "--run", tmp_path, "--out", tmp_path / "curves.xyz")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: --out {tmp_path / 'curves.xyz'}: unknown image extension '.xyz'")


@pytest.mark.parametrize(
    "module", ["fgpt_jax.generate", "fgpt_jax.chat", "fgpt_jax.eval", "fgpt_jax.hf", "fgpt_jax.plot"]
)
def test_help(module):
    r = cli(module, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ") and r.stderr == ""


def test_every_command_is_an_installed_script():
    """`fgpt-<name>` (pyproject's [project.scripts]) runs the same main() as `python -m fgpt_jax.<name>`."""
    import importlib
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(
        f"fgpt-{n}" for n in ("data", "train", "eval", "generate", "chat", "serve", "hf", "plot")
    )
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module.removesuffix(".__main__").endswith(name.removeprefix("fgpt-")), name
        assert callable(getattr(importlib.import_module(module), func)), target
