"""The plot CLI: training curves from metrics.jsonl."""

import subprocess
import sys

from fgpt_jax.metrics import MetricsWriter
from fgpt_jax.plot import plot
from fgpt_jax.rundir import RunDir


def test_plot_cli(tmp_path):
    w = MetricsWriter(RunDir(tmp_path))
    for s in range(1, 21):
        w.log(s, {"train/loss": 10 / s, "lr": 1e-3 * s, "lr_muon": 0.02})
        if s % 5 == 0:
            w.log(s, {"val/loss": 11 / s, "hellaswag/acc_norm": 0.25 + s / 100})
    w.close()
    out = plot(tmp_path)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, "-m", "fgpt_jax.plot", "--run", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl: not found" in r.stderr
