"""The data stage: documents -> uint16 token shards -> batches; conversations -> rows -> batches.

Modules, in the order data flows through them:
  sources        documents: FineWeb-Edu from the Hub, local jsonl/json/parquet/csv/txt, plain text (Gutenberg)
  writer         tokenise documents into shards + manifest.json (parallel, resumable, atomic)
  shards         the shard format: manifest validation, memmapped reading, window gathering
  bundled        the bundled Tiny Shakespeare corpus, tokenised into a cache on first use
  loader         batches: random token windows (pretraining), rows of a fixed table (SFT), fixed val batches
  pipeline       from a DataConfig to the training loader and validation batches
  conversations  instruction data: Alpaca/messages records -> rendered, filtered, split, packed rows
  preferences    preference pairs (DPO): chosen/rejected replies -> rendered, filtered, split row pairs
  download       checked, atomic, resumable downloads into the cache
  hellaswag      HellaSwag items (official jsonl, checked download; llama.cpp's text format)
  core           CORE's eval bundle (nanochat's core.yaml, eval_meta_data.csv, task files; its download)
CLI: `python -m fgpt_jax.data --help`.

This file holds the stage's shared nouns, which every module above may import (and which import
none of them): the config, the batch types, and the two hashing rules that make the data
deterministic (seed derivation and the train/validation split), and the cache directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from fgpt_jax.errors import ConfigError

FORMATS = ("tokens", "chat", "preference")
VERIFY = ("background", "startup", "off")


@dataclass
class DataConfig:
    """Where training data comes from and how it is read (batch size and block size live elsewhere)."""

    path: str = "tinyshakespeare"  # shard directory holding manifest.json, or "tinyshakespeare" (the bundled corpus);
    # chat/preference: a file or Hub dataset; "": none recorded
    seed: int = 0  # loader seed: the window permutation and per-epoch offsets derive from it
    prefetch: int = 2  # batches prepared ahead by background threads (0: none)
    read_threads: int = 1  # background threads gathering batches from the memmapped shards
    val_windows: int = 1280  # fixed validation windows (capped by the val split, rounded to whole batches)
    verify: Literal["background", "startup", "off", True, False] = "background"  # full sha256 of every shard: in a
    # background thread (Data.check raises), before training, or never; true/false (older config.json) read as
    # startup/off
    format: Literal["tokens", "chat", "preference"] = "tokens"  # tokens: pretraining shards; chat: conversations (SFT);
    # preference: chosen/rejected pairs (DPO)
    max_prompt_tokens: int = 0  # chat/preference: drop records with more non-reply tokens (0: no limit)
    max_response_tokens: int = 0  # chat/preference: drop records with more reply tokens (preference: either reply) (0:
    # no limit)
    pack: bool = True  # chat: pack several conversations per row (else one per row, padded)
    val_fraction: float = 0.05  # chat/preference: share of records held out for validation
    limit: int = 0  # chat/preference: use only the first N records of the source (0: all)
    truncate: bool = False  # preference: cut what is over max_prompt_tokens (oldest turns first) / max_response_tokens
    # (a reply's end) instead of dropping the pair

    def __post_init__(self):
        if isinstance(self.verify, bool):  # config.json of fgpt-jax 0.1/0.2: verify was a boolean
            self.verify = "startup" if self.verify else "off"
        problems = []
        if self.verify not in VERIFY:
            problems.append(f"verify={self.verify!r} must be one of {', '.join(VERIFY)}")
        if self.format not in FORMATS:
            problems.append(f"format={self.format!r} must be one of {', '.join(FORMATS)}")
        if not 0 <= self.val_fraction < 1:  # also refuses nan
            problems.append(f"val_fraction={self.val_fraction} must be in [0, 1)")
        for name in ("prefetch", "max_prompt_tokens", "max_response_tokens", "limit"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("read_threads", "val_windows"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ConfigError("DataConfig: " + "; ".join(problems))


class Batch(NamedTuple):
    """What every loader yields and every step consumes (a pytree: jit, shard and scan see its leaves).

    tokens int32 [..., B, T + 1]: inputs are tokens[..., :-1], targets tokens[..., 1:].
    mask float32 [..., B, T]: 1 where the target token counts in the loss, 0 where it does not
    (prompt and padding in SFT). Pretraining batches carry all ones, so there is one program.
    """

    tokens: np.ndarray
    mask: np.ndarray

    @classmethod
    def of_tokens(cls, tokens: np.ndarray) -> Batch:
        """A batch in which every target token counts (pretraining)."""
        tokens = np.asarray(tokens, np.int32)
        return cls(tokens, np.ones(tokens.shape[:-1] + (tokens.shape[-1] - 1,), np.float32))


class PreferenceBatch(NamedTuple):
    """What preference tuning (DPO) consumes: pairs of rows, each pair (chosen, rejected) adjacent.

    tokens int32 [..., 2P, T + 1] and mask float32 [..., 2P, T] as in `Batch`; rows 2i and 2i + 1
    are pair i's chosen and rejected reply after the same prompt, the mask 1 on the reply's tokens
    only. ref_logp float32 [..., 2P]: each row's reply log-probability under the reference model
    (computed once when the run starts), so the reference never sits in device memory. Padding
    pairs (validation) have an all-zero mask and count for nothing.
    """

    tokens: np.ndarray
    mask: np.ndarray
    ref_logp: np.ndarray


def derive(seed: int, *parts) -> int:
    """A 64-bit integer from (seed, parts): stable across processes and machines, unlike hash()."""
    h = hashlib.sha256(":".join(str(p) for p in (seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "big")


def in_val_split(key: str | bytes, val_fraction: float) -> bool:
    """The train/validation rule for documents and conversations: sha256 of the
    record's key (a document id or text, a rendering's bytes) read as a fraction of 2^64, below
    `val_fraction`. The same on every machine and run; identical records land in the same split."""
    if val_fraction <= 0:
        return False
    h = hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2.0**64


def cache_root() -> str:
    """Where downloads and derived files are cached: $FGPT_JAX_CACHE, default ~/.cache/fgpt_jax."""
    return os.environ.get("FGPT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fgpt_jax")


__all__ = ["DataConfig", "Batch", "PreferenceBatch", "derive", "in_val_split", "cache_root", "FORMATS", "VERIFY"]
