"""The training loop end to end on the bundled sample: run dir, metrics, TensorBoard, checkpoints,
exact resume after SIGTERM, NaN handling, and the CLI."""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from hostdevices import device_flags

from fgpt_jax.checkpoint import load_model
from fgpt_jax.config import apply_overrides, load_config, load_run_config
from fgpt_jax.tokenizer import get_tokenizer
from fgpt_jax.train import TrainingError, train
from fgpt_jax.train.hooks import Hook, Result

SMALL = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.block_size=32",
    "train.steps=8",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.ckpt_every=4",
    "train.sample_tokens=8",
    "data.val_windows=8",
    "optim.warmup_steps=2",
]


def small_config(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}


def params_of(run):
    model, _ = load_model(run)
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))


class ParamNorm(Hook):
    """A user's own periodic work, passed to train(hooks=...): the global parameter norm."""

    name = "param_norm"

    def __call__(self, step, state, results):
        norm = float(
            jax.numpy.sqrt(sum(jax.numpy.sum(x.astype("float32") ** 2) for x in jax.tree.leaves(state.params)))
        )
        return Result({"param_norm": norm}, f"step {step}: param_norm {norm:.3f}")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted 8-step run shared by several tests (with a user hook every 3 steps, which only
    reads the state)."""
    run = tmp_path_factory.mktemp("straight")
    last = train(small_config(), run, hooks=[ParamNorm(3)])
    return run, last


@pytest.mark.slow
def test_a_user_hook_runs_at_its_cadence_and_is_logged(straight_run):
    run, last = straight_run
    rows = [r for r in read_metrics(run) if "param_norm" in r]
    assert [r["step"] for r in rows] == [3, 6, 8]  # every 3 steps, and at the end
    final = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in params_of(run)))
    assert rows[-1]["param_norm"] == pytest.approx(final, rel=1e-5) and last["param_norm"] == rows[-1]["param_norm"]
    assert "step 3: param_norm" in (run / "train.log").read_text()


@pytest.mark.slow
def test_run_directory(straight_run):
    run, last = straight_run
    cfg = small_config()
    assert load_run_config(run) == cfg
    rows = read_metrics(run)
    assert sorted(losses(run)) == list(range(1, 9))
    first = next(r for r in rows if "train/loss" in r)
    assert {"step", "train/loss", "lr", "lr_muon", "grad_norm"} <= set(first)
    assert any("tokens_per_sec" in r for r in rows)
    vals = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(vals) == [0, 4, 8] and vals[8] < vals[4] < vals[0]
    assert vals[0] == pytest.approx(np.log(50304), rel=0.05)  # untrained: about uniform over the vocab
    assert last["val/loss"] == vals[8] and last["step"] == 8
    assert any(isinstance(r.get("samples"), str) and r["samples"].startswith("Once upon a time") for r in rows)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    assert (run / "train.log").read_text().count("val/loss") == 3


@pytest.mark.slow
def test_tensorboard_events_read_back(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = straight_run
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "lr", "lr_muon", "grad_norm", "tokens_per_sec", "val/loss"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert any("samples" in t for t in tags["tensors"])  # tensorboardX writes text as tensor summaries
    loss8 = [e.value for e in acc.Scalars("train/loss") if e.step == 8][0]
    assert loss8 == pytest.approx(losses(run)[8], rel=1e-6)


@pytest.mark.slow
def test_loaded_model_reproduces_val_loss(straight_run):
    from fgpt_jax.data.bundled import resolve
    from fgpt_jax.data.loader import val_windows
    from fgpt_jax.data.shards import open_shards
    from fgpt_jax.loss import token_losses

    run, last = straight_run
    model, cfg = load_model(run)
    batches = [
        b.tokens
        for b in val_windows(open_shards(resolve(cfg.data.path), "val"), cfg.model.block_size, 4, cfg.data.val_windows)
    ]
    total = sum(float(token_losses(model(b[:, :-1]), b[:, 1:]).sum()) for b in batches)
    n = sum(b[:, 1:].size for b in batches)
    assert total / n == pytest.approx(last["val/loss"], rel=1e-5)
    # val/bpb: the text targets' nats / ln 2 / their UTF-8 bytes (<|endoftext|> targets left out).
    table = get_tokenizer().token_bytes(cfg.model.vocab_size)
    nats = sum(float((token_losses(model(b[:, :-1]), b[:, 1:]) * (table[b[:, 1:]] > 0)).sum()) for b in batches)
    nbytes = sum(int(table[b[:, 1:]].sum()) for b in batches)
    assert nats / math.log(2) / nbytes == pytest.approx(last["val/bpb"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(straight_run, tmp_path):
    """N steps, SIGTERM, resume: identical losses and parameters to the straight run."""
    run_a, _ = straight_run
    run_b = tmp_path / "b"

    def kill_at_3(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path, at a deterministic step

    partial = train(small_config(), run_b, on_step=kill_at_3)
    stopped = partial["step"]
    assert 3 <= stopped < 8
    ckpt_steps = sorted(int(p.name) for p in (run_b / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpt_steps[-1] == stopped  # the signal left a complete checkpoint at the step it stopped
    train(small_config(), run_b, resume=True)
    assert losses(run_b) == losses(run_a)  # bitwise: same batches, same updates
    for a, b in zip(params_of(run_a), params_of(run_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "resumed from step" in (run_b / "train.log").read_text()


@pytest.mark.slow
def test_hellaswag_inside_training(tmp_path):
    from pathlib import Path

    data = Path(__file__).parent / "data" / "hellaswag_val_200.txt"
    cfg = small_config(
        "train.steps=2",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.hellaswag_every=2",
        f"train.hellaswag_data={data}",
        "train.hellaswag_limit=8",
    )
    last = train(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "hellaswag/acc" in r]
    assert [r["step"] for r in rows] == [2]
    assert {"hellaswag/acc", "hellaswag/acc_norm", "hellaswag/acc_token_avg"} <= set(rows[0])
    assert all(0 <= rows[0][k] <= 1 and rows[0][k] * 8 == round(rows[0][k] * 8) for k in rows[0] if "hellaswag" in k)
    assert last["hellaswag/acc"] == rows[0]["hellaswag/acc"]


@pytest.mark.slow
def test_existing_run_needs_resume(straight_run):
    run, _ = straight_run
    with pytest.raises(TrainingError, match="already holds checkpoints; pass --resume"):
        train(small_config(), run)
    with pytest.raises(TrainingError, match="model config differs"):
        train(small_config("model.n_layer=3"), run, resume=True)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = small_config(
        "optim.name=adamw",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        "train.ckpt_every=1",
        "train.eval_every=0",
    )
    with pytest.raises(TrainingError, match=r"step \d+: (train/loss|grad_norm) is (nan|inf)"):
        train(cfg, tmp_path)
    good = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert good, "no checkpoint before the divergence"
    model, _ = load_model(tmp_path)
    from flax import nnx

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.slow
def test_cli_help_and_bad_input(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--config" in r.stdout
    r = _cli("--workdir", str(tmp_path), "--config.model.n_layr=2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'model.n_layr'" in lines[0] and "n_layer" in lines[0]
    r = _cli("--workdir", str(tmp_path), "--config.data.path=/nonexistent/shards")
    assert r.returncode == 2 and "/nonexistent/shards" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _cli_losses(run, *extra, env_extra=None):
    args = ["--workdir", str(run)] + [f"--config.{o}" for o in SMALL + ["train.steps=3", "train.ckpt_every=0"]]
    r = _cli(*args, *extra, env_extra=env_extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return [losses(run)[s] for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The first 3 losses of the CLI on one device: what the multi-device runs must reproduce."""
    return _cli_losses(tmp_path_factory.mktemp("one"))


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_one_device(tmp_path, one_device):
    four = {"XLA_FLAGS": device_flags(4)}
    one = one_device
    dp = _cli_losses(tmp_path / "dp", env_extra=four)
    fsdp = _cli_losses(tmp_path / "fsdp", "--config.train.sharding=fsdp", env_extra=four)
    assert "4 device(s)" in (tmp_path / "dp" / "train.log").read_text()
    np.testing.assert_allclose(dp, one, rtol=1e-5)
    np.testing.assert_allclose(fsdp, dp, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path, one_device):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = one_device
    run = tmp_path / "multi"
    args = ["--workdir", str(run)] + [f"--config.{o}" for o in SMALL + ["train.steps=3", "train.ckpt_every=0"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fgpt_jax.train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            ),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 device(s)" in (run / "train.log").read_text()
    multi = [losses(run)[s] for s in (1, 2, 3)]
    np.testing.assert_allclose(multi, one, rtol=1e-5)


def test_print_config_resolves_and_writes_nothing(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", "--config", "gpt2_124m", "--config.train.steps=7", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    from fgpt_jax.config import from_json

    cfg = from_json(r.stdout)
    assert cfg == apply_overrides(load_config("gpt2_124m"), ["train.steps=7"])
    assert list(tmp_path.iterdir()) == []  # no runs/ directory, nothing tokenised into it


def test_console_keeps_per_step_lines_in_the_log_on_a_terminal(tmp_path):
    from fgpt_jax.metrics import Console
    from fgpt_jax.rundir import RunDir

    console = Console(RunDir(tmp_path), enabled=True)
    console.tty = True  # a terminal: the bar shows progress, step lines go to train.log only
    console("held until the checks pass")
    assert not (tmp_path / "train.log").exists()
    console.start()
    console("step 1/2 | loss 1.0", file_only=True)
    assert (tmp_path / "train.log").read_text().splitlines() == ["held until the checks pass", "step 1/2 | loss 1.0"]
