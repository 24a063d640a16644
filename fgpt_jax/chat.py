"""Chat with an instruction-tuned run: `python -m fgpt_jax.chat --run DIR`.

    python -m fgpt_jax.chat --run DIR [--step N] [--system TEXT] [--prompt TEXT] [--max-new-tokens N]
                            [--temperature T] [--top-k K] [--top-p P] [--seed S]

A multi-turn REPL (`fgpt_jax.inference.session.ChatSession`). On a terminal: `you>` prompts,
`/reset` clears the history, `/quit` (or Ctrl-D) leaves; answers stream as they are generated. With
stdin not a terminal (a pipe, a file), every non-empty line is one user turn and each answer is one
JSON line, `{"turn": N, "user": TEXT, "assistant": ANSWER}`: answers hold newlines of their own, so
raw text could not tell where one ends. `/reset` and `/quit` lines work there too and print nothing.
`--prompt TEXT` answers once, as plain text, and exits.
A run that was not instruction-tuned (`fgpt_jax.config.instruction_tuned`: neither SFT nor DPO, so
pretrained or imported) still answers, after one note on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.errors import UserError


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m fgpt_jax.chat", description="Chat with an instruction-tuned run.")
    p.add_argument("--run", type=Path, required=True, metavar="DIR", help="run directory (config.json + checkpoints/)")
    p.add_argument("--step", type=cli.int_in(0), metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one message and exit")
    cli.add_sampling_args(p, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.95)
    return p


def _answer(session, text: str) -> None:
    for piece in session.reply(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        from fgpt_jax.checkpoint import load_model
        from fgpt_jax.config import instruction_tuned
        from fgpt_jax.inference.generator import Generator
        from fgpt_jax.inference.session import ChatSession

        model, cfg = load_model(args.run, args.step)
        if not instruction_tuned(cfg):
            # Pretrained or imported: it still answers, but a newcomer should know why it rambles.
            print(
                f"note: {args.run} was not instruction-tuned (data.format {cfg.data.format!r}): answers will be "
                f"text continuations; fine-tune it first with python -m fgpt_jax.train --config sft "
                f"--config.init_from={args.run}",
                file=sys.stderr,
                flush=True,
            )
        session = ChatSession(
            Generator.from_model(model),
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        if args.prompt is not None:
            _answer(session, args.prompt)
            return 0
        interactive = sys.stdin.isatty()
        turns = 0
        if interactive:
            print("Chatting with", args.run, "— /reset clears the history, /quit leaves.")
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                if interactive:
                    print()
                return 0
            except UnicodeDecodeError:
                raise UserError("stdin: not UTF-8 text") from None
            text = line.strip()
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                session.reset()
                if interactive:
                    print("(history cleared)")
                continue
            if not text:
                continue
            if interactive:
                sys.stdout.write("assistant> ")
                _answer(session, text)
            else:  # one JSON line per turn, written when the answer is complete
                turns += 1
                answer = "".join(session.reply(text))
                print(json.dumps({"turn": turns, "user": text, "assistant": answer}), flush=True)

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
