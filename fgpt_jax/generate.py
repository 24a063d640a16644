"""Continue a prompt with a trained model: `python -m fgpt_jax.generate --run DIR --prompt TEXT`.

    python -m fgpt_jax.generate --run DIR --prompt TEXT [--step N] [--max-new-tokens N] [--temperature T]
                                [--top-k K] [--top-p P] [--seed S] [--num-samples N] [--no-stream]

Restores the run's checkpoint (parameters only; the model config comes from DIR/config.json) and
streams the continuation token by token (`--prompt -` reads stdin; an empty prompt starts a new
document). Any --max-new-tokens works: past the model's context the window slides. The engine is
`fgpt_jax.inference.generator.Generator`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.errors import UserError


def _parser() -> cli.Parser:
    p = cli.Parser(
        prog="python -m fgpt_jax.generate",
        description="Continue a prompt with a trained model (restored from its run directory).",
    )
    p.add_argument("--run", type=Path, required=True, metavar="DIR", help="run directory (config.json + checkpoints/)")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads it from stdin)")
    p.add_argument("--step", type=cli.int_in(0), metavar="N", help="checkpoint step (default: the latest)")
    cli.add_sampling_args(p, max_new_tokens=128, temperature=0.8, top_k=50, top_p=1.0)
    p.add_argument(
        "--num-samples",
        type=cli.int_in(1, 1024),
        default=1,
        metavar="N",
        help="independent continuations, generated as one batch (default 1)",
    )
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        from fgpt_jax.checkpoint import load_model
        from fgpt_jax.inference.generator import Generator, TextStreamer
        from fgpt_jax.tokenizer import get_tokenizer

        if args.prompt == "-":
            try:
                prompt = sys.stdin.buffer.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"--prompt -: stdin is not UTF-8 text (byte {e.start})") from None
        else:
            prompt = args.prompt
        model, _ = load_model(args.run, args.step)
        gen = Generator.from_model(model)
        tok = get_tokenizer()
        ids = tok.encode(prompt) or [tok.eot_id]  # an empty prompt: start a new document
        sampling = dict(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        )
        if args.num_samples == 1 and not args.no_stream:
            out = TextStreamer()
            tokens = gen.stream(ids, seed=args.seed, **sampling)  # checks its arguments before anything is printed
            sys.stdout.write(prompt)
            for t in tokens:
                if t in gen.stop_ids:
                    break
                sys.stdout.write(out.push(t))
                sys.stdout.flush()
            sys.stdout.write(out.flush() + "\n")
        else:
            # One batch: every row draws its own tokens from the shared key.
            rows = gen.generate([ids] * args.num_samples, seed=args.seed, **sampling)
            for i, row in enumerate(rows):
                text = tok.decode([t for t in row if t not in gen.stop_ids])
                print(json.dumps({"sample": i, "text": prompt + text}) if args.num_samples > 1 else prompt + text)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
