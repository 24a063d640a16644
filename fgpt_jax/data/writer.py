"""Tokenise documents into uint16 shards: parallel, resumable, atomic, and only in its own directory.

Each document becomes `<|endoftext|> + tokens` and goes to validation by `in_val_split(key)` (key =
id, or text): stable across processes and machines, and no document is in both splits. Each split
fills shards of exactly `shard_tokens` tokens (a document may continue in the next shard); the last
shard is shorter.

Tokenisation runs in worker processes (`fgpt_jax.data.workers`).

Crash safety: every file is written to a temp name and renamed. `.progress.json` is written first
(it marks the directory as this module's) and again whenever a shard completes, with the unfinished
buffers of both splits and the source position, so a rerun continues after the last complete shard
and produces the same bytes as an uninterrupted run. `manifest.json` is written last; its presence
marks the directory complete. Only the names this module writes are ever removed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import math
import os
import re
import time

import numpy as np
from tqdm import tqdm

from fgpt_jax.data import in_val_split
from fgpt_jax.data.shards import DTYPE, FORMAT, MANIFEST, SPLITS, VERSION, fingerprint, sampled_entry, shard_name
from fgpt_jax.data.sources import DataError
from fgpt_jax.data.workers import Tokeniser
from fgpt_jax.tokenizer import get_tokenizer

PROGRESS = ".progress.json"
# Every name this module writes (shards, partial buffers, the two records, and their temp files): the
# only names it ever removes. Anything else in --out, even `train_images.npy`, is the user's.
_SPLIT = "|".join(SPLITS)
_OURS = re.compile(
    rf"^(?:(?:{_SPLIT})_\d{{6}}\.npy|\.partial-(?:{_SPLIT})-\d{{6}}\.npy|"
    rf"{re.escape(MANIFEST)}|{re.escape(PROGRESS)})(?:\.tmp\d+)?$"
)
# Fewer validation documents than this and val/loss is one or two documents' loss, not the corpus's:
# the CLI warns (`val_split_warning`). The split stays a pure function of each document's hash (a
# guaranteed minimum would need the corpus's size before streaming it, and order-dependent rules).
MIN_VAL_DOCUMENTS = 20
_CHUNK_CHARS = 1_000_000  # ~250k tokens per task: small enough to balance workers, large enough to amortise IPC


def _fsync_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one, never a prefix


def save_npy(path: str, arr: np.ndarray) -> None:
    _fsync_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def save_json(path: str, obj: dict) -> None:
    _fsync_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


class _SplitWriter:
    """Accumulates one split's tokens and writes full shards."""

    def __init__(self, split: str, out_dir: str, shard_tokens: int, saved: dict | None):
        self.split, self.out_dir, self.shard_tokens = split, out_dir, shard_tokens
        self.shards: list[dict] = list(saved["shards"]) if saved else []
        self.num_documents = int(saved["num_documents"]) if saved else 0
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        if saved and saved.get("partial"):
            part = np.load(os.path.join(out_dir, saved["partial"]), allow_pickle=False)
            if len(part) != saved["partial_tokens"]:
                raise DataError(
                    f"{os.path.join(out_dir, saved['partial'])}: expected "
                    f"{saved['partial_tokens']} tokens; delete {out_dir} and start again"
                )
            self.buffer, self.buffered = [part], len(part)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self.buffered

    def add(self, tokens: np.ndarray, num_documents: int) -> bool:
        """Append tokens; write every shard that fills. True if one was written."""
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.num_documents += num_documents
        wrote = False
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buffer)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.buffer, self.buffered = [rest], len(rest)
            wrote = True
        return wrote

    def flush(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
            self.buffer, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        path = os.path.join(self.out_dir, name)
        buf = io.BytesIO()
        np.save(buf, tokens, allow_pickle=False)
        data = buf.getbuffer()
        _fsync_write(path, lambda f: f.write(data))
        sha = hashlib.sha256(data).hexdigest()  # of the bytes written, without reading the file back
        self.shards.append(
            {
                "file": name,
                "num_tokens": int(len(tokens)),
                "sha256": sha,
                "fingerprint": fingerprint(tokens),
                "sampled": sampled_entry(tokens),
            }
        )

    def save_partial(self, seq: int) -> dict:
        name = None
        if self.buffered:
            name = f".partial-{self.split}-{seq:06d}.npy"
            save_npy(os.path.join(self.out_dir, name), np.concatenate(self.buffer))
        return {
            "shards": self.shards,
            "num_documents": self.num_documents,
            "partial": name,
            "partial_tokens": self.buffered,
        }


def _settings(source, shard_tokens: int, val_fraction: float, max_tokens: int | None) -> dict:
    tok = get_tokenizer()
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source.description,
        "tokenizer": {"name": tok.name, "sha256": tok.sha256},
        "dtype": DTYPE,
        "eot_id": tok.eot_id,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
    }


