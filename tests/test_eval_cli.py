"""The eval CLI end to end on a tiny run directory: val and hellaswag results as the last stdout
line, eval.jsonl records, and one-line errors with exit status 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from fgpt_jax.checkpoint import save_model
from fgpt_jax.config import Config, load_run_config
from fgpt_jax.eval.__main__ import main
from fgpt_jax.model import GPT, GPTConfig

DATA = Path(__file__).parent / "data" / "hellaswag_val_200.txt"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_cfg = GPTConfig.preset("tiny", block_size=64)
    cfg = Config(name="eval-test", model=model_cfg)  # data.path "tinyshakespeare": the bundled corpus
    return save_model(tmp_path_factory.mktemp("run") / "run", GPT(model_cfg, rngs=nnx.Rngs(0)), cfg, step=7)


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_hellaswag_cli(run_dir, capsys):
    assert main(["hellaswag", "--run", str(run_dir), "--data", str(DATA), "--limit", "20", "--no-progress"]) == 0
    result = last_json(capsys)
    assert result["task"] == "hellaswag" and result["n"] == 20 and result["step"] == 7
    for key in ("acc", "acc_norm", "acc_token_avg"):
        assert 0.0 <= result[key] <= 1.0 and (result[key] * 20) == pytest.approx(round(result[key] * 20))
    saved = [r for r in records(run_dir) if r["task"] == "hellaswag"]
    assert saved[-1]["acc_norm"] == result["acc_norm"] and saved[-1]["step"] == 7


def test_val_cli(run_dir, capsys):
    assert main(["val", "--run", str(run_dir), "--max-tokens", "2048", "--batch-size", "8", "--no-progress"]) == 0
    result = last_json(capsys)
    assert set(result) >= {"task", "tokens", "loss", "ppl", "step"} and result["task"] == "val"
    assert result["tokens"] == 32 * 64  # 2048 // 64 windows of 64 targets each
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["loss"] == pytest.approx(math.log(50304), rel=0.05)  # untrained: about uniform
    assert records(run_dir)[-1]["task"] == "val"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["hellaswag", "--data", "/nonexistent/hellaswag.jsonl"],
            "error: /nonexistent/hellaswag.jsonl: file not found",
        ),
        (["hellaswag", "--limit", "0"], "error: argument --limit: expected a positive integer, got '0'"),
        (["val", "--step", "99"], "error: --step 99: not in"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir, capsys, argv, expected):
    argv = argv[:1] + ["--run", str(run_dir)] + argv[1:]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_bad_data_line_named(run_dir, capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("ctx\n9\na\nb\nc\nd\n")
    assert main(["hellaswag", "--run", str(run_dir), "--data", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: expected a label 0..3, got '9'"


def test_cli_process_exit_code(run_dir, tmp_path):
    """The real `python -m fgpt_jax.eval`: exit status 2 and exactly one line on stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.eval",
            "hellaswag",
            "--run",
            str(run_dir),
            "--data",
            str(tmp_path / "missing.txt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: file not found"]


# ------------------------------------------------- `eval val` == the trainer's val/loss (issue 13)

TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=64",
    "train.steps=2",
    "train.batch_size=8",
    "train.grad_accum=2",
    "train.eval_every=0",
    "train.ckpt_every=0",
    "train.sample_tokens=2",
    "optim.warmup_steps=1",
]


def last_val_loss(run: Path, tag: str = "val/loss") -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[tag] for r in rows if tag in r][-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pretraining run (micro-batch 4 = 8 / grad_accum 2, 12 validation windows) and an SFT
    run on the Alpaca sample, both trained by the real trainer."""
    from fgpt_jax.config import apply_overrides, load_config
    from fgpt_jax.train import train

    root = tmp_path_factory.mktemp("trained")
    train(apply_overrides(load_config("tiny"), TINY + ["data.val_windows=12"]), root / "base")
    train(
        apply_overrides(
            load_config("tiny"),
            TINY
            + [
                "data.format=chat",
                f"data.path={Path(__file__).parent / 'data' / 'instruction-examples.json'}",
                "data.val_fraction=0.2",
                "data.max_prompt_tokens=0",
                "data.max_response_tokens=0",
            ],
        ),
        root / "sft",
    )
    return root / "base", root / "sft"


@pytest.mark.slow
def test_val_default_is_the_trainers_val_loss(trained, capsys):
    base, _ = trained
    assert main(["val", "--run", str(base), "--no-progress"]) == 0
    result = last_json(capsys)
    assert result["loss"] == pytest.approx(last_val_loss(base), rel=1e-6)
    assert result["bpb"] == pytest.approx(last_val_loss(base, "val/bpb"), rel=1e-6)  # and the trainer's val/bpb
    assert 0 < result["bpb"] < result["loss"] / math.log(2)  # a token is more than one byte of text
    assert result["windows"] == 12 and result["tokens"] == 12 * 64
    assert result["data"] == load_run_config(base).data.path  # the data it trained on


@pytest.mark.slow
def test_val_default_on_an_sft_run_is_its_masked_val_loss(trained, capsys):
    _, sft = trained
    assert main(["val", "--run", str(sft), "--no-progress"]) == 0
    result = last_json(capsys)
    assert result["loss"] == pytest.approx(last_val_loss(sft), rel=1e-6)
    assert result["bpb"] == pytest.approx(last_val_loss(sft, "val/bpb"), rel=1e-6)
    assert result["windows"] is None and result["data"].endswith("instruction-examples.json")
    assert 0 < result["tokens"] < 40 * 64  # masked: only the held-out answers' tokens count
    # Any run scores any data: the SFT model on the bundled corpus.
    assert main(["val", "--run", str(sft), "--data", "tinyshakespeare", "--max-tokens", "512", "--no-progress"]) == 0
    assert last_json(capsys)["tokens"] == 512
    assert main(["val", "--run", str(sft), "--max-tokens", "512"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-tokens: applies to token shards; conversations (")


@pytest.mark.slow
def test_val_on_an_imported_run_needs_data(trained, tmp_path, capsys):
    """An imported run records no training data: `eval val` asks for --data, and with the trained
    run's own data and geometry gives back that run's val/loss (export/import is exact)."""
    from fgpt_jax import hf
    from fgpt_jax.checkpoint import load_model

    base, _ = trained
    model, cfg = load_model(base)
    hf.to_hf(model, cfg, tmp_path / "hf")
    imported = save_model(tmp_path / "imported", *hf.from_hf(str(tmp_path / "hf")))
    assert main(["val", "--run", str(imported)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --run {imported}: records no training data (an imported "
        f"model?); pass --data with a shard directory, 'tinyshakespeare' or a "
        f"conversations file"
    )
    assert (
        main(
            [
                "val",
                "--run",
                str(imported),
                "--data",
                "tinyshakespeare",
                "--batch-size",
                "4",
                "--max-tokens",
                str(12 * 64),
                "--no-progress",
            ]
        )
        == 0
    )
    assert last_json(capsys)["loss"] == pytest.approx(last_val_loss(base), rel=1e-6)
    data = Path(__file__).parent / "data" / "instruction-examples.json"
    assert main(["val", "--run", str(imported), "--data", str(data), "--no-progress"]) == 0
    result = last_json(capsys)
    assert result["data"] == str(data) and result["windows"] is None and math.isfinite(result["loss"])
