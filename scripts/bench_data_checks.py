"""What the data checks cost: the fingerprint and sampled blocks read on every open, the full sha256
(`data.verify`, `data check --verify`), and the vocabulary check on every training batch.

  python scripts/bench_data_checks.py [DIR]   # DIR: where to write the 200 MB test shard (default: the temp dir)

One random 100M-token shard (the writer's default size). The shard was just written, so the page
cache is warm: a cold disk adds 64 small random reads per shard to the sampled check. Prints a
markdown table of best-of-N times.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

import numpy as np

from fgpt_jax.data.loader import WindowLoader
from fgpt_jax.data.shards import ShardSet, file_sha256, fingerprint, sampled_sha256

VOCAB = 50_261


def best(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    d = tempfile.mkdtemp(dir=sys.argv[1] if len(sys.argv) > 1 else None)
    path = os.path.join(d, "train_000000.npy")
    try:
        np.save(path, np.random.default_rng(0).integers(0, 50_257, 100_000_000, dtype=np.uint16))
        arr = np.asarray(np.load(path, mmap_mode="r"))
        rows = [
            ("fingerprint (first and last 4,096 tokens)", best(5, lambda: fingerprint(arr))),
            ("sampled_sha256 (64 blocks of 4,096 tokens)", best(5, lambda: sampled_sha256(arr))),
            ("file_sha256 (every byte, 200 MB)", best(3, lambda: file_sha256(path))),
        ]
        for batch in (16, 64):

            def loader(vocab):
                shards = ShardSet(path=d, split="train", manifest={}, arrays=[arr], files=[path], vocab_size=vocab)
                return WindowLoader(shards, 1024, batch, prefetch=0)

            checked, unchecked = loader(VOCAB), loader(None)
            starts = checked.window_starts(checked.local_rows(0))
            tokens = checked.shards.gather(starts, 1025)
            rows += [
                (f"check_vocab, batch {batch} x 1025", best(200, lambda: checked.shards.check_vocab(tokens, starts))),
                (f"WindowLoader.batch with the check, batch {batch} x 1025", best(50, lambda: checked.batch(1))),
                (f"WindowLoader.batch without it, batch {batch} x 1025", best(50, lambda: unchecked.batch(1))),
            ]
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(d)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}\n")
    print("| what (one 100M-token shard) | best time |\n|---|---|")
    for what, t in rows:
        print(f"| {what} | {t * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
