"""Evaluate a run: `python -m fgpt_jax.eval {val,hellaswag,dpo} --run DIR [...]`.

    python -m fgpt_jax.eval val --run DIR [--step N] [--data DIR_OR_FILE] [--max-tokens N] [--batch-size N]
    python -m fgpt_jax.eval hellaswag --run DIR [--step N] [--limit N] [--data FILE] [--batch-size N]
    python -m fgpt_jax.eval dpo --run DIR --ref REF_DIR [--step N] [--ref-step N] [--data FILE] [--limit N]

The result is printed as one JSON object on the last line of stdout and appended, with the step
evaluated, to RUN/eval.jsonl. Progress bars go to stderr, on a terminal only. Bad input exits 2
with one line `error: <file or flag>: <what was expected>`.

`val` scores, by default, exactly the batches the trainer's `val/loss` used (the run's data, its
`data.val_windows` windows, its micro-batch), so it prints the trainer's number; `--data` scores
any shard directory (or the bundled corpus, or a conversations file for a masked loss) instead,
for any run: pretrained, fine-tuned or imported.

`dpo` prints the DPO metrics (dpo/loss, rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected; means over pairs) of the run against the reference
run `--ref`, with the run's dpo.* settings. By default it scores the run's own validation pairs in
its micro-batches (a DPO run's val/ metrics, the same numbers when --ref is its init_from); `--data`
scores every pair of a preference file (its first --limit records) that fits the context, whole:
no prompt/reply limits, no truncation, so any tool can recompute the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.data.hellaswag import PREPROCESS
from fgpt_jax.errors import UserError


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m fgpt_jax.eval", description="Evaluate a run directory's checkpoint.")
    sub = p.add_subparsers(dest="task", required=True, metavar="{val,hellaswag,dpo}", parser_class=cli.Parser)
    common = cli.Parser(add_help=False)
    common.add_argument(
        "--run", type=Path, required=True, metavar="DIR", help="run directory (config.json + checkpoints/)"
    )
    common.add_argument(
        "--step", type=cli.int_in(0), metavar="N", help="checkpoint step to evaluate (default: the latest)"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    h = sub.add_parser("hellaswag", parents=[common], help="HellaSwag accuracy (acc, acc_norm, acc_token_avg)")
    h.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="HellaSwag items: original jsonl or llama.cpp 6-line .txt, optionally .gz/.bz2 "
        "(default: the official hellaswag_val.jsonl, downloaded once into $FGPT_JAX_CACHE/hellaswag)",
    )
    h.add_argument("--limit", type=cli.positive_int, metavar="N", help="score only the first N items")
    h.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=32,
        metavar="N",
        help="items per device call, 4 rows each (default 32; rounded up to a multiple of the devices)",
    )
    h.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        default="harness",
        help="jsonl text: 'harness' = lm-eval-harness clean-up with the activity label (default); "
        "'none' = raw ctx and endings, as build-nanogpt",
    )

    v = sub.add_parser("val", parents=[common], help="validation loss and perplexity")
    v.add_argument(
        "--data",
        metavar="DIR_OR_FILE",
        help="a shard directory, 'tinyshakespeare', or a conversations file (.json/.jsonl/.parquet: a "
        "masked loss on its held-out split) (default: the data the run trained on)",
    )
    v.add_argument(
        "--max-tokens",
        type=cli.positive_int,
        metavar="N",
        help="score about N target tokens: N // seq_len windows (default: the run's data.val_windows, "
        "the trainer's own validation windows)",
    )
    v.add_argument(
        "--batch-size",
        type=cli.positive_int,
        metavar="N",
        help="sequences per device call (default: the run's micro-batch, as in training)",
    )

    d = sub.add_parser("dpo", parents=[common], help="DPO preference metrics against a reference run")
    d.add_argument(
        "--ref",
        type=Path,
        required=True,
        metavar="DIR",
        help="the reference run (a DPO run's init_from: the SFT run it started from)",
    )
    d.add_argument("--ref-step", type=cli.int_in(0), metavar="N", help="the reference's checkpoint (default: latest)")
    d.add_argument(
        "--data",
        metavar="FILE",
        help="preference pairs (.json/.jsonl/.parquet or a Hub dataset NAME[:SPLIT]): every pair that fits "
        "the context (default: the run's validation pairs)",
    )
    d.add_argument("--limit", type=cli.positive_int, metavar="N", help="read only the first N records")
    d.add_argument(
        "--batch-size",
        type=cli.positive_int,
        metavar="N",
        help="pairs per device call (default: the run's micro-batch, as in training)",
    )
    return p


def _load(run: Path, step: int | None):
    """(graphdef, params replicated on the mesh, cfg, step) of a run's checkpoint."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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


def run_val(
    run: Path, step: int | None, data: str | None, max_tokens: int | None, batch_size: int | None, progress: bool
) -> dict:
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
        raise UserError(
            f"--run {run}: records no training data (an imported model?); pass --data with a shard "
            f"directory, 'tinyshakespeare' or a conversations file"
        )
    elif cfg.data.format == "preference":
        raise UserError(
            f"--run {run}: trained on preference pairs; its validation metrics come from python -m "
            f"fgpt_jax.eval dpo --run {run} --ref {cfg.init_from} (--data scores a loss on other data)"
        )
    chat = data_cfg.format == "chat"
    if chat and max_tokens is not None:
        raise UserError(
            f"--max-tokens: applies to token shards; conversations ({data_cfg.path}) are scored whole "
            f"(every row of the held-out split)"
        )
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
        raise UserError(val.notes[0] if val.notes else f"--data {data_cfg.path}: no validation batches")
    graphdef, params, cfg, step = _load(run, step)
    with _progress("val", len(val.val), progress) as bar:
        loss, tokens = mean_loss(make_eval_step(graphdef), params, val.val, shd.batch_sharding(mesh, 2), bar.update)
    return {
        "task": "val",
        "step": step,
        "tokens": tokens,
        "loss": loss,
        "ppl": perplexity(loss),
        "data": data_cfg.path,
        "windows": windows,
    }


