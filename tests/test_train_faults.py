"""Breaking runs on purpose: two trainers on one directory, refused resumes, a disk that fills during an
async save, bit-flipped and truncated checkpoints, a failing periodic hook, a crash before the first
checkpoint, stop signals. Each case must lose nothing and say what happened in one line."""

import errno
import json
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fgpt_jax.checkpoint import CheckpointError, load_model
from fgpt_jax.config import ConfigError, apply_overrides, load_config
from fgpt_jax.train import TrainingError, train
from fgpt_jax.train import hooks as H

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


def cfg_of(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def steps_of(run):
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def metric_steps(run):
    return [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in json.loads(line)
    ]


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fgpt_jax.train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _wait_until(cond, what, timeout=180):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what} never happened"
        time.sleep(0.2)


# -- one writer per run directory ----------------------------------------------------------------


def test_second_trainer_refused_and_signals_exit_non_zero(tmp_path):
    run = tmp_path / "run"
    flags = [f"--config.{o}" for o in SMALL + ["train.steps=100000", "train.ckpt_every=0"]]
    first = _cli("--run", str(run), *flags)
    try:
        _wait_until((run / "metrics.jsonl").exists, "the first trainer's first step")
        for extra in ([], ["--resume"]):
            second = _cli("--run", str(run), *flags, *extra)
            out, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert err.strip().count("\n") == 0 and f"in use by pid {first.pid}" in err, err
        first.send_signal(signal.SIGINT)  # Ctrl-C: save, say so, exit 130
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    assert "checkpoint saved" in (run / "train.log").read_text()
    (saved,) = steps_of(run)
    resumed = _cli("--run", str(run), "--resume")  # SIGTERM (a scheduler's preemption): save, exit 143
    try:
        _wait_until(lambda: metric_steps(run)[-1] > saved, "a step after the resume")
        resumed.send_signal(signal.SIGTERM)
        out, err = resumed.communicate(timeout=120)
    finally:
        resumed.kill()
    assert resumed.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(steps_of(run)) == 2


def test_refused_resume_writes_nothing(tmp_path):
    train(cfg_of("train.steps=4", "train.ckpt_every=2"), tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in ("config.json", "metrics.jsonl", "train.log")}
    with pytest.raises(ValueError, match="global_batch_size"):  # the loader's state is for batches of 4
        train(cfg_of("train.steps=6", "train.batch_size=8"), tmp_path, resume=True)
    with pytest.raises(TrainingError, match="model config differs"):
        train(cfg_of("train.steps=6", "model.n_layer=2"), tmp_path, resume=True)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    train(cfg_of("train.steps=6"), tmp_path, resume=True)  # the plain resume still works
    assert metric_steps(tmp_path) == list(range(1, 7))


# -- saves that fail, checkpoints that rot ---------------------------------------------------------


