"""Training throughput: the real jitted train step on synthetic tokens, with MFU, memory and compile time.

    python scripts/bench_train.py --config gpt2_124m [--micro-batch 16 32 64] [--grad-accum 1]
                                  [--steps 20] [--warmup 3] [--variant base adamw muon chunked+scan ...]
                                  [--config.model.n_layer=6 ...] [--json results.json]

Each row builds the run exactly as `python -m fgpt_jax.train` does (`fgpt_jax.train.step.build_setup`:
the same mesh, shardings, optax chain and donated step) for the config plus the variant's
overrides, feeds random tokens already on the device, compiles the step ahead of time (timed:
*compile s*, tracing included), runs --warmup steps, then times --steps steps with a single sync
at the end. Columns:
  tokens/s   micro-batch x grad-accum x T x steps / time
  MFU        tokens/s x FLOPs per token / (devices x the device's dense bf16 peak), PaLM convention
             (6 x non-embedding-position params + 12 x layers x width x T, attention not halved for
             causality; GPT-2 124M at T=1024: 855 MFLOP/token); n/a without a known peak (CPU)
  XLA GB     the compiled step's own buffers (arguments + outputs - donated aliases + temporaries),
             from XLA's memory analysis: per row, also on CPU
  peak GB    the device allocator's peak since the process started (GPU; rows run in increasing
             size, so it is this row's peak unless an earlier row was larger)
Prints a markdown table; with --json, writes the rows after every row (a killed run keeps what it had).

Variants (overrides on top of the config; join several with '+', e.g. scan+remat):
    base    the config as it is              xla / cudnn   model.attention=xla / cudnn
    remat   model.remat=true                 adamw / muon  optim.name=adamw / muon
    fp32    model.dtype=float32              bf16          model.dtype=bfloat16
    chunked model.loss_chunk=128 (fused chunked LM head + cross-entropy)
    scan    model.scan_layers=true (one lax.scan over the blocks)
    pad56 / pad64   model.attention_pad=8 / 64 (cuDNN head_dim padding: FGPT's 52 -> 56 / 64)
    ns_bf16 optim.ns_dtype=bfloat16 (Newton-Schulz in bf16; skipped where OptimConfig has no ns_dtype)
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from fgpt_jax import cli
from fgpt_jax import sharding as shd
from fgpt_jax.config import ConfigError, apply_overrides, load_config, split_config_args
from fgpt_jax.data import Batch
from fgpt_jax.metrics import mfu, peak_flops
from fgpt_jax.train.step import build_setup

VARIANTS = {
    "base": [],
    "xla": ["model.attention=xla"],
    "cudnn": ["model.attention=cudnn"],
    "remat": ["model.remat=true"],
    "adamw": ["optim.name=adamw"],
    "muon": ["optim.name=muon"],
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "chunked": ["model.loss_chunk=128"],
    "scan": ["model.scan_layers=true"],
    "pad56": ["model.attention_pad=8"],
    "pad64": ["model.attention_pad=64"],
    "ns_bf16": ["optim.ns_dtype=bfloat16"],
}
COLUMNS = [
    "variant",
    "micro-batch",
    "accum",
    "dtype",
    "attention",
    "remat",
    "scan",
    "loss chunk",
    "pad",
    "optimizer",
    "compile s",
    "step ms",
    "tokens/s",
    "MFU",
    "XLA GB",
    "peak GB",
]


def variant_overrides(name: str) -> list[str]:
    """The overrides of a variant name such as "scan+remat"; ValueError for an unknown part."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown or not name:
        raise ValueError(
            f"--variant {name}: unknown {unknown[0] if unknown else 'empty name'!r}; "
            f"choose from {', '.join(VARIANTS)} (join several with '+')"
        )
    return [o for p in parts for o in VARIANTS[p]]


