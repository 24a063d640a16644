"""Batches for training and validation: random token windows, rows of a fixed table, fixed val batches.

Every loader yields `Batch(tokens, mask)` numpy arrays for this process's rows of global batch k,
and batch k is a pure function of (seed, k): it does not depend on how many processes read it
(process p reads rows [p B/P, (p+1) B/P)) nor on whether the run was stopped and resumed.

`WindowLoader` (pretraining). The train split is one stream of N tokens. Epoch e cuts it into
W = (N - T) // (T + 1) windows of T + 1 tokens starting at o_e + j (T + 1), with a random offset o_e
in [0, T] so window boundaries move between epochs, and visits them in a fresh random permutation
(no window twice in an epoch, every window once). Global window g = k B + i (step k, row i) lies in
epoch g // W. Windows may span documents; <|endoftext|> separates them. The mask is all ones.
Every batch's token ids are checked against the vocabulary (`ShardSet.check_vocab`, one max).

`RowLoader` (instruction tuning, and any data laid out as a fixed table of rows with a mask):
global row g is row perm_e[g mod N] of epoch e = g // N; batches wrap into the next epoch when N < B.

grain provides the iterator: a `MapDataset` over steps whose checkpointable state is just the next
step, with background prefetch threads. `EpochPermutation` is the one permutation rule: a numpy
table per epoch, or for epochs over 2^24 items grain's memory-free `index_shuffle` (a numpy table
would then cost 64+ MiB per epoch, while index_shuffle's cycle-walking costs up to milliseconds per
index on small epochs, so small epochs use tables).

`first_row` starts a loader partway into its stream, at global row `first_row`: a warm restart
continues the rows its source run would have read next, whatever the new batch size.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from functools import cached_property

import grain
import numpy as np
from grain.experimental import index_shuffle

from fgpt_jax.data import Batch, derive
from fgpt_jax.data.shards import ShardSet
from fgpt_jax.data.sources import DataError

STATE_VERSION = 1
TABLE_MAX_ITEMS = 1 << 24  # 17B tokens of windows at T=1024; beyond, grain's index_shuffle


class EpochPermutation:
    """A fresh random permutation of n items per epoch, a pure function of (seed, tag, epoch)."""

    def __init__(self, n: int, seed: int, tag: str):
        if n < 1:
            raise ValueError(f"EpochPermutation: need at least one item, got {n}")
        self.n, self.seed, self.tag = n, int(seed), tag
        self._grain_seed = derive(self.seed, "permutation") % 2**32
        self._tables: dict[int, np.ndarray] = {}

    def _table(self, epoch: int) -> np.ndarray:
        if epoch not in self._tables:
            rng = np.random.default_rng([derive(self.seed, self.tag, epoch)])
            self._tables[epoch] = rng.permutation(self.n).astype(np.int64)
        return self._tables[epoch]

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, permuted item) of each global index in `g`."""
        epoch_g, j_g = np.divmod(np.asarray(g, dtype=np.int64), self.n)
        item_g = np.empty_like(j_g)
        epochs = [int(e) for e in np.unique(epoch_g)]
        for epoch in epochs:
            sel = epoch_g == epoch
            if self.n <= TABLE_MAX_ITEMS:
                item_g[sel] = self._table(epoch)[j_g[sel]]
            else:
                s = (self._grain_seed + epoch) % 2**32  # grain's own per-epoch reseeding rule
                item_g[sel] = [index_shuffle(int(j), max_index=self.n - 1, seed=s, rounds=4) for j in j_g[sel]]
        # Keep only this call's epochs: the next batch starts in the last of them, and memory stays
        # bounded by one batch's worth of tables.
        self._tables = {e: t for e, t in self._tables.items() if e in epochs}
        return epoch_g, item_g


