"""Warm restarts (init_mode=warm) and FGPT's two-phase recipe: parameters and optimizer moments carried
over, a new schedule from step 0, and the data stream continued with no batch seen twice."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgpt_jax.checkpoint import Checkpoints, save_model
from fgpt_jax.config import apply_overrides, load_config, resolve_config
from fgpt_jax.data.bundled import resolve
from fgpt_jax.data.loader import WindowLoader
from fgpt_jax.data.shards import open_shards
from fgpt_jax.model import named_leaves
from fgpt_jax.rundir import RunDir
from fgpt_jax.train import TrainingError, train
from fgpt_jax.train.start import prepare
from fgpt_jax.train.trainer import StopSignal, Trainer

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

SMALL = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=16",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_tokens=4",
    "data.val_windows=8",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    train(apply_overrides(load_config("tiny"), SMALL + ["train.steps=8"]), run)
    return run


def warm_cfg(base, *extra):
    return apply_overrides(
        load_config("tiny"),
        SMALL
        + [f"init_from={base}", "init_mode=warm", "train.steps=6", "optim.warmup_steps=0", "optim.lr=1e-3", *extra],
    )


def test_warm_restart_carries_state_and_continues_the_data(base_run, tmp_path):
    cfg = warm_cfg(base_run)
    prepared = prepare(cfg, RunDir(tmp_path))
    trainer = Trainer(prepared)
    base = Checkpoints(RunDir(base_run).checkpoints, read_only=True)
    base_state, base_data = base.restore(8, prepared.setup.abstract_state)
    base.close()
    # Parameters and optimizer moments are the base run's; the step counter and schedules restart.
    for name, x in named_leaves(trainer.state.params).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(named_leaves(base_state.params)[name]))
    moments = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.opt_state) if np.ndim(x) > 0]  # noqa: E731
    for a, b in zip(moments(trainer.state), moments(base_state)):
        np.testing.assert_array_equal(a, b)
    assert int(trainer.state.step) == 0 and int(base_state.step) == 8
    # The first batches are the ones the base run would have drawn next.
    shards = open_shards(resolve("tinyshakespeare"), "train")
    straight = WindowLoader(shards, 16, 4, seed=0)
    for k in range(4):
        np.testing.assert_array_equal(prepared.data.loader.batch(k).tokens, straight.batch(8 + k).tokens)
    trainer.run(StopSignal())  # and it trains
    assert "warm restart from" in (tmp_path / "train.log").read_text()


def test_warm_restart_with_another_batch_size_skips_nothing(base_run, tmp_path):
    cfg = warm_cfg(base_run, "train.batch_size=2")
    prepared = prepare(cfg, RunDir(tmp_path))
    shards = open_shards(resolve("tinyshakespeare"), "train")
    straight = WindowLoader(shards, 16, 4, seed=0)
    got = np.concatenate([prepared.data.loader.batch(k).tokens for k in range(4)])
    np.testing.assert_array_equal(got, np.concatenate([straight.batch(8).tokens, straight.batch(9).tokens]))
    prepared.checkpoints.close()
    prepared.writer.close()


def test_warm_restart_from_the_cli(base_run, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.train",
            "--run",
            str(tmp_path / "w"),
            *[f"--config.{o}" for o in SMALL],
            f"--config.init_from={base_run}",
            "--config.init_mode=warm",
            "--config.train.steps=20",
            "--config.optim.warmup_steps=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert RunDir(tmp_path / "w").checkpoint_steps()[-1] == 20


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["data.seed=1"], "data differs (seed 0 vs 1)"),
        (["optim.name=adamw"], "init_from used optim.name=muon"),
        (["model.n_layer=2"], "model shape differs from the base run"),
    ],
)
def test_warm_restart_refuses_what_cannot_continue(base_run, tmp_path, extra, needle):
    with pytest.raises(TrainingError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        train(warm_cfg(base_run, *extra), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_warm_restart_from_a_params_only_run_is_refused(tmp_path):
    from flax import nnx

    from fgpt_jax.model import GPT

    cfg = resolve_config("tiny", SMALL)
    save_model(tmp_path / "imported", GPT(cfg.model, rngs=nnx.Rngs(0)), cfg)
    with pytest.raises(TrainingError, match="holds parameters only"):
        train(warm_cfg(tmp_path / "imported"), tmp_path / "r")


# -- FGPT's two phases ---------------------------------------------------------------------------


def test_fgpt_phase_1_is_fgpts_reported_run():
    from fgpt_jax.optim import learning_rates

    cfg = load_config("fgpt")
    t, o = cfg.train, cfg.optim
    assert cfg.model.num_params() == 662_660_544
    assert t.batch_size // t.grad_accum == 84 and t.grad_accum == 6 and t.batch_size * cfg.model.block_size == 516_096
    assert t.steps == 41_667 and round(t.steps * 516_096 / 1e9, 1) == 21.5
    assert (o.warmup_steps, o.plateau_steps, o.min_lr_ratio, o.grad_clip) == (1667, 8333, 0.1, 1.0)
    assert (o.muon_lr, o.muon_weight_decay, o.lr, o.weight_decay, o.weight_decay_on) == (0.03, 0.1, 3e-4, 0.1, "all")
    lr = lambda s: {k: float(v) for k, v in learning_rates(o, t.steps, s).items()}  # noqa: E731
    assert lr(0)["lr_muon"] == pytest.approx(0.03 / 1667)
    assert lr(1666)["lr_muon"] == pytest.approx(0.03) and lr(9999)["lr_muon"] == pytest.approx(0.03)
    assert lr(10_000 + (t.steps - 1 - 10_000) // 2)["lr_muon"] == pytest.approx(0.03 * 0.55, rel=1e-3)
    assert lr(t.steps - 1) == pytest.approx({"lr": 3e-5, "lr_muon": 0.003})


def test_fgpt_phase_2_anneals_from_phase_1():
    from fgpt_jax.optim import learning_rates

    p1, p2 = load_config("fgpt"), load_config("fgpt_anneal")
    assert (p2.init_from, p2.init_mode, p2.model) == ("runs/fgpt", "warm", p1.model)
    assert p2.train.steps == 16_666 and round(p2.train.steps * 516_096 / 1e9, 1) == 8.6
    assert p2.optim.grad_clip == 0.5 and p2.optim.warmup_steps == 0
    assert (
        dataclasses.replace(
            p2.optim, muon_lr=0.03, lr=3e-4, min_lr_ratio=0.1, warmup_steps=1667, plateau_steps=8333, grad_clip=1.0
        )
        == p1.optim
    )  # the same optimizer otherwise
    lr = lambda s: {k: float(v) for k, v in learning_rates(p2.optim, p2.train.steps, s).items()}  # noqa: E731
    assert lr(0) == pytest.approx({"lr": 3e-5, "lr_muon": 0.003})
    assert lr(p2.train.steps - 1) == pytest.approx({"lr": 5e-6, "lr_muon": 0.0005})


def test_fgpt_phase_2_refuses_a_base_of_another_shape(tmp_path):
    from flax import nnx

    from fgpt_jax.model import GPT

    other = resolve_config("tiny", SMALL)
    save_model(tmp_path / "p1", GPT(other.model, rngs=nnx.Rngs(0)), other)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.train",
            "--config",
            "fgpt_anneal",
            "--run",
            str(tmp_path / "p2"),
            f"--config.init_from={tmp_path / 'p1'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model shape differs from the base run" in r.stderr and "n_layer 32 vs 1" in r.stderr
