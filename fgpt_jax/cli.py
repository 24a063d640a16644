"""What every command-line entry point shares: one-line errors, checked argument types, quiet logs.

The contract of every `python -m fgpt_jax.<command>`: `--help` prints the usage; bad input exits
with status 2 and one line `error: <file or flag>: <what was expected>` on stderr, never a
traceback; Ctrl-C exits with status 130. Only CLI modules import this (libraries raise exceptions:
any `fgpt_jax.errors.UserError` becomes that one line, see `run`).

Why the CLIs import lazily: every `__main__` imports only argparse, this module and fgpt_jax.errors at
the top, and the library (JAX, flax, orbax, datasets) inside its body, after the arguments are parsed
and checked. `--help` and a bad flag then answer in a fraction of a second instead of the 2-5 s that
starting JAX and its plugins takes, and nothing touches a device (or grabs GPU memory) before the
command knows it will run. A function-level import in a CLI is this rule, not a dodged import cycle.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable

from fgpt_jax.errors import UserError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
SEED_MAX = 2**32 - 1  # jax.random.key takes 32- or 64-bit seeds; one range for every command

# XLA's C++ logging reads its level once, possibly when jaxlib loads: set it before any CLI module
# imports jax (every CLI imports this module first). A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(text: str, kind: type):
    try:
        value = kind(text.replace("_", "")) if kind is int else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (either bound optional)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            what = (
                "a positive integer"
                if (lo, hi) == (1, None)
                else "a non-negative integer"
                if (lo, hi) == (0, None)
                else f"an integer {f'>= {lo}' if hi is None else f'<= {hi}' if lo is None else f'in [{lo}, {hi}]'}"
            )
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with `lo_open`)."""

    def parse(text: str) -> float:
        value = _number(text, float)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if low_bad or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            bounds = (
                f"{'>' if lo_open else '>='} {lo}"
                if hi is None
                else f"<= {hi}"
                if lo is None
                else f"in {left}{lo}, {hi}]"
            )
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}")
        return value

    return parse


positive_int = int_in(1)
seed = int_in(0, SEED_MAX)


def add_sampling_args(
    p: argparse.ArgumentParser, max_new_tokens: int | None, temperature: float, top_k: int, top_p: float
) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed, checked the same way everywhere."""
    default = "the model's context / 2" if max_new_tokens is None else max_new_tokens
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        metavar="N",
        help=f"tokens to generate (default: {default}); past the context the window slides",
    )
    p.add_argument(
        "--temperature",
        type=float_in(0.0, 100.0),
        default=temperature,
        metavar="T",
        help=f"0 = greedy (default {temperature})",
    )
    p.add_argument(
        "--top-k",
        type=int_in(0),
        default=top_k,
        metavar="K",
        help=f"sample from the K most likely tokens; 0 = all (default {top_k})",
    )
    p.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, lo_open=True),
        default=top_p,
        metavar="P",
        help=f"nucleus sampling mass in (0, 1]; 1 = off (default {top_p})",
    )
    p.add_argument("--seed", type=seed, default=0, help=f"PRNG seed in [0, {SEED_MAX}] (default 0)")


def quiet_libraries() -> None:
    """Silence the chatter of absl, orbax, tensorstore, grain and jax that a user would read as errors
    ("Given directory is read only", "setting save_interval_steps=0", background-thread tracebacks
    of a failed async save, ...). Our own code raises every error that matters and the CLI prints it
    as one line; set FGPT_JAX_DEBUG=1 to see the libraries' logs and tracebacks again.

    orbax logs through absl's Python logging (the "absl" logger), jax through Python logging, XLA's
    C++ code through TF_CPP_MIN_LOG_LEVEL (also set on import, see above), and a few libraries
    through `warnings`. tests/test_cli.py runs every command and checks stderr stays clean."""
    if os.environ.get("FGPT_JAX_DEBUG"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "orbax", "jax._src.xla_bridge", "jax", "grain"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", module="orbax")
    # Exceptions in library threads (orbax's async writer, tensorstore callbacks on a closed event
    # loop) and unraisable ones would print tracebacks after our one-line error.
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the first line; whitespace collapsed)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return " ".join(text.split())


def run(main: Callable[[], int | None]) -> int:
    """Run a CLI body: a `UserError` (fgpt_jax.errors: every error a user can fix derives from it) and
    an OS error become `error: ...` with status 2; Ctrl-C becomes status 130 with one line. Anything
    else is a bug and keeps its traceback."""
    quiet_libraries()
    try:
        return main() or 0
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        where = e.filename or ""
        print(f"error: {where + ': ' if where else ''}{e.strerror or one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
