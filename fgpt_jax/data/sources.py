"""Documents for the shard writer: FineWeb-Edu from the Hub, local files, plain-text corpora.

Every source yields `(key, text)` pairs in a fixed order; `key` (the document id, or the text when
there is none) decides the train/validation split. Sources can report and restore their position
(`state_dict` / `load_state_dict`) so an interrupted tokenisation resumes without re-reading.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence

from fgpt_jax.errors import UserError

FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
HUB_TIMEOUT_S = 10.0  # the one Hub request made before streaming (check_hub)
# Local file suffix -> `datasets` packaged builder.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}

# Project Gutenberg markers; the START marker may wrap onto a second line before its closing ***.
_PG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^*]*\*{3}.*$", re.MULTILINE | re.IGNORECASE
)
_PG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)", re.MULTILINE | re.IGNORECASE)
# The header's first line names Project Gutenberg ("The Project Gutenberg eBook of ..."); the licence
# after END closes with the newsletter sentence, or (older files) with "*** END: FULL LICENSE ***".
_PG_TITLE = re.compile(r"^.*Project Gutenberg", re.MULTILINE | re.IGNORECASE)
_PG_LICENCE_ENDS = (
    re.compile(r"^\*{3}\s*END:\s*FULL\s+LICENSE\s*\*{3}", re.MULTILINE | re.IGNORECASE),
    re.compile(r"to\s+hear\s+about\s+new\s+e-?books\.", re.IGNORECASE),
)
_PG_HEADER_MAX = 20_000  # characters before START searched for the header's first line (headers: ~0.5-1.5 KB)
_PG_LICENCE_MAX = 40_000  # characters after END that may be licence (it is ~18-20 KB)
_BLANK_LINES = re.compile(r"\n[ \t]*\n+")


class DataError(UserError, ValueError):
    """Bad user input; the message reads `<file or flag>: <what was expected>`."""


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end + 1


def strip_gutenberg(text: str) -> tuple[str, int]:
    """(`text` without Project Gutenberg's headers and licences, number of characters removed).

    Stripping happens only around a matched START/END pair: from the header's first line (the first
    line naming Project Gutenberg within 20,000 characters before START) through the START line, and
    from the END line through the licence's closing line. Without a closing line, what follows END
    is stripped only if it is short enough to be the licence alone (40,000 characters), else only
    the END line goes. So text before or after a book (an appendix, another book) is kept, and each
    of several books in one file is stripped the same way. Without a matched pair (no markers, or a
    START without END) the text is returned unchanged."""
    pieces, pos, removed = [], 0, 0
    while True:
        start = _PG_START.search(text, pos)
        end = _PG_END.search(text, start.end()) if start else None
        if end is None:
            break
        title = _PG_TITLE.search(text, max(pos, start.start() - _PG_HEADER_MAX), start.start())
        head = title.start() if title else start.start()
        body = _line_end(text, start.end())
        after = _line_end(text, end.start())
        nxt = _PG_START.search(text, after)
        stop = nxt.start() if nxt else len(text)
        window = min(stop, after + _PG_LICENCE_MAX)
        closing = next((m for m in (r.search(text, after, window) for r in _PG_LICENCE_ENDS) if m), None)
        tail = _line_end(text, closing.end()) if closing else stop if stop - after <= _PG_LICENCE_MAX else after
        pieces += [text[pos:head], text[body : end.start()]]
        removed += (body - head) + (tail - end.start())
        pos = tail
    if pos == 0:
        return text, 0
    pieces.append(text[pos:])
    return "\n\n".join(p.strip("\r\n") for p in pieces if p.strip()), removed


def expand_files(patterns: Sequence[str], flag: str = "--files") -> list[str]:
    """Files named directly, by glob or by directory (sorted), each checked to exist."""
    files: list[str] = []
    for p in patterns:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if os.path.splitext(f)[1].lower() in BUILDERS)
            if not found:
                raise DataError(f"{p}: directory holds no {'/'.join(sorted(BUILDERS))} files")
            files += found
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise DataError(f"{p}: pattern matches no file")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"{p}: file not found")
    if not files:
        raise DataError(f"{flag}: expected at least one file")
    return files


class DatasetsSource:
    """Rows of a `datasets` IterableDataset (streamed: nothing but the shards reaches the disk)."""

    def __init__(self, ds, text_field: str, id_field: str, where: str, description: dict):
        self._ds, self.text_field, self.id_field, self._where = ds, text_field, id_field, where
        self.description = description

    def __iter__(self) -> Iterator[tuple[str, str]]:
        rows = iter(self._ds)
        try:
            yield from self._documents(rows)
        finally:
            # Close datasets' reader now: left to interpreter shutdown, pyarrow's threads can abort
            # the process ("terminate called ...") after our one-line error.
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def _documents(self, rows) -> Iterator[tuple[str, str]]:
        for row in rows:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                if self.text_field not in row:
                    raise DataError(
                        f"--text-field: column {self.text_field!r} not in {self._where} "
                        f"(columns: {', '.join(sorted(row))})"
                    )
                raise DataError(
                    f"{self._where}: column {self.text_field!r} must hold strings, got {type(text).__name__}"
                )
            doc_id = row.get(self.id_field)
            yield (str(doc_id) if doc_id not in (None, "") else text), text

    def state_dict(self) -> dict:
        # datasets' own position (shard and row), JSON-friendly; valid because we never read ahead.
        return self._ds.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ds.load_state_dict(state)


def check_hub(repo: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Fail fast, with one line that suggests --files, when the Hub cannot serve `repo`.

    `datasets` retries an unreachable Hub five times with backoff, and its final error does not say
    what to do instead.
    Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) fails at once; otherwise one metadata
    request (through huggingface_hub, so HF_ENDPOINT, proxies and tokens apply) must answer
    within `timeout` seconds."""
    import datasets.config
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    hint = "download the files elsewhere and pass them with --files"
    if getattr(datasets.config, "HF_HUB_OFFLINE", False) or getattr(datasets.config, "HF_DATASETS_OFFLINE", False):
        raise DataError(
            f"--repo {repo}: cannot be streamed, the Hugging Face Hub is off (HF_HUB_OFFLINE or "
            f"HF_DATASETS_OFFLINE is set); {hint}"
        )
    try:
        HfApi().dataset_info(repo, timeout=timeout)
    except RepositoryNotFoundError:
        raise DataError(
            f"--repo {repo}: no such dataset on the Hub (or it is private or gated: log in with `hf auth login`)"
        ) from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy or server error
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise DataError(f"--repo {repo}: the Hugging Face Hub is unreachable ({reason}); {hint}") from None


