"""The in-JAX measurements of scripts/gpu/check.py, one per subcommand, each in its own process.

    python scripts/gpu/probe.py env       --json OUT.json [--smoke]
    python scripts/gpu/probe.py numerics  --json OUT.json [--smoke]
    python scripts/gpu/probe.py after-run --json OUT.json --run DIR --hellaswag FILE [--limit N]
                                          [--batch-size N] [--new-tokens N] [--decode-batches 1 16] [--copy-to DIR]

check.py starts these as subprocesses so that it never initialises a device itself (JAX takes 75% of
the GPU's memory when it starts) and so that a crash or an out-of-memory in one leaves the rest of the
call running. Each writes one JSON object that check.py renders. JAX is imported inside the functions
(as the CLIs do), so `attention_verdict` can be imported and tested without starting JAX.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plan.py, beside this file
from plan import choose_micro_batch  # noqa: E402

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
IMPORTS = (  # the modules the train CLI, the data CLI, bench_train and after-run need
    "fgpt_jax.train.trainer",
    "fgpt_jax.data.shards",
    "fgpt_jax.data.pipeline",
    "fgpt_jax.eval.hellaswag",
    "fgpt_jax.inference.generator",
    "grain",
    "tensorboardX",
    "orbax.checkpoint",
    "tiktoken",
)
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP_", "CUDA_VISIBLE", "NVIDIA_TF32")
# The self-test's cases: GPT-2's heads (64 wide), and FGPT's 52-wide heads with the padding model.py
# gives them on the cuDNN path (GPTConfig.attention_pad = 8: 52 -> 56). (heads, head_dim, pad multiple)
ATTENTION_CASES = ((12, 64, 8), (24, 52, 8))
ATTENTION_CASES_MORE = ((12, 64, 8), (24, 52, 8), (24, 52, 64))
# cuDNN passes if, on outputs and on each of dq, dk, dv, its relative error against XLA in float32 is at
# most twice XLA-in-bf16's own plus this floor: bf16 rounding alone is 1e-3 to 1e-2 relative
# (/work/.library/device/METHOD.md's yardstick); a wrong mask, scale or padding is far above it.
REL_FLOOR = 2e-3


def env_info() -> dict:
    """Versions (and where each came from), the devices, cuDNN, and the XLA/JAX settings in force."""
    import jax

    rows = [("python", f"{platform.python_version()} ({sys.executable})")]
    for name in DISTRIBUTIONS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        rows.append((name, f"{dist.version} ({dist.locate_file('')})"))
    import fgpt_jax

    rows.append(("fgpt_jax imported from", os.path.dirname(fgpt_jax.__file__)))
    missing = []
    for module in IMPORTS:  # what the later sections import: a missing wheel shows here, first
        try:
            importlib.import_module(module)
        except Exception as e:
            missing.append(f"{module}: {type(e).__name__}: {e}")
    rows.append(("imports of the later sections", "; ".join(missing) or f"ok ({len(IMPORTS)} modules)"))
    devices = jax.devices()
    d = devices[0]
    rows.append(("devices", f"{len(devices)} x {d.device_kind} ({d.platform})"))
    if getattr(d, "compute_capability", None):
        rows.append(("compute capability", d.compute_capability))
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            v = cuda_versions.cudnn_get_version()
            rows.append(("cuDNN", f"{v // 10000}.{v // 100 % 100}.{v % 100} ({v})"))
            rows.append(("CUDA runtime", str(cuda_versions.cuda_runtime_get_version())))
    except Exception as e:  # CPU-only jaxlib, or an API that moved
        rows.append(("cuDNN", f"unknown ({type(e).__name__})"))
    for key in ("jax_optimization_level", "jax_compilation_cache_dir", "jax_default_matmul_precision"):
        rows.append((key, str(getattr(jax.config, key, "n/a (this jax has no such option)"))))
    for key in sorted(k for k in os.environ if k.startswith(ENV_PREFIXES)):
        rows.append((f"${key}", os.environ[key]))
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


def device_memory() -> tuple[int, str]:
    """(bytes JAX may allocate on the first device, where the number came from). On CPU, which has no
    allocator limit, the host's physical memory stands in."""
    import jax

    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{d.device_kind}: JAX's bytes_limit"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory (no device allocator limit)"