class BatchLoader:
    """What every training loader shares: batch k is the pure function `batch(k)`; grain supplies the
    prefetching iterator, whose state is just the next step. `get_state` adds `_identity()` (what
    the state is only valid for) and `set_state` refuses a mismatch.

    Subclasses set their own fields, then call `super().__init__` (prefetching may start at once)."""

    kind = "data"  # names the loader in error messages

    def __init__(
        self,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        prefetch: int,
        read_threads: int = 1,
        first_row: int = 0,
    ):
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be positive and divisible by process_count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if first_row < 0:
            raise ValueError(f"first_row must be >= 0, got {first_row}")
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = global_batch_size // process_count
        self.first_row = int(first_row)
        ds = grain.MapDataset.range(0, sys.maxsize).map(self.batch)
        options = grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=max(0, prefetch))
        self._iter = ds.to_iter_dataset(options).__iter__()

    def batch(self, step: int) -> Batch:
        raise NotImplementedError

    def _identity(self) -> dict:
        raise NotImplementedError

    def local_rows(self, step: int) -> np.ndarray:
        """Global row indices of this process's rows in batch `step`."""
        first = self.first_row + int(step) * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def rows_read(self, steps: int) -> int:
        """The global row the batch after `steps` batches starts at (where a warm restart continues)."""
        return self.first_row + int(steps) * self.global_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return next(self._iter)

    def get_state(self) -> dict:
        """Small JSON-serialisable state: the next step, plus what it is only valid for."""
        grain_state = self._iter.get_state()
        return {**self.identity(), "step": int(grain_state["next_index"]), "grain": grain_state}

    def identity(self) -> dict:
        ident = self._identity()
        if self.first_row:  # absent when 0, as in the states of fgpt-jax 0.1
            ident["first_row"] = self.first_row
        return ident

    def set_state(self, state: dict) -> None:
        """Continue from a saved state: the next batch is batch `state["step"]`."""
        for k, mine in self.identity().items():
            if state.get(k) != mine:
                raise DataError(
                    f"{self.kind} state: saved {k}={state.get(k)!r} but this loader has {mine!r} "
                    f"(different data or config; batches would not match)"
                )
        if state.get("first_row", 0) != self.first_row:
            raise DataError(
                f"{self.kind} state: saved first_row={state.get('first_row', 0)} but this loader has {self.first_row}"
            )
        self._iter.set_state(state["grain"])


class WindowLoader(BatchLoader):
    """Random windows of the train split: `Batch` with tokens int32 [local_batch, seq_len + 1]."""

    kind = "token data"

    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        read_threads: int = 1,
        first_row: int = 0,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards, self.seq_len, self.seed = shards, seq_len, int(seed)
        self.window = seq_len + 1
        # Same count for every offset in [0, T], so each epoch has exactly W windows.
        self.windows_per_epoch = (shards.num_tokens - seq_len) // self.window
        if self.windows_per_epoch < 1:
            raise DataError(
                f"{shards.path}: {shards.split} split has {shards.num_tokens} tokens, "
                f"too few for one window of {self.window} (need {2 * seq_len + 1})"
            )
        self.permutation = EpochPermutation(self.windows_per_epoch, self.seed, "table")
        super().__init__(global_batch_size, process_index, process_count, prefetch, read_threads, first_row)

    def epoch_offset(self, epoch: int) -> int:
        return derive(self.seed, "offset", epoch) % self.window

    def window_starts(self, g: np.ndarray) -> np.ndarray:
        """Token positions of global windows g in the train stream."""
        epoch_g, perm_g = self.permutation(g)
        starts = perm_g * self.window
        for epoch in np.unique(epoch_g):
            starts[epoch_g == epoch] += self.epoch_offset(int(epoch))
        return starts

    def batch(self, step: int) -> Batch:
        """Batch `step`. Raises ShardError (naming the shard file and position) if a token is not a
        vocabulary id: a corrupt shard stops training here rather than as a NaN loss later."""
        starts = self.window_starts(self.local_rows(step))
        tokens = self.shards.gather(starts, self.window)
        self.shards.check_vocab(tokens, starts)
        return Batch.of_tokens(tokens)

    def _identity(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_tokens": self.shards.num_tokens,
        }


