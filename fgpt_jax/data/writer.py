"""Tokenise documents into uint16 shards: parallel, resumable, atomic.

Each document becomes `<|endoftext|> + tokens` and goes to validation by `in_val_split(key)`
(key = id, or text): stable across processes and machines, and no document is in both splits. Each split fills shards of exactly
`shard_tokens` tokens (a document may continue in the next shard); the last shard is shorter.

Tokenisation runs in a process pool: on the 35 Gutenberg books (2 cores) tiktoken's threaded
`encode_ordinary_batch` gained little or nothing over one thread (4.1M tokens/s; 3.3-8.1M with
2 threads across runs) while 2 processes reached ~10M tokens/s; see benchmarks/RESULTS.md. Workers also pack their tokens into uint16, so
only compact arrays cross the process boundary.

Crash safety: every file is written to a temp name and renamed. Whenever a shard completes, the
unfinished buffers of both splits and the source position go into `.progress.json`, so a rerun
continues after the last complete shard and produces the same bytes as an uninterrupted run.
`manifest.json` is written last; its presence marks the directory complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import signal
import time

import numpy as np
from tqdm import tqdm

from fgpt_jax.data import in_val_split
from fgpt_jax.data.shards import DTYPE, FORMAT, MANIFEST, SPLITS, VERSION, fingerprint, shard_name
from fgpt_jax.data.sources import DataError
from fgpt_jax.tokenizer import get_tokenizer

PROGRESS = ".progress.json"
_CHUNK_CHARS = 1_000_000  # ~250k tokens per task: small enough to balance workers, large enough to amortise IPC


def pack(token_lists: list[list[int]], eot_id: int) -> np.ndarray:
    """Concatenate documents, each prefixed by <|endoftext|>, into one uint16 array."""
    total = sum(map(len, token_lists)) + len(token_lists)
    eot = (eot_id,)
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable((eot, t) for t in token_lists))
    return np.fromiter(flat, dtype=np.uint16, count=total)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
    get_tokenizer()


def encode_pack(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 tokens of all texts, each prefixed by <|endoftext|>; per-document token counts)."""
    tok = get_tokenizer()
    lists = [tok.encode(t) for t in texts]
    lengths = np.fromiter((len(t) + 1 for t in lists), dtype=np.int64, count=len(lists))
    return pack(lists, tok.eot_id), lengths


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Tokeniser:
    """Order-preserving tokenisation: inline for one worker, a process pool otherwise."""

    def __init__(self, workers: int):
        # spawn, not fork: the parent runs datasets/pyarrow threads, which fork would copy mid-lock.
        # An executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool here
        # instead of being respawned forever while the parent waits.
        self.pool = (concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            if workers > 1 else None)

    def submit(self, texts: list[str]):
        return self.pool.submit(encode_pack, texts) if self.pool else _Done(encode_pack(texts))

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


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
                raise DataError(f"{os.path.join(out_dir, saved['partial'])}: expected "
                                f"{saved['partial_tokens']} tokens; delete {out_dir} and start again")
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
            self._write(flat[:self.shard_tokens])
            rest = flat[self.shard_tokens:]
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
        self.shards.append({"file": name, "num_tokens": int(len(tokens)), "sha256": sha,
                            "fingerprint": fingerprint(tokens)})

    def save_partial(self, seq: int) -> dict:
        name = None
        if self.buffered:
            name = f".partial-{self.split}-{seq:06d}.npy"
            save_npy(os.path.join(self.out_dir, name), np.concatenate(self.buffer))
        return {"shards": self.shards, "num_documents": self.num_documents,
                "partial": name, "partial_tokens": self.buffered}


def _settings(source, shard_tokens: int, val_fraction: float, max_tokens: int | None) -> dict:
    tok = get_tokenizer()
    return {"format": FORMAT, "version": VERSION, "source": source.description,
            "tokenizer": {"name": tok.name, "sha256": tok.sha256}, "dtype": DTYPE, "eot_id": tok.eot_id,
            "shard_tokens": shard_tokens, "val_fraction": val_fraction, "max_tokens": max_tokens}


