"""The GPU check in one command: headline numbers first, within a time budget, from a plain clone.

    python3 scripts/gpu/check.py --plan headline --budget 480 --out DIR   # on the GPU machine: one call
    python3 scripts/gpu/check.py --plan more --budget 240 --out DIR       # optional second call
    python scripts/gpu/check.py --plan headline --smoke --out /tmp/gc     # anywhere: tiny shapes on CPU

Plan `headline`, in this order (plan.py holds the sections and their GPU budgets; scripts/gpu/README.md
says where each budget comes from):
  (a) environment (versions, device, memory, XLA/JAX settings) and a cuDNN attention self-test (head_dim
      64, and FGPT's 52 padded to 56 as model.py pads it); if it fails, every later section runs with
      XLA attention (`model.attention=xla`) and the report says so
  (b) GPT-2 124M, bf16, T = 1024: tokens/s, MFU, memory, with AdamW then Muon, at one micro-batch chosen
      from plan.train_memory against the memory JAX may use (no sweep)
  (c) the PyTorch peer (scripts/gpu/torch_peer.py: torch.compile, the same shape and optimizers)
  (d) `python -m fgpt_jax.train --config gpt2_124m` on the Gutenberg books for 150 steps with the step
      program (b) compiled, a checkpoint restored whole and checked against what was saved, the full
      HellaSwag timed after compilation, KV-cache decode tokens/s at batch 1
  (e) FGPT 662.7M at one micro-batch with scan over layers (the option that compiles fastest)
Plan `more`: the micro-batch sweeps, the peer at each, the step-speed variants, XLA/JAX settings,
numerics (bf16 vs float32) and Muon vs AdamW, for whatever device time is left.

On the GPU machine it first installs the wheels carried in .whl/ (scripts/gpu/fetch_wheels.sh) into the
work directory and puts them on the subprocesses' PYTHONPATH, so the whole call is this one line. Every
measurement runs in its own subprocess (this process never initialises a device: JAX would take 75% of
its memory), sharing a persistent compilation cache in the work directory. A section may use the time
the ones before it left unused; past its deadline it is stopped and reported as cut, and what no longer
fits in --budget is reported as not run. The report (NAME.md, also printed), the raw numbers (NAME.json)
and every subprocess's output (NAME.log) are written to --out, rewritten after each section.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # plan.py, sections.py, and scripts/ (bench_train) below
sys.path.insert(1, str(ROOT / "scripts"))
sys.path.insert(2, str(ROOT))  # fgpt_jax from this checkout (cli, config): nothing here starts a device
import plan  # noqa: E402
import sections  # noqa: E402

from fgpt_jax import cli  # noqa: E402


class Check:
    """One call: the staged sources and wheels, the subprocesses under the time budget, the report."""

    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.t0 = time.monotonic()
        self.work, self.out = Path(args.workdir).absolute(), Path(args.out).absolute()
        self.assets = Path(args.assets).absolute()
        self.deadline = self.t0 + args.budget
        self.section_deadline = self.deadline
        self.sections: list[dict] = []  # {"title", "lines", "status", ...} in report order
        self.data: dict = {}
        self.current: dict | None = None
        self.attention, self.attention_note = "xla", None  # until (a) has run its self-test
        self.micro: dict = {}
        self.results: dict = {}
        self.setup_notes: list[str] = []
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / f"{args.name}.log", "w", encoding="utf-8")
        self.env = self._stage()

    def _stage(self) -> dict:
        """This checkout's fgpt_jax (with configs/ as fgpt_jax.configs, as pip installs it) copied into the
        work dir, and the carried wheels installed beside it: both first on the subprocesses' PYTHONPATH,
        so the check measures this tree's code, installed or not."""
        t = time.monotonic()
        src, tmp = self.work / "src", self.work / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "fgpt_jax", tmp / "fgpt_jax", ignore=ignore)
        shutil.copytree(ROOT / "configs", tmp / "fgpt_jax" / "configs", ignore=ignore)
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp, src)
        path = [str(src)]
        site = self._install_wheels()
        if site:
            path.append(str(site))
        path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "PYTHONUNBUFFERED": "1",
            "FGPT_JAX_CACHE": str(self.work / "cache"),
            # One persistent compilation cache for every subprocess of this (and a later) call: the GPT-2
            # step of (b) is loaded, not recompiled, by (d); XLA's autotuning results are kept there too.
            "JAX_COMPILATION_CACHE_DIR": str(self.work / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        if self.smoke:
            env.setdefault("JAX_PLATFORMS", "cpu")
            env.setdefault("OMP_NUM_THREADS", "1")  # torch on 2 shared cores: threads only contend
        self.setup_notes.append(
            f"Sources staged in {src} (fgpt_jax imported from there); compilation cache {self.work / 'jax_cache'}; "
            f"setup took {time.monotonic() - t:.1f} s."
        )
        return env

    def _install_wheels(self) -> Path | None:
        """pip --target install of .whl/*.whl (the packages the device image lacks) into WORK/site; the
        optional flax wheel only if the image's flax is not the 0.12 series this code is tested with."""
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        if not wheels:
            self.setup_notes.append(f"No wheels in {self.args.wheels or '(none)'}: the installed packages are used.")
            return None
        if self.smoke and not self.args.install_wheels:
            self.setup_notes.append(f"Smoke: the {len(wheels)} wheels in {self.args.wheels} are not installed.")
            return None
        site = self.work / "site"
        t = time.monotonic()
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        pip += ["--no-cache-dir", "--upgrade", "--target", str(site)]
        subprocess.run([*pip, *map(str, wheels)], check=True, stdout=self.log, stderr=subprocess.STDOUT)
        optional = sorted((Path(self.args.wheels) / "optional").glob("flax-*.whl"))
        probe = [sys.executable, "-c", "import flax, sys; sys.exit(not flax.__version__.startswith('0.12.'))"]
        extra = []
        if optional and subprocess.run(probe, capture_output=True).returncode != 0:
            subprocess.run([*pip, *map(str, optional)], check=True, stdout=self.log, stderr=subprocess.STDOUT)
            extra = [p.name for p in optional]
        names = ", ".join(p.name.split("-")[0] + " " + p.name.split("-")[1] for p in wheels + [Path(x) for x in extra])
        self.setup_notes.append(f"Installed {names} into {site} in {time.monotonic() - t:.1f} s.")
        sys.path.insert(0, str(site))  # this process too: the report's memory estimates load the configs
        importlib.invalidate_caches()
        return site

    def timing(self, steps: int | None = None, warmup: int = 2) -> tuple[int, int]:
        """(timed steps, warm-up steps) of a throughput row: one and none in smoke (the code path is the point)."""
        return (1, 0) if self.smoke else (steps or self.args.steps, warmup)

    def run_steps(self) -> int:
        return 6 if self.smoke else self.args.run_steps

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.monotonic()

    def proc(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Run `cmd` in the work dir until the section's deadline: {"rc", "out", "tail", "seconds"} or
        {"skipped": why}."""
        if self.left() <= 5:
            return {"skipped": f"not run: the section's time is up ({max(self.left(), 0):.0f} s left)"}
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
            start_new_session=True,  # its own process group: a cut kills its children too
        )
        try:
            out, _ = p.communicate(timeout=max(self.left(), 1))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, rc = p.communicate()[0] + "\n[killed: the section's deadline]", "cut"
            if self.current is not None:
                self.current["cut"] = True
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
        if r["rc"] == "cut":
            return f"cut at the section's deadline after {r['seconds']:.0f} s: {r['tail']}"
        return None if r["rc"] == 0 else f"failed (rc={r['rc']}, {r['seconds']:.0f} s): {r['tail']}"

    def probe(self, what: str, *extra: str) -> dict | str:
        """The probe's JSON; on a failure the one line, or what it wrote before (with the line as "error")."""
        path = self.work / f"probe_{what}.json"
        path.unlink(missing_ok=True)
        r = self.python(what, [str(HERE / "probe.py"), what, "--json", str(path), *extra])
        err = self.failed(r)
        if err and not path.is_file():
            return err
        return json.loads(path.read_text()) | ({"error": err} if err else {})

    def bench(self, name, config, overrides, variants, micro, steps, warmup, env=None) -> tuple[dict, str | None]:
        """scripts/bench_train.py rows (whatever it wrote before a failure or a cut) and the failure line."""
        path = self.work / f"bench_{name}.json"
        path.unlink(missing_ok=True)
        cmd = [str(ROOT / "scripts" / "bench_train.py"), "--config", config, *(f"--config.{o}" for o in overrides)]
        cmd += ["--variant", *variants, "--micro-batch", *map(str, micro), "--steps", str(steps)]
        cmd += ["--warmup", str(warmup), "--json", str(path)]
        r = self.python(name, cmd, env)
        result = json.loads(path.read_text()) if path.exists() else {"rows": []}
        result["overrides"] = list(overrides)
        return result, self.failed(r)

    def add(self, lines: list[str], data=None) -> None:
        """The current section's report block and raw data."""
        self.current["lines"] = lines
        self.data[self.current["title"]] = data
        self.write()

    def run_plan(self) -> None:
        # (a) always runs: every later section needs its attention verdict and micro-batches.
        keep = set(self.args.sections or [s.key for s in plan.PLANS[self.args.plan]]) | {"env"}
        secs = [s for s in plan.PLANS[self.args.plan] if s.key in keep]
        # Deadlines: the running total of the budgets, stretched when --budget exceeds the plan's total.
        scale = max(1.0, self.args.budget / sum(s.budget_s for s in secs))
        planned = 0.0
        for s in secs:
            planned += s.budget_s * scale
            now = time.monotonic()
            entry = {"title": s.title, "budget": s.budget_s, "lines": [], "status": "", "start": now - self.t0}
            self.sections.append(entry)
            if self.deadline - now < s.min_s and not self.smoke:
                entry["status"] = f"not run: {self.deadline - now:.0f} s of the budget left, it needs {s.min_s} s"
                entry["lines"] = [f"**Did not fit**: {entry['status']}."]
                self.write()
                continue
            # The running total of the budgets, but never less than the section's minimum, never past --budget.
            self.section_deadline = (
                self.deadline if self.smoke else min(self.deadline, max(self.t0 + planned, now + s.min_s))
            )
            self.current = entry
            try:
                sections.run_section(self, s.key)
            except Exception as e:  # a broken section reports itself; the others still run
                sections.section_error(self, e)
            used = time.monotonic() - now
            entry["used"] = used
            entry["status"] = ("cut at its deadline, " if entry.get("cut") else "") + f"{used:.0f} s"
            entry["attention"] = self.attention_note if s.key != "env" else None
            self.current = None
            self.write()
        self.section_deadline = self.deadline

    def write(self) -> None:
        a = self.args
        head = [
            f"# fgpt-jax GPU check, plan `{a.plan}`"
            + (" (smoke: tiny shapes on CPU, no GPU figures)" if self.smoke else ""),
            "",
            f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Host: {platform.node()}. "
            f"Command: `{' '.join(sys.argv)}`. Budget {a.budget} s, {time.monotonic() - self.t0:.0f} s used.",
            "",
            *plan.format_plan(a.plan, a.budget, self.smoke),
            "",
            *self.setup_notes,
            "",
        ]
        body = []
        for s in self.sections:
            status = s["status"] or "running"
            attn = f"; attention: {s['attention']}" if s.get("attention") else ""
            body += [f"## {s['title']}", "", f"GPU budget {s['budget']} s; {status}{attn}.", "", *s["lines"], ""]
        notrun = [s["title"] for s in self.sections if s["status"].startswith("not run") or s.get("cut")]
        tail = [
            "## Summary",
            "",
            *sections.summary(self),
            "",
            "Did not fit: " + ("; ".join(notrun) if notrun else "nothing (every section ran to its end)") + ".",
        ]
        for suffix, text in (
            ("md", "\n".join(head + body + tail) + "\n"),
            (
                "json",
                json.dumps({"args": vars(a), "sections": self.data, "results": self.results}, indent=1, default=str),
            ),
        ):
            tmp = self.out / f"{a.name}.{suffix}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.out / f"{a.name}.{suffix}")


def _keys(text: str) -> list[str]:
    keys = [k for k in text.split(",") if k]
    every = sorted({s.key for p in plan.PLANS.values() for s in p})
    bad = [k for k in keys if k not in every]
    if bad or not keys:
        raise argparse.ArgumentTypeError(
            f"expected section keys from {', '.join(every)} (comma-separated), got {text!r}"
        )
    return keys


def parser() -> cli.Parser:
    p = cli.Parser(
        prog="python3 scripts/gpu/check.py",
        description=__doc__.split("\n\n")[0],
        epilog="Plans: "
        + "; ".join(f"{k}: {v}" for k, v in plan.PLAN_HELP.items())
        + ". scripts/gpu/README.md says how.",
    )
    p.add_argument("--plan", choices=sorted(plan.PLANS), default="headline", help="default headline")
    p.add_argument(
        "--sections",
        type=_keys,
        help="only these section keys of the plan (e.g. fgpt), in the plan's order; env always runs",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (the test's mode)")
    p.add_argument("--out", required=True, metavar="DIR", help="where NAME.md, NAME.json and NAME.log are written")
    p.add_argument("--name", help="file name stem (default: the plan's name)")
    p.add_argument(
        "--budget",
        type=cli.int_in(30, 3600),
        metavar="S",
        help="seconds for the whole call (default: the plan's total, 480 for headline)",
    )
    p.add_argument(
        "--workdir",
        default="/tmp/fgpt_gpu_check",
        help="staged sources, wheels, caches, shards, runs (default %(default)s)",
    )
    p.add_argument("--assets", default=str(ROOT / ".gpu"), help="what fetch_wheels.sh copied (default .gpu/)")
    p.add_argument(
        "--wheels", default=str(ROOT / ".whl"), help="wheels to install first (default .whl/; not in --smoke)"
    )
    p.add_argument("--install-wheels", action="store_true", help="install --wheels in --smoke mode too")
    p.add_argument(
        "--peak-tflops",
        type=cli.float_in(0, lo_open=True),
        metavar="X",
        help="your card's dense bf16 peak for MFU (default: fgpt_jax/metrics.py's table)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per throughput row (default 10)")
    p.add_argument(
        "--books", nargs="+", metavar="FILE", help="text files for the real run (default .gpu/gutenberg/*.txt)"
    )
    p.add_argument("--hellaswag", type=Path, metavar="FILE", help="default .gpu/hellaswag_val_full.txt.bz2")
    p.add_argument("--hellaswag-batch", type=cli.positive_int, default=64, help="items per HellaSwag call (default 64)")
    p.add_argument("--run-steps", type=cli.int_in(10, 100_000), default=150, help="steps of the real run (default 150)")
    p.add_argument("--optim-steps", type=cli.positive_int, default=200, help="steps of each Muon/AdamW run (plan more)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.budget = args.budget or plan.total_budget(args.plan)
    args.name = args.name or args.plan
    for f in args.books or []:
        if not Path(f).is_file():
            p.error(f"--books {f}: not a file")
    if args.hellaswag is not None and not args.hellaswag.is_file():
        p.error(f"--hellaswag {args.hellaswag}: not a file")
    if args.sections:
        missing = [k for k in args.sections if k not in {s.key for s in plan.PLANS[args.plan]}]
        if missing:
            p.error(
                f"--sections {','.join(missing)}: not in plan {args.plan} "
                f"({', '.join(s.key for s in plan.PLANS[args.plan])})"
            )
    print("\n".join(plan.format_plan(args.plan, args.budget, args.smoke)), flush=True)

    def body() -> int:
        c = Check(args)
        try:
            c.run_plan()
        finally:
            c.write()
            c.log.close()
        print((c.out / f"{args.name}.md").read_text(), flush=True)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
