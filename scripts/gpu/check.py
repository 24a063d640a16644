"""The GPU proof in one command: environment, numerics, throughput against PyTorch, and a real run.

    bash scripts/gpu_check.sh --plan 1 --out "$OUT"    # on the device machine (installs the carried wheels)
    python scripts/gpu_check.py --smoke --out /tmp/gc  # anywhere: every section with tiny shapes on CPU

Sections, run in this order (choose with --sections, or a --plan that fits one 10-minute device call;
the tables of what is measured, and the code of each section, are in scripts/gpu_sections.py):
  env         versions, device and memory, cuDNN, the XLA/JAX settings in force
  throughput  the trainer's jitted step (scripts/bench_train.py): gpt2 micro-batches 16/32/64 with AdamW and
              Muon, fgpt 8/16/32 with remat off and on: step time, tokens/s, MFU, memory, compile time
  peer        build-nanogpt's GPT-2 in PyTorch (.gpu/torch_ref_bench.py: torch.compile, flash SDPA, bf16) on
              the same shapes, in the same call, and the ratio fgpt-jax / torch
  numerics    cuDNN vs XLA attention in bf16 (head_dim 64; 52 padded to 56 and to 64), max abs error of
              outputs and gradients against float32; gpt2 forward logits and train-step losses, bf16 vs float32
  run         `python -m fgpt_jax.train --config gpt2_124m` on shards of the Gutenberg books (bf16): loss,
              checkpoint save and restore time, full HellaSwag time and accuracy, KV-cache decode tokens/s
  optim       Muon vs AdamW at 124M on the same shards (scripts/bench_optim.py, a small lr sweep each): the
              tokens each needs to reach AdamW's final validation loss (goal: Muon <= 0.7x)
  variants    the step-speed options against their base: fused chunked loss, scan over layers, head_dim
              padding 56 vs 64, Newton-Schulz in bf16 (optim.ns_dtype)
  flags       gpt2 (AdamW) under XLA/JAX settings: defaults, memory fraction .95, optimization level O1,
              the latency-hiding scheduler, cuBLAS-only GEMMs

Every measurement runs in its own subprocess (this process never touches the GPU: JAX would take 75% of
its memory), so an error or an out-of-memory is reported in its section and the rest still run. A time
budget (--budget) bounds the whole call: what no longer fits is listed as not run. The report (markdown),
the raw results (JSON) and every subprocess's output (log) go to --out DIR, rewritten after each section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fgpt_jax.cli only: this process imports nothing that starts a device
from gpu_sections import FLAG_SETS, MODELS, SMOKE_MODEL, run_sections  # noqa: E402  (scripts/, beside this file)

from fgpt_jax import cli  # noqa: E402

SECTIONS = ("env", "throughput", "peer", "numerics", "run", "optim", "variants", "flags")  # the order they run in
PLANS = {  # one device call each (10 minutes at most), in order of importance; together the whole check
    "1": (("env", "throughput", "peer"), ("gpt2",)),  # the GPT-2 goals: tokens/s, MFU, ratio to torch
    "2": (("env", "throughput", "peer"), ("fgpt",)),  # the FGPT goal
    "3": (("env", "numerics", "run"), ("gpt2",)),  # correctness, the HellaSwag and decode goals
    "4": (("env", "variants"), ("gpt2", "fgpt")),  # the step-speed options (FGPT: scan's compile time)
    "5": (("env", "flags"), ("gpt2",)),  # XLA/JAX settings
    "6": (("env", "optim"), ("gpt2",)),  # Muon vs AdamW: tokens to AdamW's final val loss at 124M
}


class Check:
    """One call: the staged sources, the subprocesses under the time budget, the report on disk."""

    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.work, self.out = Path(args.workdir).absolute(), Path(args.out).absolute()
        self.assets = Path(args.assets).absolute()
        self.deadline = time.monotonic() + args.budget
        self.sections: list[tuple[str, list[str]]] = []  # (title, markdown lines), in report order
        self.data: dict = {}
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / f"{args.name}.log", "w", encoding="utf-8")
        self.env = self._stage()

    def _stage(self) -> dict:
        """Copy this checkout's fgpt_jax (with configs/ as fgpt_jax.configs, as pip installs it) into the
        work dir and put it first on the subprocesses' PYTHONPATH: the check measures this tree's code,
        installed or not."""
        src, tmp = self.work / "src", self.work / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "fgpt_jax", tmp / "fgpt_jax", ignore=ignore)
        shutil.copytree(ROOT / "configs", tmp / "fgpt_jax" / "configs", ignore=ignore)
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp, src)
        path = os.pathsep.join([str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "FGPT_JAX_CACHE": str(self.work / "cache")}
        if self.smoke:
            env.setdefault("JAX_PLATFORMS", "cpu")
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def proc(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Run `cmd` in the work dir within the budget; {"rc", "tail", "seconds"} or {"skipped": why}."""
        reserve = 0 if self.smoke else 20  # never start what cannot even load JAX and compile
        if self.left() <= reserve + 5:
            return {"skipped": f"not run: time budget ({max(self.left(), 0):.0f} s of {self.args.budget} s left)"}
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n" + "".join(f"  {k}={v}\n" for k, v in (env or {}).items()))
        self.log.flush()
        t0 = time.monotonic()
        p = subprocess.Popen(
            cmd,
            cwd=self.work,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = p.communicate(timeout=max(self.left() - 5, 1))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, rc = p.communicate()[0] + "\n[killed: time budget]", "timeout"
        except KeyboardInterrupt:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        self.log.write(out + f"\n===== {name}: rc={rc} in {time.monotonic() - t0:.1f} s\n")
        self.log.flush()
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return {"rc": rc, "out": out, "tail": " / ".join(lines[-3:])[-600:], "seconds": time.monotonic() - t0}

    def python(self, name: str, args: list[str], env: dict | None = None) -> dict:
        return self.proc(name, [sys.executable, *args], env)

    def failed(self, r: dict) -> str | None:
        """None if the subprocess ran and succeeded, else the one line the report shows."""
        if "skipped" in r:
            return r["skipped"]
        return None if r["rc"] == 0 else f"failed (rc={r['rc']}, {r['seconds']:.0f} s): {r['tail']}"

    def probe(self, what: str, *extra: str) -> dict | str:
        path = self.work / f"probe_{what}.json"
        path.unlink(missing_ok=True)
        r = self.python(what, [str(ROOT / "scripts" / "gpu_probe.py"), what, "--json", str(path), *extra])
        return self.failed(r) or json.loads(path.read_text())

    def bench(self, name: str, model: str, variants: list[str], micro: list[int], env: dict | None = None):
        """bench_train rows (whatever it wrote before a failure) and the failure line, if any."""
        path = self.work / f"bench_{name}.json"
        path.unlink(missing_ok=True)
        config, *_ = MODELS[model]
        steps = ["--steps", "1", "--warmup", "0"] if self.smoke else ["--steps", str(self.args.steps), "--warmup", "2"]
        overrides = [f"--config.{o}" for o in SMOKE_MODEL[model]] if self.smoke else []
        r = self.python(
            name,
            [
                str(ROOT / "scripts" / "bench_train.py"),
                "--config",
                config,
                *overrides,
                "--variant",
                *variants,
                "--micro-batch",
                *map(str, micro),
                *steps,
                "--json",
                str(path),
            ],
            env,
        )
        result = json.loads(path.read_text()) if path.exists() else {"rows": []}
        return result, self.failed(r)

    def add(self, title: str, lines: list[str], data=None) -> None:
        self.sections.append((title, lines))
        self.data[title] = data
        self.write()

    def write(self) -> None:
        a = self.args
        head = [
            f"# fgpt-jax GPU check{' (smoke: tiny shapes)' if self.smoke else ''}",
            "",
            f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Host: {platform.node()}. "
            f"Command: `{' '.join(sys.argv)}`. Sections: {', '.join(a.sections)}; models: {', '.join(a.models)}; "
            f"budget {a.budget} s, {a.budget - max(self.left(), 0):.0f} s used.",
            "",
        ]
        body = [ln for title, lines in self.sections for ln in (f"## {title}", "", *lines, "")]
        for suffix, text in (
            ("md", "\n".join(head + body) + "\n"),
            ("json", json.dumps({"args": vars(a), "sections": self.data}, indent=1, default=str)),
        ):
            tmp = self.out / f"{a.name}.{suffix}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.out / f"{a.name}.{suffix}")


def _names(choices, what: str):
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"expected {what} from {', '.join(choices)} (comma-separated), got {text!r}"
            )
        return names

    parse.__name__ = what
    return parse