def _clean(out_dir: str, keep: set[str]) -> None:
    """Remove temp files, stale partial buffers and shards beyond the last checkpoint: only names
    this module writes (`_OURS`), in a directory that holds its progress record or manifest."""
    for name in os.listdir(out_dir):
        if _OURS.match(name) and name not in keep and name != PROGRESS:
            os.remove(os.path.join(out_dir, name))


def _previous_run(out_dir: str) -> tuple[dict | None, dict | None]:
    """(manifest, progress record) left in `out_dir` by this module, or refuse a directory that holds
    anything else: a rerun must never delete or overwrite files it did not write."""
    if not os.path.exists(out_dir):
        return None, None
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir}: exists and is not a directory")
    for name in (MANIFEST, PROGRESS):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
                problem = None if isinstance(record, dict) else "expected a JSON object"
            except (UnicodeDecodeError, ValueError) as e:
                problem = f"unreadable ({' '.join(str(e).split())})"
            if problem:
                raise DataError(f"{path}: {problem}; delete {out_dir} and start again")
            return (record, None) if name == MANIFEST else (None, record)
    names = sorted(n for n in os.listdir(out_dir) if not re.fullmatch(rf"{re.escape(PROGRESS)}\.tmp\d+", n))
    if names:  # not ours (ours always holds its progress record first): refuse rather than clean
        raise DataError(
            f"--out {out_dir}: not empty and not a shard directory in progress (it holds {names[0]!r}"
            f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}); use a new or empty directory"
        )
    return None, None


def _make_dirs(path: str) -> list[str]:
    """Create `path` and its missing parents; return those created, deepest first."""
    created, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created


def _undo(out_dir: str, created: list[str]) -> None:
    """After a failure before any shard completed: remove what this run wrote (its records and
    temp files, nothing else) and the directories it created, if they are then empty."""
    for name in os.listdir(out_dir):
        if _OURS.match(name):
            os.remove(os.path.join(out_dir, name))
    for d in created:
        try:
            os.rmdir(d)  # only succeeds on an empty directory
        except OSError:
            break


def _chunks(source, max_docs: int):
    """Documents in groups of about _CHUNK_CHARS characters, each with the source position after it."""
    docs, chars = [], 0
    for key, text in source:
        docs.append((key, text))
        chars += len(text)
        if chars >= _CHUNK_CHARS or len(docs) >= max_docs:
            yield docs, json.loads(json.dumps(source.state_dict()))  # a copy, not a live reference
            docs, chars = [], 0
    if docs:
        yield docs, json.loads(json.dumps(source.state_dict()))