def peak_memory_gb(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def program_memory_gb(compiled) -> float | None:
    """Arguments + outputs - donated aliases + temporaries of a compiled executable, in GiB."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return total / 2**30


def bench_one(cfg, steps: int, warmup: int, mesh) -> dict:
    t = cfg.train
    T = t.seq_len or cfg.model.block_size
    micro = t.batch_size // t.grad_accum
    setup = build_setup(cfg, mesh)
    state = setup.init(None)
    rng = np.random.default_rng(0)
    host = Batch.of_tokens(rng.integers(0, 50257, (t.grad_accum, micro, T + 1), dtype=np.int32))
    batch = Batch(*(shd.global_batch(x, shd.batch_sharding(mesh, 3, batch_axis=1)) for x in host))
    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()  # tracing + XLA compilation
    compile_s = time.perf_counter() - start
    metrics = None
    for _ in range(warmup):  # first executions: allocations, autotuning caches
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):  # no host sync inside: dispatch runs ahead, as in the trainer
        state, metrics = compiled(state, batch)
    loss = float(jax.device_get(metrics["train/loss"]))
    elapsed = time.perf_counter() - start
    tok_s = steps * t.batch_size * T / elapsed
    util = mfu(tok_s, cfg.model.flops_per_token(T), mesh.size, peak_flops())
    return {
        "compile_s": compile_s,
        "step_ms": 1000 * elapsed / steps,
        "tokens_per_sec": tok_s,
        "mfu": util,
        "loss": loss,
        "xla_gb": program_memory_gb(compiled),
        "peak_mem_gb": peak_memory_gb(jax.devices()[0]),
    }


def _row_cells(row: dict) -> list[str]:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    head = [
        row["variant"],
        str(row["micro_batch"]),
        str(row["grad_accum"]),
        row.get("dtype", ""),
        row.get("attention", ""),
        str(row.get("remat", "")),
        str(row.get("scan_layers", "")),
        str(row.get("loss_chunk", "")),
        str(row.get("attention_pad", "")),
        row.get("optimizer", ""),
    ]
    if "error" in row or "skipped" in row:
        return head + [row.get("error") or f"skipped: {row['skipped']}"] + [""] * 5
    return head + [
        f"{row['compile_s']:.1f}",
        f"{row['step_ms']:.1f}",
        f"{row['tokens_per_sec']:,.0f}",
        fmt(row["mfu"], ".1%"),
        fmt(row["xla_gb"], ".2f"),
        fmt(row["peak_mem_gb"], ".1f"),
    ]


def markdown_row(row: dict) -> str:
    return "| " + " | ".join(_row_cells(row)) + " |"


def table_header() -> str:
    align = ["---"] + ["---:"] * 2 + ["---"] * 7 + ["---:"] * 6
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(align) + "|"


def _write_json(path: str, header: dict, rows: list[dict]) -> None:
    """The rows and the markdown table as printed (for scripts/gpu/check.py), atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        table = [*table_header().splitlines(), *map(markdown_row, rows)]
        json.dump({**header, "rows": rows, "markdown": table}, f, indent=1)
    os.replace(tmp, path)


def _parser() -> cli.Parser:
    p = cli.Parser(
        prog="python scripts/bench_train.py",
        description=__doc__.splitlines()[0],
        epilog="Config: --config PRESET_OR_FILE (default gpt2_124m) and --config.a.b=VALUE overrides.",
    )
    p.add_argument(
        "--micro-batch",
        type=cli.positive_int,
        nargs="+",
        help="sequences per micro-batch (global); default: the config's",
    )
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=cli.int_in(0), default=3, help="untimed steps after compiling (default 3)")
    p.add_argument(
        "--variant",
        nargs="+",
        default=["base"],
        metavar="NAME",
        help=f"variants, '+' joins several (default base): {', '.join(VARIANTS)}",
    )
    p.add_argument("--json", metavar="FILE", help="write the rows to this file (after every row)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        spec, overrides, rest = split_config_args(argv)
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    for v in args.variant:
        try:
            variant_overrides(v)
        except ValueError as e:
            parser.error(str(e))

    def body() -> int:
        base = apply_overrides(load_config(spec or "gpt2_124m"), overrides)
        mesh = shd.make_mesh()
        dev = jax.devices()[0]
        T = base.train.seq_len or base.model.block_size
        header = {
            "device": dev.device_kind,
            "platform": dev.platform,
            "devices": mesh.size,
            "jax": jax.__version__,
            "config": base.name,
            "params": base.model.num_params(),
            "seq_len": T,
            "flops_per_token": base.model.flops_per_token(T),
            "peak_flops": peak_flops(),
            "steps": args.steps,
            "warmup": args.warmup,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
            "optimization_level": str(getattr(jax.config, "jax_optimization_level", "n/a")),
        }
        print(
            f"jax {jax.__version__}, {mesh.size} x {dev.device_kind}, config {base.name} "
            f"({base.model.num_params() / 1e6:.1f}M params), T={T}, {args.steps} timed steps after "
            f"{args.warmup} warm-up; MFU: PaLM FLOPs/token {base.model.flops_per_token(T) / 1e6:.0f}M over "
            f"{'n/a' if peak_flops() is None else f'{peak_flops() / 1e12:.0f} TFLOP/s'} per device"
        )
        print(table_header(), flush=True)
        rows = []
        for variant in args.variant:
            for micro in args.micro_batch or [base.train.batch_size // base.train.grad_accum]:
                row = {"variant": variant, "micro_batch": micro, "grad_accum": args.grad_accum}
                try:
                    cfg = apply_overrides(
                        base,
                        variant_overrides(variant)
                        + [f"train.batch_size={micro * args.grad_accum}", f"train.grad_accum={args.grad_accum}"],
                    )
                except ConfigError as e:  # e.g. optim.ns_dtype before the optimizer has it
                    row["skipped"] = cli.one_line(e).split(";")[0]
                else:
                    m = cfg.model
                    row.update(
                        dtype=m.dtype,
                        attention=m.attention,
                        remat=m.remat,
                        scan_layers=m.scan_layers,
                        loss_chunk=m.loss_chunk,
                        attention_pad=m.attention_pad,
                        optimizer=cfg.optim.name,
                    )
                    try:
                        row.update(bench_one(cfg, args.steps, args.warmup, mesh))
                    except Exception as e:  # e.g. out of memory at a large micro-batch: report it, go on
                        row["error"] = f"{type(e).__name__}: {cli.one_line(e)[:300]}"
                rows.append(row)
                print(markdown_row(row), flush=True)
                if args.json:
                    _write_json(args.json, header, rows)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
