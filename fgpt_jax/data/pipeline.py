"""From a `DataConfig` to what the trainer and the evaluator read: a training loader and the fixed
validation batches. The one place that knows which format reads which way:

  tokens  a shard directory (or the bundled corpus): `WindowLoader` over the train split, and
          `data.val_windows` fixed windows of the val split (`val_windows`);
  chat    conversations from a file or the Hub: rendered, filtered, split and packed once
          (`build_chat_data`), then `RowLoader` over the train rows and every val row (`val_rows`).
  preference  chosen/rejected pairs (DPO): rendered, filtered, split once (`build_preference_data`),
          each row's reference log-probability from the caller's `reference` (the DPO run's
          starting model), then `PairLoader` over the train pairs and every val pair (`val_pairs`).

A corpus without a validation split still trains (val/loss is then skipped and the log says so);
any other problem with the val split (a missing, truncated, foreign or corrupt shard, a token
outside the vocabulary) is an error, not a silent switch-off.

Shard contents (`data.verify`). Opening always checks each shard's header, length, fingerprint and
sampled blocks, and every batch's token ids; only the full sha256 reads every byte, which costs a
pass over the corpus (minutes for tens of GB), so it is a choice: "background" (default) hashes
every shard in a daemon thread while training runs and `Data.check()` raises what it found;
"startup" hashes them before `open_data` returns; "off" never (a note says so). Without a training
loader (`train=False`) there is no loop to call `check()`, so "background" hashes the val shards
before returning, as "startup" does.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fgpt_jax.data import Batch, DataConfig
from fgpt_jax.data.bundled import resolve
from fgpt_jax.data.conversations import build_chat_data, load_conversations
from fgpt_jax.data.loader import BatchLoader, RowLoader, Rows, WindowLoader, val_rows, val_windows
from fgpt_jax.data.preferences import PairLoader, build_preference_data, load_pairs, val_pairs
from fgpt_jax.data.shards import ShardError, ShardSet, file_sha256, open_shards, read_manifest
from fgpt_jax.data.sources import DataError
from fgpt_jax.tokenizer import get_tokenizer


class Verification:
    """The full sha256 of shards checked against their manifest in a daemon thread.

    `error` holds the first mismatch (a ShardError naming the file) once the thread finds it;
    `done` is set when every shard was hashed, a mismatch was found, or `stop()` was called."""

    def __init__(self, shard_sets: list[ShardSet]):
        self.jobs = [
            (f, e["sha256"]) for s in shard_sets for f, e in zip(s.files, s.manifest["splits"][s.split]["shards"])
        ]
        self.num_bytes = sum(os.path.getsize(f) for f, _ in self.jobs)
        self.error: ShardError | None = None
        self.done, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="fgpt-jax shard verification", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path, expected in self.jobs:
                if self._stop.is_set():
                    return
                try:
                    ok = file_sha256(path) == expected
                except OSError as e:
                    self.error = ShardError(f"{path}: could not be read to verify it ({e.strerror or e})")
                    return
                if not ok:
                    self.error = ShardError(
                        f"{path}: sha256 does not match the manifest (corrupt shard; "
                        f"found by the background verification, data.verify=background)"
                    )
                    return
        finally:
            self.done.set()

    def stop(self) -> None:
        """Stop after the shard being hashed (the thread is a daemon: it never delays the exit)."""
        self._stop.set()


@dataclass
class Data:
    """A run's data: the training loader (None when only validation was asked for), the fixed
    validation batches (global batch `val_batch_size`, this process's rows), and notes for the log."""

    loader: BatchLoader | None
    val: list[Batch]
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    verification: Verification | None = None  # the background sha256 pass (data.verify=background)

    def check(self) -> None:
        """Raise the ShardError the background verification found; return at once otherwise.

        Non-blocking (it reads a flag), so the training loop can call it every logged step: a shard
        whose bytes differ from its manifest then stops the run within one logging interval of
        being found, instead of training on corrupt data. A no-op when nothing runs in the
        background (data.verify startup/off, chat data). The error is raised on every call after."""
        if self.verification is not None and self.verification.error is not None:
            raise self.verification.error

    @property
    def verified(self) -> bool:
        """True once the background verification hashed every shard and found them all intact."""
        v = self.verification
        return v is not None and v.done.is_set() and v.error is None and not v._stop.is_set()


def open_data(
    cfg: DataConfig,
    seq_len: int,
    batch_size: int,
    val_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
    first_row: int = 0,
    reference: Callable[[Rows], np.ndarray] | None = None,
) -> Data:
    """The loader and validation batches `cfg` describes, for sequences of `seq_len` tokens.

    `batch_size` is the global batch per step; `val_batch_size` the global batch per validation call
    (the trainer's micro-batch); both count pairs for preference data. With `train=False` only the
    validation batches are built. Preference data needs `reference(rows) -> [N] float32`, each row's
    log-probability under the reference model (fgpt_jax.eval.dpo.Reference, whose `source`, the model
    it scores with, the train loader's state records)."""
    if not cfg.path:
        raise DataError(
            "data.path: empty; expected a shard directory, the bundled corpus "
            "'tinyshakespeare', or (format chat/preference) a conversations or preference file"
        )
    if cfg.format == "chat":
        return _chat(cfg, seq_len, batch_size, val_batch_size, process_index, process_count, train, first_row)
    if cfg.format == "preference":
        if reference is None:
            raise DataError(
                "data.format=preference: needs the reference model's log-probabilities (a DPO run's init_from)"
            )
        return _preference(
            cfg, seq_len, batch_size, val_batch_size, process_index, process_count, train, first_row, reference
        )
    if os.path.isfile(cfg.path):
        raise _file_not_shards(cfg.path)
    path = resolve(cfg.path)
    blocking = cfg.verify == "startup" or (cfg.verify == "background" and not train)
    opened: list[ShardSet] = []
    loader, notes, val = None, [], []
    if train:
        opened.append(open_shards(path, "train", verify=blocking))
        loader = WindowLoader(
            opened[-1],
            seq_len,
            batch_size,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
            prefetch=cfg.prefetch,
            read_threads=cfg.read_threads,
            first_row=first_row,
        )
    if read_manifest(path)["splits"]["val"]["num_tokens"] == 0:
        notes.append(f"data.path {cfg.path}: no validation split (made with --val-fraction 0); val/loss is skipped")
    else:
        opened.append(open_shards(path, "val", verify=blocking))
        val = val_windows(
            opened[-1],
            seq_len,
            val_batch_size,
            cfg.val_windows,
            process_index=process_index,
            process_count=process_count,
        )
    verification = None
    if cfg.verify == "background" and not blocking:
        verification = Verification(opened)
        size = verification.num_bytes
        notes.append(
            f"data.path {cfg.path}: checking the sha256 of {len(verification.jobs)} shards "
            f"({f'{size / 1e9:.1f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'}) in the background "
            f"(data.verify=background)"
        )
    elif cfg.verify == "off":
        notes.append(
            f"data.path {cfg.path}: shards are not hashed (data.verify=off): a change outside each "
            f"shard's fingerprint and sampled blocks goes unnoticed unless it leaves the vocabulary"
        )
    return Data(loader, val, notes, verification=verification)


# Record keys that say what a file given as pretraining data holds (searched in its first MiB).
_CHAT_KEYS = re.compile(r'"(?:instruction|messages)"\s*:')
_PREFERENCE_KEYS = re.compile(r'"(?:chosen|rejected)"\s*:')
_TABLE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")  # what `data fineweb --files` reads


def _file_not_shards(path: str) -> DataError:
    """The error for a file given as pretraining data (data.format=tokens reads shard directories):
    the command that makes shards of it, or, when its records are instruction data or preference
    pairs, the preset that trains on them as they are."""
    what = f"data.path {path}: a file, but pretraining (data.format=tokens) reads a shard directory"
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        try:
            head = " ".join(f'"{name}":' for name in pq.read_schema(path).names)
        except Exception:  # not readable as parquet: the shard command will say why
            head = ""
    elif suffix in (".json", ".jsonl"):
        with open(path, "rb") as f:
            head = f.read(1 << 20).decode("utf-8", "replace")
    else:
        head = ""
    if _PREFERENCE_KEYS.search(head):
        return DataError(
            f"{what}; its records are preference pairs: train DPO on them with --config dpo "
            f"--config.init_from=SFT_RUN_DIR (data.format=preference)"
        )
    if _CHAT_KEYS.search(head):
        return DataError(
            f"{what}; its records are instruction data: fine-tune on them with --config sft "
            f"--config.init_from=RUN_DIR (data.format=chat)"
        )
    out = f"data/{os.path.splitext(os.path.basename(path))[0]}"
    command = (
        f"python -m fgpt_jax.data fineweb --files {path} --out {out} (--text-field NAME if the text is not in 'text')"
        if suffix in _TABLE_SUFFIXES
        else f"python -m fgpt_jax.data text {path} --out {out}"
    )
    return DataError(f"{what}; make one from it with {command}, then --config.data.path={out}")


def _chat(cfg: DataConfig, seq_len, batch_size, val_batch_size, process_index, process_count, train, first_row) -> Data:
    chat = build_chat_data(
        load_conversations(cfg.path, limit=cfg.limit or None),
        seq_len,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_response_tokens=cfg.max_response_tokens,
        pack=cfg.pack,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    if chat.train.num_rows == 0 and train:
        raise DataError(
            f"data.path {cfg.path}: no conversation fits ({chat.stats['dropped_too_long']} too long, "
            f"{chat.stats['dropped_prompt']} prompt, {chat.stats['dropped_response']} response over the "
            f"limits); raise train.seq_len / data.max_*_tokens or use another source"
        )
    loader = (
        RowLoader(
            chat.train,
            batch_size,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
            prefetch=cfg.prefetch,
            kind="chat",
            first_row=first_row,
        )
        if train
        else None
    )
    val = (
        val_rows(chat.val, val_batch_size, get_tokenizer().eot_id, process_index, process_count)
        if chat.val.num_rows
        else []
    )
    notes = [] if val else [f"data.path {cfg.path}: no conversation in the validation split; val/loss is skipped"]
    return Data(loader, val, notes, chat.stats)


def _preference(
    cfg: DataConfig, seq_len, batch_size, val_batch_size, process_index, process_count, train, first_row, reference
) -> Data:
    pref = build_preference_data(
        load_pairs(cfg.path, limit=cfg.limit or None),
        seq_len,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_response_tokens=cfg.max_response_tokens,
        truncate=cfg.truncate,
        val_fraction=cfg.val_fraction,
    )
    s = pref.stats
    if pref.train.num_rows == 0 and train:
        raise DataError(
            f"data.path {cfg.path}: no preference pair fits ({s['dropped_too_long']} too long, "
            f"{s['dropped_prompt']} prompt, {s['dropped_response']} response over the limits, "
            f"{s['dropped_empty']} empty, {s['dropped_identical']} identical); raise train.seq_len / "
            f"data.max_*_tokens, set data.truncate=true, or use another source"
        )
    loader = None
    if train:
        train_logps = reference(pref.train)
        loader = PairLoader(
            pref.train,
            train_logps,
            batch_size,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
            prefetch=cfg.prefetch,
            first_row=first_row,
            # fgpt_jax.eval.dpo.Reference knows its model; the state records it (a plain function does not)
            reference_source=getattr(reference, "source", None),
        )
    val = (
        val_pairs(pref.val, reference(pref.val), val_batch_size, get_tokenizer().eot_id, process_index, process_count)
        if pref.val.num_rows
        else []
    )
    notes = (
        [] if val else [f"data.path {cfg.path}: no preference pair in the validation split; val metrics are skipped"]
    )
    return Data(loader, val, notes, s)


__all__ = ["Data", "Verification", "open_data", "ShardError"]
