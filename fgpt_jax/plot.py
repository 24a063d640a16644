"""Training curves of a run in one image: `python -m fgpt_jax.plot --run RUN [--out FILE.png]`.

Reads metrics.jsonl only (no TensorBoard needed): train and val loss, learning rate(s), and the
HellaSwag accuracies when the run logged them. Needs matplotlib (`pip install -e ".[plot]"`).
The image format follows --out's extension (png, svg, pdf, ...: whatever matplotlib writes); the
file is written under a temporary name and renamed, so a crash never leaves half an image.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN/curves.png) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works on headless GPU nodes
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('matplotlib is needed for plots: pip install -e ".[plot]"') from None
    out = Path(out) if out else Path(run_dir) / "curves.png"
    formats = sorted(plt.figure().canvas.get_supported_filetypes())
    plt.close("all")
    fmt = out.suffix.lower().removeprefix(".")
    if fmt not in formats:
        what = f"unknown image extension {out.suffix!r}" if out.suffix else "no image extension"
        raise UserError(f"--out {out}: {what}; expected one of {', '.join('.' + f for f in formats)}")
    rows = _read_rows(Path(run_dir) / "metrics.jsonl")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    hella = [k for k in ("hellaswag/acc_norm", "hellaswag/acc", "hellaswag/acc_token_avg") if series(rows, k)[0]]
    panels = 2 + bool(hella)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax = axes[0]
    if series(rows, "train/loss")[0]:
        ax.plot(*series(rows, "train/loss"), label="train", lw=1)
    if series(rows, "val/loss")[0]:
        ax.plot(*series(rows, "val/loss"), label="val", marker="o", ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=Path(run_dir).name)
    ax.grid(alpha=0.3)
    _legend(ax)
    ax = axes[1]
    for key in ("lr", "lr_muon"):
        if series(rows, key)[0]:
            ax.plot(*series(rows, key), label=key)
    ax.set(xlabel="step", ylabel="learning rate", yscale="log", title="schedule")
    ax.grid(alpha=0.3)
    _legend(ax)
    if hella:
        ax = axes[2]
        for key in hella:
            ax.plot(*series(rows, key), label=key.split("/")[1], marker="o", ms=3)
        ax.axhline(0.25, color="gray", ls="--", lw=1, label="chance")
        ax.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.tight_layout()
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
    p.add_argument("--run", type=Path, metavar="DIR", help="run directory (holds metrics.jsonl)")
    p.add_argument(
        "run_positional", nargs="?", type=Path, metavar="RUN", help=argparse.SUPPRESS
    )  # the 0.1 form: plot RUN
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="output image; its extension picks the format: .png, .svg, .pdf, ... (default: RUN/curves.png)",
    )
    args = p.parse_args(argv)
    run = args.run or args.run_positional
    if run is None:
        p.error("--run: expected a run directory")

    def body() -> int:
        print(plot(run, args.out))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
