"""The sections of scripts/gpu_check.py: what each measures, how it is run, and its part of the report.

Each `section_*` takes the `Check` of the call (its `python`/`probe`/`bench` subprocess helpers run under
the call's time budget) and adds one titled block of markdown and its raw data with `c.add`. The tables
below say what is measured: models and micro-batches, the variants, the XLA/JAX settings.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

from fgpt_jax import cli

ROOT = Path(__file__).resolve().parent.parent

MODELS = {  # config preset, torch_ref_bench name, micro-batches, (label, bench variant, torch optimizer)
    "gpt2": ("gpt2_124m", "gpt2", [16, 32, 64], [("AdamW", "adamw", "adamw"), ("Muon", "muon", "muon")]),
    "fgpt": ("fgpt", "fgpt", [8, 16, 32], [("Muon", "base", "muon"), ("Muon, remat", "remat", "muon")]),
}
VARIANT_ROWS = {
    "gpt2": [(64, ["adamw", "adamw+chunked", "adamw+scan"]), (32, ["muon", "muon+ns_bf16"])],
    "fgpt": [(16, ["base", "scan", "pad64", "scan+remat"])],
}
# --smoke: every code path once, at the least cost on 2 CPU cores (one group per model, fewer compiles).
# FGPT's stand-in keeps its odd head_dim (104 / 2 = 52).
SMOKE_MODEL = {
    "gpt2": ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.block_size=32"],
    "fgpt": ["model.n_layer=1", "model.n_embd=104", "model.n_head=2", "model.block_size=32"],
}
SMOKE_GROUPS = {"gpt2": [("AdamW", "adamw", "adamw")], "fgpt": [("Muon, remat", "remat", "muon")]}
SMOKE_VARIANTS = [(2, ["chunked+scan+pad64", "ns_bf16"])]
FLAG_SETS = {
    "default": {},
    "mem95": {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".95"},
    "O1": {"JAX_OPTIMIZATION_LEVEL": "O1"},
    "lhs": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    "cublas": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
    "lhs+cublas+mem95": {
        "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": ".95",
    },
}


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]


def section_env(c) -> None:
    r = c.probe("env")
    lines = [r] if isinstance(r, str) else md_table(["what", "value"], [[x["what"], x["value"]] for x in r["rows"]])
    c.add("Environment", lines, r)


def section_numerics(c) -> None:
    r = c.probe("numerics", *(["--smoke"] if c.smoke else []))
    if isinstance(r, str):
        return c.add("Numerics", [r], r)
    att = [
        [
            x["head_dim"],
            x["padded_to"],
            x.get("heads", ""),
            x.get("shape", ""),
            x["implementation"],
            *(
                [x["error"], "", "", "", ""]
                if "error" in x
                else [
                    f"{x['out_err_vs_fp32']:.2e}",
                    f"{x['grad_err_vs_fp32']:.2e}",
                    f"{x['xla_bf16_out_err_vs_fp32']:.2e}",
                    f"{x['xla_bf16_grad_err_vs_fp32']:.2e}",
                    f"{x['out_err_vs_xla_bf16']:.2e}",
                ]
            ),
        ]
        for x in r["attention"]
    ]
    f = r["forward"]
    lines = [
        "Attention, causal, random normal q/k/v and output cotangent; max abs error against XLA in float32:",
        "",
        *md_table(
            [
                "head dim",
                "padded to",
                "heads",
                "B x T",
                "implementation",
                "out err",
                "grad err",
                "XLA bf16 out err",
                "XLA bf16 grad err",
                "out vs XLA bf16",
            ],
            att,
        ),
        "",
        f"{f['what']}: bf16 vs float32 max abs error {f['max_abs_err']:.3g}, mean {f['mean_abs_err']:.3g} "
        f"(largest |logit| {f['max_abs_logit']:.3g}).",
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
    ]
    c.add("Numerics", lines, r)


def _torch_status(c) -> str | None:
    """None if the PyTorch reference can run here, else why not."""
    ref = c.assets / "torch_ref_bench.py"
    if not ref.is_file():
        return f"skipped: {ref} missing (run scripts/fetch_gpu_wheels.sh and carry .gpu)"
    r = c.python("torch?", ["-c", "import torch; print('TORCH', torch.__version__, torch.cuda.is_available())"])
    if c.failed(r):
        return "skipped: torch is not installed here" if "No module named" in r.get("out", "") else c.failed(r)
    version, cuda = r["out"].split("TORCH ")[-1].split()[:2]
    return None if cuda == "True" else f"skipped: torch {version} has no CUDA device here (the reference needs a GPU)"


def section_throughput(c, model: str) -> None:
    config, tname, micro, groups = MODELS[model]
    micro, groups = ([2], SMOKE_GROUPS[model]) if c.smoke else (c.args.micro_batches or micro, groups)
    do_jax, do_peer = "throughput" in c.args.sections, "peer" in c.args.sections
    peer_note = _torch_status(c) if do_peer else "not selected"
    torch_rows, rows, notes, raw = {}, [], [], {}
    for label, variant, topt in groups:
        jax_rows = {}
        if do_jax:
            result, err = c.bench(f"{model}_{variant}", model, [variant], micro)
            raw[label] = result
            jax_rows = {r["micro_batch"]: r for r in result["rows"]}
            if err:
                notes.append(f"fgpt-jax {label}: {err}")
        for mb in micro:
            if do_peer and peer_note is None and (mb, topt) not in torch_rows:
                r = c.python(
                    f"torch {tname} {mb} {topt}",
                    [str(c.assets / "torch_ref_bench.py"), tname, str(mb), str(c.args.steps), topt],
                )
                err = c.failed(r)
                line = next((ln for ln in reversed(r.get("out", "").splitlines()) if ln.startswith("{")), None)
                torch_rows[(mb, topt)] = {"error": err} if err or line is None else json.loads(line)
            j, t = jax_rows.get(mb, {}), torch_rows.get((mb, topt), {})
            jerr = j.get("error") or j.get("skipped")
            ratio = j["tokens_per_sec"] / t["tokens_per_s"] if "tokens_per_sec" in j and "tokens_per_s" in t else None
            rows.append(
                [
                    label,
                    mb,
                    *(
                        [jerr, "", "", "", "", ""]
                        if jerr
                        else [
                            fmt(j.get("step_ms"), ".1f"),
                            fmt(j.get("tokens_per_sec"), ",.0f"),
                            fmt(j.get("mfu"), ".1%"),
                            fmt(j.get("compile_s"), ".1f"),
                            fmt(j.get("xla_gb")),
                            fmt(j.get("peak_mem_gb"), ".1f"),
                        ]
                    ),
                    t.get("error") or fmt(t.get("tokens_per_s"), ",.0f"),
                    fmt(t.get("mfu_989"), ".1%"),
                    fmt(t.get("max_mem_gb"), ".1f"),
                    fmt(ratio, ".2f"),
                ]
            )
    head = next((r for r in raw.values() if r.get("rows")), {})
    lines = [
        f"Config `{config}`{' (smoke overrides: ' + ', '.join(SMOKE_MODEL[model]) + ')' if c.smoke else ''}, "
        f"T = {head.get('seq_len', 'n/a')}, {head.get('steps', c.args.steps)} timed steps; MFU: PaLM convention, "
        f"{fmt(head['flops_per_token'] / 1e6 if head else None, '.0f')} MFLOP/token over "
        f"{fmt(head['peak_flops'] / 1e12 if head.get('peak_flops') else None, '.0f')} TFLOP/s dense bf16. Peer: "
        f"{'measured' if peer_note is None else peer_note}.",
        "",
        *md_table(
            [
                "optimizer",
                "micro-batch",
                "step ms",
                "tokens/s",
                "MFU",
                "compile s",
                "XLA GB",
                "peak GB",
                "torch tokens/s",
                "torch MFU",
                "torch GB",
                "fgpt-jax / torch",
            ],
            rows,
        ),
        "",
        *(f"- {n}" for n in notes),
    ]
    c.add(f"Throughput: {model}", lines, {"jax": raw, "torch": {f"{k[0]} {k[1]}": v for k, v in torch_rows.items()}})


def section_variants(c, model: str) -> None:
    lines, raw = [], []
    for mb, variants in SMOKE_VARIANTS if c.smoke else VARIANT_ROWS[model]:
        result, err = c.bench(f"variants_{model}_{mb}", model, variants, [mb])
        raw.append(result)
        lines += [*result.get("markdown", []), *([f"- {err}"] if err else []), ""]  # bench_train's own table
    c.add(f"Variants: {model}", lines, raw)


def section_flags(c) -> None:
    rows, raw = [], {}
    mb = 2 if c.smoke else 32
    for name in c.args.flag_sets:
        env = FLAG_SETS[name]
        result, err = c.bench(f"flags_{name}", "gpt2", ["adamw"], [mb], env)
        raw[name] = result
        r = (result["rows"] or [{}])[0]
        err = err or r.get("error")
        setting = " ".join(f"{k}={v}" for k, v in env.items()) or "(none)"
        rows.append(
            [
                name,
                setting,
                result.get("optimization_level", ""),
                *(
                    [err, "", "", "", ""]
                    if err
                    else [
                        fmt(r["compile_s"], ".1f"),
                        fmt(r["step_ms"], ".1f"),
                        fmt(r["tokens_per_sec"], ",.0f"),
                        fmt(r["mfu"], ".1%"),
                        f"{fmt(r['xla_gb'])} / {fmt(r['peak_mem_gb'], '.1f')}",
                    ]
                ),
            ]
        )
    c.add(
        "XLA/JAX settings: gpt2, AdamW, micro-batch " + str(mb),
        md_table(
            [
                "set",
                "environment",
                "jax_optimization_level",
                "compile s",
                "step ms",
                "tokens/s",
                "MFU",
                "XLA GB / peak GB",
            ],
            rows,
        ),
        raw,
    )


def _shards(c) -> tuple[Path | None, str]:
    """The Gutenberg books as shards in the work directory (tokenised once per call): (dir, what happened)."""
    books = c.args.books or sorted(glob.glob(str(c.assets / "gutenberg" / "*.txt")))
    blocks = []
    if not books and c.smoke:  # no Gutenberg here: the bundled Tiny Shakespeare, one document per speech
        books, blocks = [str(ROOT / "fgpt_jax" / "assets" / "tinyshakespeare.txt")], ["--blocks"]
    if not books:
        return None, "skipped: the Gutenberg books are missing (run scripts/fetch_gpu_wheels.sh and carry .gpu)"
    shards = c.work / "shards"
    if (shards / "manifest.json").is_file():
        return shards, f"Shards: {len(books)} file(s), tokenised earlier in this call"
    shutil.rmtree(shards, ignore_errors=True)
    r = c.python("data", ["-m", "fgpt_jax.data", "text", *books, *blocks, "--out", str(shards), "--no-progress"])
    if c.failed(r):
        return None, f"tokenising: {c.failed(r)}"
    return (
        shards,
        f"Shards: {len(books)} file(s) tokenised in {r['seconds']:.1f} s: `{r['out'].strip().splitlines()[-1]}`",
    )


def section_optim(c) -> None:
    """Muon vs AdamW at 124M: the tokens each needs to reach AdamW's final val loss (scripts/bench_optim.py)."""
    shards, note = _shards(c)
    if shards is None:
        return c.add("Optimizer: Muon vs AdamW", [note])
    path = c.work / "bench_optim.json"
    path.unlink(missing_ok=True)
    args = (
        [
            "--config",
            "tiny",
            *(f"--config.{o}" for o in SMOKE_MODEL["gpt2"]),
            "--config.train.batch_size=4",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--adamw-lrs",
            "3e-3",
            "--muon-lrs",
            "0.02",
        ]
        if c.smoke
        else [
            "--config",
            "gpt2_124m",
            "--config.train.batch_size=32",
            "--config.train.grad_accum=1",
            "--config.data.val_windows=64",
            "--steps",
            str(c.args.optim_steps),
            "--eval-every",
            "20",
            "--adamw-lrs",
            "6e-4",
            "1.2e-3",
            "2.4e-3",
            "--muon-lrs",
            "0.01",
            "0.02",
            "0.04",
        ]
    )
    r = c.python("optim", [str(ROOT / "scripts" / "bench_optim.py"), "--data", str(shards), *args, "--json", str(path)])
    table = [ln for ln in r["out"].splitlines() if ln.startswith("|") or ln.startswith("Muon (lr")]
    c.add(
        "Optimizer: Muon vs AdamW",
        [note, "", *(table or [c.failed(r) or "no output"])],
        json.loads(path.read_text()) if path.exists() else None,
    )


