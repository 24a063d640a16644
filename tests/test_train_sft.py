"""Instruction tuning through the training loop, and the chat CLI on the result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fgpt_jax.config import apply_overrides, load_config, load_run_config, resolve_config
from fgpt_jax.train import TrainingError, train

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained run on the bundled sample."""
    run = tmp_path_factory.mktemp("base")
    cfg = apply_overrides(
        load_config("tiny"),
        MODEL
        + [
            "train.steps=20",
            "train.batch_size=8",
            "train.eval_every=0",
            "train.sample_tokens=4",
            "optim.warmup_steps=2",
        ],
    )
    train(cfg, run)
    return run


SFT = [
    "train.batch_size=8",
    "train.log_every=5",
    "train.ckpt_every=0",
    "train.sample_tokens=8",
    "optim.warmup_steps=2",
    "data.max_prompt_tokens=0",
    "data.max_response_tokens=0",
]


def sft_config(base, *extra):
    return resolve_config("sft", [f"init_from={base}", *SFT, *extra])


def test_sft_masked_val_loss_falls(base_run, tmp_path):
    cfg = sft_config(
        base_run,
        f"data.path={DATA / 'instruction-examples.json'}",
        "train.steps=30",
        "train.eval_every=15",
        "optim.lr=2e-3",
        "data.val_fraction=0.1",
    )
    assert cfg.model == load_run_config(base_run).model  # the base run's model, not the preset's
    last = train(cfg, tmp_path)
    vals = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r}
    assert sorted(vals) == [0, 15, 30]
    assert vals[30] < vals[0] - 0.5, vals
    assert "initialised from" in (tmp_path / "train.log").read_text()
    samples = [r["samples"] for r in read_metrics(tmp_path) if "samples" in r]
    assert samples and samples[-1].startswith("Q: What is the capital of France?\nA: ")
    assert last["step"] == 30


def test_chat_cli_answers_and_stops_at_end(base_run, tmp_path):
    """Overfit one answer; the REPL, fed by a pipe, must print exactly it once per turn."""
    convs = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Paris is the capital."}]}
        for q in [
            "What is the capital of France?",
            "Hello",
            "Name a city.",
            "Where is the Louvre?",
            "Tell me something.",
            "Which city has the Eiffel Tower?",
            "Hi there",
            "Say a fact.",
        ]
        * 4
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    run = tmp_path / "sft"
    train(
        sft_config(
            base_run,
            f"data.path={path}",
            "train.steps=60",
            "train.eval_every=0",
            "optim.lr=3e-3",
            "data.val_fraction=0",
            "data.pack=false",
        ),
        run,
    )
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.chat", "--run", str(run), "--temperature", "0", "--max-new-tokens", "24"],
        input="What is the capital of France?\n/reset\nHello\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line) for line in r.stdout.splitlines()] == [  # stdin not a terminal: one JSON line per turn
        {"turn": 1, "user": "What is the capital of France?", "assistant": "Paris is the capital."},
        {"turn": 2, "user": "Hello", "assistant": "Paris is the capital."},
    ]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.chat",
            "--run",
            str(run),
            "--temperature",
            "0",
            "--prompt",
            "Where is the Louvre?",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert one.returncode == 0 and one.stdout == "Paris is the capital.\n"


def test_python_train_resolves_like_the_cli(base_run, tmp_path):
    """train(load_config("sft") + init_from) from Python takes the base run's model, as the CLI does."""
    cfg = apply_overrides(
        load_config("sft"),
        [
            f"init_from={base_run}",
            *SFT,
            "train.steps=2",
            "train.eval_every=0",
            f"data.path={DATA / 'instruction-examples.json'}",
        ],
    )
    assert cfg.model is None
    train(cfg, tmp_path)
    assert load_run_config(tmp_path).model == load_run_config(base_run).model
    remat = resolve_config("sft", [f"init_from={base_run}", "model.remat=true"])  # model.* applies on top
    assert remat.model.remat and remat.model.n_layer == 2


def test_init_from_other_shape_fails(base_run, tmp_path):
    cfg = apply_overrides(load_config("tiny"), [f"init_from={base_run}", "model.n_layer=3"])
    with pytest.raises(
        TrainingError, match=r"model shape differs from the base run \(block_size 128 vs 64, n_layer 3 vs 2"
    ):
        train(cfg, tmp_path)