def _clean(out_dir: str, keep: set[str]) -> None:
    """Remove temp files, stale partial buffers and shards beyond the last checkpoint."""
    for name in os.listdir(out_dir):
        ours = name.startswith((".partial-", PROGRESS, MANIFEST)) or (
            name.startswith(tuple(f"{s}_" for s in SPLITS)) and ".npy" in name)
        if ours and name not in keep and name != PROGRESS:
            os.remove(os.path.join(out_dir, name))


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


def write_shards(source, out_dir: str, shard_tokens: int = 100_000_000, val_fraction: float = 0.005,
                 workers: int | None = None, max_tokens: int | None = None, progress: bool = True,
                 chunk_docs: int = 4096) -> dict:
    """Tokenise `source` into `out_dir`; resume if a previous run stopped. Returns the manifest."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens: expected a positive integer, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens: expected a positive integer, got {max_tokens}")
    workers = workers or os.cpu_count() or 1
    settings = _settings(source, shard_tokens, val_fraction, max_tokens)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path, progress_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)

    def same_settings(saved: dict, what: str) -> None:
        for k, v in settings.items():
            if saved.get(k) != v:
                raise DataError(f"{what}: written with {k}={saved.get(k)!r}, this run has {v!r}; "
                                f"use another --out directory or delete this one")

    if os.path.exists(manifest_path):  # already complete: rerunning is a no-op
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        same_settings(manifest, manifest_path)
        return manifest
    state = None
    if os.path.exists(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            state = json.load(f)
        same_settings(state["settings"], progress_path)
    keep = set()
    if state:
        for s in state["splits"].values():
            keep |= {sh["file"] for sh in s["shards"]} | ({s["partial"]} if s["partial"] else set())
    _clean(out_dir, keep)

    writers = {s: _SplitWriter(s, out_dir, shard_tokens, state["splits"][s] if state else None) for s in SPLITS}
    docs_done, seq = (state["documents"], state["seq"]) if state else (0, 0)
    if state:
        source.load_state_dict(state["source_state"])
    total = sum(w.num_tokens for w in writers.values())
    done = max_tokens is not None and total >= max_tokens
    chunks = _chunks(source, chunk_docs)
    first = None if done else next(chunks, None)  # read before the bar: bad input fails with one clean line
    bar = tqdm(desc=f"tokenising -> {out_dir}", unit=" docs", initial=docs_done, disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    t0, tokens_at_start = time.perf_counter(), total
    tokeniser = _Tokeniser(workers if first is not None else 1)
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
                raise DataError("--workers: a tokeniser process died (out of memory, or the program was read from "
                                "stdin, which spawned workers cannot re-import); retry, or use --workers 1") from e
            if max_tokens is not None:  # stop after the document that reaches max_tokens
                ends = np.cumsum(lengths)
                cut = int(np.searchsorted(ends, max_tokens - total, side="left"))
                if cut < len(lengths):
                    tokens, lengths, val_d, done = tokens[:ends[cut]], lengths[:cut + 1], val_d[:cut + 1], True
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
            bar.set_postfix(tokens=f"{total:,}",
                            tok_s=f"{(total - tokens_at_start) / (time.perf_counter() - t0):,.0f}", refresh=False)
            if wrote and not done:
                seq += 1
                splits = {s: w.save_partial(seq) for s, w in writers.items()}
                save_json(progress_path, {"settings": settings, "documents": docs_done, "seq": seq,
                                          "source_state": src_state, "splits": splits})
                _clean(out_dir, {sh["file"] for s in splits.values() for sh in s["shards"]}
                       | {s["partial"] for s in splits.values() if s["partial"]})
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
    manifest["splits"] = {s: {"num_tokens": w.num_tokens, "num_documents": w.num_documents, "shards": w.shards}
                          for s, w in writers.items()}
    save_json(manifest_path, manifest)
    os.remove(progress_path) if os.path.exists(progress_path) else None
    _clean(out_dir, {sh["file"] for w in writers.values() for sh in w.shards} | {MANIFEST})
    return manifest
