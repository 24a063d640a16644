"""Evaluate a run: `python -m fgpt_jax.eval {val,hellaswag,core,dpo,harness} --run DIR [...]`.

    python -m fgpt_jax.eval val --run DIR [--step N] [--data DIR_OR_FILE] [--max-tokens N] [--batch-size N]
    python -m fgpt_jax.eval hellaswag --run DIR [--step N] [--limit N] [--data FILE] [--batch-size N]
    python -m fgpt_jax.eval core --run DIR [--step N] [--data DIR] [--tasks a,b] [--max-per-task N] [--batch-size N]
    python -m fgpt_jax.eval dpo --run DIR --ref REF_DIR [--step N] [--ref-step N] [--data FILE] [--limit N]
    python -m fgpt_jax.eval harness --run DIR --tasks T[,T...] [--step N] [--include-path DIR] [--num-fewshot K]
        [--limit N] [--batch-size B] [--apply-chat-template] [--output-path DIR] [--log-samples]

The result is printed as one JSON object on the last line of stdout and appended, with the step
evaluated, to RUN/eval.jsonl. Progress bars go to stderr, on a terminal only. Bad input exits 2
with one line `error: <file or flag>: <what was expected>`.

`val` prints loss, perplexity and bits per byte (`bpb`: nats of the text targets / ln 2 / their UTF-8
bytes, nanochat's, comparable across vocabularies). It scores, by default, exactly the batches the
trainer's `val/loss` and `val/bpb` used (the run's data, its `data.val_windows` windows, its
micro-batch), so it prints the trainer's numbers; `--data` scores any shard directory (or the bundled
corpus, or a conversations file for a masked loss) instead, for any run: pretrained, fine-tuned or
imported.

Every command here only parses its flags, loads (fgpt_jax.eval.load), calls the library
(fgpt_jax.eval.evaluate_*) and prints: the evaluations themselves live in fgpt_jax/eval/.

`dpo` prints the DPO metrics (dpo/loss, rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected; means over pairs) of the run against the reference
run `--ref`, with the run's dpo.* settings. By default it scores the run's own validation pairs in
its micro-batches (a DPO run's val/ metrics, the same numbers when --ref is its init_from); `--data`
scores every pair of a preference file (its first --limit records) that fits the context, whole:
no prompt/reply limits, no truncation, so any tool can recompute the numbers.

`core` scores DCLM's CORE metric as nanochat does (fgpt_jax.eval.core), on nanochat's eval bundle
(downloaded once into $FGPT_JAX_CACHE/core, or `--data DIR`); the per-task table goes to stderr
and nanochat's CSV to RUN/core_<step>.csv.

`harness` runs lm-evaluation-harness tasks on the run's model in process (fgpt_jax.eval.harness;
the optional extra `pip install "fgpt-jax[eval]"`); its JSON line's "results" is lm-eval's results
dictionary, and --output-path receives lm-eval's own result files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from fgpt_jax import cli
from fgpt_jax.data.hellaswag import PREPROCESS
from fgpt_jax.errors import UserError


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m fgpt_jax.eval", description="Evaluate a run directory's checkpoint.")
    sub = p.add_subparsers(
        dest="task", required=True, metavar="{val,hellaswag,core,dpo,harness}", parser_class=cli.Parser
    )
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

    v = sub.add_parser("val", parents=[common], help="validation loss, perplexity and bits per byte")
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
    _add_core_parser(sub, common)
    _harness_parser(sub, common)
    return p


def _add_core_parser(sub, common: cli.Parser) -> None:
    c = sub.add_parser("core", parents=[common], help="DCLM's CORE metric (22 in-context tasks), as nanochat scores it")
    c.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="an eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/) (default: nanochat's "
        "eval_bundle.zip, downloaded once into $FGPT_JAX_CACHE/core)",
    )
    c.add_argument(
        "--tasks",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()] or None,
        metavar="A,B,...",
        help="score only these task labels (default: every task of core.yaml)",
    )
    c.add_argument(
        "--max-per-task",
        type=cli.positive_int,
        metavar="N",
        help="the first N items of each task after nanochat's shuffle (default: all)",
    )
    c.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=64,
        metavar="N",
        help="prompts per device call (default 64; rounded up to a multiple of the devices)",
    )


def _harness_parser(sub, common: cli.Parser) -> None:
    h = sub.add_parser(
        "harness",
        parents=[common],
        help='lm-evaluation-harness tasks, in process (pip install "fgpt-jax[eval]")',
        description="Run lm-evaluation-harness tasks on the run's model in process; prints one JSON line "
        'whose "results" is lm-eval\'s results dictionary.',
    )
    h.add_argument(
        "--tasks",
        required=True,
        metavar="T[,T...]",
        help="lm-eval task, group or tag names (or glob patterns, or task YAML files), comma-separated",
    )
    h.add_argument(
        "--include-path",
        type=Path,
        metavar="DIR",
        help="a directory of your own task YAMLs (they win over lm-eval's registry of the same name)",
    )
    h.add_argument(
        "--num-fewshot", type=cli.int_in(0), metavar="K", help="few-shot examples per prompt (default: each task's)"
    )
    h.add_argument("--limit", type=cli.positive_int, metavar="N", help="evaluate only the first N documents per task")
    h.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=32,
        metavar="B",
        help="rows per scoring call and prompts per generation call (default 32)",
    )
    h.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render prompts with the chat template (<|system|>/<|user|>/<|assistant|> turns), for SFT runs",
    )
    h.add_argument(
        "--output-path",
        type=Path,
        metavar="DIR",
        help="write lm-eval's result files there, as its CLI does (DIR/<run>/results_<date>.json)",
    )
    h.add_argument(
        "--log-samples", action="store_true", help="also write every request and response (needs --output-path)"
    )


def _bar(desc: str, enabled: bool, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not (enabled and sys.stderr.isatty()))


def run_val(args) -> dict:
    from fgpt_jax import eval as ev
    from fgpt_jax import sharding as shd
    from fgpt_jax.rundir import RunDir

    cfg = RunDir(args.run).read_config()  # fails on a bad run before the model is loaded
    batches, info = ev.validation_batches(cfg, shd.make_mesh(), args.data, args.max_tokens, args.batch_size, args.run)
    model = ev.load(args.run, args.step)
    with _bar("val", not args.no_progress, len(batches)) as bar:
        m = ev.evaluate_val(model, batches, bar.update)
    return {
        "task": "val",
        "step": model.step,
        "tokens": m["tokens"],
        "loss": m["loss"],
        "ppl": m["ppl"],
        "bpb": m["bpb"],
        "bytes": m["bytes"],
        **info,
    }


def run_dpo(args) -> dict:
    from fgpt_jax import eval as ev
    from fgpt_jax import sharding as shd
    from fgpt_jax.rundir import RunDir

    cfg = RunDir(args.run).read_config()  # bad runs fail before any model loads
    with _bar("reference", not args.no_progress) as bar:
        batches, info = ev.preference_batches(
            cfg, args.ref, args.ref_step, shd.make_mesh(), args.data, args.limit, args.batch_size, bar.update, args.run
        )
    model = ev.load(args.run, args.step)  # after the reference is freed
    with _bar("dpo", not args.no_progress, len(batches)) as bar:
        m = ev.evaluate_dpo(model, batches, bar.update)
    return {"task": "dpo", "step": model.step, **m, **info}


def run_hellaswag(args) -> dict:
    from fgpt_jax import eval as ev
    from fgpt_jax.data.hellaswag import load_examples, preprocessing
    from fgpt_jax.rundir import RunDir

    RunDir(args.run).read_config()
    examples = load_examples(args.data, args.limit, args.preprocess)  # bad input fails before the model loads
    model = ev.load(args.run, args.step)
    m = ev.evaluate_hellaswag(model, examples, args.batch_size, progress=not args.no_progress and sys.stderr.isatty())
    data = str(args.data) if args.data is not None else "hellaswag_val.jsonl (official)"
    # What was done to the text: the flag does not apply to llama.cpp's (already preprocessed) text.
    done = preprocessing(args.data, args.preprocess)
    return {"task": "hellaswag", "step": model.step, **m, "data": data, "preprocess": done}


def run_core(args) -> dict:
    """`eval core`: args.run, .step, .data, .tasks, .max_per_task, .batch_size, .no_progress."""
    import jax
    from tqdm import tqdm

    from fgpt_jax import eval as ev
    from fgpt_jax import sharding as shd
    from fgpt_jax.data.core import CoreError, download_bundle, load_items, read_bundle
    from fgpt_jax.eval.core import CoreEvaluator, format_csv, format_table
    from fgpt_jax.rundir import RunDir

    run, step, data, max_per_task = args.run, args.step, args.data, args.max_per_task
    cfg = RunDir(run).read_config()
    main_process = jax.process_index() == 0
    show = not args.no_progress and main_process and sys.stderr.isatty()
    if data is None:
        bar = tqdm(desc="eval_bundle.zip", unit="B", unit_scale=True, file=sys.stderr, disable=not show)

        def fetched(done, total):
            bar.total = total
            bar.update(done - bar.n)

        with bar:
            data = download_bundle(progress=fetched)
    bundle = read_bundle(data)
    chosen = bundle.select(args.tasks)
    missing = chosen.missing()
    present = [t for t in chosen.tasks if t not in missing]
    if not present:
        raise CoreError(f"--data {data}: no data file for {', '.join(f'{t.label} ({t.path})' for t in missing)}")
    # Every item is read, checked, rendered and tokenised before the model loads.
    loaded = [(t, load_items(t, max_per_task)) for t in present]
    t0 = time.perf_counter()
    evaluator = CoreEvaluator(
        loaded,
        cfg.model.block_size,
        args.batch_size,
        mesh=shd.make_mesh(),
        n_total=len(bundle.tasks),
        missing=[t.label for t in missing],
        max_per_task=max_per_task,
    )
    prepare = time.perf_counter() - t0
    if missing and main_process:  # said once every check has passed, so a refused run prints one line
        names = ", ".join(f"{t.label} ({t.path})" for t in missing)
        print(f"note: {len(missing)} task file(s) missing, not scored: {names}", file=sys.stderr)
    model = ev.load(run, step)
    step = model.step
    with tqdm(total=evaluator.n_batches, desc="core", unit="batch", file=sys.stderr, disable=not show) as bar:
        t0 = time.perf_counter()
        result = evaluator(model.graphdef, model.params, bar.update, bar.set_postfix_str)
        seconds = time.perf_counter() - t0
    record = {
        "task": "core",
        "step": step,
        **result,
        "data": str(data),
        "seconds": round(seconds, 3),
        "prepare_seconds": round(prepare, 3),
    }
    if main_process:
        print(format_table(result), file=sys.stderr)
        path = Path(run) / f"core_{step if step is not None else 0:06d}.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(format_csv(result), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader sees the old CSV or the whole new one
        record["csv"] = str(path)
    return record


def run_harness(args) -> dict:
    from fgpt_jax import eval as ev
    from fgpt_jax.rundir import RunDir

    if args.log_samples and args.output_path is None:
        raise UserError("--log-samples: needs --output-path DIR (the samples are written there)")
    RunDir(args.run).read_config()  # a bad run fails first
    from fgpt_jax.eval import harness  # a missing lm_eval fails here, in one line

    if not os.environ.get("FGPT_JAX_DEBUG"):  # lm-eval's warnings, as the other libraries' logs (cli.py)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager, names = harness.resolve_tasks(args.tasks, args.include_path)  # before the model loads
    harness.check_output_path(args.output_path)
    model = ev.load(args.run, args.step)
    progress = not args.no_progress and sys.stderr.isatty()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    t0 = time.perf_counter()
    results = ev.evaluate_harness(
        model,
        names,
        task_manager=manager,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template,
        log_samples=args.log_samples,
        output_path=args.output_path,
        model_args={"model": str(args.run), "step": model.step},
        progress=progress,
    )
    keys = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
    return {
        "task": "harness",
        "step": model.step,
        "tasks": names,
        **harness.jsonable({k: results[k] for k in keys if k in results}),
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "apply_chat_template": args.apply_chat_template,
        "include_path": None if args.include_path is None else str(args.include_path),
        "output_files": results.get("output_files", []),
        "lm_eval_version": results.get("lm_eval_version"),
        "seconds": round(time.perf_counter() - t0, 3),
    }


TASKS = {"val": run_val, "hellaswag": run_hellaswag, "core": run_core, "dpo": run_dpo, "harness": run_harness}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        import jax

        from fgpt_jax.rundir import RunDir
        from fgpt_jax.sharding import initialize_distributed

        initialize_distributed()
        record = TASKS[args.task](args)
        if jax.process_index() == 0:
            RunDir(args.run).append_eval(record)
            print(json.dumps(record), flush=True)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