@dataclass
class Rows:
    """A fixed table of training rows: tokens int32 [N, T + 1], mask float32 [N, T] (aligned with
    tokens[:, 1:]), and how many source records (conversations, pairs) they hold."""

    tokens: np.ndarray
    mask: np.ndarray
    num_records: int

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the rows (tokens and mask): identifies the data a loader state belongs to."""
        h = hashlib.sha256(np.ascontiguousarray(self.tokens, np.int32).tobytes())
        h.update(np.ascontiguousarray(self.mask, np.float32).tobytes())
        return h.hexdigest()[:16]


class RowLoader(BatchLoader):
    """Rows of a fixed table in a fresh permutation each epoch: `Batch` of [local_batch, ...] rows."""

    def __init__(
        self,
        rows: Rows,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        kind: str = "chat",
        first_row: int = 0,
    ):
        if rows.num_rows < 1:
            raise DataError(f"{kind} data: no rows (every record filtered out?)")
        self.rows, self.seed, self.row_kind = rows, int(seed), kind
        self.kind = f"{kind} data"
        self.permutation = EpochPermutation(rows.num_rows, self.seed, f"{kind}-rows")
        super().__init__(global_batch_size, process_index, process_count, prefetch, first_row=first_row)

    def batch(self, step: int) -> Batch:
        _, r = self.permutation(self.local_rows(step))
        return Batch(self.rows.tokens[r], self.rows.mask[r])

    def _identity(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": self.row_kind,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_rows": self.rows.num_rows,
            "content_hash": self.rows.content_hash,
        }


def _local(batch: Batch, size: int, process_index: int, process_count: int) -> Batch:
    if size % process_count:
        raise ValueError(f"validation batch of {size} rows is not divisible by process_count {process_count}")
    local = size // process_count
    return Batch(*(x[process_index * local : (process_index + 1) * local] for x in batch))


def val_windows(
    shards: ShardSet, seq_len: int, batch_size: int, num_windows: int, process_index: int = 0, process_count: int = 1
) -> list[Batch]:
    """A fixed set of validation windows, identical on every call, as batches of the same shape.

    Windows are non-overlapping and evenly spread over the whole split. Their number is capped by
    the split's size and rounded down to whole batches (one smaller batch if fewer than
    `batch_size` fit). `batch_size` is global; a process gets its rows of each batch."""
    window = seq_len + 1
    available = shards.num_tokens // window
    if available < 1:
        raise DataError(
            f"{shards.path}: {shards.split} split has {shards.num_tokens} tokens, too few for one window of {window}"
        )
    if num_windows < 1 or batch_size < 1:
        raise ValueError(f"num_windows and batch_size must be positive, got {num_windows} and {batch_size}")
    n = min(num_windows, available)
    if n >= batch_size:
        n -= n % batch_size
    starts = (np.arange(n, dtype=np.int64) * available // n) * window
    size = min(batch_size, n)
    batches = []
    for b in range(0, n, size):
        tokens = shards.gather(starts[b : b + size], window)
        shards.check_vocab(tokens, starts[b : b + size])  # a corrupt val shard fails here, it never scores
        batches.append(_local(Batch.of_tokens(tokens), size, process_index, process_count))
    return batches


def val_rows(rows: Rows, batch_size: int, pad_id: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """Every row in order, in batches of `batch_size` (global; a process gets its rows of each).

    The last batch is filled up with `pad_id` rows whose mask is all 0, so every batch has the same
    shape and the padding adds nothing to a masked loss sum or token count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_pad = -rows.num_rows % batch_size
    tokens = np.concatenate([rows.tokens, np.full((n_pad, rows.seq_len + 1), pad_id, np.int32)])
    mask = np.concatenate([rows.mask, np.zeros((n_pad, rows.seq_len), np.float32)]).astype(np.float32)
    return [
        _local(Batch(tokens[b : b + batch_size], mask[b : b + batch_size]), batch_size, process_index, process_count)
        for b in range(0, len(tokens), batch_size)
    ]
