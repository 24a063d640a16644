"""Evaluate a run: `python -m fgpt_jax.eval {val,hellaswag} --run DIR [...]`.

    python -m fgpt_jax.eval val --run DIR [--step N] [--data DIR_OR_FILE] [--max-tokens N] [--batch-size N]
    python -m fgpt_jax.eval hellaswag --run DIR [--step N] [--limit N] [--data FILE] [--batch-size N]

The result is printed as one JSON object on the last line of stdout and appended, with the step
evaluated, to RUN/eval.jsonl. Progress bars go to stderr, on a terminal only. Bad input exits 2
with one line `error: <file or flag>: <what was expected>`.

`val` scores, by default, exactly the batches the trainer's `val/loss` used (the run's data, its
`data.val_windows` windows, its micro-batch), so it prints the trainer's number; `--data` scores
any shard directory (or the bundled corpus, or a conversations file for a masked loss) instead,
for any run: pretrained, fine-tuned or imported.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.data.hellaswag import PREPROCESS


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m fgpt_jax.eval", description="Evaluate a run directory's checkpoint.")
    sub = p.add_subparsers(dest="task", required=True, metavar="{val,hellaswag}", parser_class=cli.Parser)
    common = cli.Parser(add_help=False)
    common.add_argument("--run", type=Path, required=True, metavar="DIR", help="run directory (config.json + checkpoints/)")
    common.add_argument("--step", type=cli.int_in(0), metavar="N", help="checkpoint step to evaluate (default: the latest)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    h = sub.add_parser("hellaswag", parents=[common], help="HellaSwag accuracy (acc, acc_norm, acc_token_avg)")
    h.add_argument("--data", type=Path, metavar="FILE",
                   help="HellaSwag items: original jsonl or llama.cpp 6-line .txt, optionally .gz/.bz2 "
                        "(default: the official hellaswag_val.jsonl, downloaded once into $FGPT_JAX_CACHE/hellaswag)")
    h.add_argument("--limit", type=cli.positive_int, metavar="N", help="score only the first N items")
    h.add_argument("--batch-size", type=cli.positive_int, default=32, metavar="N",
                   help="items per device call, 4 rows each (default 32; rounded up to a multiple of the devices)")
    h.add_argument("--preprocess", choices=PREPROCESS, default="harness",
                   help="jsonl text: 'harness' = lm-eval-harness clean-up with the activity label (default); "
                        "'none' = raw ctx and endings, as build-nanogpt")

    v = sub.add_parser("val", parents=[common], help="validation loss and perplexity")
    v.add_argument("--data", metavar="DIR_OR_FILE",
                   help="a shard directory, 'tinyshakespeare', or a conversations file (.json/.jsonl/.parquet: a "
                        "masked loss on its held-out split) (default: the data the run trained on)")
    v.add_argument("--max-tokens", type=cli.positive_int, metavar="N",
                   help="score about N target tokens: N // seq_len windows (default: the run's data.val_windows, "
                        "the trainer's own validation windows)")
    v.add_argument("--batch-size", type=cli.positive_int, metavar="N",
                   help="sequences per device call (default: the run's micro-batch, as in training)")
    return p


def _load(run: Path, step: int | None):
    """(graphdef, params replicated on the mesh, cfg, step) of a run's checkpoint."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fgpt_jax import sharding as shd
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.rundir import RunDir

    steps = RunDir(run).checkpoint_steps()
    step = steps[-1] if step is None and steps else step
    model, cfg = load_model(run, step)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, jax.device_put(params, NamedSharding(shd.make_mesh(), P())), cfg, step


def _progress(desc: str, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not (enabled and sys.stderr.isatty()))


