"""CLI: tokenise FineWeb-Edu, local files or plain-text corpora into shards; check a shard directory.

  python -m fgpt_jax.data fineweb --out data/edu10B --name sample-10BT
  python -m fgpt_jax.data fineweb --out data/mine --files docs/*.parquet --text-field text
  python -m fgpt_jax.data text books/*.txt --out data/books
  python -m fgpt_jax.data bundled           # build the bundled Tiny Shakespeare shards; print their directory
  python -m fgpt_jax.data check data/edu10B --verify

Bad input exits with status 2 and one line `error: <file or flag>: <what was expected>`; Ctrl-C
exits with 130, and rerunning the same command resumes after the last complete shard. --out must be
new, empty, or a directory this command wrote: it never deletes or overwrites anyone else's files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fgpt_jax import cli


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, val_fraction: float) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="output directory (shards + manifest.json): new, empty, or one this command wrote; rerun to resume",
    )
    p.add_argument(
        "--shard-tokens",
        type=cli.positive_int,
        default=100_000_000,
        help="tokens per shard (default 100,000,000 = 200 MB as uint16)",
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=val_fraction,
        help=f"fraction of documents sent to validation by hash of id/text (default {val_fraction})",
    )
    p.add_argument(
        "--workers",
        type=cli.positive_int,
        default=os.cpu_count() or 1,
        help="tokeniser processes (default: all cores; 1 tokenises in this process)",
    )
    p.add_argument(
        "--max-tokens",
        type=cli.positive_int,
        default=None,
        help="stop after the document that brings the total to N tokens",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m fgpt_jax.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{fineweb,text,bundled,check}", parser_class=cli.Parser
    )

    p = sub.add_parser("fineweb", help="FineWeb-Edu from the Hub (streamed), or local files with --files")
    p.add_argument(
        "--name",
        default="sample-10BT",
        help="FineWeb-Edu config: sample-10BT, sample-100BT, sample-350BT, CC-MAIN-... (default sample-10BT)",
    )
    p.add_argument("--repo", default="HuggingFaceFW/fineweb-edu", help="Hub dataset repository")
    p.add_argument(
        "--files",
        nargs="+",
        metavar="FILE",
        help="read local jsonl/json/parquet/csv/txt files (or directories, globs) instead of the Hub",
    )
    p.add_argument("--text-field", default="text", help="column holding the document text (default text)")
    p.add_argument("--id-field", default="id", help="column holding the document id for the split hash (default id)")
    _common(p, 0.005)

    p = sub.add_parser("text", help="plain-text files: one document per file, or per blank-line block")
    p.add_argument("files", nargs="+", metavar="FILE", help="text files, directories or globs (UTF-8)")
    p.add_argument("--blocks", action="store_true", help="one document per blank-line block instead of per file")
    p.add_argument(
        "--keep-gutenberg",
        action="store_true",
        help="keep Project Gutenberg headers/licences (stripped by default when markers are present)",
    )
    _common(p, 0.1)

    sub.add_parser(
        "bundled", aliases=["sample"], help="tokenise the bundled Tiny Shakespeare into the cache; print its directory"
    )

    p = sub.add_parser("check", help="validate a shard directory and print its manifest summary")
    p.add_argument("dir", help="shard directory (or 'tinyshakespeare')")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every shard's full sha256 (without it, only a sample of each shard is read)",
    )
    return parser


def _report_stripped(source) -> None:
    """One stderr line per file whose Project Gutenberg header/licence was stripped: how much."""
    for path, (removed, size) in getattr(source, "stripped", {}).items():
        print(
            f"{path}: stripped Project Gutenberg header and licence: {removed:,} of {size:,} characters "
            f"({removed / size:.1%}; --keep-gutenberg keeps them)",
            file=sys.stderr,
        )


def _check(directory: str, verify: bool) -> dict:
    """`data check`: both splits' counts and what was checked; without --verify, a note on stderr
    says how much of the tokens opening read (the rest is not checked)."""
    from fgpt_jax.data.bundled import resolve
    from fgpt_jax.data.shards import SPLITS, open_shards, read_manifest, tokens_checked

    path = resolve(directory)
    manifest = read_manifest(path)
    out = {}
    for split in SPLITS:
        if manifest["splits"][split]["shards"]:
            s = open_shards(path, split, verify=verify)
            out[split] = {"num_tokens": s.num_tokens, "num_documents": s.num_documents, "shards": len(s.files)}
        else:
            out[split] = {"num_tokens": 0, "num_documents": 0, "shards": 0}
    if verify:
        return {"dir": directory, **out, "checked": "sha256 of every shard"}
    entries = [e for split in SPLITS for e in manifest["splits"][split]["shards"]]
    read = min(1.0, sum(tokens_checked(e) for e in entries) / max(1, sum(e["num_tokens"] for e in entries)))
    old = sum(1 for e in entries if not e.get("sampled"))
    what = "header, length, first and last 4,096 tokens" + (
        " and 64 sampled 4,096-token blocks" if old < len(entries) else ""
    )
    print(
        f"note: checked each shard's {what} ({read:.1%} of the tokens"
        f"{f'; {old} shards were written before sampled blocks existed' if 0 < old < len(entries) else ''}); "
        f"bytes elsewhere are not checked: add --verify to hash every shard",
        file=sys.stderr,
    )
    return {"dir": directory, **out, "checked": f"{what}: {read:.1%} of the tokens"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from fgpt_jax.data.shards import SPLITS
        from fgpt_jax.data.sources import TextSource, files_source, hub_source
        from fgpt_jax.data.writer import val_split_warning, write_shards

        if args.command in ("bundled", "sample"):
            from fgpt_jax.data.bundled import corpus_dir

            print(corpus_dir(progress=True))
        elif args.command == "check":
            print(json.dumps(_check(args.dir, args.verify)))
        else:
            if args.command == "text":
                source = TextSource(args.files, blocks=args.blocks, gutenberg=not args.keep_gutenberg)
            elif args.files:
                source = files_source(args.files, text_field=args.text_field, id_field=args.id_field)
            else:
                source = hub_source(args.name, repo=args.repo, text_field=args.text_field, id_field=args.id_field)
            try:
                m = write_shards(
                    source,
                    args.out,
                    shard_tokens=args.shard_tokens,
                    val_fraction=args.val_fraction,
                    workers=args.workers,
                    max_tokens=args.max_tokens,
                    progress=not args.no_progress,
                )
            except KeyboardInterrupt:
                print(
                    "error: interrupted; rerun the same command to resume after the last complete shard",
                    file=sys.stderr,
                )
                return cli.EXIT_INTERRUPTED
            _report_stripped(source)
            warning = val_split_warning(m, args.out)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            summary = {
                s: {k: m["splits"][s][k] for k in ("num_tokens", "num_documents")}
                | {"shards": len(m["splits"][s]["shards"])}
                for s in SPLITS
            }
            print(json.dumps({"out": args.out, **summary}))
        return 0

    return cli.run(body)


def _exit(code: int) -> None:
    """Exit with `code`. After an error, skip interpreter teardown (os._exit): pyarrow reader
    threads still winding down can otherwise abort the process ("terminate called without an
    active exception") after the one-line error. Every file was already closed or renamed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    _exit(main())
