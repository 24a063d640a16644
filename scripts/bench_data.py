"""Data pipeline throughput: tokenisation vs tiktoken's ceiling, and the training sampler.

  python scripts/bench_data.py --files my_books/*.txt

Tokenisation: `write_shards` end to end (read, strip, split hash, tokenise, pack, write shards),
beside tiktoken's `encode_ordinary_batch` on the same document texts with as many threads (the
ceiling the issue names) and a bare process pool encoding the same texts (the alternative that
measured faster, and so what write_shards uses). Sampler: `WindowLoader` batches
of B x (T + 1) int32 host arrays from the memmapped shards, on one thread and through grain's
prefetching iterator. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np

from fgpt_jax.data.bundled import CORPUS_FILE
from fgpt_jax.data.loader import WindowLoader
from fgpt_jax.data.shards import open_shards
from fgpt_jax.data.sources import TextSource, files_source
from fgpt_jax.data.writer import write_shards
from fgpt_jax.tokenizer import get_tokenizer


def _source(files, text_field):
    if all(f.lower().endswith(".txt") for f in files):
        return TextSource(files)  # Gutenberg headers/licences stripped, one document per book
    return files_source(files, text_field=text_field)


def _encode(text: str) -> int:
    return len(get_tokenizer().encode(text))


def best_of(repeat: int, fn):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--files", nargs="+", default=[CORPUS_FILE], help="text/jsonl/parquet/csv files (default: bundled sample)"
    )
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--copies",
        type=int,
        default=1,
        help="read the files N times, so process start-up (~1 s) is amortised as on a real corpus",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokeniser threads/processes")
    p.add_argument("--repeat", type=int, default=3, help="take the best of N runs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300, help="sampler batches timed")
    args = p.parse_args(argv)

    tok = get_tokenizer()
    files = list(args.files) * args.copies
    texts = [t for _, t in _source(files, args.text_field)]
    n_chars = sum(map(len, texts))
    rows = []

    t_ceiling, lists = best_of(args.repeat, lambda: tok.encode_batch(texts, num_threads=args.workers))
    n_tokens = sum(map(len, lists)) + len(lists)  # + one <|endoftext|> per document, as in the shards
    rows.append(("tiktoken encode_ordinary_batch (ceiling)", f"{args.workers} threads", n_tokens / t_ceiling, 1.0))

    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.map(_encode, ["warm up"] * args.workers)  # exclude process start and tokenizer load
        t_proc, _ = best_of(args.repeat, lambda: pool.map(_encode, texts, chunksize=1))
    rows.append(
        (
            "raw process pool, encode_ordinary per document",
            f"{args.workers} processes",
            n_tokens / t_proc,
            t_ceiling / t_proc,
        )
    )

    with tempfile.TemporaryDirectory() as tmp:

        def run():
            out = tempfile.mkdtemp(dir=tmp)
            return write_shards(
                _source(files, args.text_field),
                out,
                shard_tokens=10_000_000,
                val_fraction=0.05,
                workers=args.workers,
                progress=False,
            ), out

        t_write, (manifest, out) = best_of(args.repeat, run)
        written = manifest["splits"]["train"]["num_tokens"] + manifest["splits"]["val"]["num_tokens"]
        assert written == n_tokens, (written, n_tokens)
        rows.append(
            (
                "write_shards end to end (read+hash+tokenise+pack+write)",
                f"{args.workers} processes",
                n_tokens / t_write,
                t_ceiling / t_write,
            )
        )

        shards = open_shards(out, "train")
        B, T = args.batch, args.seq_len
        s = WindowLoader(shards, T, B, seed=0, prefetch=0)
        s.batch(0)
        t_pure, _ = best_of(args.repeat, lambda: [s.batch(k) for k in range(args.steps)])
        rows.append(
            (f"sampler batch(k), B={B} T={T}, int32 host arrays", "1 thread", args.steps * B * T / t_pure, None)
        )
        for prefetch, threads in ((2, 1), (4, 2)):
            it = WindowLoader(shards, T, B, seed=0, prefetch=prefetch, read_threads=threads)
            next(it)
            t_it, _ = best_of(args.repeat, lambda: [next(it) for _ in range(args.steps)])
            rows.append(
                (
                    f"sampler grain iterator, prefetch={prefetch}",
                    f"{threads} read thread(s)",
                    args.steps * B * T / t_it,
                    None,
                )
            )

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"{len(texts)} documents, {n_chars:,} characters, {n_tokens:,} tokens, "
        f"sampler over {shards.num_tokens:,} train tokens",
        file=sys.stderr,
    )
    print("| what | parallelism | tokens/s | fraction of ceiling |")
    print("|---|---|---:|---:|")
    for what, par, rate, frac in rows:
        print(f"| {what} | {par} | {rate:,.0f} | {'' if frac is None else f'{frac:.0%}'} |")


if __name__ == "__main__":
    main()
