"""Token shards on disk: the manifest format, its validation, and memmapped reading.

A shard directory holds `{split}_{i:06d}.npy` (1-D uint16, every document prefixed by
<|endoftext|>) and `manifest.json`, written last, so a directory with a manifest is complete.

What opening checks, cheapest first, so a bad directory fails naming the file and the field:
  - the manifest's whole schema (`Manifest`: types, ranges, split sums; shard names must be plain
    file names inside the directory: no path separator, no "..", nothing absolute);
  - every shard's .npy header, dtype and length, and its fingerprint (sha256 of its length and
    first and last 4,096 tokens): a missing, truncated, foreign or overwritten shard;
  - for shards written since the `sampled` entry exists, 64 evenly spaced 4,096-token blocks
    (`sampled_sha256`): bytes changed inside one of them. Manifests without it still open.
Together these read a small fraction of a large shard: a change elsewhere is only caught by the full
sha256 (`verify=True`, `data check --verify`, or `data.verify` in training), and, for token ids
outside the vocabulary, by `ShardSet.check_vocab` as batches are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fgpt_jax.errors import UserError
from fgpt_jax.tokenizer import get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "fgpt-jax-shards"
VERSION = 1
DTYPE = "uint16"  # GPT-2's 50,261 ids fit; half the disk and page cache of int32
SPLITS = ("train", "val")
_FINGERPRINT_TOKENS = 4096
SAMPLE_BLOCKS, SAMPLE_BLOCK_TOKENS = 64, 4096  # the sampled check of shards written from now on


class ShardError(UserError, ValueError):
    """A shard directory that cannot be used; the message names the file."""


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def check_file_name(name: str) -> str:
    """`name` if it is a plain file name (it stays inside its directory); ValueError otherwise."""
    if (
        not name
        or name in (".", "..")
        or "\0" in name
        or os.path.isabs(name)
        or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep))
    ):
        raise ShardError(
            f"expected a file name inside the shard directory (no path separator, '..' or absolute path), got {name!r}"
        )
    return name


def fingerprint(tokens: np.ndarray) -> str:
    """Cheap identity of a shard: sha256 of its length, first and last 4,096 tokens."""
    h = hashlib.sha256(str(len(tokens)).encode())
    h.update(np.ascontiguousarray(tokens[:_FINGERPRINT_TOKENS]).tobytes())
    h.update(np.ascontiguousarray(tokens[-_FINGERPRINT_TOKENS:]).tobytes())
    return h.hexdigest()[:32]


def sampled_sha256(tokens: np.ndarray, blocks: int = SAMPLE_BLOCKS, block_tokens: int = SAMPLE_BLOCK_TOKENS) -> str:
    """sha256 of `blocks` evenly spaced blocks of `block_tokens` tokens (the first block at the start, the
    last at the end), or of every token when the shard is no longer than that. Reads blocks x block_tokens
    tokens (512 KiB at the defaults) however large the shard: a cheap check of its middle on every open."""
    n = len(tokens)
    h = hashlib.sha256(f"{n}:{blocks}:{block_tokens}".encode())
    if n <= blocks * block_tokens:
        h.update(np.ascontiguousarray(tokens).tobytes())
    else:
        starts = np.arange(blocks, dtype=np.int64) * (n - block_tokens) // max(1, blocks - 1)
        for s in starts:
            h.update(np.ascontiguousarray(tokens[s : s + block_tokens]).tobytes())
    return h.hexdigest()[:32]


def sampled_entry(tokens: np.ndarray) -> dict:
    """The manifest's `sampled` record of a shard being written."""
    return {"blocks": SAMPLE_BLOCKS, "block_tokens": SAMPLE_BLOCK_TOKENS, "sha256": sampled_sha256(tokens)}


def tokens_checked(entry: dict) -> int:
    """How many of a shard's tokens opening it reads (fingerprint plus sampled blocks; overlaps counted twice)."""
    s = entry.get("sampled")
    return min(entry["num_tokens"], 2 * _FINGERPRINT_TOKENS + (s["blocks"] * s["block_tokens"] if s else 0))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# -- the manifest's schema ----------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "12" is not 12 and true is not 1; extra keys are allowed, so later writers may add fields.
    model_config = ConfigDict(strict=True, extra="allow")


Count = Annotated[int, Field(ge=0)]
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Sampled(_Strict):
    blocks: Annotated[int, Field(ge=1, le=4096)]
    block_tokens: Annotated[int, Field(ge=1, le=1 << 20)]
    sha256: Hex32


class ShardEntry(_Strict):
    file: str
    num_tokens: Annotated[int, Field(ge=1)]
    sha256: Hex64
    fingerprint: Hex32
    sampled: Sampled | None = None  # absent in manifests written before it existed

    _file = field_validator("file")(check_file_name)


class Split(_Strict):
    num_tokens: Count
    num_documents: Count
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _sums(self):
        total = sum(s.num_tokens for s in self.shards)
        if total != self.num_tokens:
            raise ShardError(f"shards hold {total} tokens, manifest says {self.num_tokens}")
        return self