def parser() -> cli.Parser:
    p = cli.Parser(
        prog="python scripts/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog="Plans (one device call each): "
        + "; ".join(f"{k}: {','.join(s)} for {','.join(m)}" for k, (s, m) in PLANS.items())
        + ". docs/gpu.md says how.",
    )
    p.add_argument("--plan", choices=sorted(PLANS), help="a preset of --sections and --models for one device call")
    p.add_argument("--sections", type=_names(SECTIONS, "sections"), help=f"default: all ({','.join(SECTIONS)})")
    p.add_argument("--models", type=_names(list(MODELS), "models"), help="for throughput/peer/variants (default both)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (the test's mode)")
    p.add_argument("--out", required=True, metavar="DIR", help="where NAME.md, NAME.json and NAME.log are written")
    p.add_argument("--name", default=None, help="file name stem (default gpu_check, or plan<N>)")
    p.add_argument(
        "--budget",
        type=cli.int_in(30),
        default=540,
        metavar="S",
        help="seconds for the whole call (default 540: a device call allows 600)",
    )
    p.add_argument(
        "--workdir", default="/tmp/fgpt_gpu_check", help="staged sources, shards, runs (default %(default)s)"
    )
    p.add_argument("--assets", default=str(ROOT / ".gpu"), help="what fetch_gpu_wheels.sh copied (default .gpu/)")
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per throughput row (default 10)")
    p.add_argument(
        "--micro-batches",
        type=cli.positive_int,
        nargs="+",
        metavar="N",
        help="throughput/peer micro-batches for every model selected (default: gpt2 16 32 64, fgpt 8 16 32)",
    )
    p.add_argument("--flag-sets", type=_names(list(FLAG_SETS), "flag sets"), help=f"default: {','.join(FLAG_SETS)}")
    p.add_argument("--books", nargs="+", metavar="FILE", help="text files for the run (default .gpu/gutenberg/*.txt)")
    p.add_argument("--hellaswag", type=Path, metavar="FILE", help="default .gpu/hellaswag_val_full.txt.bz2")
    p.add_argument("--hellaswag-batch", type=cli.positive_int, default=64, help="items per HellaSwag call (default 64)")
    p.add_argument("--run-steps", type=cli.positive_int, default=300, help="steps of the real run (default 300)")
    p.add_argument(
        "--optim-steps",
        type=cli.positive_int,
        default=200,
        help="steps of each Muon/AdamW run of the optim section (default 200)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    sections, models = PLANS[args.plan] if args.plan else (SECTIONS, tuple(MODELS))
    args.sections, args.models = args.sections or list(sections), args.models or list(models)
    args.name = args.name or (f"plan{args.plan}" if args.plan else "gpu_check")
    args.flag_sets = args.flag_sets or (["O1"] if args.smoke else list(FLAG_SETS))
    for f in args.books or []:
        if not Path(f).is_file():
            p.error(f"--books {f}: not a file")
    if args.hellaswag is not None and not args.hellaswag.is_file():
        p.error(f"--hellaswag {args.hellaswag}: not a file")

    def body() -> int:
        c = Check(args)
        try:
            run_sections(c)
        finally:
            c.write()
            c.log.close()
        print((c.out / f"{args.name}.md").read_text(), flush=True)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
