"""The sections of scripts/gpu/check.py: what each measures, how it is run, and its part of the report.

Each `section_<key>` (the keys of plan.py's plans) takes the call's `Check` (its `python`/`probe`/`bench`
helpers run subprocesses under the section's deadline) and adds one titled block of markdown and its raw
data with `c.add`. Cross-section facts live on the Check: `c.attention` (the path every section after (a)
runs with: "cudnn" if the self-test passed, else "xla"), `c.micro` (the micro-batches from the memory
estimate) and `c.results` (numbers later sections and the summary compare).

Compiled programs are reused within a call: the subprocesses share a persistent compilation cache in the
work directory, and (b) and (d) build the GPT-2 step from the same config (`gpt2_step_overrides`), so the
real run in (d) loads the AdamW step that (b) compiled; (d) reports whether it did.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

from fgpt_jax import cli

ROOT = Path(__file__).resolve().parents[2]

# --smoke: every code path once, at the least cost on 2 CPU cores. FGPT's stand-in keeps head_dim 52.
SMOKE_MODEL = {
    "gpt2": ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.block_size=32"],
    "fgpt": ["model.n_layer=1", "model.n_embd=104", "model.n_head=2", "model.block_size=32"],
}
SMOKE_MICRO = 2
GOALS = {  # issue 23's goals for one H100 (benchmarks, never timed tests)
    "gpt2_tokens": 520_000,
    "gpt2_mfu": 0.45,
    "peer_ratio": 1.2,
    "fgpt_tokens": 110_000,
    "hellaswag_s": 30.0,
    "decode_tokens": 1_500,
}
VARIANT_ROWS = {  # plan `more`: (micro-batch, variants) per model; the first variant of a row is its base
    "gpt2": [(64, ["adamw", "adamw+chunked", "adamw+scan"]), (32, ["muon", "muon+ns_bf16"])],
    "fgpt": [(16, ["scan", "base", "scan+pad64", "scan+remat"])],
}
SMOKE_VARIANTS = [(SMOKE_MICRO, ["chunked+scan+pad64", "ns_bf16"])]
FLAG_SETS = {
    "default": {},
    "mem95": {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".95"},
    "O1": {"JAX_OPTIMIZATION_LEVEL": "O1"},
    "lhs": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    "cublas": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
}


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(str(x) for x in r) + " |" for r in rows),
    ]


def attention_overrides(c) -> list[str]:
    """The real switch: GPTConfig.attention (model.py's resolve_attention honours it on every backend)."""
    return [f"model.attention={c.attention}"]


def gpt2_step_overrides(c) -> list[str]:
    """Everything the GPT-2 step program depends on beyond the micro-batch, shared by (b) and (d): the
    attention path and the schedule's constants (train.steps and the warmup are baked into the program)."""
    steps = c.run_steps()
    return [
        *(SMOKE_MODEL["gpt2"] if c.smoke else []),
        *attention_overrides(c),
        f"train.steps={steps}",
        f"optim.warmup_steps={max(steps // 10, 1)}",
    ]


def peak(c, file_peak):
    """The dense bf16 peak MFU is reported against: --peak-tflops, else what the measuring process found
    for its device in fgpt_jax/metrics.py's table (None on CPU)."""
    return c.args.peak_tflops * 1e12 if c.args.peak_tflops else file_peak


def mfu(c, tokens_per_sec, flops_per_token, file_peak):
    p = peak(c, file_peak)
    return tokens_per_sec * flops_per_token / p if p and tokens_per_sec else None


def _estimate_gb(c, result: dict, row: dict) -> float | None:
    """plan.train_memory for a bench_train row (the model as that row built it), in GiB."""
    import dataclasses

    from plan import train_memory

    try:
        from fgpt_jax.config import apply_overrides, load_config

        cfg = apply_overrides(load_config(result["config"]), result.get("overrides", []))
    except Exception:  # a config this checkout cannot rebuild: no estimate, the row stands
        return None
    fields = {"dtype": "dtype", "attention": "attention", "remat": "remat", "scan_layers": "scan_layers"}
    fields |= {"loss_chunk": "loss_chunk", "attention_pad": "attention_pad"}
    model = dataclasses.replace(cfg.model, **{f: row[k] for k, f in fields.items() if k in row})
    attention = c.attention if model.attention == "auto" else model.attention
    return (
        train_memory(model, row["micro_batch"], optimizer=row.get("optimizer", "adamw"), attention=attention).total
        / 2**30
    )


def throughput_table(c, result: dict) -> list[str]:
    """bench_train rows as the report's table, MFU against `peak`, with the memory estimate beside XLA's."""
    rows = []
    for r in result.get("rows", []):
        err = r.get("error") or (f"skipped: {r['skipped']}" if "skipped" in r else None)
        cells = [r["variant"], r["micro_batch"]]
        if err:
            rows.append(cells + [err] + [""] * 6)
            continue
        rows.append(
            cells
            + [
                fmt(r["compile_s"], ".1f"),
                fmt(r["step_ms"], ".1f"),
                fmt(r["tokens_per_sec"], ",.0f"),
                fmt(mfu(c, r["tokens_per_sec"], result["flops_per_token"], result.get("peak_flops")), ".1%"),
                fmt(_estimate_gb(c, result, r), ".1f"),
                fmt(r.get("xla_gb"), ".1f"),
                fmt(r.get("peak_mem_gb"), ".1f"),
            ]
        )
    head = ["variant", "micro-batch", "compile s", "step ms", "tokens/s", "MFU", "estimate GB", "XLA GB", "peak GB"]
    return md_table(head, rows)


def bench_note(c, result: dict) -> str:
    p = peak(c, result.get("peak_flops"))
    return (
        f"`{result.get('config', '?')}` ({fmt(result.get('params', 0) / 1e6, '.1f')}M params), T = "
        f"{result.get('seq_len', 'n/a')}, {result.get('steps', '?')} timed steps after {result.get('warmup', '?')} "
        f"warm-up, on {result.get('device', '?')}; attention {c.attention}. MFU: "
        f"{fmt(result.get('flops_per_token', 0) / 1e6, ',.0f')} MFLOP/token (PaLM convention) over "
        f"{fmt(p / 1e12 if p else None, '.0f')} TFLOP/s dense bf16"
        f"{' (--peak-tflops)' if c.args.peak_tflops else ''}. *estimate GB*: scripts/gpu/plan.py's train_memory "
        "(what the micro-batch was chosen from); *XLA GB*: the compiled step's own buffers; *peak GB*: the "
        "allocator's peak in that process so far (rows run in order)."
    )


# -- (a) environment and the cuDNN self-test --------------------------------------------------------------


def section_env(c) -> None:
    extra = ["--smoke"] if c.smoke else []
    r = c.probe("env", *extra, *(["--more"] if c.args.plan == "more" else []))
    if isinstance(r, str):  # the device did not even start JAX: later sections try XLA attention
        c.attention, c.attention_note = "xla", f"xla (the environment probe failed: {r})"
        c.micro = {"gpt2": SMOKE_MICRO if c.smoke else 16, "fgpt": SMOKE_MICRO if c.smoke else 8}
        return c.add([r, "", f"**Warning**: later sections use XLA attention and micro-batches {c.micro}."], r)
    a = r["attention"]
    c.attention = a["path"]
    c.attention_note = "cudnn (self-test passed)" if a["passed"] else "xla (cuDNN self-test failed; fallback, see (a))"
    mbs = r["micro_batches"]
    c.micro = {k: SMOKE_MICRO for k in mbs} if c.smoke else {k: v["micro_batch"] for k, v in mbs.items()}
    case_rows = []
    for x in a["cases"]:
        name = [x["head_dim"], x["padded_to"], x["heads"], x["shape"]]
        if "error" in x:
            case_rows.append(name + [f"did not run: {x['error']}", "", ""])
        else:
            rel = lambda d: " / ".join(f"{d[k]:.1e}" for k in ("out", "dq", "dk", "dv"))  # noqa: E731
            case_rows.append(name + [rel(x["cudnn_rel"]), rel(x["xla_bf16_rel"]), "yes" if x["finite"] else "NO"])
    lines = [
        *md_table(["what", "value"], [[x["what"], x["value"]] for x in r["rows"]]),
        "",
        "cuDNN attention self-test (fgpt_jax.model.causal_attention, causal, bf16, random normal q/k/v and output "
        "cotangent): relative L2 error against XLA in float32, output / dq / dk / dv; passes when cuDNN's is at "
        "most 2x XLA-bf16's + 2e-3 everywhere.",
        "",
        *md_table(["head dim", "padded to", "heads", "B x T", "cuDNN bf16", "XLA bf16", "finite"], case_rows),
        "",
    ]
    if a["passed"]:
        lines.append("Attention path for every later section: **cudnn** (`--config.model.attention=cudnn`).")
    else:
        lines += [
            "**Warning: the cuDNN attention self-test failed; every later section runs with XLA attention "
            "(`--config.model.attention=xla`), which is slower and holds the T x T scores.** Why:",
            "",
            *(f"- {x}" for x in a["reasons"]),
        ]
    lines += [
        "",
        f"Memory for the micro-batch estimate: {r['device_bytes'] / 2**30:.1f} GiB ({r['device_bytes_source']}); "
        f"a micro-batch is chosen when its estimate fits 80% of it.",
        "",
        *md_table(
            [
                "model",
                "optimizer",
                "micro-batch (estimate)",
                "estimate GiB",
                "params+grads+optimizer",
                "activations",
                "logits",
            ],
            [
                [
                    k,
                    "AdamW" if k == "gpt2" else "Muon, scan",
                    v["micro_batch"],
                    f"{v['estimate_gb']:.1f}",
                    f"{sum(v['parts_gb'][p] for p in ('params', 'grads', 'optimizer', 'compute_copies')):.1f}",
                    f"{v['parts_gb']['activations']:.1f}",
                    f"{v['parts_gb']['logits']:.1f}",
                ]
                for k, v in mbs.items()
            ],
        ),
    ]
    if c.smoke:
        lines += ["", f"Smoke: every later section uses micro-batch {SMOKE_MICRO} and 1-layer stand-ins."]
    c.add(lines, r)


# -- (b) GPT-2 throughput -----------------------------------------------------------------------------


def section_gpt2(c) -> None:
    mb = c.micro["gpt2"]
    result, err = c.bench("gpt2", "gpt2_124m", gpt2_step_overrides(c), ["adamw", "muon"], [mb], *c.timing())
    for r in result.get("rows", []):
        if "tokens_per_sec" in r:
            c.results[f"gpt2_{r['optimizer']}"] = {
                **r,
                "mfu": mfu(c, r["tokens_per_sec"], result["flops_per_token"], result.get("peak_flops")),
            }
    lines = [
        bench_note(c, result) if result.get("rows") else "",
        "",
        *throughput_table(c, result),
        "",
        f"Goal on one H100: >= {GOALS['gpt2_tokens']:,} tokens/s ({GOALS['gpt2_mfu']:.0%} MFU) with AdamW.",
        *([f"- {err}"] if err else []),
    ]
    c.add(lines, result)


# -- (c) the PyTorch peer -----------------------------------------------------------------------------


def torch_status(c) -> str | None:
    """None if the peer can run here (torch with CUDA; on CPU only in smoke), else why not."""
    r = c.python("torch?", ["-c", "import torch; print('TORCH', torch.__version__, torch.cuda.is_available())"])
    if c.failed(r):
        return "skipped: torch is not installed here" if "No module named" in r.get("out", "") else c.failed(r)
    version, cuda = r["out"].split("TORCH ")[-1].split()[:2]
    if cuda != "True" and not c.smoke:
        return f"skipped: torch {version} sees no CUDA device here"
    return None


def run_peer(c, name: str, model: str, mb: int, optimizers: list[str]) -> tuple[dict, str | None]:
    path = c.work / f"peer_{name}.json"
    path.unlink(missing_ok=True)
    args = [str(ROOT / "scripts" / "gpu" / "torch_peer.py"), "--model", model, "--micro-batch", str(mb)]
    args += ["--optimizer", *optimizers, "--steps", str(c.args.steps), "--json", str(path)]
    args += ["--smoke"] if c.smoke else []
    args += ["--peak-tflops", str(c.args.peak_tflops)] if c.args.peak_tflops else []
    r = c.python(f"peer {name}", args)
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    return result, c.failed(r)


def peer_rows(c, result: dict, jax_key: str) -> list[list]:
    rows = []
    for t in result.get("rows", []):
        j = c.results.get(f"{jax_key}_{t['optimizer']}", {})
        if "error" in t:
            rows.append([t["optimizer"], t["micro_batch"], t["error"], "", "", "", "", "", ""])
            continue
        ratio = j["tokens_per_sec"] / t["tokens_per_sec"] if j.get("tokens_per_sec") else None
        rows.append(
            [
                t["optimizer"],
                t["micro_batch"],
                fmt(t["first_step_s"], ".1f"),
                fmt(t["step_ms"], ".1f"),
                fmt(t["tokens_per_sec"], ",.0f"),
                fmt(mfu(c, t["tokens_per_sec"], result["flops_per_token"], result.get("peak_flops")), ".1%"),
                fmt(t.get("peak_mem_gb"), ".1f"),
                fmt(j.get("tokens_per_sec"), ",.0f"),
                fmt(ratio, ".2f"),
            ]
        )
    return rows


PEER_HEAD = [
    "optimizer",
    "micro-batch",
    "first step s",
    "step ms",
    "tokens/s",
    "MFU",
    "peak GB",
    "fgpt-jax tokens/s",
    "fgpt-jax / torch",
]


def section_peer(c) -> None:
    why = torch_status(c)
    if why:
        return c.add([f"Peer: {why}."], {"skipped": why})
    mb = c.micro["gpt2"]
    result, err = run_peer(c, "gpt2", "gpt2", mb, ["adamw", "muon"])
    for t in result.get("rows", []):
        j = c.results.get(f"gpt2_{t['optimizer']}")
        if j and "tokens_per_sec" in t:
            c.results[f"peer_{t['optimizer']}"] = {**t, "ratio": j["tokens_per_sec"] / t["tokens_per_sec"]}
    lines = [
        f"Peer: measured. scripts/gpu/torch_peer.py: build-nanogpt's GPT-2 in PyTorch {result.get('torch', '?')} on "
        f"{result.get('device', '?')}, "
        f"{'torch.compile' if result.get('compile') else 'eager (smoke: no torch.compile)'}, "
        f"bf16 autocast, fused AdamW / torch.optim.Muon + fused AdamW, {result.get('attention', '')}; the same shape "
        f"as (b) (micro-batch {mb}, T = {result.get('seq_len', '?')}) and our FLOPs per token for MFU. *first step s* "
        "includes torch.compile (once per process).",
        "",
        *md_table(PEER_HEAD, peer_rows(c, result, "gpt2")),
        "",
        f"Goal: fgpt-jax >= {GOALS['peer_ratio']}x the torch.compile peer in the same call.",
        *([f"- {err}"] if err else []),
    ]
    c.add(lines, result)


# -- (d) the real run -----------------------------------------------------------------------------------


def shards(c) -> tuple[Path | None, str]:
    """The Gutenberg books as shards in the work directory (tokenised once per call): (dir, what happened)."""
    books = c.args.books or sorted(glob.glob(str(c.assets / "gutenberg" / "*.txt")))
    blocks = []
    if not books and c.smoke:  # no Gutenberg here: the bundled Tiny Shakespeare, one document per speech
        books, blocks = [str(ROOT / "fgpt_jax" / "assets" / "tinyshakespeare.txt")], ["--blocks"]
    if not books:
        return None, "skipped: the Gutenberg books are missing (run scripts/gpu/fetch_wheels.sh and carry .gpu)"
    out = c.work / "shards"
    if (out / "manifest.json").is_file():
        return out, f"Shards: {len(books)} file(s), tokenised earlier in this work directory"
    shutil.rmtree(out, ignore_errors=True)
    r = c.python("data", ["-m", "fgpt_jax.data", "text", *books, *blocks, "--out", str(out), "--no-progress"])
    if c.failed(r):
        return None, f"tokenising: {c.failed(r)}"
    last = r["out"].strip().splitlines()[-1]
    return out, f"`python -m fgpt_jax.data text` on {len(books)} file(s): {r['seconds']:.1f} s, `{last}`"


def _step_cache_entries(c) -> set[str]:
    return {p.name for p in (c.work / "jax_cache").glob("jit_step-*")}


def section_run(c) -> None:
    a, lines = c.args, []
    hellaswag = a.hellaswag or (
        ROOT / "tests" / "data" / "hellaswag_val_200.txt" if c.smoke else c.assets / "hellaswag_val_full.txt.bz2"
    )
    if not Path(hellaswag).is_file():
        return c.add([f"skipped: {hellaswag} missing (run scripts/gpu/fetch_wheels.sh and carry .gpu)"])
    data, note = shards(c)
    if data is None:
        return c.add([note])
    run = c.work / "run"
    for d in (run, c.work / "ckpt_copy"):
        shutil.rmtree(d, ignore_errors=True)
    lines.append(note)
    mb, steps = c.micro["gpt2"], c.run_steps()
    overrides = [
        *gpt2_step_overrides(c),
        f"train.batch_size={mb}",
        "train.grad_accum=1",
        f"train.log_every={1 if c.smoke else 10}",
        f"train.eval_every={steps}",  # val/loss at the start and at the last step
        f"train.ckpt_every={steps}",
        "train.hellaswag_every=0",
        "train.core_every=0",  # the preset scores CORE every 1000 steps: the real run has no bundle on the device
        "train.sample_every=0",
        f"data.val_windows={8 if c.smoke else 64}",
        f"data.path={data}",
    ]
    before = _step_cache_entries(c)
    cmd = ["-m", "fgpt_jax.train", "--config", "gpt2_124m", "--run", str(run), *(f"--config.{o}" for o in overrides)]
    r = c.python("train", cmd)
    new = _step_cache_entries(c) - before
    metrics = (
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").is_file()
        else []
    )
    lines.append(
        f"`python -m fgpt_jax.train --config gpt2_124m {' '.join('--config.' + o for o in overrides)}` "
        f"(attention {c.attention}, micro-batch {mb} as in (b)): "
        + (c.failed(r) or f"{r['seconds']:.0f} s wall clock (start, compile, {steps} steps, evaluations, saves)")
    )
    if "gpt2_adamw" in c.results:
        hit = not new and bool(before)
        c.results["run_cache_hit"] = hit
        lines.append(
            "Step program: "
            + (
                "loaded from the compilation cache (the one (b) compiled): compile time paid once."
                if hit
                else f"compiled again ({len(new)} new step entries in the cache): (b)'s program was not reused."
            )
        )
    by_step: dict = {}
    for m in metrics:
        by_step.setdefault(m["step"], {}).update({k: v for k, v in m.items() if isinstance(v, (int, float))})
    shown = [s for s, m in sorted(by_step.items()) if "val/loss" in m or s in (min(by_step), max(by_step))]
    lines += [
        "",
        *md_table(
            ["step", "train/loss", "val/loss", "tokens/s", "MFU"],
            [
                [
                    s,
                    fmt(by_step[s].get("train/loss"), ".4f"),
                    fmt(by_step[s].get("val/loss"), ".4f"),
                    fmt(by_step[s].get("tokens_per_sec"), ",.0f"),
                    fmt(by_step[s].get("mfu"), ".1%"),
                ]
                for s in shown
            ],
        ),
    ]
    vals = [by_step[s]["val/loss"] for s in shown if "val/loss" in by_step[s]]
    if len(vals) >= 2:
        c.results["val_falling"] = vals[-1] < vals[0]
        lines += [
            "",
            f"val/loss {vals[0]:.3f} -> {vals[-1]:.3f}: {'falling' if vals[-1] < vals[0] else 'NOT falling'}.",
        ]
    if c.failed(r):
        return c.add(lines, {"metrics": metrics})
    extra = (
        ["--limit", "8", "--batch-size", "4", "--new-tokens", "8"]
        if c.smoke
        else ["--batch-size", str(a.hellaswag_batch)]
    )
    extra += ["--decode-batches", *(["1", "16"] if a.plan == "more" else ["1"])]
    p = c.probe(
        "after-run", "--run", str(run), "--hellaswag", str(hellaswag), "--copy-to", str(c.work / "ckpt_copy"), *extra
    )
    if isinstance(p, str):
        lines += ["", f"checkpoint / HellaSwag / decode: {p}"]
        return c.add(lines, {"metrics": metrics})
    c.results["checkpoint_ok"] = all(x["ok"] for x in p["checks"])
    lines += [
        "",
        *md_table(
            ["checkpoint check", "result", "detail"],
            [[x["what"], "ok" if x["ok"] else "**FAILED**", x["detail"]] for x in p["checks"]],
        ),
        "",
        *md_table(["checkpoint timing", "seconds"], [[x["what"], f"{x['seconds']:.2f}"] for x in p["rows"]]),
    ]
    h = p.get("hellaswag")
    if h:
        c.results["hellaswag"] = h
        lines += [
            "",
            f"HellaSwag, {h['items']:,} items ({h['batch_items']} per call, {p['dtype']}): first call (compiles) "
            f"{h['first_call_s']:.1f} s, **after compilation {h['steady_s']:.1f} s**; acc {h['acc']:.4f}, "
            f"acc_norm {h['acc_norm']:.4f}, acc_token_avg {h['acc_token_avg']:.4f} (a short run on books: near "
            f"chance). Goal: all 10,042 items <= {GOALS['hellaswag_s']:.0f} s.",
        ]
    if p.get("decode"):
        c.results["decode"] = p["decode"]
        lines += [
            "",
            *md_table(
                ["decode batch", "prompt", "new tokens", "first call s", "s", "tokens/s"],
                [
                    [
                        d["batch"],
                        d["prompt_tokens"],
                        d["new_tokens"],
                        f"{d['first_call_s']:.2f}",
                        f"{d['seconds']:.3f}",
                        f"{d['tokens_per_sec']:,.0f}",
                    ]
                    for d in p["decode"]
                ],
            ),
            "",
            f"Goal: KV-cache decode at batch 1 >= {GOALS['decode_tokens']:,} tokens/s (greedy, no stop token).",
        ]
    if p.get("error"):
        lines += ["", f"- after-run probe: {p['error']} (what it measured before is above)"]
    c.add(lines, {"metrics": metrics, "after_run": p})


# -- (e) FGPT -------------------------------------------------------------------------------------------


def section_fgpt(c) -> None:
    mb = c.micro["fgpt"]
    overrides = [*(SMOKE_MODEL["fgpt"] if c.smoke else []), *attention_overrides(c)]
    result, err = c.bench("fgpt", "fgpt", overrides, ["scan"], [mb], *c.timing(5, 1))
    for r in result.get("rows", []):
        if "tokens_per_sec" in r:
            c.results["fgpt"] = {
                **r,
                "mfu": mfu(c, r["tokens_per_sec"], result["flops_per_token"], result.get("peak_flops")),
            }
    lines = [
        (bench_note(c, result) + " Muon (the fgpt preset's optimizer), `model.scan_layers=true`: one block compiled.")
        if result.get("rows")
        else "",
        "",
        *throughput_table(c, result),
        "",
        f"Goal on one H100: >= {GOALS['fgpt_tokens']:,} tokens/s.",
        *([f"- {err}"] if err else []),
    ]
    c.add(lines, result)


# -- plan `more` ----------------------------------------------------------------------------------------


def _sweep(c, model: str, candidates, largest: int) -> list[int]:
    """Candidates up to the estimate's largest fitting micro-batch (on CPU smoke: just the smoke one)."""
    return [SMOKE_MICRO] if c.smoke else [m for m in candidates if m <= largest] or [largest]


def section_gpt2_sweep(c) -> None:
    mbs = _sweep(c, "gpt2", (16, 32, 64), c.micro["gpt2"])
    result, err = c.bench("gpt2_sweep", "gpt2_124m", gpt2_step_overrides(c), ["adamw", "muon"], mbs, *c.timing())
    for r in result.get("rows", []):
        if "tokens_per_sec" in r:
            c.results[f"gpt2sweep{r['micro_batch']}_{r['optimizer']}"] = r
    c.add(
        [
            bench_note(c, result) if result.get("rows") else "",
            "",
            *throughput_table(c, result),
            *([f"- {err}"] if err else []),
        ],
        result,
    )


def section_peer_sweep(c) -> None:
    why = torch_status(c)
    if why:
        return c.add([f"Peer: {why}."], {"skipped": why})
    rows, raw = [], {}
    for mb in _sweep(c, "gpt2", (16, 32, 64), c.micro["gpt2"]):
        result, err = run_peer(c, f"sweep{mb}", "gpt2", mb, ["adamw", "muon"])
        raw[mb] = result
        rows += peer_rows(c, result, f"gpt2sweep{mb}") + ([[f"micro-batch {mb}: {err}"] + [""] * 8] if err else [])
    c.add(["Peer: measured (one process, one torch.compile, per micro-batch).", "", *md_table(PEER_HEAD, rows)], raw)


def section_fgpt_sweep(c) -> None:
    overrides = [*(SMOKE_MODEL["fgpt"] if c.smoke else []), *attention_overrides(c)]
    mbs = _sweep(c, "fgpt", (8, 16, 32), c.micro["fgpt"])
    result, err = c.bench("fgpt_sweep", "fgpt", overrides, ["scan", "scan+remat"], mbs, *c.timing(5, 1))
    c.add(
        [
            bench_note(c, result) if result.get("rows") else "",
            "",
            *throughput_table(c, result),
            *([f"- {err}"] if err else []),
        ],
        result,
    )


def section_variants(c) -> None:
    lines, raw = [], []
    for model in ("gpt2",) if c.smoke else ("gpt2", "fgpt"):
        config = "gpt2_124m" if model == "gpt2" else "fgpt"
        overrides = [*(SMOKE_MODEL[model] if c.smoke else []), *attention_overrides(c)]
        for mb, variants in SMOKE_VARIANTS if c.smoke else VARIANT_ROWS[model]:
            result, err = c.bench(f"variants_{model}_{mb}", config, overrides, variants, [mb], *c.timing(5, 1))
            raw.append(result)
            lines += [
                f"{config}, micro-batch {mb}:",
                "",
                *throughput_table(c, result),
                *([f"- {err}"] if err else []),
                "",
            ]
    c.add(lines, raw)


def section_flags(c) -> None:
    rows, raw = [], {}
    mb = SMOKE_MICRO if c.smoke else min(32, c.micro["gpt2"])
    for name in ["O1"] if c.smoke else list(FLAG_SETS):
        env = FLAG_SETS[name]
        result, err = c.bench(f"flags_{name}", "gpt2_124m", gpt2_step_overrides(c), ["adamw"], [mb], *c.timing(), env)
        raw[name] = result
        r = (result.get("rows") or [{}])[0]
        err = err or r.get("error")
        setting = " ".join(f"{k}={v}" for k, v in env.items()) or "(none)"
        rows.append(
            [name, setting, result.get("optimization_level", "")]
            + (
                [err, "", "", "", ""]
                if err
                else [
                    fmt(r["compile_s"], ".1f"),
                    fmt(r["step_ms"], ".1f"),
                    fmt(r["tokens_per_sec"], ",.0f"),
                    fmt(mfu(c, r["tokens_per_sec"], result["flops_per_token"], result.get("peak_flops")), ".1%"),
                    f"{fmt(r.get('xla_gb'))} / {fmt(r.get('peak_mem_gb'), '.1f')}",
                ]
            )
        )
    head = [
        "set",
        "environment",
        "jax_optimization_level",
        "compile s",
        "step ms",
        "tokens/s",
        "MFU",
        "XLA GB / peak GB",
    ]
    c.add(
        [
            f"gpt2, AdamW, micro-batch {mb}, a fresh process per setting (attention {c.attention}).",
            "",
            *md_table(head, rows),
        ],
        raw,
    )


def section_numerics(c) -> None:
    r = c.probe("numerics", *(["--smoke"] if c.smoke else []))
    if isinstance(r, str):
        return c.add([r], r)
    f = r["forward"]
    lines = [
        f"{f['what']}: bf16 vs float32 max abs error {f['max_abs_err']:.3g}, relative L2 {f['rel_err']:.2e}.",
        "",
        "Train steps (AdamW, same init and batches):",
        "",
        *md_table(
            ["step", "loss float32", "loss bf16", "bf16 - float32"],
            [
                [s["step"], f"{s['loss_fp32']:.5f}", f"{s['loss_bf16']:.5f}", f"{s['diff']:+.2e}"]
                for s in r["train_steps"]
            ],
        ),
        "",
        *(f"- {n}" for n in r["notes"]),
        "- head_dim padding 52 -> 64 against 52 -> 56: the environment section's self-test rows (plan `more`).",
    ]
    c.add(lines, r)


def section_optim(c) -> None:
    """Muon vs AdamW at 124M: the tokens each needs to reach AdamW's final val loss (scripts/bench_optim.py)."""
    data, note = shards(c)
    if data is None:
        return c.add([note])
    path = c.work / "bench_optim.json"
    path.unlink(missing_ok=True)
    if c.smoke:
        args = ["--config", "tiny", *(f"--config.{o}" for o in SMOKE_MODEL["gpt2"]), "--config.train.batch_size=4"]
        args += ["--steps", "4", "--eval-every", "2", "--adamw-lrs", "3e-3", "--muon-lrs", "0.02"]
    else:
        args = ["--config", "gpt2_124m", f"--config.model.attention={c.attention}", "--config.train.batch_size=32"]
        args += ["--config.train.grad_accum=1", "--config.data.val_windows=64", "--steps", str(c.args.optim_steps)]
        args += ["--eval-every", "20", "--adamw-lrs", "6e-4", "1.2e-3", "2.4e-3", "--muon-lrs", "0.01", "0.02", "0.04"]
    r = c.python("optim", [str(ROOT / "scripts" / "bench_optim.py"), "--data", str(data), *args, "--json", str(path)])
    table = [ln for ln in r.get("out", "").splitlines() if ln.startswith("|") or ln.startswith("Muon (lr")]
    c.add([note, "", *(table or [c.failed(r) or "no output"])], json.loads(path.read_text()) if path.exists() else None)


def summary(c) -> list[str]:
    """The headline numbers against the goals, last in the report (the device's reply shows the end)."""
    R = c.results
    g2, pr, fg = R.get("gpt2_adamw", {}), R.get("peer_adamw", {}), R.get("fgpt", {})
    h, dec = R.get("hellaswag", {}), {d["batch"]: d for d in R.get("decode", [])}
    rows = [
        ["attention path", c.attention_note or "n/a", "cuDNN self-test passes"],
        [
            "GPT-2 124M AdamW tokens/s (MFU)",
            f"{fmt(g2.get('tokens_per_sec'), ',.0f')} ({fmt(g2.get('mfu'), '.1%')})",
            f">= {GOALS['gpt2_tokens']:,} ({GOALS['gpt2_mfu']:.0%})",
        ],
        ["GPT-2 124M Muon tokens/s", fmt(R.get("gpt2_muon", {}).get("tokens_per_sec"), ",.0f"), ""],
        [
            "fgpt-jax / torch.compile (AdamW; Muon)",
            f"{fmt(pr.get('ratio'))}; {fmt(R.get('peer_muon', {}).get('ratio'))}",
            f">= {GOALS['peer_ratio']}x",
        ],
        [
            "real run: val/loss falling; step program reused",
            f"{R.get('val_falling', 'n/a')}; {R.get('run_cache_hit', 'n/a')}",
            "True; True",
        ],
        ["checkpoint restored == saved", str(R.get("checkpoint_ok", "n/a")), "True"],
        [
            f"HellaSwag {fmt(h.get('items'), ',')} items, after compilation",
            f"{fmt(h.get('steady_s'), '.1f')} s",
            f"<= {GOALS['hellaswag_s']:.0f} s (10,042 items)",
        ],
        [
            "decode batch 1, tokens/s",
            fmt(dec.get(1, {}).get("tokens_per_sec"), ",.0f"),
            f">= {GOALS['decode_tokens']:,}",
        ],
        [
            "FGPT 662.7M (scan) tokens/s (MFU)",
            f"{fmt(fg.get('tokens_per_sec'), ',.0f')} ({fmt(fg.get('mfu'), '.1%')})",
            f">= {GOALS['fgpt_tokens']:,}",
        ],
    ]
    if c.args.plan != "headline":
        rows = rows[:1]
    measured = "measured (smoke: 1-layer stand-ins on CPU, not comparable)" if c.smoke else "measured"
    return md_table(["headline", measured, "goal (one H100)"], rows)


def run_section(c, key: str) -> None:
    globals()[f"section_{key}"](c)


def section_error(c, e: Exception) -> None:
    import traceback

    c.log.write(traceback.format_exc())
    c.add([f"section raised {type(e).__name__}: {cli.one_line(e)}"], None)