def micro_batches(device_bytes: int, attention: str) -> dict:
    """The check's micro-batches for GPT-2 124M (AdamW; Muon holds less) and FGPT (Muon, scan) at T = 1024."""
    import dataclasses

    from fgpt_jax.config import load_config

    out = {}
    for name, preset, optimizer, overrides in (
        ("gpt2", "gpt2_124m", "adamw", {}),
        ("fgpt", "fgpt", "muon", {"scan_layers": True}),
    ):
        model = dataclasses.replace(load_config(preset).model, **overrides)
        mb, est = choose_micro_batch(model, device_bytes, optimizer=optimizer, attention=attention)
        out[name] = {"micro_batch": mb, "estimate_gb": est.total / 2**30, "parts_gb": _gb(est)}
    return out


def _gb(est) -> dict:
    return {k: round(getattr(est, k) / 2**30, 3) for k in ("params", "grads", "optimizer", "compute_copies")} | {
        "activations": round(est.activations / 2**30, 3),
        "logits": round(est.logits / 2**30, 3),
    }


# -- the cuDNN attention self-test ------------------------------------------------------------------


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_case(B: int, T: int, N: int, H: int, pad: int, seed: int) -> dict:
    """cuDNN in bf16 against XLA in float32 (the reference) and XLA in bf16 (the yardstick), outputs and
    q/k/v gradients, through fgpt_jax.model.causal_attention (the padding the model uses). Fresh random
    normal inputs for every case; the output cotangent is random too, so every gradient entry counts."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fgpt_jax.model import causal_attention

    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, ct = (jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)

    def run(impl, dtype, pad_multiple):
        f = jax.jit(lambda q, k, v: causal_attention(q, k, v, implementation=impl, pad_multiple=pad_multiple))
        out, vjp = jax.vjp(f, *(x.astype(dtype) for x in (q, k, v)))
        return [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(ct.astype(dtype)))]

    with jax.default_matmul_precision("float32"):
        ref = run("xla", jnp.float32, 1)
    xla16 = run("xla", jnp.bfloat16, 1)
    case = {"heads": N, "head_dim": H, "padded_to": -(-H // pad) * pad, "shape": f"{B}x{T}"}
    try:
        cud = run("cudnn", jnp.bfloat16, pad)
    except Exception as e:  # no cuDNN (CPU), or a cuDNN that refuses the shape: the verdict says so
        return {**case, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:240]}"}
    names = ("out", "dq", "dk", "dv")
    return {
        **case,
        "finite": bool(all(np.isfinite(x).all() for x in cud)),
        "cudnn_rel": {n: _rel(c, r) for n, c, r in zip(names, cud, ref)},
        "xla_bf16_rel": {n: _rel(x, r) for n, x, r in zip(names, xla16, ref)},
        "cudnn_vs_xla_bf16_rel": {n: _rel(c, x) for n, c, x in zip(names, cud, xla16)},
    }


def attention_verdict(cases: list[dict]) -> dict:
    """{"path": "cudnn" or "xla", "passed": bool, "reasons": [...]}: cuDNN only if every case ran, is
    finite, and is within 2x XLA-bf16's relative error (+ REL_FLOOR) on outputs and every gradient."""
    reasons = []
    for c in cases:
        name = f"head_dim {c['head_dim']} (padded to {c['padded_to']})"
        if "error" in c:
            reasons.append(f"{name}: cuDNN did not run: {c['error']}")
            continue
        if not c["finite"]:
            reasons.append(f"{name}: cuDNN gave non-finite values")
        for k, err in c["cudnn_rel"].items():
            limit = 2 * c["xla_bf16_rel"][k] + REL_FLOOR
            if not err <= limit:  # `not <=` also catches nan
                reasons.append(f"{name}: {k} relative error {err:.2e} > {limit:.2e} (2x XLA bf16's + {REL_FLOOR})")
    passed = bool(cases) and not reasons
    return {"path": "cudnn" if passed else "xla", "passed": passed, "reasons": reasons}


