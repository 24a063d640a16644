"""A run directory written by fgpt-jax 0.1 (tests/data/legacy_run_v0_1, made before the redesign)
still loads, evaluates, generates and resumes. It is copied first: nothing writes into tests/data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fgpt_jax.checkpoint import load_model
from fgpt_jax.config import load_run_config
from fgpt_jax.eval.__main__ import main as eval_main
from fgpt_jax.train import train

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parent / "data" / "legacy_run_v0_1"


@pytest.fixture
def legacy(tmp_path):
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    return run


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loads_with_its_own_config(legacy):
    model, cfg = load_model(legacy)
    assert cfg.data.path == "sample" and cfg.model.n_embd == 8  # the 0.1 name of the bundled corpus
    assert model.wte.embedding[...].shape == (50304, 8)


def test_eval_val_reproduces_the_trainers_number(legacy, capsys):
    logged = {r["step"]: r["val/loss"] for r in metrics(legacy) if "val/loss" in r}
    assert eval_main(["val", "--run", str(legacy), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["loss"] == pytest.approx(logged[4], rel=1e-6)


def test_generates(legacy):
    from fgpt_jax.inference.generator import Generator
    from fgpt_jax.tokenizer import get_tokenizer

    model, _ = load_model(legacy)
    out = Generator.from_model(model).generate([get_tokenizer().encode("ROMEO:")], 5, temperature=0)
    assert len(out[0]) >= 1


def test_resumes_and_continues_the_same_stream(legacy, tmp_path):
    """Resuming the 0.1 checkpoint restores optimizer and loader state; two more steps train."""
    cfg = load_run_config(legacy)
    import dataclasses

    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6))
    last = train(longer, legacy, resume=True)
    assert last["step"] == 6 and np.isfinite(last["train/loss"])
    steps = [r["step"] for r in metrics(legacy) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed from step 4" in (legacy / "train.log").read_text()
