import json
from types import SimpleNamespace

import pytest

from fgpt_jax.metrics import MetricsWriter, Throughput, format_line, mfu, peak_flops, read_metrics
from fgpt_jax.model import GPTConfig
from fgpt_jax.rundir import RunDir


def test_peak_flops_table():
    gpu = lambda kind: SimpleNamespace(platform="gpu", device_kind=kind)
    assert peak_flops(gpu("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(gpu("NVIDIA H100 PCIe")) == 756e12
    assert peak_flops(gpu("NVIDIA H200")) == 989e12
    assert peak_flops(gpu("NVIDIA GH200 480GB")) == 989e12
    assert peak_flops(gpu("NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops(gpu("NVIDIA L40S")) == 362e12
    assert peak_flops(gpu("NVIDIA GeForce GTX 1080")) is None
    assert peak_flops() is None  # this machine's CPU: MFU shows n/a


def test_mfu_gpt2_example():
    # 520K tokens/s of GPT-2 124M at T=1024 on one H100 SXM is ~45% MFU (the GPU issue's target).
    f = GPTConfig.preset("gpt2").flops_per_token(1024)
    assert mfu(520_000, f, 1, 989e12) == pytest.approx(0.4497, abs=1e-3)
    assert mfu(520_000, f, 1, None) is None


def test_writer_truncates_on_resume(tmp_path):
    w = MetricsWriter(RunDir(tmp_path))
    for s in range(1, 6):
        w.log(s, {"train/loss": 10 - s, "lr": 1e-3})
    w.log(5, {"samples": "Once upon a time"})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut short by a crash
    w = MetricsWriter(RunDir(tmp_path), keep_through=3)
    w.log(4, {"train/loss": 1.0})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train/loss"] == 1.0


def test_format_line():
    line = format_line(10, 200, {"train/loss": 3.14159, "lr": 6e-4, "tokens_per_sec": 12345.6, "mfu": None})
    assert line == "step 10/200 | loss 3.1416 | lr 6.00e-04 | 12,346 tok/s"
    assert format_line(1, 2, {"train/loss": 1.0}, eta_s=3725.2) == "step 1/2 | loss 1.0000 | eta 1:02:05"


def test_fresh_start_drops_an_earlier_attempts_entries(tmp_path):
    """A run restarted from scratch (it crashed before its first checkpoint) must not show its steps twice."""
    w = MetricsWriter(RunDir(tmp_path))
    for s in range(0, 4):
        w.log(s, {"train/loss": 1.0})
    w.close()
    w = MetricsWriter(RunDir(tmp_path))  # keep_through=-1: a fresh start
    w.log(0, {"val/loss": 2.0})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 0, "val/loss": 2.0}]


def test_read_metrics_skips_what_is_not_a_step_object(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(
        b'{"step": 1, "x": 1}\n[1, 2]\n"text"\n{"step": "2"}\n\xff\xfe\n{"step": 3}\n'
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]


def test_throughput_times_steps_not_compilation_or_hooks(monkeypatch):
    clock = iter([0.0, 100.0, 101.0, 400.0, 401.0, 402.0])
    monkeypatch.setattr("fgpt_jax.metrics.time.perf_counter", lambda: next(clock))
    t = Throughput(tokens_per_step=1000, flops_per_token=1.0, n_devices=1, peak=None)
    assert t.tick(1, report=True) == {}  # step 1 includes compilation: it only starts the clock
    assert t.tick(2, report=False) == {} and t.rate == pytest.approx(1000 / 100)
    assert t.tick(3, report=True)["tokens_per_sec"] == pytest.approx(2000 / 101)
    t.pause()  # a checkpoint or an evaluation ran
    assert t.tick(4, report=True) == {}
    assert t.tick(5, report=False) == {}
    assert t.tick(6, report=True)["tokens_per_sec"] == pytest.approx(2000 / 2)
