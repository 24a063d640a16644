"""scripts/gpu_check.py: its --smoke mode end to end on CPU (every section, tiny shapes), so the command a
GPU session runs cannot rot; its argument checks; its time budget."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def _check(*args, timeout=120):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _check(
        "--smoke",
        "--out",
        str(out),
        "--workdir",
        str(work),
        "--assets",
        str(tmp_path / "no-assets"),
        "--budget",
        "1500",
        timeout=1600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = (out / "gpu_check.md").read_text()
    assert report in r.stdout  # printed too: the device returns the end of the output
    titles = [line[3:] for line in report.splitlines() if line.startswith("## ")]
    assert titles == [
        "Environment",
        "Throughput: gpt2",
        "Throughput: fgpt",
        "Numerics",
        "Real run",
        "Optimizer: Muon vs AdamW",
        "Variants: gpt2",
        "XLA/JAX settings: gpt2, AdamW, micro-batch 2",
    ]
    for bad in ("failed (rc=", "error:", "not run: time budget", "Traceback"):
        assert bad not in report, bad
    # the checkout's sources were staged and imported, configs included
    assert f"| fgpt_jax imported from | {work / 'src' / 'fgpt_jax'} |" in report
    assert (work / "src" / "fgpt_jax" / "configs" / "gpt2_124m.py").is_file()
    # numerics (on a GPU: head_dim 64, and 52 padded to 56 and to 64; in smoke two cases), errors small, finite
    data = json.loads((out / "gpu_check.json").read_text())["sections"]
    att = data["Numerics"]["attention"]
    assert [(a["head_dim"], a["padded_to"]) for a in att] == [(64, 64), (52, 64)]
    assert all(0 < a["out_err_vs_fp32"] < 0.1 and 0 < a["grad_err_vs_fp32"] < 0.1 for a in att)
    assert abs(data["Numerics"]["train_steps"][0]["diff"]) < 0.05
    optim = data["Optimizer: Muon vs AdamW"]  # scripts/bench_optim.py ran both optimizers on the same shards
    assert [r["optimizer"] for r in optim["runs"]] == ["adamw", "muon"] and optim["target"] > 0
    # throughput rows measured; the PyTorch peer says why it did not run
    for model in ("gpt2", "fgpt"):
        rows = [row for res in data[f"Throughput: {model}"]["jax"].values() for row in res["rows"]]
        assert rows and all(row["tokens_per_sec"] > 0 and row["compile_s"] > 0 for row in rows)
    assert "Peer: skipped: " in report and "torch_ref_bench.py missing" in report
    variants = [row for res in data["Variants: gpt2"] for row in res["rows"]]
    assert [v["variant"] for v in variants] == ["chunked+scan+pad64", "ns_bf16"]
    assert variants[0]["loss_chunk"] == 128 and variants[0]["scan_layers"] and variants[0]["tokens_per_sec"] > 0
    # the real run: the training CLI on shards, loss falling, checkpoint, HellaSwag and decode timed
    assert "val/loss" in report and ": falling." in report
    after = data["Real run"]["after_run"]
    assert [x["what"].split(" (")[0] for x in after["rows"]] == ["checkpoint restore", "checkpoint save", "load_model"]
    assert after["hellaswag"]["items"] == 8 and 0 <= after["hellaswag"]["acc"] <= 1
    assert [d["batch"] for d in after["decode"]] == [1, 16] and all(d["tokens_per_sec"] > 0 for d in after["decode"])
    flags = data["XLA/JAX settings: gpt2, AdamW, micro-batch 2"]
    assert flags["O1"]["optimization_level"] == "O1" and flags["O1"]["rows"][0]["tokens_per_sec"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--sections", "env,gpu"],
            "error: argument --sections: expected sections from env, throughput, peer, "
            "numerics, run, optim, variants, flags (comma-separated), got 'env,gpu'",
        ),
        (["--plan", "9"], "error: argument --plan: invalid choice: '9' (choose from "),  # quoting varies by Python
        (["--budget", "10"], "error: argument --budget: expected an integer >= 30, got '10'"),
        (["--books", "/no/such/book.txt"], "error: --books /no/such/book.txt: not a file"),
    ],
)
def test_bad_arguments_one_line(tmp_path, args, message):
    r = _check("--out", str(tmp_path), *args)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line == message or (message.endswith("from ") and line.startswith(message))
    assert not list(tmp_path.iterdir())  # nothing written before the checks pass


def test_budget_refuses_what_no_longer_fits(tmp_path):
    args = gpu_check.parser().parse_args(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")])
    args.sections, args.models, args.name, args.flag_sets = ["env"], ["gpt2"], "t", ["default"]
    c = gpu_check.Check(argparse.Namespace(**vars(args)))
    ran = c.proc("echo", ["echo", "hello"])
    assert ran["rc"] == 0 and ran["tail"] == "hello"
    c.deadline = time.monotonic() + 10  # less than a GPU subprocess needs to start: refused, not killed midway
    assert c.proc("echo", ["echo", "hello"])["skipped"].startswith("not run: time budget")
    c.log.close()


def test_plans_cover_every_section_and_model():
    covered = {s for sections, _ in gpu_check.PLANS.values() for s in sections}
    assert covered == set(gpu_check.SECTIONS)
    assert {m for _, models in gpu_check.PLANS.values() for m in models} == set(gpu_check.MODELS)