def run_dpo(
    run: Path,
    step: int | None,
    ref: Path,
    ref_step: int | None,
    data: str | None,
    limit: int | None,
    batch_size: int | None,
    progress: bool,
) -> dict:
    import jax

    from fgpt_jax import sharding as shd
    from fgpt_jax.data.pipeline import open_data
    from fgpt_jax.data.preferences import build_preference_data, load_pairs, val_pairs
    from fgpt_jax.eval.dpo import dpo_eval_step, load_params, preference_metrics, row_logps
    from fgpt_jax.rundir import RunDir
    from fgpt_jax.tokenizer import get_tokenizer

    cfg, ref_cfg = RunDir(run).read_config(), RunDir(ref).read_config()  # bad runs fail before any model loads
    if data is None and cfg.data.format != "preference":
        raise UserError(f"--run {run}: trained on {cfg.data.format} data, not preference pairs; pass --data FILE")
    mesh = shd.make_mesh()
    pairs = batch_size or cfg.train.batch_size // cfg.train.grad_accum  # the trainer's micro-batch
    pairs = -(-pairs // mesh.size) * mesh.size
    reference: dict = {}

    def ref_logps(rows):  # the reference model loads once the data has been read and checked
        if not reference:
            graphdef, params, _, s = load_params(ref, ref_step, mesh)
            reference.update(step=s, eval_step=dpo_eval_step(graphdef, cfg.dpo, mesh), params=params)
        with _progress("reference", -(-rows.num_rows // (2 * pairs)), progress) as bar:
            return row_logps(reference["eval_step"], reference["params"], rows, pairs, mesh, bar.update)

    if data is None:  # the run's own validation pairs, batched as the trainer batches them
        seq_len = cfg.train.seq_len or cfg.model.block_size
        data_cfg = dataclasses.replace(cfg.data, limit=limit or cfg.data.limit)
        opened = open_data(
            data_cfg, seq_len, pairs, pairs, jax.process_index(), jax.process_count(), train=False, reference=ref_logps
        )
        if not opened.val:
            raise UserError(f"--run {run}: no preference pair in its validation split ({data_cfg.path})")
        batches, stats, path = opened.val, opened.stats, data_cfg.path
    else:  # every pair of the file that fits both models' context, whole
        seq_len = min(cfg.model.block_size, ref_cfg.model.block_size)
        built = build_preference_data(load_pairs(data, limit), seq_len, val_fraction=0.0)
        stats, path = built.stats, data
        if not built.train.num_rows:
            raise UserError(
                f"--data {data}: no pair fits the {seq_len}-token context ({stats['dropped_too_long']} "
                f"too long, {stats['dropped_empty']} empty, {stats['dropped_identical']} identical)"
            )
        batches = val_pairs(
            built.train, ref_logps(built.train), pairs, get_tokenizer().eot_id, jax.process_index(), jax.process_count()
        )
    ref_step = reference["step"]
    reference.clear()  # frees the reference before the policy loads
    graphdef, params, cfg, step = load_params(run, step, mesh)
    with _progress("dpo", len(batches), progress) as bar:
        metrics = preference_metrics(dpo_eval_step(graphdef, cfg.dpo, mesh), params, batches, mesh, bar.update)
    counts = {k: v for k, v in stats.items() if k == "loaded" or k.startswith(("dropped_", "truncated_"))}
    return {
        "task": "dpo",
        "step": step,
        "ref": str(ref),
        "ref_step": ref_step,
        **metrics,
        "beta": cfg.dpo.beta,
        "loss_type": cfg.dpo.loss,
        "label_smoothing": cfg.dpo.label_smoothing,
        "data": path,
        "seq_len": seq_len,
        **counts,
    }


def run_hellaswag(
    run: Path, step: int | None, data: Path | None, limit: int | None, batch_size: int, preprocess: str, progress: bool
) -> dict:
    from fgpt_jax.data.hellaswag import load_examples, preprocessing
    from fgpt_jax.eval.hellaswag import HellaSwagScorer
    from fgpt_jax.rundir import RunDir

    RunDir(run).read_config()
    examples = load_examples(data, limit, preprocess)  # bad input fails before the model loads
    graphdef, params, cfg, step = _load(run, step)
    scorer = HellaSwagScorer(
        examples, cfg.model.block_size, batch_size=batch_size, progress=progress and sys.stderr.isatty()
    )
    t0 = time.perf_counter()
    result = scorer(graphdef, params)
    return {
        "task": "hellaswag",
        "step": step,
        **result,
        "data": str(data) if data is not None else "hellaswag_val.jsonl (official)",
        "preprocess": preprocessing(data, preprocess),  # what was done: the flag does not apply to llama.cpp text
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        import jax

        from fgpt_jax.rundir import RunDir
        from fgpt_jax.sharding import initialize_distributed

        initialize_distributed()
        if args.task == "hellaswag":
            record = run_hellaswag(
                args.run, args.step, args.data, args.limit, args.batch_size, args.preprocess, not args.no_progress
            )
        elif args.task == "dpo":
            record = run_dpo(
                args.run,
                args.step,
                args.ref,
                args.ref_step,
                args.data,
                args.limit,
                args.batch_size,
                not args.no_progress,
            )
        else:
            record = run_val(args.run, args.step, args.data, args.max_tokens, args.batch_size, not args.no_progress)
        if jax.process_index() == 0:
            RunDir(args.run).append_eval(record)
            print(json.dumps(record), flush=True)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