class Splits(_Strict):
    train: Split
    val: Split


class TokenizerId(_Strict):
    name: str
    sha256: str


class Manifest(_Strict):
    """What manifest.json must hold (the writer's settings plus the splits)."""

    format: Literal["fgpt-jax-shards"]
    version: Literal[1]
    tokenizer: TokenizerId
    dtype: Literal["uint16"]
    splits: Splits
    eot_id: Count | None = None
    source: dict | None = None
    shard_tokens: Annotated[int, Field(ge=1)] | None = None
    val_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def _explain(err: dict) -> str:
    """One pydantic error as `field: expected ..., got ...`."""
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return f"{_field(err['loc'])}: {msg[len('Value error, ') :]}"
    if err["type"] == "missing":
        return f"{_field(err['loc'])}: missing"
    msg = "expected " + msg[len("Input should be ") :] if msg.startswith("Input should be ") else msg
    msg = re.sub(r" or instance of \w+$", "", msg)  # pydantic's class names mean nothing to the reader
    got = repr(err.get("input"))
    return f"{_field(err['loc'])}: {msg}, got {got if len(got) <= 40 else got[:37] + '...'}"


def validate_manifest(m, path: str) -> dict:
    """`m` (parsed JSON) checked against the schema: the dict itself, or ShardError naming `path` and the field."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path}: expected format {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    if m.get("version") != VERSION:
        raise ShardError(f"{path}: expected version {VERSION}, got {m.get('version')!r}")
    try:
        checked = Manifest.model_validate(m)
    except ValidationError as e:
        raise ShardError(f"{path}: {_explain(e.errors()[0])}") from None
    tok = get_tokenizer()
    if checked.tokenizer.sha256 != tok.sha256:
        raise ShardError(
            f"{path}: shards were made with another tokenizer "
            f"(sha256 {checked.tokenizer.sha256}, expected {tok.sha256})"
        )
    seen: dict[str, str] = {}
    for split in SPLITS:
        for i, s in enumerate(getattr(checked.splits, split).shards):
            where = f"splits.{split}.shards[{i}].file"
            if s.file in seen:
                raise ShardError(f"{path}: {where}: {s.file!r} is also {seen[s.file]}")
            seen[s.file] = where
    return m


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
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or numbers too long to parse
        raise ShardError(f"{path}: expected a JSON manifest ({' '.join(str(e).split())})") from e
    return validate_manifest(m, path)


def load_shard(
    path: str,
    num_tokens: int,
    expected_fingerprint: str | None = None,
    sha256: str | None = None,
    sampled: dict | None = None,
) -> np.ndarray:
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
    if sampled is not None and sampled_sha256(arr, sampled["blocks"], sampled["block_tokens"]) != sampled["sha256"]:
        raise ShardError(f"{path}: sampled blocks do not match the manifest (corrupt shard)")
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
    vocab_size: int | None = None  # token ids must be below it (check_vocab); None: not checked
    offsets: np.ndarray = field(init=False)  # offsets[i] = global position of arrays[i][0]; offsets[-1] = num_tokens

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["splits"][self.split]["num_documents"])

    def locate(self, position: int) -> tuple[str, int]:
        """(shard file, position inside it) of global token `position`."""
        i = int(np.searchsorted(self.offsets, position, side="right") - 1)
        name = self.files[i] if i < len(self.files) else f"{self.path} ({self.split} shard {i})"
        return name, int(position - self.offsets[i])

    def check_vocab(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Raise ShardError if a token of `tokens` (rows gathered from `starts`) is not a vocabulary id.

        One max over the batch (a corrupt shard would otherwise surface much later as a NaN loss);
        the error names the shard file and the token's position in it."""
        if self.vocab_size is None or tokens.size == 0 or int(tokens.max()) < self.vocab_size:
            return
        row, col = (int(x[0]) for x in np.nonzero(tokens >= self.vocab_size))
        name, pos = self.locate(int(starts[row]) + col)
        raise ShardError(
            f"{name}: token {int(tokens[row, col])} at position {pos} is not below the vocabulary "
            f"size {self.vocab_size} (corrupt shard; `python -m fgpt_jax.data check {self.path} "
            f"--verify` checks every shard)"
        )

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
                out[row, filled : filled + take] = self.arrays[s][pos - self.offsets[s] : pos - self.offsets[s] + take]
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
        raise ShardError(
            f"{os.path.join(path, MANIFEST)}: split {split!r} has no tokens "
            f"(val_fraction {manifest.get('val_fraction')})"
        )
    files, arrays = [], []
    for e in entries:
        f = os.path.join(path, e["file"])  # a plain file name: read_manifest checked it
        arrays.append(
            load_shard(f, e["num_tokens"], e["fingerprint"], e["sha256"] if verify else None, e.get("sampled"))
        )
        files.append(f)
    return ShardSet(
        path=path, split=split, manifest=manifest, arrays=arrays, files=files, vocab_size=get_tokenizer().n_vocab
    )
