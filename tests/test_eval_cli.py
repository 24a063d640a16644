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
from fgpt_jax.config import Config
from fgpt_jax.eval.__main__ import main
from fgpt_jax.model import GPT, GPTConfig

DATA = Path(__file__).parent / "data" / "hellaswag_val_200.txt"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_cfg = GPTConfig.preset("tiny", block_size=64)
    cfg = Config(name="eval-test", model=model_cfg)  # data.path "sample": the bundled Tiny Shakespeare
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


@pytest.mark.parametrize("argv, expected", [
    (["hellaswag", "--data", "/nonexistent/hellaswag.jsonl"], "error: /nonexistent/hellaswag.jsonl: file not found"),
    (["hellaswag", "--limit", "0"], "error: argument --limit: expected a positive integer, got '0'"),
    (["val", "--step", "99"], "error: --step 99: not in"),
])
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
    p = subprocess.run([sys.executable, "-m", "fgpt_jax.eval", "hellaswag", "--run", str(run_dir),
                        "--data", str(tmp_path / "missing.txt")], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: file not found"]
