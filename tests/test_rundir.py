"""The run directory: its layout, and the writer lock (one trainer per directory, never stale)."""

import os
import signal
import subprocess
import sys

import pytest

from fgpt_jax.config import Config
from fgpt_jax.rundir import RunDir, RunDirError

HOLD = (
    "import sys, time; from fgpt_jax.rundir import RunDir\n"
    "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)"
)


def _holder(path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_layout_and_config_roundtrip(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.checkpoint_steps() == [] and not run.has_checkpoints()
    run.write_config(Config(name="x"))
    assert run.read_config() == Config(name="x")
    (run.checkpoints / "8").mkdir(parents=True)
    (run.checkpoints / "12").mkdir()
    (run.checkpoints / "16.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save is never listed
    assert run.checkpoint_steps() == [8, 12]
    run.append_eval({"task": "val"})
    assert '"task": "val"' in run.eval_log.read_text()


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by pid {holder.pid} on .*; wait for it"):
            with RunDir(tmp_path).lock():
                pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_not_stale(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs
    holder.wait()
    with RunDir(tmp_path).lock():  # the kernel released the flock with the process
        pass


def test_refused_run_leaves_no_directory_behind(tmp_path):
    path = tmp_path / "new"
    with pytest.raises(ValueError):
        with RunDir(path).lock():
            raise ValueError("a later check failed")
    assert not path.exists()
    with RunDir(path).lock() as run:
        run.write_config(Config())
    assert sorted(p.name for p in path.iterdir()) == [".lock", "config.json"]