def section_run(c) -> None:
    a, lines = c.args, []
    hellaswag = a.hellaswag or (
        ROOT / "tests" / "data" / "hellaswag_val_200.txt" if c.smoke else c.assets / "hellaswag_val_full.txt.bz2"
    )
    if not Path(hellaswag).is_file():
        return c.add("Real run", [f"skipped: {hellaswag} missing (run scripts/fetch_gpu_wheels.sh and carry .gpu)"])
    shards, note = _shards(c)
    if shards is None:
        return c.add("Real run", [note])
    run = c.work / "run"
    for d in (run, c.work / "ckpt_copy"):
        shutil.rmtree(d, ignore_errors=True)
    lines.append(note)
    config = "tiny" if c.smoke else "gpt2_124m"
    overrides = (
        [
            "model.n_layer=1",
            "model.n_embd=64",
            "model.n_head=2",
            "model.block_size=32",
            "train.steps=6",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.eval_every=3",
            "train.ckpt_every=3",
            "train.log_every=1",
            "data.val_windows=8",
            "optim.warmup_steps=2",
            "train.sample_tokens=4",
        ]
        if c.smoke
        else [
            f"train.steps={a.run_steps}",
            "train.batch_size=64",
            "train.grad_accum=2",
            "train.log_every=10",
            f"train.eval_every={max(a.run_steps // 3, 1)}",
            f"train.ckpt_every={max(a.run_steps // 3, 1)}",
            "train.hellaswag_every=0",
            "train.core_every=0",  # the preset's CORE would download nanochat's bundle at the end
            "train.sample_every=0",
            "data.val_windows=128",
            f"optim.warmup_steps={max(a.run_steps // 10, 1)}",
        ]
    )
    overrides += [f"data.path={shards}"]
    r = c.python(
        "train", ["-m", "fgpt_jax.train", "--config", config, "--run", str(run), *(f"--config.{o}" for o in overrides)]
    )
    metrics = (
        [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").is_file()
        else []
    )
    lines.append(
        f"`python -m fgpt_jax.train --config {config} {' '.join('--config.' + o for o in overrides)}`: "
        + (c.failed(r) or f"{r['seconds']:.0f} s wall clock (start, compile, steps, evaluations, saves)")
    )
    by_step: dict = {}
    for m in metrics:
        by_step.setdefault(m["step"], {}).update({k: v for k, v in m.items() if isinstance(v, (int, float))})
    shown = [s for s, m in sorted(by_step.items()) if "val/loss" in m or s == min(by_step)]
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
        trend = "falling" if vals[-1] < vals[0] else "NOT falling"
        lines += ["", f"val/loss {vals[0]:.3f} -> {vals[-1]:.3f}: {trend}."]
    if c.failed(r):
        return c.add("Real run", lines, {"metrics": metrics})
    limit = (
        ["--limit", "8", "--batch-size", "4", "--new-tokens", "8"]
        if c.smoke
        else ["--batch-size", str(a.hellaswag_batch)]
    )
    p = c.probe(
        "after-run", "--run", str(run), "--hellaswag", str(hellaswag), "--copy-to", str(c.work / "ckpt_copy"), *limit
    )
    if isinstance(p, str):
        lines += ["", f"checkpoint / HellaSwag / decode: {p}"]
    else:
        h = p["hellaswag"]
        lines += [
            "",
            *md_table(["what", "seconds"], [[x["what"], f"{x['seconds']:.2f}"] for x in p["rows"]]),
            "",
            f"HellaSwag, {h['items']:,} items ({h['batch_items']} per call, {p['dtype']}): first call (compiles) "
            f"{h['first_call_s']:.1f} s, second call {h['steady_s']:.1f} s; acc {h['acc']:.4f}, acc_norm "
            f"{h['acc_norm']:.4f}, acc_token_avg {h['acc_token_avg']:.4f} (a short run on books: near chance).",
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
        ]
    c.add("Real run", lines, {"metrics": metrics, "after_run": p})


def run_sections(c) -> None:
    """The selected sections, in the order of SECTIONS in gpu_check.py; a section that raises reports
    its error in the report and the next one runs."""
    sel = c.args.sections
    jobs = [("env", lambda: section_env(c))]
    if {"throughput", "peer"} & set(sel):
        jobs += [
            ("throughput" if "throughput" in sel else "peer", lambda m=m: section_throughput(c, m))
            for m in c.args.models
        ]
    jobs += [
        ("numerics", lambda: section_numerics(c)),
        ("run", lambda: section_run(c)),
        ("optim", lambda: section_optim(c)),
    ]
    models = c.args.models[:1] if c.smoke else c.args.models  # smoke: one small variants table
    jobs += [("variants", lambda m=m: section_variants(c, m)) for m in models]
    jobs += [("flags", lambda: section_flags(c))]
    for name, job in jobs:
        if name not in sel:
            continue
        try:
            job()
        except Exception as e:  # a broken section reports itself; the others still run
            import traceback

            c.log.write(traceback.format_exc())
            c.add(f"{name}: error", [f"error: {type(e).__name__}: {cli.one_line(e)}"], None)
