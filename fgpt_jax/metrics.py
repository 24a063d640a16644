"""What a run reports: metrics.jsonl, TensorBoard event files, console lines (`Console`), and MFU.

Tags are the same everywhere: `train/loss`, `lr` (and `lr_muon`), `grad_norm`, `tokens_per_sec`,
`mfu`, `val/loss`, `hellaswag/*`; text samples go to TensorBoard as text and to metrics.jsonl.
Only process 0 writes. A run that starts at step s keeps only the entries up to s: on resume,
entries logged after the restored checkpoint (before the crash) are dropped from metrics.jsonl and
purged from TensorBoard; a fresh start drops everything an earlier attempt logged. So the curves
never show the same step twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import jax
from tqdm import tqdm

# Dense bf16 tensor-core peaks (TFLOP/s per device) from the vendors' datasheets, matched against
# jax's device_kind. MFU = achieved model FLOP/s / (peak * devices).
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
]


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the first), or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return None
    kind = device.device_kind
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in kind:
            return tflops * 1e12
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if not peak or not math.isfinite(tokens_per_sec):
        return None
    return tokens_per_sec * flops_per_token / (peak * n_devices)


class MetricsWriter:
    """metrics.jsonl + TensorBoard (tensorboardX) for one run directory (a `RunDir`)."""

    def __init__(self, run, keep_through: int = -1, enabled: bool = True):
        """Entries for steps after `keep_through` are dropped (-1: a fresh start drops all)."""
        self.enabled = enabled
        self.path = run.metrics
        self.tb = None
        if not enabled:
            return
        self._truncate_after(keep_through)
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides events at or after it that earlier event files hold.
        self.tb = SummaryWriter(str(run.tb), purge_step=keep_through + 1)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for row in read_metrics(self.path):
            if row.get("step", 0) <= step:
                kept.append(json.dumps(row))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        """One metrics.jsonl line and one TensorBoard scalar per numeric value."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            if v is None:
                continue
            if isinstance(v, str):
                self.tb.add_text(k, v, step)
                row[k] = v
            else:
                v = float(v)
                self.tb.add_scalar(k, v, step)
                row[k] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl (or the one of a run directory), skipping lines that are
    not objects with an integer step (a line cut short by a crash, say)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


class Throughput:
    """Training speed, measured on the host one step behind the device (when each step's metrics
    arrive). `tick` at every step keeps `rate`, a smoothed tokens/s for the progress bar; at logged
    steps it also reports the mean tokens/s and MFU since the last report. The first step after
    the start or a `pause` (evaluation, checkpoints) only sets the clock: it includes compilation or
    work that is not training."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, n_devices: int, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.n_devices, self.peak = (
            tokens_per_step,
            flops_per_token,
            n_devices,
            peak,
        )
        self.rate = 0.0
        self.pause()

    def pause(self) -> None:
        self._ref = self._prev = None  # (time, step)

    def tick(self, step: int, report: bool) -> dict:
        now = time.perf_counter()
        out = {}
        if self._prev is not None:
            dt = now - self._prev[0]
            if dt > 0:
                inst = (step - self._prev[1]) * self.tokens_per_step / dt
                self.rate = inst if self.rate == 0 else 0.8 * self.rate + 0.2 * inst
        if self._ref is None:
            self._ref = (now, step)
        elif report and now > self._ref[0]:
            tps = (step - self._ref[1]) * self.tokens_per_step / (now - self._ref[0])
            out = {"tokens_per_sec": tps, "mfu": mfu(tps, self.flops_per_token, self.n_devices, self.peak)}
            self._ref = (now, step)
        self._prev = (now, step)
        return out


def format_line(step: int, total: int, values: dict, eta_s: float | None = None) -> str:
    """The plain progress line printed when stdout is not a terminal."""
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("train/loss", "loss {:.4f}"),
        ("val/loss", "val {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("tokens_per_sec", "{:,.0f} tok/s"),
        ("mfu", "mfu {:.1%}"),
    ):
        if values.get(key) is not None:
            parts.append(fmt.format(values[key]))
    if eta_s is not None:
        h, rem = divmod(int(eta_s), 3600)
        parts.append(f"eta {h}:{rem // 60:02d}:{rem % 60:02d}")
    return " | ".join(parts)


class Console:
    """Lines for the user: printed (above the progress bar on a terminal) and appended to train.log.
    Lines logged before the run directory may be written (while the start-up checks run) are held
    back and written by `start()`; only process 0 prints."""

    def __init__(self, run, enabled: bool):
        self.run, self.enabled, self.open, self._held = run, enabled, False, []
        self.tty = enabled and sys.stdout.isatty()

    def __call__(self, text: str, file_only: bool = False) -> None:
        if not self.enabled:
            return
        if not file_only:
            tqdm.write(text)
        if self.open:
            self.run.append_log(text)
        else:
            self._held.append(text)

    def start(self) -> None:
        """The checks passed: the run directory is ours to write."""
        self.open = True
        for text in self._held:
            self.run.append_log(text)
        self._held = []
