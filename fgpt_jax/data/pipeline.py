"""From a `DataConfig` to what the trainer and the evaluator read: a training loader and the fixed
validation batches. The one place that knows which format reads which way:

  tokens  a shard directory (or the bundled corpus): `WindowLoader` over the train split, and
          `data.val_windows` fixed windows of the val split (`val_windows`);
  chat    conversations from a file or the Hub: rendered, filtered, split and packed once
          (`build_chat_data`), then `RowLoader` over the train rows and every val row (`val_rows`).

A corpus without a validation split still trains (val/loss is then skipped and the log says so);
any other problem with the val split (a missing, truncated or foreign shard) is an error, not a
silent switch-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fgpt_jax.data import Batch, DataConfig
from fgpt_jax.data.bundled import resolve
from fgpt_jax.data.conversations import build_chat_data, load_conversations
from fgpt_jax.data.loader import BatchLoader, RowLoader, WindowLoader, val_rows, val_windows
from fgpt_jax.data.shards import ShardError, open_shards, read_manifest
from fgpt_jax.tokenizer import get_tokenizer


@dataclass
class Data:
    """A run's data: the training loader (None when only validation was asked for), the fixed
    validation batches (global batch `val_batch_size`, this process's rows), and notes for the log."""

    loader: BatchLoader | None
    val: list[Batch]
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ShardError if a background verification of the shards found a mismatch. Cheap: the
        trainer calls it every step. (Shards are checked on open; background verification: to come.)"""


def open_data(cfg: DataConfig, seq_len: int, batch_size: int, val_batch_size: int, process_index: int = 0,
              process_count: int = 1, train: bool = True, first_row: int = 0) -> Data:
    """The loader and validation batches `cfg` describes, for sequences of `seq_len` tokens.

    `batch_size` is the global batch per step; `val_batch_size` the global batch per validation call
    (the trainer's micro-batch). With `train=False` only the validation batches are built."""
    if not cfg.path:
        raise ValueError("data.path: empty; expected a shard directory, the bundled corpus "
                         "'tinyshakespeare', or (format chat) a conversations file")
    if cfg.format == "chat":
        return _chat(cfg, seq_len, batch_size, val_batch_size, process_index, process_count, train, first_row)
    path = resolve(cfg.path)
    loader, notes = None, []
    if train:
        loader = WindowLoader(open_shards(path, "train", verify=cfg.verify), seq_len, batch_size, seed=cfg.seed,
                              process_index=process_index, process_count=process_count, prefetch=cfg.prefetch,
                              read_threads=cfg.read_threads, first_row=first_row)
    if read_manifest(path)["splits"]["val"]["num_tokens"] == 0:
        notes.append(f"data.path {cfg.path}: no validation split (made with --val-fraction 0); val/loss is skipped")
        return Data(loader, [], notes)
    val = val_windows(open_shards(path, "val", verify=cfg.verify), seq_len, val_batch_size, cfg.val_windows,
                      process_index=process_index, process_count=process_count)
    return Data(loader, val, notes)


def _chat(cfg: DataConfig, seq_len, batch_size, val_batch_size, process_index, process_count, train,
          first_row) -> Data:
    chat = build_chat_data(load_conversations(cfg.path, limit=cfg.limit or None), seq_len,
                           max_prompt_tokens=cfg.max_prompt_tokens, max_response_tokens=cfg.max_response_tokens,
                           pack=cfg.pack, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if chat.train.num_rows == 0 and train:
        raise ValueError(f"data.path {cfg.path}: no conversation fits ({chat.stats['dropped_too_long']} too long, "
                         f"{chat.stats['dropped_prompt']} prompt, {chat.stats['dropped_response']} response over the "
                         f"limits); raise train.seq_len / data.max_*_tokens or use another source")
    loader = (RowLoader(chat.train, batch_size, seed=cfg.seed, process_index=process_index,
                        process_count=process_count, prefetch=cfg.prefetch, kind="chat", first_row=first_row)
              if train else None)
    val = (val_rows(chat.val, val_batch_size, get_tokenizer().eot_id, process_index, process_count)
           if chat.val.num_rows else [])
    notes = [] if val else [f"data.path {cfg.path}: no conversation in the validation split; val/loss is skipped"]
    return Data(loader, val, notes, chat.stats)


__all__ = ["Data", "open_data", "ShardError"]
