"""Convert between transformers GPT-2 checkpoints and run directories: `python -m fgpt_jax.hf {import,export}`.

    python -m fgpt_jax.hf import --hf PATH_OR_HUB_NAME --run RUN_DIR [--revision REV]
    python -m fgpt_jax.hf export --run RUN_DIR --out HF_DIR [--step N] [--vocab-size N]

Both print one JSON line on success; bad input exits 2 with one line naming the file, flag or tensor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.hf.weights import GPT2_VOCAB, OUR_VOCAB


def _parser() -> cli.Parser:
    p = cli.Parser(
        prog="python -m fgpt_jax.hf", description="Convert between transformers GPT-2 checkpoints and run directories."
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=cli.Parser)
    imp = sub.add_parser(
        "import",
        help="a transformers GPT-2 checkpoint -> a run directory",
        description="Read a transformers GPT-2 checkpoint (gpt2 .. gpt2-xl) into a run directory "
        "that eval, generate, chat and --config.init_from accept.",
    )
    imp.add_argument(
        "--hf",
        required=True,
        metavar="PATH_OR_NAME",
        help="local directory with config.json + model.safetensors (or pytorch_model.bin, needs torch), "
        "or a Hub name such as openai-community/gpt2 (downloaded with huggingface_hub)",
    )
    imp.add_argument(
        "--run",
        "--out",
        dest="run",
        required=True,
        metavar="RUN_DIR",
        help="run directory to create (--out is accepted too)",
    )
    imp.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub names only)")
    exp = sub.add_parser(
        "export",
        help="a run directory -> a transformers GPT-2 directory",
        description="Write config.json, model.safetensors and tokenizer files that "
        "transformers' GPT2LMHeadModel / AutoTokenizer.from_pretrained load.",
    )
    exp.add_argument("--run", required=True, metavar="DIR", help="run directory to export")
    exp.add_argument("--out", required=True, metavar="HF_DIR", help="directory to create (must not exist or be empty)")
    exp.add_argument(
        "--step", type=cli.int_in(0), default=None, metavar="N", help="checkpoint step (default: the latest)"
    )
    exp.add_argument(
        "--vocab-size",
        type=cli.int_in(GPT2_VOCAB, OUR_VOCAB),
        default=None,
        metavar="N",
        help=f"embedding rows to write, {GPT2_VOCAB}..{OUR_VOCAB} (default: all rows, minus trailing "
        f"rows still holding the import fill, so an imported GPT-2 exports at {GPT2_VOCAB})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        from fgpt_jax.checkpoint import load_model, save_model
        from fgpt_jax.hf.weights import HFError, from_hf, to_hf
        from fgpt_jax.rundir import RunDir

        if args.cmd == "import":
            if RunDir(args.run).has_checkpoints():
                raise HFError(f"--run {args.run}: already holds checkpoints; choose another directory")
            model, cfg = from_hf(args.hf, revision=args.revision)
            save_model(
                args.run, model, cfg, step=0, meta={"source": "huggingface", "hf": args.hf, "revision": args.revision}
            )
            print(
                json.dumps(
                    {
                        "run": str(args.run),
                        "hf": args.hf,
                        "n_layer": cfg.model.n_layer,
                        "n_embd": cfg.model.n_embd,
                        "block_size": cfg.model.block_size,
                    }
                )
            )
        else:
            if not Path(args.run).is_dir():
                raise HFError(f"--run {args.run}: no such directory")
            model, cfg = load_model(args.run, step=args.step)
            out = to_hf(model, cfg, args.out, vocab_size=args.vocab_size)
            with open(out / "config.json") as f:
                V = json.load(f)["vocab_size"]
            print(json.dumps({"hf_dir": str(out), "run": args.run, "vocab_size": V}))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
