"""The README's quickstart works as written: every command of its quickstart block is run exactly as
printed, in a fresh working directory, and leaves what the README says it leaves.

The only addition is what the README itself documents for slow machines (`--config.train.steps=20
--config.optim.warmup_steps=2`), appended to the train command; it is read from the README, so the test
follows the text. The
TensorBoard command (a server, in its own block) is checked through what it would show: the event
files under runs/tiny/tb and the tags the README names.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARKER = "<!-- tests/test_readme.py runs this block as written"


def quickstart_commands() -> list[str]:
    """The lines of the bash block right after the marker, comments stripped."""
    after = README.split(MARKER, 1)[1]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [" ".join(shlex.quote(a) for a in argv) for argv in commands if argv]


def slow_machine_flag() -> list[str]:
    m = re.search(
        r"On a slow or busy\s+machine, add `(--config\.train\.steps=\d+[^`]*)` to the first\s+command", README
    )
    assert m, "README: the slow-machine flag sentence is gone; update this test with the README"
    return m.group(1).split()


def test_quickstart_block_is_what_this_test_expects():
    cmds = quickstart_commands()
    assert cmds[0] == "python -m fgpt_jax.train"
    assert [c.split()[2] for c in cmds] == ["fgpt_jax.train", "fgpt_jax.plot", "fgpt_jax.generate", "fgpt_jax.eval"]
    assert "tensorboard --logdir runs/tiny/tb" in README


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    cmds = quickstart_commands()
    argvs = [shlex.split(c) for c in cmds]
    argvs[0] += slow_machine_flag()
    for argv in argvs:
        assert argv[0] == "python"
        argv[0] = sys.executable  # the interpreter of the user's activated environment
    # This checkout's code whatever the environment's install points at; FGPT_JAX_CACHE is conftest's.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }

    train = subprocess.run(argvs[0], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["name"] == "tiny" and cfg["train"]["steps"] == 20
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["20"]
    last = [json.loads(line) for line in train.stdout.splitlines() if line.startswith("{")][-1]  # final metrics
    assert last["step"] == 20 and last["val/loss"] < 10.0  # it learned something (untrained: ~10.8)
    for name in ("metrics.jsonl", "train.log"):
        assert (run / name).stat().st_size > 0

    # The other commands only read the run: run them side by side.
    procs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs[1:]
    ]
    (plot_out, plot_err), (gen_out, gen_err), (eval_out, eval_err) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], (plot_err + gen_err + eval_err)[-2000:]

    png = run / "curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and plot_out.strip().endswith("curves.png")
    assert gen_out.startswith("ROMEO:") and len(gen_out.strip()) > len("ROMEO:") + 20
    record = json.loads(eval_out.strip().splitlines()[-1])
    assert record["task"] == "val" and record["step"] == 20
    assert record["loss"] == pytest.approx(last["val/loss"], rel=1e-4)  # the trainer's own number
    assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["loss"] == record["loss"]

    # What `tensorboard --logdir runs/tiny/tb` shows: the scalars and the text samples the README names.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert {"train/loss", "lr", "grad_norm", "tokens_per_sec", "val/loss"} <= set(acc.Tags()["scalars"])
    assert "samples/text_summary" in acc.Tags()["tensors"]