def run_val(run: Path, step: int | None, data: str | None, max_tokens: int | None, batch_size: int | None,
            progress: bool) -> dict:
    import jax

    from fgpt_jax import sharding as shd
    from fgpt_jax.data.pipeline import open_data
    from fgpt_jax.eval.perplexity import mean_loss, perplexity
    from fgpt_jax.loss import make_eval_step

    from fgpt_jax.rundir import RunDir
    cfg = RunDir(run).read_config()  # fails on a bad run before the model is loaded
    data_cfg = cfg.data
    if data is not None:
        fmt = "chat" if data.lower().endswith((".json", ".jsonl", ".parquet")) else "tokens"
        data_cfg = dataclasses.replace(cfg.data, path=data, format=fmt)
    elif not cfg.data.path:
        raise ValueError(f"--run {run}: records no training data (an imported model?); pass --data with a shard "
                         f"directory, 'tinyshakespeare' or a conversations file")
    chat = data_cfg.format == "chat"
    if chat and max_tokens is not None:
        raise ValueError(f"--max-tokens: applies to token shards; conversations ({data_cfg.path}) are scored whole "
                         f"(every row of the held-out split)")
    mesh = shd.make_mesh()
    seq_len = cfg.train.seq_len or cfg.model.block_size
    batch = batch_size or cfg.train.batch_size // cfg.train.grad_accum  # the trainer's micro-batch
    batch = -(-batch // mesh.size) * mesh.size
    windows = None
    if not chat:  # conversations: every held-out row, in batches of `batch`, as the trainer reads them
        windows = data_cfg.val_windows if max_tokens is None else max(1, max_tokens // seq_len)
        if windows < batch:  # one batch, still split evenly over the devices
            windows = batch = max(mesh.size, windows - windows % mesh.size)
        data_cfg = dataclasses.replace(data_cfg, val_windows=windows)
    val = open_data(data_cfg, seq_len, batch, batch, jax.process_index(), jax.process_count(), train=False)
    if not val.val:
        raise ValueError(val.notes[0] if val.notes else f"--data {data_cfg.path}: no validation batches")
    graphdef, params, cfg, step = _load(run, step)
    with _progress("val", len(val.val), progress) as bar:
        loss, tokens = mean_loss(make_eval_step(graphdef), params, val.val, shd.batch_sharding(mesh, 2), bar.update)
    return {"task": "val", "step": step, "tokens": tokens, "loss": loss, "ppl": perplexity(loss),
            "data": data_cfg.path, "windows": windows}


def run_hellaswag(run: Path, step: int | None, data: Path | None, limit: int | None, batch_size: int,
                  preprocess: str, progress: bool) -> dict:
    from fgpt_jax.data.hellaswag import load_examples
    from fgpt_jax.eval.hellaswag import HellaSwagScorer
    from fgpt_jax.rundir import RunDir

    RunDir(run).read_config()
    examples = load_examples(data, limit, preprocess)  # bad input fails before the model loads
    graphdef, params, cfg, step = _load(run, step)
    scorer = HellaSwagScorer(examples, cfg.model.block_size, batch_size=batch_size,
                             progress=progress and sys.stderr.isatty())
    t0 = time.perf_counter()
    result = scorer(graphdef, params)
    return {"task": "hellaswag", "step": step, **result,
            "data": str(data) if data is not None else "hellaswag_val.jsonl (official)",
            "preprocess": preprocess, "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        import jax

        from fgpt_jax.rundir import RunDir
        from fgpt_jax.sharding import initialize_distributed
        initialize_distributed()
        if args.task == "hellaswag":
            record = run_hellaswag(args.run, args.step, args.data, args.limit, args.batch_size, args.preprocess,
                                   not args.no_progress)
        else:
            record = run_val(args.run, args.step, args.data, args.max_tokens, args.batch_size, not args.no_progress)
        if jax.process_index() == 0:
            RunDir(args.run).append_eval(record)
            print(json.dumps(record), flush=True)
        return 0

    from fgpt_jax.checkpoint import CheckpointError
    from fgpt_jax.config import ConfigError
    from fgpt_jax.data.hellaswag import HellaSwagError
    from fgpt_jax.data.shards import ShardError
    from fgpt_jax.data.sources import DataError
    return cli.run(body, (HellaSwagError, ShardError, ConfigError, CheckpointError, DataError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