class _DiskFull:
    """A write future that fails in the background, as a full disk does after the arrays were copied."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    def cancel(self):
        return False


def test_failed_async_save_surfaces_one_step_later(tmp_path, monkeypatch):
    real = ocp.StandardCheckpointHandler.async_save
    calls = {"n": 0}

    async def fails_on_second_save(self, *args, **kwargs):
        futures = await real(self, *args, **kwargs)
        calls["n"] += 1
        return futures + [_DiskFull()] if calls["n"] == 3 else futures  # params + train of save 1, params of save 2

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fails_on_second_save)
    seen = []
    with pytest.raises(CheckpointError) as e:
        train(cfg_of("train.steps=40", "train.ckpt_every=8"), tmp_path, on_step=lambda s, m: seen.append(s))
    msg = str(e.value)
    assert msg == "checkpoint 16: save failed (No space left on device); checkpoint 8 is intact", msg
    assert max(seen) < 24  # noticed while training on, not at the end nor at the next save
    log = (tmp_path / "train.log").read_text()
    assert "checkpoint 8 saved" in log and "checkpoint 16 saved" not in log
    monkeypatch.undo()
    assert steps_of(tmp_path) == [8]
    load_model(tmp_path)  # the intact one loads


@pytest.fixture
def three_checkpoints(tmp_path):
    train(cfg_of("train.steps=6", "train.ckpt_every=2", "train.keep_checkpoints=3"), tmp_path)
    assert steps_of(tmp_path) == [2, 4, 6]
    return tmp_path


def _biggest_file(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_bit_flipped_checkpoint_is_refused_and_an_earlier_one_resumes(three_checkpoints):
    run = three_checkpoints
    victim = _biggest_file(run / "checkpoints" / "6" / "params")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    for attempt in (
        lambda: load_model(run),
        lambda: train(cfg_of("train.steps=8", "train.keep_checkpoints=3"), run, resume=True),
    ):
        with pytest.raises(CheckpointError) as e:
            attempt()
        msg = str(e.value)
        assert msg.startswith("checkpoint 6: ") and ("checksum" in msg or "unreadable" in msg), msg
        assert "earlier checkpoints: 2, 4 (resume from one with --resume --step 4" in msg and "\n" not in msg
    last = train(cfg_of("train.steps=8", "train.keep_checkpoints=3"), run, resume=True, resume_step=4)
    assert last["step"] == 8 and steps_of(run)[-1] == 8 and 6 not in steps_of(run)
    aside = list((run / "checkpoints.set-aside").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["6"]  # moved, not deleted
    assert metric_steps(run) == list(range(1, 9))
    assert "moved to" in (run / "train.log").read_text()


def test_truncated_checkpoint_names_the_fallback(three_checkpoints):
    run = three_checkpoints
    victim = _biggest_file(run / "checkpoints" / "6" / "train")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", "--run", str(run), "--resume", "--config.train.steps=8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint 6: ") and "--resume --step 4" in lines[0], lines


# -- hooks, validation, restarts -------------------------------------------------------------------


def test_a_failing_sample_never_costs_the_final_checkpoint(tmp_path, monkeypatch):
    def broken(self, step, state, results):
        raise RuntimeError("generation blew up")

    monkeypatch.setattr(H.TextSample, "__call__", broken)
    with pytest.raises(RuntimeError, match="generation blew up"):
        train(cfg_of("train.steps=5", "train.ckpt_every=100", "train.sample_every=0"), tmp_path)
    assert steps_of(tmp_path) == [5]  # saved although the sample after it failed


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.sample_tokens=0", "sample_tokens"),
        ("train.sample_prompt=", "sample_prompt"),
        ("optim.lr=nan", "lr"),
        ("optim.beta1=1.5", "beta1"),
        ("optim.eps=-1", "eps"),
        ("data.prefetch=-1", "prefetch"),
        ("data.val_windows=-4", "val_windows"),
    ],
)
def test_bad_values_refused_before_anything_runs(override, field):
    with pytest.raises(ConfigError, match=field):
        cfg_of(override)


def test_vocab_smaller_than_the_tokenizer_refused(tmp_path):
    with pytest.raises(TrainingError, match="model.vocab_size=1000: must be >= 50261"):
        train(cfg_of("model.vocab_size=1000", "train.steps=1"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_restart_after_a_crash_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def crash_at_3(step, _):
        if step == 3:
            raise KeyboardInterrupt  # kill -9 would do the same to the files

    with pytest.raises(KeyboardInterrupt):
        train(cfg_of("train.steps=6", "train.ckpt_every=100"), tmp_path, on_step=crash_at_3)
    assert metric_steps(tmp_path)[:2] == [1, 2] and steps_of(tmp_path) == []
    time.sleep(1.1)  # a new event file name (tensorboardX names them by the second)
    train(cfg_of("train.steps=6", "train.ckpt_every=100"), tmp_path)
    assert metric_steps(tmp_path) == list(range(1, 7))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))  # the first file's steps purged


def test_nan_guard_names_the_step_and_keeps_the_checkpoint(tmp_path):
    cfg = cfg_of(
        "optim.name=adamw",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        "train.ckpt_every=1",
        "train.steps=20",
    )
    with pytest.raises(TrainingError, match=r"step \d+: (train/loss|grad_norm) is (nan|inf)"):
        train(cfg, tmp_path)
    model, _ = load_model(tmp_path)
    import jax
    from flax import nnx

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_a_shard_corrupted_between_the_sampled_blocks_stops_training(tmp_path):
    """Bytes changed where opening a shard does not look are found by the background sha256 pass
    (data.verify=background), and the trainer stops on it instead of training on corrupt data."""
    from fgpt_jax.data.bundled import CORPUS_FILE
    from fgpt_jax.data.shards import SAMPLE_BLOCK_TOKENS, SAMPLE_BLOCKS, ShardError
    from fgpt_jax.data.sources import TextSource
    from fgpt_jax.data.writer import write_shards

    shards = tmp_path / "shards"
    write_shards(
        TextSource([CORPUS_FILE], blocks=True, gutenberg=False),
        str(shards),
        val_fraction=0.1,
        workers=1,
        progress=False,
    )
    path = shards / "train_000000.npy"
    tokens = np.load(path, mmap_mode="r")
    n = len(tokens)
    assert n > SAMPLE_BLOCKS * SAMPLE_BLOCK_TOKENS  # else the sampled check reads every token
    starts = np.arange(SAMPLE_BLOCKS, dtype=np.int64) * (n - SAMPLE_BLOCK_TOKENS) // (SAMPLE_BLOCKS - 1)
    gap = int(starts[10] + SAMPLE_BLOCK_TOKENS + 1)
    assert gap < starts[11]  # a token no open-time check reads
    offset = path.stat().st_size - tokens.nbytes + 2 * gap
    del tokens
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x01\x00")  # a valid id: only the full hash can tell
    with pytest.raises(ShardError, match="train_000000.npy: sha256 does not match the manifest"):
        train(cfg_of(f"data.path={shards}", "train.steps=200", "data.verify=background"), tmp_path / "run")