def _check_progress(state: dict, path: str, out_dir: str) -> dict:
    """The progress record's structure (it names the files a rerun keeps and reads back)."""
    try:
        for sp in SPLITS:
            saved = state["splits"][sp]
            names = [sh["file"] for sh in saved["shards"]] + ([saved["partial"]] if saved["partial"] else [])
            if not all(isinstance(n, str) and _OURS.match(n) for n in names):
                raise ValueError(f"splits.{sp}: unexpected file name among {names}")
            int(saved["num_documents"]), int(saved["partial_tokens"])
        int(state["documents"]), int(state["seq"])
        state["source_state"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed progress record ({e}); delete {out_dir} and start again") from e
    return state


def write_shards(
    source,
    out_dir: str,
    shard_tokens: int = 100_000_000,
    val_fraction: float = 0.005,
    workers: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    chunk_docs: int = 4096,
) -> dict:
    """Tokenise `source` into `out_dir`; resume if a previous run stopped. Returns the manifest.

    `out_dir` must be new, empty, or a directory this function wrote (its progress record or
    manifest is there); anything else is refused, and only the names it writes are ever removed.
    Nothing is written before the first documents were read (bad input fails first); a run that
    fails before completing a shard removes what it wrote, including the directories it created."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens: expected a positive integer, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens: expected a positive integer, got {max_tokens}")
    workers = workers or os.cpu_count() or 1
    settings = _settings(source, shard_tokens, val_fraction, max_tokens)
    manifest_path, progress_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)

    def same_settings(saved, what: str) -> None:
        saved = saved if isinstance(saved, dict) else {}
        for k, v in settings.items():
            if saved.get(k) != v:
                raise DataError(
                    f"{what}: written with {k}={saved.get(k)!r}, this run has {v!r}; "
                    f"use another --out directory or delete this one"
                )

    manifest, state = _previous_run(out_dir)
    if manifest is not None:  # already complete: rerunning is a no-op
        same_settings(manifest, manifest_path)
        return manifest
    if state is not None:
        same_settings(state.get("settings"), progress_path)
        _check_progress(state, progress_path, out_dir)
        if state["source_state"] is not None:
            source.load_state_dict(state["source_state"])
    chunks = _chunks(source, chunk_docs)
    resumed_tokens = (
        0
        if state is None
        else sum(sum(sh["num_tokens"] for sh in sp["shards"]) + sp["partial_tokens"] for sp in state["splits"].values())
    )
    done = max_tokens is not None and resumed_tokens >= max_tokens
    # Read before writing anything: bad input (a missing column, a bad file) fails with one clean line.
    first = None if done else next(chunks, None)
    if first is None and not state:
        chunks.close()
        raise DataError(f"{source.description.get('files', source.description)}: no documents found")
    created: list[str] = []
    try:
        created = _make_dirs(out_dir)
        if state is None:  # the record that marks the directory as ours, before any other file
            state = {
                "settings": settings,
                "documents": 0,
                "seq": 0,
                "source_state": None,
                "splits": {
                    sp: {"shards": [], "num_documents": 0, "partial": None, "partial_tokens": 0} for sp in SPLITS
                },
            }
            save_json(progress_path, state)
        keep = set()
        for sp in state["splits"].values():
            keep |= {sh["file"] for sh in sp["shards"]} | ({sp["partial"]} if sp["partial"] else set())
        _clean(out_dir, keep)
        writers = {sp: _SplitWriter(sp, out_dir, shard_tokens, state["splits"][sp]) for sp in SPLITS}
        return _tokenise(
            source, chunks, first, writers, state, settings, out_dir, workers, val_fraction, max_tokens, progress, done
        )
    except BaseException:
        chunks.close()
        if os.path.isdir(out_dir) and not os.path.exists(manifest_path) and _completed_shards(progress_path) == 0:
            _undo(out_dir, created)  # nothing to resume: leave the disk as this run found it
        raise


def _completed_shards(progress_path: str) -> int:
    try:
        with open(progress_path, encoding="utf-8") as f:
            return int(json.load(f)["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _tokenise(
    source,
    chunks,
    first,
    writers: dict,
    state: dict,
    settings: dict,
    out_dir: str,
    workers: int,
    val_fraction: float,
    max_tokens: int | None,
    progress: bool,
    done: bool,
) -> dict:
    """The pipelined loop of `write_shards`: tokenise chunks in the pool, fill shards, checkpoint the
    progress whenever a shard completes, then write the manifest."""
    manifest_path, progress_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)
    docs_done, seq = int(state["documents"]), int(state["seq"])
    total = sum(w.num_tokens for w in writers.values())
    bar = tqdm(
        desc=f"tokenising -> {out_dir}",
        unit=" docs",
        initial=docs_done,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t0, tokens_at_start = time.perf_counter(), total
    tokeniser = Tokeniser(workers if first is not None else 1)
    pending: collections.deque = collections.deque()  # (val flags, source state after chunk, result)
    try:
        while not done:
            while first is not None or (chunks is not None and len(pending) < 2 * workers + 1):
                nxt, first = (first, None) if first is not None else (next(chunks, None), None)
                if nxt is None:
                    chunks.close()
                    chunks = None
                    break
                docs, src_state = nxt
                flags = np.array([in_val_split(k, val_fraction) for k, _ in docs], dtype=bool)
                pending.append((flags, src_state, tokeniser.submit([t for _, t in docs])))
            if not pending:
                break
            val_d, src_state, result = pending.popleft()
            try:
                tokens, lengths = result.result()
            except concurrent.futures.process.BrokenProcessPool as e:
                raise DataError(
                    "--workers: a tokeniser process died (out of memory, or the program was read from "
                    "stdin, which spawned workers cannot re-import); retry, or use --workers 1"
                ) from e
            if max_tokens is not None:  # stop after the document that reaches max_tokens
                ends = np.cumsum(lengths)
                cut = int(np.searchsorted(ends, max_tokens - total, side="left"))
                if cut < len(lengths):
                    tokens, lengths, val_d, done = tokens[: ends[cut]], lengths[: cut + 1], val_d[: cut + 1], True
            wrote = False
            if not val_d.any():
                wrote |= writers["train"].add(tokens, len(lengths))
            else:
                val_t = np.repeat(val_d, lengths)
                wrote |= writers["train"].add(tokens[~val_t], int((~val_d).sum()))
                wrote |= writers["val"].add(tokens[val_t], int(val_d.sum()))
            total += len(tokens)
            docs_done += len(lengths)
            bar.update(len(lengths))
            bar.set_postfix(
                tokens=f"{total:,}",
                tok_s=f"{(total - tokens_at_start) / (time.perf_counter() - t0):,.0f}",
                refresh=False,
            )
            if wrote and not done:
                seq += 1
                splits = {s: w.save_partial(seq) for s, w in writers.items()}
                save_json(
                    progress_path,
                    {
                        "settings": settings,
                        "documents": docs_done,
                        "seq": seq,
                        "source_state": src_state,
                        "splits": splits,
                    },
                )
                _clean(
                    out_dir,
                    {sh["file"] for s in splits.values() for sh in s["shards"]}
                    | {s["partial"] for s in splits.values() if s["partial"]},
                )
    finally:
        if chunks is not None:
            chunks.close()  # releases the source's readers now, also when max_tokens stops early
        tokeniser.close()
        bar.close()

    if docs_done == 0:
        raise DataError(f"{source.description.get('files', source.description)}: no documents found")
    for w in writers.values():
        w.flush()
    manifest = dict(settings)
    manifest["splits"] = {
        s: {"num_tokens": w.num_tokens, "num_documents": w.num_documents, "shards": w.shards}
        for s, w in writers.items()
    }
    save_json(manifest_path, manifest)
    os.remove(progress_path) if os.path.exists(progress_path) else None
    _clean(out_dir, {sh["file"] for w in writers.values() for sh in w.shards} | {MANIFEST})
    return manifest


def val_split_warning(manifest: dict, out_dir: str) -> str | None:
    """A one-line warning when the validation split holds fewer than MIN_VAL_DOCUMENTS documents
    though a fraction was asked for (a small corpus at FineWeb's default 0.005, say), with the
    --val-fraction that would hold out about MIN_VAL_DOCUMENTS; None when it has enough (or
    --val-fraction 0 asked for none)."""
    fraction = manifest["val_fraction"]
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    total = val["num_documents"] + train["num_documents"]
    if not fraction or val["num_documents"] >= MIN_VAL_DOCUMENTS or not total:
        return None
    suggested = min(0.5, math.ceil(100 * MIN_VAL_DOCUMENTS / total) / 100)
    return (
        f"--out {out_dir}: validation holds {val['num_documents']} of {total} documents "
        f"({val['num_tokens']:,} tokens) at --val-fraction {fraction:g}, too few for a steady val/loss; "
        f"to hold out about {round(suggested * total)}, write a new --out with --val-fraction {suggested:g}"
    )
