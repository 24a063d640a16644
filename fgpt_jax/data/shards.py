"""Token shards on disk: the manifest format, its validation, and memmapped reading.

A shard directory holds `{split}_{i:06d}.npy` (1-D uint16, every document prefixed by
<|endoftext|>) and `manifest.json`, written last, so a directory with a manifest is complete.
Opening checks the manifest (format, tokenizer hash, dtype, counts) and every shard's header,
length and fingerprint (sha256 of its first and last 4,096 tokens), so a missing, truncated or
foreign shard fails naming the file; `verify=True` also checks each shard's full sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from fgpt_jax.tokenizer import get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "fgpt-jax-shards"
VERSION = 1
DTYPE = "uint16"  # GPT-2's 50,261 ids fit; half the disk and page cache of int32
SPLITS = ("train", "val")
_FINGERPRINT_TOKENS = 4096


class ShardError(ValueError):
    """A shard directory that cannot be used; the message names the file."""


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def fingerprint(tokens: np.ndarray) -> str:
    """Cheap identity of a shard: sha256 of its length, first and last 4,096 tokens."""
    h = hashlib.sha256(str(len(tokens)).encode())
    h.update(np.ascontiguousarray(tokens[:_FINGERPRINT_TOKENS]).tobytes())
    h.update(np.ascontiguousarray(tokens[-_FINGERPRINT_TOKENS:]).tobytes())
    return h.hexdigest()[:32]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str) -> dict:
    """The parsed, checked manifest of a shard directory."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ShardError(f"{directory}: shard directory not found")
    if not os.path.isfile(path):
        raise ShardError(f"{path}: manifest missing (tokenisation incomplete, or not a shard directory)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: expected a JSON manifest ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path}: expected format {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    if m.get("version") != VERSION:
        raise ShardError(f"{path}: expected version {VERSION}, got {m.get('version')!r}")
    tok = get_tokenizer()
    if m.get("tokenizer", {}).get("sha256") != tok.sha256:
        raise ShardError(f"{path}: shards were made with another tokenizer "
                         f"(sha256 {m.get('tokenizer', {}).get('sha256')}, expected {tok.sha256})")
    if m.get("dtype") != DTYPE:
        raise ShardError(f"{path}: expected dtype {DTYPE}, got {m.get('dtype')!r}")
    for split in SPLITS:
        s = m.get("splits", {}).get(split)
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            raise ShardError(f"{path}: split {split!r} missing or malformed")
        total = sum(int(sh.get("num_tokens", -1)) for sh in s["shards"])
        if total != s.get("num_tokens"):
            raise ShardError(f"{path}: split {split!r} shards hold {total} tokens, manifest says {s.get('num_tokens')}")
    return m


def load_shard(path: str, num_tokens: int, expected_fingerprint: str | None = None,
               sha256: str | None = None) -> np.ndarray:
    """One shard, memmapped and checked against its manifest entry."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated files fail inside numpy's header/mmap code
        raise ShardError(f"{path}: not a readable .npy shard (truncated or corrupt: {e})") from e
    if arr.dtype != np.dtype(DTYPE) or arr.ndim != 1:
        raise ShardError(f"{path}: expected a 1-D {DTYPE} array, got {arr.dtype} with shape {arr.shape}")
    if arr.shape[0] != num_tokens:
        raise ShardError(f"{path}: expected {num_tokens} tokens, found {arr.shape[0]}")
    if expected_fingerprint is not None and fingerprint(arr) != expected_fingerprint:
        raise ShardError(f"{path}: contents do not match the manifest (foreign or overwritten shard)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ShardError(f"{path}: sha256 does not match the manifest (corrupt shard)")
    # A plain ndarray view of the mapping: fancy indexing on np.memmap is measurably slower.
    return np.asarray(arr)


@dataclass
class ShardSet:
    """The memmapped shards of one split, read as one concatenated token stream."""
    path: str  # the shard directory
    split: str
    manifest: dict
    arrays: list[np.ndarray]  # memmapped uint16 shards, in order
    files: list[str]
    offsets: np.ndarray = field(init=False)  # offsets[i] = global position of arrays[i][0]; offsets[-1] = num_tokens

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["splits"][self.split]["num_documents"])

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """tokens[i] = stream[starts[i] : starts[i] + length] as int32, shape [len(starts), length].

        Vectorised per shard: one fancy-index per shard touched; only windows that cross a shard
        boundary (rare with 100M-token shards) are copied piecewise."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int32)
        if len(starts) == 0:
            return out
        if starts.min() < 0 or starts.max() + length > self.num_tokens:
            raise IndexError(f"window outside the {self.num_tokens}-token {self.split} stream")
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, starts + length - 1, side="right") - 1
        cols = np.arange(length, dtype=np.int64)
        for shard in np.unique(first):
            rows = np.nonzero((first == shard) & (last == shard))[0]
            if len(rows):
                local = starts[rows] - self.offsets[shard]
                out[rows] = self.arrays[shard][local[:, None] + cols]
        for row in np.nonzero(first != last)[0]:
            pos, filled = int(starts[row]), 0
            while filled < length:
                s = int(np.searchsorted(self.offsets, pos, side="right") - 1)
                take = min(length - filled, int(self.offsets[s + 1]) - pos)
                out[row, filled:filled + take] = self.arrays[s][pos - self.offsets[s]: pos - self.offsets[s] + take]
                pos, filled = pos + take, filled + take
        return out


def open_shards(path: str, split: str, verify: bool = False) -> ShardSet:
    """The validated, memmapped shards of `split` ("train" or "val") in directory `path`
    (`fgpt_jax.data.bundled.resolve` turns the bundled corpus's name into its directory)."""
    if split not in SPLITS:
        raise ShardError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    manifest = read_manifest(path)
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise ShardError(f"{os.path.join(path, MANIFEST)}: split {split!r} has no tokens "
                         f"(val_fraction {manifest.get('val_fraction')})")
    files, arrays = [], []
    for e in entries:
        f = os.path.join(path, os.path.basename(e["file"]))
        arrays.append(load_shard(f, int(e["num_tokens"]), e.get("fingerprint"),
                                 e.get("sha256") if verify else None))
        files.append(f)
    return ShardSet(path=path, split=split, manifest=manifest, arrays=arrays, files=files)
