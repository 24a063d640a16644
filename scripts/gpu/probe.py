"""The in-JAX measurements of scripts/gpu_check.py, one per subcommand, each in its own process.

    python scripts/gpu_probe.py env       --json OUT.json
    python scripts/gpu_probe.py numerics  --json OUT.json [--smoke]
    python scripts/gpu_probe.py after-run --json OUT.json --run DIR --hellaswag FILE [--limit N]
                                          [--batch-size N] [--new-tokens N] [--copy-to DIR]

gpu_check.py starts these as subprocesses so that it never initialises a device itself (JAX takes
75% of the GPU's memory at start) and so that a crash or an out-of-memory in one leaves the others
running. Each writes one JSON object: {"rows": [...], "notes": [...], ...}; gpu_check renders it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "array_record",
    "tensorboardX",
    "tiktoken",
    "numpy",
    "torch",
    "nvidia-cudnn-cu13",
    "nvidia-cudnn-cu12",
)
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP_", "CUDA_VISIBLE", "NVIDIA_TF32")


def env_info() -> dict:
    """Versions (and where each came from), the devices, cuDNN, and the XLA/JAX settings in force."""
    rows = [("python", f"{platform.python_version()} ({sys.executable})")]
    for name in DISTRIBUTIONS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        rows.append((name, f"{dist.version} ({dist.locate_file('')})"))
    import fgpt_jax

    rows.append(("fgpt_jax imported from", os.path.dirname(fgpt_jax.__file__)))
    devices = jax.devices()
    d = devices[0]
    rows.append(("devices", f"{len(devices)} x {d.device_kind} ({d.platform})"))
    if getattr(d, "compute_capability", None):
        rows.append(("compute capability", d.compute_capability))
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        rows.append(("memory JAX may use (bytes_limit)", f"{stats['bytes_limit'] / 2**30:.1f} GiB"))
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            v = cuda_versions.cudnn_get_version()
            rows.append(("cuDNN", f"{v // 10000}.{v // 100 % 100}.{v % 100} ({v})"))
            rows.append(("CUDA runtime", str(cuda_versions.cuda_runtime_get_version())))
    except Exception as e:  # CPU-only jaxlib, or an API that moved
        rows.append(("cuDNN", f"unknown ({type(e).__name__})"))
    for key in ("jax_optimization_level", "jax_memory_fitting_level", "jax_default_matmul_precision"):
        rows.append((key, str(getattr(jax.config, key, "n/a (this jax has no such option)"))))
    for key in sorted(k for k in os.environ if k.startswith(ENV_PREFIXES)):
        rows.append((f"${key}", os.environ[key]))
    if not any(k == "XLA_FLAGS" for k in os.environ):
        rows.append(("$XLA_FLAGS", "(unset: XLA defaults)"))
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        rows.append(("nvidia-smi", (out.stdout or out.stderr).strip()))
    return {"rows": [{"what": k, "value": v} for k, v in rows]}


# -- numerics --------------------------------------------------------------------------------------


def _attention_case(B, T, N, H, pad, implementation, seed=0) -> dict:
    from fgpt_jax.model import causal_attention

    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, ct = (jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)

    def run(impl, dtype, pad_multiple):
        f = jax.jit(lambda q, k, v: causal_attention(q, k, v, implementation=impl, pad_multiple=pad_multiple))
        out, vjp = jax.vjp(f, *(x.astype(dtype) for x in (q, k, v)))
        return [np.asarray(x, np.float32) for x in (out, *vjp(ct.astype(dtype)))]

    with jax.default_matmul_precision("float32"):
        ref = run("xla", jnp.float32, 1)
    xla16 = run("xla", jnp.bfloat16, 1)
    cand = run(implementation, jnp.bfloat16, pad)
    err = lambda a, b: float(max(np.abs(x - y).max() for x, y in zip(a, b)))  # noqa: E731
    P = -(-H // pad) * pad
    return {
        "head_dim": H,
        "padded_to": P,
        "heads": N,
        "shape": f"{B}x{T}",
        "implementation": f"{implementation} bf16",
        "out_err_vs_fp32": err(cand[:1], ref[:1]),
        "grad_err_vs_fp32": err(cand[1:], ref[1:]),
        "xla_bf16_out_err_vs_fp32": err(xla16[:1], ref[:1]),
        "xla_bf16_grad_err_vs_fp32": err(xla16[1:], ref[1:]),
        "out_err_vs_xla_bf16": err(cand[:1], xla16[:1]),
        "max_abs_out": float(np.abs(ref[0]).max()),
    }


def _loss_compare(preset_cfg, B, T, steps) -> tuple[dict, list[dict]]:
    """gpt2 forward logits and a few real train steps (AdamW), bf16 vs float32, from the same init
    (build_setup's, seeded: the parameters are float32 either way) and the same batches."""
    from flax import nnx

    from fgpt_jax import sharding as shd
    from fgpt_jax.config import apply_overrides
    from fgpt_jax.data import Batch
    from fgpt_jax.train.step import build_setup

    rng = np.random.default_rng(0)
    batches = [Batch.of_tokens(rng.integers(0, 50257, (1, B, T + 1), dtype=np.int32)) for _ in range(steps)]
    mesh = shd.make_mesh()
    logits, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = apply_overrides(
            preset_cfg, [f"model.dtype={dtype}", f"train.batch_size={B}", "train.grad_accum=1", "optim.name=adamw"]
        )
        with jax.default_matmul_precision("float32" if dtype == "float32" else "default"):
            setup = build_setup(cfg, mesh)
            state = setup.init(None)
            forward = jax.jit(lambda p, x: nnx.merge(setup.graphdef, p)(x))
            logits[dtype] = np.asarray(forward(state.params, jnp.asarray(batches[0].tokens[0, :, :-1])))
            losses[dtype] = []
            for b in batches:
                state, metrics = setup.train_step(state, Batch(*(jnp.asarray(x) for x in b)))
                losses[dtype].append(float(metrics["train/loss"]))
    diff = np.abs(logits["bfloat16"] - logits["float32"])
    forward = {
        "what": f"{preset_cfg.name} forward logits, {B}x{T}",
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "max_abs_logit": float(np.abs(logits["float32"]).max()),
    }
    steps_rows = [
        {"step": i + 1, "loss_fp32": a, "loss_bf16": b, "diff": b - a}
        for i, (a, b) in enumerate(zip(losses["float32"], losses["bfloat16"]))
    ]
    return forward, steps_rows


def numerics(smoke: bool) -> dict:
    from fgpt_jax.config import load_config

    on_gpu = jax.default_backend() == "gpu"
    impl = "cudnn" if on_gpu else "xla"
    notes = [] if on_gpu else ["no GPU: cuDNN is absent, so the padded XLA path stands in for it (same padding)"]
    B, T = (2, 32) if smoke else (4, 1024)
    cases = [(2, 64, 8), (2, 52, 64)] if smoke else [(12, 64, 8), (24, 52, 8), (24, 52, 64)]
    attention = []
    for N, H, pad in cases:
        try:
            attention.append(_attention_case(B, T, N, H, pad, impl))
        except Exception as e:  # e.g. a cuDNN that refuses a shape: report the case, keep going
            attention.append(
                {
                    "head_dim": H,
                    "padded_to": -(-H // pad) * pad,
                    "implementation": f"{impl} bf16",
                    "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                }
            )
    preset = load_config("gpt2_124m")
    if smoke:
        from fgpt_jax.config import apply_overrides

        preset = apply_overrides(
            preset, ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.block_size=32"]
        )
    forward, steps = _loss_compare(preset, 2 if smoke else 8, T, 1 if smoke else 3)
    notes.append("float32 runs use jax.default_matmul_precision('float32') (no TF32); bf16 runs the default")
    return {"attention": attention, "forward": forward, "train_steps": steps, "notes": notes}


# -- after the real run: checkpoint, HellaSwag, decode --------------------------------------------


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def after_run(run: Path, hellaswag: Path, limit: int | None, batch_size: int, new_tokens: int, copy_to: Path) -> dict:
    from flax import nnx

    from fgpt_jax import sharding as shd
    from fgpt_jax.checkpoint import Checkpoints, load_model
    from fgpt_jax.data.hellaswag import load_examples
    from fgpt_jax.eval.hellaswag import HellaSwagScorer
    from fgpt_jax.inference.generator import Generator
    from fgpt_jax.rundir import RunDir
    from fgpt_jax.train.step import build_setup

    rows = []
    cfg = RunDir(run).read_config()
    setup = build_setup(cfg, shd.make_mesh())
    ckpts = Checkpoints(RunDir(run).checkpoints, read_only=True)
    step = ckpts.latest_step()
    (state, data_state), restore_s = _timed(lambda: ckpts.restore(step, setup.abstract_state))
    ckpts.close()
    size = sum(f.stat().st_size for f in (RunDir(run).checkpoints / str(step)).rglob("*") if f.is_file())
    rows.append(
        {"what": f"checkpoint restore (full train state, step {step}, {size / 2**20:,.0f} MiB)", "seconds": restore_s}
    )
    shutil.rmtree(copy_to, ignore_errors=True)
    out = Checkpoints(copy_to, async_save=False, keep_best=False)
    _, save_s = _timed(lambda s=state: (out.save(step, s, data_state), out.wait()))  # bound now: `del state` below
    out.close()
    rows.append({"what": "checkpoint save (same state, synchronous, to local disk)", "seconds": save_s})
    del state
    (model, _), load_s = _timed(lambda: load_model(run))
    rows.append({"what": "load_model (params only, for evaluation/generation)", "seconds": load_s})
    graphdef, params = nnx.split(model, nnx.Param)

    examples = load_examples(hellaswag, limit)
    scorer, build_s = _timed(lambda: HellaSwagScorer(examples, cfg.model.block_size, batch_size=batch_size))
    metrics, first_s = _timed(lambda: scorer(graphdef, params))
    _, steady_s = _timed(lambda: scorer(graphdef, params))
    hs = {
        "items": len(examples),
        "batch_items": scorer.batch_size,
        "build_s": build_s,
        "first_call_s": first_s,
        "steady_s": steady_s,
        **{k: metrics[k] for k in ("acc", "acc_norm", "acc_token_avg")},
    }

    gen = Generator(graphdef, params, stop_ids=())  # no stop token: every row decodes all new tokens
    rng = np.random.default_rng(0)
    decode = []
    for B in (1, 16):
        prompts = rng.integers(0, 50257, (B, 16)).tolist()
        _, first = _timed(lambda: gen.generate(prompts, new_tokens, temperature=0))
        _, best = _timed(lambda: gen.generate(prompts, new_tokens, temperature=0))
        decode.append(
            {
                "batch": B,
                "prompt_tokens": 16,
                "new_tokens": new_tokens,
                "first_call_s": first,
                "seconds": best,
                "tokens_per_sec": B * new_tokens / best,
            }
        )
    return {"rows": rows, "hellaswag": hs, "decode": decode, "dtype": cfg.model.dtype}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["env", "numerics", "after-run"])
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--run", type=Path)
    p.add_argument("--hellaswag", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--copy-to", type=Path)
    args = p.parse_args(argv)
    if args.what == "env":
        result = env_info()
    elif args.what == "numerics":
        result = numerics(args.smoke)
    else:
        result = after_run(
            args.run,
            args.hellaswag,
            args.limit,
            args.batch_size,
            args.new_tokens,
            args.copy_to or args.run.parent / "ckpt_copy",
        )
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
