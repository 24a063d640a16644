"""Train a GPT: `python -m fgpt_jax.train`.

    python -m fgpt_jax.train [--config FILE_OR_PRESET] [--config.a.b=VALUE ...] [--run DIR] [--resume]
                             [--print-config]

With no arguments: the quickstart, a tiny GPT on the bundled Tiny Shakespeare, written to
runs/tiny/. `--workdir` is accepted as another name for `--run`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fgpt_jax import cli


def _parser() -> cli.Parser:
    p = cli.Parser(
        prog="python -m fgpt_jax.train",
        description="Train a GPT. With no arguments: the tiny quickstart on the bundled Tiny Shakespeare.",
        epilog="Config: --config PRESET_OR_FILE (presets: fgpt_jax/configs, the repository's configs/; default "
        "tiny) and dotted overrides such as --config.model.n_layer=6 --config.train.steps=1000 "
        "--config.optim.name=adamw. Every key: docs/configs.md.",
    )
    p.add_argument("--config", metavar="FILE_OR_PRESET", help="config preset name or .py file (default: tiny)")
    p.add_argument(
        "--run", "--workdir", dest="run", type=Path, metavar="DIR", help="run directory (default: runs/<config name>)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run from its latest checkpoint")
    p.add_argument(
        "--step",
        type=cli.int_in(1),
        metavar="N",
        help="with --resume: continue from checkpoint N instead of the latest (later ones are moved to "
        "RUN/checkpoints.set-aside/)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    from fgpt_jax.config import resolve_config, split_config_args, to_json

    spec, overrides, rest = split_config_args(argv)  # --config.a.b=V are not argparse flags
    args = parser.parse_args(rest)
    if args.step is not None and not args.resume:
        parser.error("--step: only with --resume")

    def body() -> int:
        # Which run directory: --run, else the preset's name; resuming without --config reads its config.json.
        named = resolve_config(spec, overrides) if args.run is None else None
        run = args.run or Path("runs") / named.name
        cfg = resolve_config(spec, overrides, run_dir=run, resume=args.resume)
        if args.print_config:
            print(to_json(cfg))
            return 0
        import jax

        from fgpt_jax.train import train

        last = train(cfg, run, resume=args.resume, resume_step=args.step)
        if jax.process_index() == 0:
            print(json.dumps({k: v for k, v in last.items() if not isinstance(v, str)}))
            print(
                f"run: {run}\nTensorBoard: tensorboard --logdir {run / 'tb'}\n"
                f"Resume or extend: python -m fgpt_jax.train --run {run} --resume [--config.train.steps=N]"
            )
        stopped = last.get("stopped_by_signal")
        return 128 + stopped if stopped else 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