def env_probe(smoke: bool, more: bool) -> dict:
    import jax

    out = env_info()
    B, T = (2, 32) if smoke else (4, 1024)
    cases = []
    for i, (N, H, pad) in enumerate(ATTENTION_CASES_MORE if more else ATTENTION_CASES):
        cases.append(attention_case(B, T, 2 if smoke else N, H, pad, seed=int(time.time()) % 10_000 + i))
    verdict = attention_verdict(cases)
    if jax.default_backend() != "gpu":
        verdict["reasons"].insert(0, f"backend {jax.default_backend()}: cuDNN needs an NVIDIA GPU")
    device_bytes, source = device_memory()
    out.update(
        attention={"cases": cases, **verdict},
        device_bytes=device_bytes,
        device_bytes_source=source,
        micro_batches=micro_batches(device_bytes, verdict["path"]),
    )
    return out


# -- numerics (plan `more`) ------------------------------------------------------------------------------


def _loss_compare(preset_cfg, B, T, steps) -> tuple[dict, list[dict]]:
    """gpt2 forward logits and a few real train steps (AdamW), bf16 vs float32, from the same init
    and the same batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
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
        "rel_err": _rel(logits["bfloat16"], logits["float32"]),
    }
    rows = [
        {"step": i + 1, "loss_fp32": a, "loss_bf16": b, "diff": b - a}
        for i, (a, b) in enumerate(zip(losses["float32"], losses["bfloat16"]))
    ]
    return forward, rows


def numerics(smoke: bool) -> dict:
    from fgpt_jax.config import apply_overrides, load_config

    preset = load_config("gpt2_124m")
    if smoke:
        preset = apply_overrides(
            preset, ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.block_size=32"]
        )
    B, T = (2, 32) if smoke else (8, 1024)
    forward, steps = _loss_compare(preset, B, T, 1 if smoke else 3)
    return {
        "forward": forward,
        "train_steps": steps,
        "notes": ["float32 runs use jax.default_matmul_precision('float32') (no TF32); bf16 runs the default"],
    }


# -- after the real run: checkpoint, HellaSwag, decode -------------------------------------------------


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _trees_equal(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def after_run(
    run: Path,
    hellaswag: Path,
    limit: int | None,
    batch_size: int,
    new_tokens: int,
    decode_batches,
    copy_to: Path,
    out: Path,
) -> dict:
    """The run's last checkpoint restored whole and checked against what the trainer saved (its per-leaf
    checksums, and the validation loss the trainer logged for those parameters), saved again and restored
    bit for bit (both timed); then HellaSwag and KV-cache decoding, each timed after its compilation.
    `out` is rewritten after each stage, so a process stopped at its deadline leaves what it measured."""
    import jax
    import numpy as np

    from fgpt_jax import eval as ev
    from fgpt_jax import sharding as shd
    from fgpt_jax.checkpoint import Checkpoints, _train_fields, checksum
    from fgpt_jax.data.hellaswag import load_examples
    from fgpt_jax.eval.hellaswag import HellaSwagScorer
    from fgpt_jax.inference.generator import Generator
    from fgpt_jax.metrics import read_metrics
    from fgpt_jax.rundir import RunDir
    from fgpt_jax.train.step import build_setup

    rows, checks = [], []
    rd = RunDir(run)
    cfg = rd.read_config()
    setup = build_setup(cfg, shd.make_mesh())
    ckpts = Checkpoints(rd.checkpoints, read_only=True)
    step = ckpts.latest_step()
    meta = ckpts.read_json(step, "meta")
    (state, data_state), restore_s = _timed(lambda: ckpts.restore(step, setup.abstract_state))
    ckpts.close()
    size = sum(f.stat().st_size for f in (rd.checkpoints / str(step)).rglob("*") if f.is_file())
    rows.append({"what": f"restore: full train state of step {step} ({size / 2**20:,.0f} MiB)", "seconds": restore_s})
    saved = meta.get("checksum", {})
    sums = {"params": checksum(state.params), "train": checksum(_train_fields(state))}
    checks.append(
        {
            "what": "restored params and optimizer state/step/rng == what the trainer saved (per-leaf checksums)",
            "ok": bool(saved) and all(sums[k] == saved.get(k) for k in ("params", "train")),
            "detail": f"saved {saved}, restored {sums}",
        }
    )
    checks.append(
        {
            "what": "restored step and data-iterator state",
            "ok": int(state.step) == step and bool(data_state),
            "detail": f"state.step {int(state.step)}, checkpoint {step}, data state keys {sorted(data_state)}",
        }
    )
    logged = [m for m in read_metrics(rd.metrics) if m.get("step") == step and "val/loss" in m]

    def restored_val_loss() -> float:  # eval val's default: the trainer's own validation batches
        model = ev.load(run, step)
        return ev.evaluate_val(model, ev.validation_batches(model.cfg, model.mesh, run=run)[0])["loss"]

    val, val_s = _timed(restored_val_loss)
    if logged:
        diff = abs(val - logged[-1]["val/loss"])
        checks.append(
            {
                "what": "val/loss of the restored params == the trainer's at that step (same windows)",
                "ok": bool(diff <= 2e-3 * max(1.0, abs(val))),  # bf16 reductions may reorder between programs
                "detail": f"trainer {logged[-1]['val/loss']:.5f}, restored {val:.5f} ({val_s:.1f} s)",
            }
        )
    shutil.rmtree(copy_to, ignore_errors=True)
    copy = Checkpoints(copy_to, async_save=False, keep_best=False)
    _, save_s = _timed(lambda s=state: (copy.save(step, s, data_state), copy.poll(wait=True)))  # bound now: `del` below
    rows.append({"what": "save: the same state, synchronous, to local disk", "seconds": save_s})
    (again, data_again), again_s = _timed(lambda: copy.restore(step, setup.abstract_state))
    copy.close()
    rows.append({"what": "restore of that copy", "seconds": again_s})
    checks.append(
        {
            "what": "save -> restore round trip is bit-identical (every leaf, and the data state)",
            "ok": _trees_equal(state, again) and data_again == data_state,
            "detail": f"{len(jax.tree.leaves(state))} leaves",
        }
    )
    graphdef, params = setup.graphdef, state.params
    del state, again  # only the parameters stay on the device for HellaSwag and decoding

    result = {"rows": rows, "checks": checks, "dtype": cfg.model.dtype, "partial": True}
    write_json(out, result)
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

    result["hellaswag"] = hs
    write_json(out, result)
    gen = Generator(graphdef, params, stop_ids=())  # no stop token: every row decodes all new tokens
    rng = np.random.default_rng(0)
    decode = []
    for B in decode_batches:
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
    return {**result, "decode": decode, "partial": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["env", "numerics", "after-run"])
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--more", action="store_true", help="env: also the 52 -> 64 padding case")
    p.add_argument("--run", type=Path)
    p.add_argument("--hellaswag", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1])
    p.add_argument("--copy-to", type=Path)
    args = p.parse_args(argv)
    if args.what == "env":
        result = env_probe(args.smoke, args.more)
    elif args.what == "numerics":
        result = numerics(args.smoke)
    else:
        result = after_run(
            args.run,
            args.hellaswag,
            args.limit,
            args.batch_size,
            args.new_tokens,
            args.decode_batches,
            args.copy_to or args.run.parent / "ckpt_copy",
            args.json,
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
