"""HellaSwag items: the original jsonl (downloaded and checked) and llama.cpp's 6-line text format.

Two on-disk formats, read transparently from plain, .gz or .bz2 files:

- The original `rowanz/hellaswag` jsonl (`hellaswag_val.jsonl`): one JSON object per line with
  `ind, activity_label, ctx_a, ctx_b, ctx, endings (4), label, split, split_type, source_id`.
  `download("val")` fetches it from its official URL into `$FGPT_JAX_CACHE/hellaswag/` (default
  ~/.cache/fgpt_jax) through fgpt_jax.data.download (a resumable .part file + rename) and checks its
  git blob id, so a truncated or foreign file is never used.
- llama.cpp's `--hellaswag` text file (klosax/hellaswag_text_data): 6 lines per item,
  `activity_label: ctx`, the label, then the 4 endings. It is already preprocessed.

Text preprocessing. lm-eval-harness (the `hellaswag` task) scores
`query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())` and each
`preprocess(ending)`, where `preprocess` strips, turns WikiHow's " [title]" into ". ", removes the
other bracketed tags and collapses double spaces. `preprocess="harness"` (the default) does exactly
that for the jsonl. build-nanogpt / FGPT score the raw `ctx` and endings with no activity label and
no preprocessing (`preprocess="none"`): its GPT-2 124M number (acc_norm 0.2955) is on raw text.
The llama.cpp file applies the same clean-up as the harness, but keeps ctx_b's case (no
`.capitalize()`), so its numbers sit very close to, not exactly on, the harness's.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fgpt_jax.data import cache_root
from fgpt_jax.data.download import fetch as checked_fetch
from fgpt_jax.errors import UserError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# Git blob ids (sha1 of b"blob <len>\0" + content) of the official files at rowanz/hellaswag@a29ff8e9.
# Only the val id is known in full; train's is checked by its published prefix. The test split
# has no labels, so it cannot be scored and is not offered.
BLOB_IDS = {"val": "0f5ee25d72216f12317d5d8a7b92deafa423d81e", "train": "1997e15f"}
N_ENDINGS = 4
PREPROCESS = ("harness", "none")


class HellaSwagError(UserError, ValueError):
    """Unusable HellaSwag input; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class Example:
    """One item: score `endings[i]` (preceded by a space) as a continuation of `context`."""

    context: str
    endings: tuple[str, str, str, str]
    label: int  # index of the true ending, 0..3
    where: str = field(default="", compare=False)  # "file:line" of the item, for messages


def preprocess(text: str) -> str:
    """lm-eval-harness's hellaswag clean-up (tasks/hellaswag/utils.py)."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def cache_dir() -> Path:
    return Path(cache_root()) / "hellaswag"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (what GitHub shows as the blob sha)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch(url: str, dest: str | Path, blob_id: str, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` (checked, atomic, resumable: fgpt_jax.data.download), refusing content
    whose git blob id does not start with `blob_id`."""

    def check(part: Path) -> None:
        data = part.read_bytes()
        got = git_blob_id(data)
        if not got.startswith(blob_id):
            raise HellaSwagError(f"{url}: downloaded {len(data)} bytes with git blob id {got}, expected {blob_id}")

    return checked_fetch(url, dest, check, error=HellaSwagError, timeout=timeout)


def download(split: str = "val", url: str | None = None) -> Path:
    """The official `hellaswag_{split}.jsonl`, from the cache or downloaded into it (checked either way)."""
    if split not in BLOB_IDS:
        raise HellaSwagError(f"split: expected one of {', '.join(BLOB_IDS)}, got {split!r}")
    dest = cache_dir() / f"hellaswag_{split}.jsonl"
    if dest.is_file():
        got = git_blob_id(dest.read_bytes())
        if got.startswith(BLOB_IDS[split]):
            return dest
        dest.unlink()  # stale or corrupt: fetch again
    return fetch(url or URL.format(split=split), dest, BLOB_IDS[split])


def _read_text(path: Path) -> str:
    """Whole file as text; .gz and .bz2 are decompressed."""
    if not path.is_file():
        raise HellaSwagError(f"{path}: file not found")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            data = f.read()
        return data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"{path}: expected UTF-8 text, plain or .gz/.bz2 ({e})") from e


