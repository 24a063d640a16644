"""Training curves of a run in one PNG: `python -m fgpt_jax.plot --run RUN [--out FILE.png]`.

Reads metrics.jsonl only (no TensorBoard needed): train and val loss, learning rate(s), and the
HellaSwag accuracies when the run logged them. Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.metrics import read_metrics


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN/curves.png) and return its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: works on headless GPU nodes
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("matplotlib is needed for plots: pip install -e \".[plot]\"") from None
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a run directory written by fgpt_jax.train)")
    rows = read_metrics(path)
    hella = [k for k in ("hellaswag/acc_norm", "hellaswag/acc", "hellaswag/acc_token_avg") if series(rows, k)[0]]
    panels = 2 + bool(hella)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax = axes[0]
    ax.plot(*series(rows, "train/loss"), label="train", lw=1)
    if series(rows, "val/loss")[0]:
        ax.plot(*series(rows, "val/loss"), label="val", marker="o", ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    for key in ("lr", "lr_muon"):
        if series(rows, key)[0]:
            ax.plot(*series(rows, key), label=key)
    ax.set(xlabel="step", ylabel="learning rate", yscale="log", title="schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    if hella:
        ax = axes[2]
        for key in hella:
            ax.plot(*series(rows, key), label=key.split("/")[1], marker="o", ms=3)
        ax.axhline(0.25, color="gray", ls="--", lw=1, label="chance")
        ax.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m fgpt_jax.plot", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, metavar="DIR", help="run directory (holds metrics.jsonl)")
    p.add_argument("run_positional", nargs="?", type=Path, metavar="RUN", help=argparse.SUPPRESS)  # the 0.1 form: plot RUN
    p.add_argument("--out", type=Path, help="output PNG (default: RUN/curves.png)")
    args = p.parse_args(argv)
    run = args.run or args.run_positional
    if run is None:
        p.error("--run: expected a run directory")

    def body() -> int:
        print(plot(run, args.out))
        return 0

    return cli.run(body, (FileNotFoundError, ImportError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
