"""How a run starts (fgpt_jax/train/start.py): the line a resume prints when it changes the
learning-rate schedule (`--resume --config.train.steps=N`)."""

import json
import math
import re

import pytest

from fgpt_jax.config import apply_overrides, load_config
from fgpt_jax.rundir import RunDir
from fgpt_jax.train import train
from fgpt_jax.train.start import schedule_change

SMALL = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.block_size=32",
    "train.steps=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=4",
    "train.sample_tokens=4",
    "data.val_windows=4",
    "optim.warmup_steps=2",
]


def small_config(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def cosine(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """The schedule multiplier written out (optim.lr_multiplier's contract), as the reference."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(max((step - warmup) / max(steps - 1 - warmup, 1), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.slow
def test_extending_a_run_prints_the_old_and_new_schedule(tmp_path):
    """4 steps, then --resume with train.steps=8: the log says so, with both schedules, and the rates
    it names for step 5 are the ones step 5 is trained with (metrics.jsonl) and the ones the saved
    4-step schedule would have given (its floor: it ended at step 4)."""
    train(small_config(), tmp_path)
    train(small_config("train.steps=8"), tmp_path, resume=True)
    log = (tmp_path / "train.log").read_text()
    lines = [line for line in log.splitlines() if "schedule is recomputed" in line]
    assert len(lines) == 1, log
    line = lines[0]
    assert line.startswith("--resume: train.steps 4 -> 8 (extended)")
    assert "was 4 steps, warmup 2, cosine to 0.1x, now 8 steps, warmup 2, cosine to 0.1x" in line
    # The order matters to a reader: the schedule note, then where the run resumed from.
    assert log.index(line) < log.index("resumed from step 4")
    num = r"([\d.e+-]+)"
    m = re.search(
        rf"Step 5 uses lr {num}, lr_muon {num} \(the saved schedule would give lr {num}, lr_muon {num}\)", line
    )
    assert m, line
    new_lr, new_muon, old_lr, old_muon = map(float, m.groups())
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step5 = next(r for r in rows if r.get("step") == 5 and "lr" in r)
    cfg = small_config()
    assert new_lr == pytest.approx(step5["lr"], rel=5e-3) and new_muon == pytest.approx(step5["lr_muon"], rel=5e-3)
    assert new_lr == pytest.approx(cfg.optim.lr * cosine(4, 8, 2), rel=5e-3)
    assert old_lr == pytest.approx(cfg.optim.lr * 0.1, rel=5e-3) and old_muon == pytest.approx(cfg.optim.muon_lr * 0.1)
    # (the line prints 3 significant digits: rel 5e-3)
    # A resume that keeps the schedule says nothing about it (now that config.json holds 8 steps).
    assert schedule_change(small_config("train.steps=8"), RunDir(tmp_path), 8) is None


@pytest.fixture
def saved_run(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(small_config("train.steps=100", "optim.warmup_steps=10"))
    return run


def test_no_line_without_a_change_or_a_resume(saved_run):
    cfg = saved_run.read_config()
    assert schedule_change(cfg, saved_run, 40) is None
    assert schedule_change(small_config("train.steps=200"), saved_run, None) is None  # not a resume
    # Fields that do not move the learning rate.
    assert schedule_change(apply_overrides(cfg, ["train.log_every=5", "optim.grad_clip=0.5"]), saved_run, 40) is None


def test_shortening_and_other_schedule_changes(saved_run):
    cfg = saved_run.read_config()
    line = schedule_change(apply_overrides(cfg, ["train.steps=60"]), saved_run, 40)
    assert line.startswith("--resume: train.steps 100 -> 60 (shortened)")
    want = cfg.optim.lr * cosine(40, 60, 10)
    got = float(re.search(r"Step 41 uses lr ([\d.e+-]+)", line).group(1))
    assert got == pytest.approx(want, rel=5e-3)
    assert f"would give lr {cfg.optim.lr * cosine(40, 100, 10):.2e}" in line
    past = schedule_change(apply_overrides(cfg, ["train.steps=40"]), saved_run, 40)
    assert past == (
        "--resume: train.steps 100 -> 40 (shortened): checkpoint 40 is already at or past the new end "
        "(40 steps); nothing to train"
    )
    line = schedule_change(apply_overrides(cfg, ["optim.warmup_steps=50", "optim.plateau_steps=5"]), saved_run, 20)
    assert line.startswith("--resume: optim schedule changed;")
    assert "was 100 steps, warmup 10, cosine to 0.1x, now 100 steps, warmup 50, plateau 5, cosine to 0.1x" in line
    assert f"Step 21 uses lr {cfg.optim.lr * 21 / 50:.2e}" in line  # back in warmup