def hub_source(
    name: str = "sample-10BT",
    repo: str = FINEWEB_REPO,
    split: str = "train",
    text_field: str = "text",
    id_field: str = "id",
) -> DatasetsSource:
    """FineWeb-Edu (or any Hub dataset with a text column), streamed; `check_hub` first."""
    check_hub(repo)
    import datasets  # imported late: it is slow to import and only the writer needs it

    try:
        ds = datasets.load_dataset(repo, name=name, split=split, streaming=True)
    except (ValueError, OSError) as e:  # a bad --name, or the Hub went away between the two requests
        raise DataError(
            f"--name {name}: could not stream {repo} ({' '.join(str(e).split())[:300]}); check --name, "
            f"or download the files elsewhere and pass them with --files"
        ) from e
    return DatasetsSource(
        ds,
        text_field,
        id_field,
        f"{repo}/{name}",
        {"kind": "hub", "repo": repo, "name": name, "split": split, "text_field": text_field, "id_field": id_field},
    )


def files_source(patterns: Sequence[str], text_field: str = "text", id_field: str = "id") -> DatasetsSource:
    """Local jsonl/json/parquet/csv/txt through `datasets`' packaged builders (one builder per call).

    .txt files give one document per file (the `text` builder with `sample_by="document"`)."""
    files = expand_files(patterns)
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    for f in files:
        if os.path.splitext(f)[1].lower() not in BUILDERS:
            raise DataError(f"{f}: expected a {'/'.join(sorted(BUILDERS))} file")
    builders = {BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise DataError(f"--files: expected one format per run, got {', '.join(sorted(kinds))}")
    builder = builders.pop()
    # Local files never need the network; stop `datasets` from trying (air-gapped nodes hang on it).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder, data_files=[os.path.abspath(f) for f in files], split="train", streaming=True, **kwargs
        )
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        raise DataError(
            f"{files[0] if len(files) == 1 else '--files'}: could not read as {builder}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    where = files[0] if len(files) == 1 else f"{len(files)} {builder} files"
    return DatasetsSource(
        ds,
        text_field,
        id_field,
        where,
        {
            "kind": "files",
            "builder": builder,
            "files": [os.path.basename(f) for f in files],
            "text_field": text_field,
            "id_field": id_field,
        },
    )


class TextSource:
    """Plain-text files: one document per file, or per blank-line block (`blocks=True`).

    Project Gutenberg headers and licences are stripped around matched markers (`strip_gutenberg`);
    `stripped` records how much per file, for the CLI to report. Line
    endings are normalised to "\\n" (Gutenberg files are CRLF), so the same book tokenises the same."""

    def __init__(self, patterns: Sequence[str], blocks: bool = False, gutenberg: bool = True):
        self.files = expand_files(patterns, flag="FILES")
        self.blocks, self.gutenberg = blocks, gutenberg
        self.stripped: dict[str, tuple[int, int]] = {}  # file -> (characters stripped, characters read), when > 0
        self._skip = 0
        self._yielded = 0
        self.description = {
            "kind": "text",
            "files": [os.path.basename(f) for f in self.files],
            "blocks": blocks,
            "gutenberg": gutenberg,
        }

    def _documents(self) -> Iterator[str]:
        for path in self.files:
            try:
                with open(path, encoding="utf-8", errors="strict") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: expected UTF-8 text ({e.reason} at byte {e.start})") from e
            if self.gutenberg:
                size = len(text)
                text, removed = strip_gutenberg(text)
                if removed:
                    self.stripped[path] = (removed, size)
            if self.blocks:
                yield from (b.strip("\n") for b in _BLANK_LINES.split(text) if b.strip())
            elif text.strip():
                yield text

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self._yielded = self._skip
        for i, text in enumerate(self._documents()):
            if i < self._skip:
                continue
            self._yielded = i + 1
            yield text, text

    def state_dict(self) -> dict:
        return {"documents": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._skip = self._yielded = int(state["documents"])
