"""The bundled corpus (Tiny Shakespeare), tokenised into a cache directory on first use.

`data.path="tinyshakespeare"` names it ("sample", its name before 0.2, still works, so run
directories written then keep resuming). One document per speech (blank-line block), 10% of them
in validation by hash. The cache lives in `$FGPT_JAX_CACHE` (default `~/.cache/fgpt_jax`) under a
name that includes the corpus and tokenizer hashes, so a changed tokenizer never reads stale
shards. It is built in a private temp directory and renamed into place: two processes racing, or a
Ctrl-C, never leave a half-written cache. Tokenising it takes seconds in this process (no worker
pool: a pool would re-import the user's script, which breaks `train()` called from a script without
a `__main__` guard); it is announced on stderr, before and after, because the quickstart otherwise
sits silent through it on its first run (and stdout may be a pipe: `data bundled` prints the
directory there).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time

from fgpt_jax.data import cache_root
from fgpt_jax.data.shards import MANIFEST
from fgpt_jax.data.sources import TextSource
from fgpt_jax.data.writer import write_shards
from fgpt_jax.tokenizer import get_tokenizer

NAME = "tinyshakespeare"
ALIASES = (NAME, "sample")  # "sample": the name used by fgpt-jax 0.1 run directories
CORPUS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tinyshakespeare.txt")
VAL_FRACTION = 0.1
SHARD_TOKENS = 100_000_000  # one shard per split: the corpus is ~340k tokens


def is_bundled(path: str) -> bool:
    return path in ALIASES


def resolve(path: str, progress: bool = False) -> str:
    """`path` as a shard directory: the bundled corpus's cache directory for its name, else unchanged."""
    return corpus_dir(progress) if is_bundled(path) else path


def corpus_dir(progress: bool = False) -> str:
    """The bundled corpus's shard directory, tokenising the text if the cache lacks it."""
    with open(CORPUS_FILE, "rb") as f:
        corpus_sha = hashlib.sha256(f.read()).hexdigest()
    key = hashlib.sha256(f"{corpus_sha}:{get_tokenizer().sha256}:{VAL_FRACTION}".encode()).hexdigest()
    root = cache_root()
    final = os.path.join(root, f"{NAME}-{key[:12]}")
    if os.path.isfile(os.path.join(final, MANIFEST)):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{NAME}-", dir=root)
    say = lambda text: print(text, file=sys.stderr, flush=True)
    say(f"tokenising the bundled Tiny Shakespeare into {final} (first use only)...")
    t0 = time.perf_counter()
    try:
        source = TextSource([CORPUS_FILE], blocks=True, gutenberg=False)
        m = write_shards(
            source, tmp, shard_tokens=SHARD_TOKENS, val_fraction=VAL_FRACTION, workers=1, progress=progress
        )
        tokens = sum(m["splits"][s]["num_tokens"] for s in m["splits"])
        say(f"tokenised the bundled Tiny Shakespeare: {tokens:,} tokens in {time.perf_counter() - t0:.1f} s")
        if os.path.isdir(final) and not os.path.isfile(os.path.join(final, MANIFEST)):
            shutil.rmtree(final, ignore_errors=True)  # left by a pre-atomic crash; ours is complete
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(final, MANIFEST)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
