"""Training curves of runs in one image: `python -m fgpt_jax.plot --run RUN [--run RUN2 ...] [--out FILE]`.

Reads metrics.jsonl only (no TensorBoard needed): train and val loss, learning rate(s), and the
HellaSwag accuracies when a run logged them. Several `--run`s share the axes, one colour per run and
a legend naming each (comparing runs is what one does next); the default image is RUN/curves.png for
one run and ./curves.png for several. matplotlib is a dependency of fgpt-jax (curves are the first
thing a user looks at, and it is small next to JAX). The image format follows --out's extension
(png, svg, pdf, ...: whatever matplotlib writes); the file is written under a temporary name and
renamed, so a crash never leaves half an image.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.errors import UserError
from fgpt_jax.metrics import read_metrics


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _read_rows(path: Path) -> list[dict]:
    """The metric rows of `path`, refused in one line if it is not text or holds no metric row."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a run directory written by fgpt_jax.train)")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (expected the JSON lines fgpt_jax.train writes)") from None
    rows = read_metrics(path)  # skips lines that are not objects with a step (one cut short by a crash, say)
    if not rows:
        raise UserError(
            f'{path}: no metrics (expected JSON objects with an integer "step", one per line, as fgpt_jax.train writes)'
        )
    return rows


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a matplotlib warning
        ax.legend()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works on headless GPU nodes
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency, so only a --no-deps install or a broken environment lacks it
        raise UserError("matplotlib is needed for plots (a dependency of fgpt-jax): pip install matplotlib") from None
    return plt


def _runs(runs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    if not runs:
        raise UserError("--run: expected a run directory")
    return list(dict.fromkeys(Path(r) for r in runs))  # the same run twice is drawn once


def _labels(runs: list[Path]) -> list[str]:
    """Each run's name, or the path as given where two runs share a name (runs/a/x and runs/b/x)."""
    names = [r.name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def figure(runs: str | os.PathLike | Sequence[str | os.PathLike]):
    """A matplotlib Figure of the curves of `runs` (one run directory, or several on shared axes):
    loss (train and val), the learning rate(s), and HellaSwag when any run logged it. With several
    runs every curve is labelled `NAME what` and a run keeps one colour on every panel. The caller
    closes it (`plt.close(fig)`)."""
    plt = _pyplot()
    runs = _runs(runs)
    rows = [_read_rows(r / "metrics.jsonl") for r in runs]
    single = len(runs) == 1
    labels = _labels(runs)
    name = lambda i, what: what if single else f"{labels[i]} {what}"
    hella = [
        k
        for k in ("hellaswag/acc_norm", "hellaswag/acc", "hellaswag/acc_token_avg")
        if any(series(r, k)[0] for r in rows)
    ]
    panels = 2 + bool(hella)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for i, r in enumerate(rows):
        colour = f"C{i % 10}"
        if series(r, "train/loss")[0]:
            axes[0].plot(*series(r, "train/loss"), label=name(i, "train"), lw=1, color=colour)
        if series(r, "val/loss")[0]:
            axes[0].plot(*series(r, "val/loss"), label=name(i, "val"), marker="o", ms=3, color=colour)
        for key, style in (("lr", "-"), ("lr_muon", "--")):
            if series(r, key)[0]:
                # one run: a colour per schedule, as before; several: a colour per run, a style per schedule
                axes[1].plot(*series(r, key), label=name(i, key), ls=style, color=None if single else colour)
        for key, marker in zip(hella, "os^"):
            if series(r, key)[0]:
                axes[2].plot(
                    *series(r, key),
                    label=name(i, key.split("/")[1]),
                    marker=marker,
                    ms=3,
                    color=None if single else colour,
                )
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title=runs[0].name if single else "loss")
    axes[1].set(xlabel="step", ylabel="learning rate", yscale="log", title="schedule")
    if hella:
        axes[2].axhline(0.25, color="gray", ls="--", lw=1, label="chance")
        axes[2].set(xlabel="step", ylabel="accuracy", title="HellaSwag")
    for ax in axes:
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.tight_layout()
    return fig


def plot(runs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write the curves of `runs` (one run directory or several) to `out` and return its path.
    Default `out`: RUN/curves.png for one run, curves.png in the working directory for several."""
    plt = _pyplot()
    runs = _runs(runs)
    out = Path(out) if out else runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    formats = sorted(plt.figure().canvas.get_supported_filetypes())
    plt.close("all")
    fmt = out.suffix.lower().removeprefix(".")
    if fmt not in formats:
        what = f"unknown image extension {out.suffix!r}" if out.suffix else "no image extension"
        raise UserError(f"--out {out}: {what}; expected one of {', '.join('.' + f for f in formats)}")
    for r in runs:  # every run is readable before anything is drawn
        _read_rows(r / "metrics.jsonl")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    fig = figure(runs)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format=fmt)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m fgpt_jax.plot", description=__doc__.splitlines()[0])
    p.add_argument(
        "--run",
        type=Path,
        action="append",
        metavar="DIR",
        help="run directory (holds metrics.jsonl); repeat it to compare runs on the same axes",
    )
    p.add_argument(
        "run_positional", nargs="?", type=Path, metavar="RUN", help=argparse.SUPPRESS
    )  # the 0.1 form: plot RUN
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="output image; its extension picks the format: .png, .svg, .pdf, ... (default: RUN/curves.png, "
        "or ./curves.png for several runs)",
    )
    args = p.parse_args(argv)
    runs = (args.run or []) + ([args.run_positional] if args.run_positional else [])
    if not runs:
        p.error("--run: expected a run directory")

    def body() -> int:
        print(plot(runs, args.out))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
