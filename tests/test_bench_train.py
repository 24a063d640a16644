"""scripts/bench_train.py runs the trainer's own step (on CPU here; the GPU numbers need a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# A benchmark run end to end: the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--config",
    "tiny",
    "--config.model.n_layer=1",
    "--config.model.n_embd=64",
    "--config.model.n_head=2",
    "--config.model.block_size=32",
]


def _bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_bench_train_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench(
        *TINY,
        "--micro-batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--variant",
        "adamw",
        "chunked+scan+remat",
        "ns_bf16",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(x["variant"], x["micro_batch"]) for x in rows] == [("adamw", 2), ("chunked+scan+remat", 2), ("ns_bf16", 2)]
    for x in rows[:2]:
        assert "error" not in x and "skipped" not in x, x
        assert x["tokens_per_sec"] > 0 and x["step_ms"] > 0 and x["loss"] > 0 and x["compile_s"] > 0
        assert x["xla_gb"] > 0  # XLA's memory analysis works on CPU too
        assert x["mfu"] is None and x["peak_mem_gb"] is None  # no bf16 peak, no allocator stats on a CPU
    assert rows[0]["optimizer"] == "adamw" and rows[1]["optimizer"] == "muon"
    assert (rows[1]["loss_chunk"], rows[1]["scan_layers"], rows[1]["remat"]) == (128, True, True)
    # Newton-Schulz in bf16 needs optim.ns_dtype, which the optimizer's maintainer adds: skipped until then.
    try:
        from fgpt_jax.optim import OptimConfig

        has_ns_dtype = hasattr(OptimConfig(), "ns_dtype")
    except ImportError:
        has_ns_dtype = False
    if not has_ns_dtype:
        assert rows[2]["skipped"] == "unknown config key 'optim.ns_dtype'"
    assert result["flops_per_token"] > 0 and len(result["markdown"]) == 2 + len(rows)
    table = [line for line in r.stdout.splitlines() if line.startswith(("| adamw", "| chunked", "| ns_bf16"))]
    assert table == result["markdown"][2:]


def test_bench_train_bad_variant_one_line():
    r = _bench("--variant", "scan+turbo", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --variant scan+turbo: unknown 'turbo'; choose from base, xla, cudnn, remat, adamw, muon, fp32, "
        "bf16, chunked, scan, pad56, pad64, ns_bf16 (join several with '+')"
    ]