def detect_format(path: Path, text: str) -> str:
    """ "jsonl" or "txt", from the name, else from the first character."""
    name = path.name.lower()
    for suffix in (".gz", ".bz2"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return "jsonl" if text.lstrip().startswith("{") else "txt"


def _label(value, where: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = -1
    if isinstance(value, bool) or label not in range(N_ENDINGS) or str(value).strip() != str(label):
        raise HellaSwagError(f"{where}: expected a label 0..3, got {value!r}")
    return label


def parse_jsonl(text: str, path: str, preprocess_mode: str = "harness") -> list[Example]:
    """Items of an original-schema HellaSwag jsonl."""
    if preprocess_mode not in PREPROCESS:
        raise HellaSwagError(f"--preprocess: expected one of {', '.join(PREPROCESS)}, got {preprocess_mode!r}")
    need = ("activity_label", "ctx_a", "ctx_b") if preprocess_mode == "harness" else ("ctx",)
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise HellaSwagError(f"{where}: expected one JSON object per line ({e.msg})") from e
        if not isinstance(doc, dict):
            raise HellaSwagError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        for key in need:
            if not isinstance(doc.get(key), str):
                raise HellaSwagError(f"{where}: expected a string field {key!r}")
        endings = doc.get("endings")
        if not (isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)):
            raise HellaSwagError(f"{where}: expected 'endings' to be a list of {N_ENDINGS} strings")
        if "label" not in doc or doc["label"] == "":
            raise HellaSwagError(f"{where}: expected a label 0..3 (the test split is unlabelled)")
        label = _label(doc["label"], where)
        if preprocess_mode == "harness":
            context = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
            endings = [preprocess(e) for e in endings]
        else:
            context = doc["ctx"]
        out.append(Example(context, tuple(endings), label, where))
    return out


def parse_txt(text: str, path: str) -> list[Example]:
    """Items of llama.cpp's 6-line format: context, label, 4 endings (already preprocessed)."""
    # Split on "\n" only: str.splitlines would also break at U+2028 and friends inside the text.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    if len(lines) % 6:
        raise HellaSwagError(
            f"{path}:{len(lines)}: expected 6 lines per item (context, label, 4 endings); "
            f"the file has {len(lines)} lines, not a multiple of 6"
        )
    out = []
    for i in range(0, len(lines), 6):
        label = _label(lines[i + 1], f"{path}:{i + 2}")
        out.append(Example(lines[i], tuple(lines[i + 2 : i + 6]), label, f"{path}:{i + 1}"))
    return out


IN_FILE = "harness, by the file's producer (llama.cpp text)"


def preprocessing(path: str | Path | None, preprocess_mode: str = "harness") -> str:
    """What was done to the text of the items `load_examples(path, ..., preprocess_mode)` reads, for an
    evaluation record: `preprocess_mode` ("harness" or "none") for jsonl (None: the official jsonl),
    which this loader preprocesses; IN_FILE for llama.cpp's text format, which --preprocess does not
    apply to (its producer applied lm-eval-harness's preprocessing)."""
    if path is None:
        return preprocess_mode
    path = Path(path)
    fmt = detect_format(path, _read_text(path))  # the file is read again: well under a second
    return preprocess_mode if fmt == "jsonl" else IN_FILE


def load_examples(
    path: str | Path | None = None, limit: int | None = None, preprocess_mode: str = "harness"
) -> list[Example]:
    """HellaSwag items from `path` (jsonl or 6-line txt, optionally .gz/.bz2), or by default the
    official validation jsonl (cached, downloaded on first use). `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise HellaSwagError(f"--limit: expected a positive number of items, got {limit}")
    path = Path(path) if path is not None else download("val")
    text = _read_text(path)
    if detect_format(path, text) == "jsonl":
        examples = parse_jsonl(text, str(path), preprocess_mode)
    else:
        if preprocess_mode != "harness":
            raise HellaSwagError(
                f"--preprocess {preprocess_mode}: {path} is llama.cpp's text format, which is "
                f"already preprocessed; raw text needs the original jsonl"
            )
        examples = parse_txt(text, str(path))
    if not examples:
        raise HellaSwagError(f"{path}: expected HellaSwag items, found none")
    return examples[:limit] if limit else examples


__all__ = [
    "Example",
    "HellaSwagError",
    "URL",
    "BLOB_IDS",
    "preprocess",
    "git_blob_id",
    "fetch",
    "download",
    "parse_jsonl",
    "parse_txt",
    "load_examples",
    "preprocessing",
    "IN_FILE",
    "cache_dir",
]
