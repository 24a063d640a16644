"""Shard reading and validation, text sources, and the bundled sample cache."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fgpt_jax.data import DataConfig
from fgpt_jax.data.bundled import resolve
from fgpt_jax.data.loader import WindowLoader, val_windows
from fgpt_jax.data.shards import ShardError, open_shards
from fgpt_jax.data.sources import DataError, TextSource, strip_gutenberg
from fgpt_jax.data.writer import write_shards
from fgpt_jax.tokenizer import get_tokenizer

# The real Project Gutenberg markers (one wrapped over two lines, as in Robinson Crusoe), CRLF endings.
BOOK = ("The Project Gutenberg EBook of A Test, by Nobody\r\n\r\nThis eBook is for the use of anyone anywhere\r\n"
        "\r\n*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n\r\n"
        "Chapter I\r\n\r\nIt was a dark night.\r\nThe wind blew.\r\n\r\nChapter II\r\n\r\nMorning came.\r\n"
        "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n"
        "***** This file should be named 1234.txt *****\r\nSection 1. General Terms of Use\r\n")
BOOK_WRAPPED = ("Header\r\n***START OF THE PROJECT GUTENBERG EBOOK THE LIFE AND ADVENTURES OF\r\n"
                "ROBINSON CRUSOE***\r\nI was born.\r\n***END OF THE PROJECT GUTENBERG EBOOK THE LIFE\r\nLicence\r\n")


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_bytes(BOOK.encode())
    (d / "b.txt").write_bytes(BOOK_WRAPPED.encode())
    (d / "c.txt").write_bytes(("Plain text, no markers.\n\n" * 400).encode())
    return d


def test_gutenberg_stripping(books):
    docs = [t for _, t in TextSource([str(books / "a.txt"), str(books / "b.txt")])]
    assert docs == ["Chapter I\n\nIt was a dark night.\nThe wind blew.\n\nChapter II\n\nMorning came.",
                    "I was born."]
    assert strip_gutenberg("no markers\n") == "no markers\n"
    blocks = [t for _, t in TextSource([str(books / "a.txt")], blocks=True)]
    assert blocks == ["Chapter I", "It was a dark night.\nThe wind blew.", "Chapter II", "Morning came."]
    kept = [t for _, t in TextSource([str(books / "a.txt")], gutenberg=False)]
    assert "General Terms of Use" in kept[0]
    with pytest.raises(DataError, match="nope.txt: file not found"):
        TextSource([str(books / "nope.txt")])
    (books / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="bad.txt: expected UTF-8"):
        list(TextSource([str(books / "bad.txt")]))


@pytest.fixture
def shard_dir(books, tmp_path):
    out = tmp_path / "shards"
    write_shards(TextSource([str(books)], blocks=True), str(out), shard_tokens=500, val_fraction=0.3,
                 progress=False)
    return out


def test_open_shards_reads_what_was_written(books, shard_dir):
    tok = get_tokenizer()
    docs = [t for _, t in TextSource([str(books)], blocks=True)]
    train, val = open_shards(str(shard_dir), "train"), open_shards(str(shard_dir), "val", verify=True)
    assert len(train.arrays) > 1 and all(isinstance(a, np.ndarray) and a.dtype == np.uint16 for a in train.arrays)
    assert train.num_tokens + val.num_tokens == sum(len(tok.encode(d)) + 1 for d in docs)
    assert train.num_documents + val.num_documents == len(docs)
    assert train.manifest["tokenizer"]["sha256"] == tok.sha256


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_missing_truncated_foreign_corrupt_shards(shard_dir):
    m = _manifest(shard_dir)
    first, second = (shard_dir / m["splits"]["train"]["shards"][i]["file"] for i in (0, 1))
    os.rename(second, str(second) + ".bak")
    with pytest.raises(ShardError, match=f"{second.name}: shard missing"):
        open_shards(str(shard_dir), "train")
    os.rename(str(second) + ".bak", second)

    good = first.read_bytes()
    first.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ShardError, match=f"{first.name}: .*truncated"):
        open_shards(str(shard_dir), "train")
    first.write_bytes(good[:40])  # truncated inside the header
    with pytest.raises(ShardError, match=first.name):
        open_shards(str(shard_dir), "train")

    foreign = np.load(io_bytes(good))[::-1].copy()  # same length and dtype, other tokens
    np.save(first, foreign)
    with pytest.raises(ShardError, match=f"{first.name}: contents do not match"):
        open_shards(str(shard_dir), "train")
    np.save(first, foreign.astype(np.int32))
    with pytest.raises(ShardError, match=f"{first.name}: expected a 1-D uint16"):
        open_shards(str(shard_dir), "train")

    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xFF  # a flipped byte in the middle
    first.write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match=f"{first.name}: (contents|sha256) do(es)? not match"):
        open_shards(str(shard_dir), "train", verify=True)
    first.write_bytes(good)
    open_shards(str(shard_dir), "train", verify=True)


def io_bytes(b):
    import io
    return io.BytesIO(b)


def test_bad_manifests(shard_dir):
    path = shard_dir / "manifest.json"
    good = _manifest(shard_dir)
    for change, msg in [(lambda m: m["tokenizer"].update(sha256="0" * 64), "another tokenizer"),
                        (lambda m: m.update(dtype="int32"), "expected dtype uint16"),
                        (lambda m: m["splits"]["train"].update(num_tokens=1), "manifest says 1")]:
        m = json.loads(json.dumps(good))
        change(m)
        path.write_text(json.dumps(m))
        with pytest.raises(ShardError, match=msg):
            open_shards(str(shard_dir), "train")
    path.write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: expected a JSON manifest"):
        open_shards(str(shard_dir), "train")
    path.unlink()
    with pytest.raises(ShardError, match="manifest.json: manifest missing"):
        open_shards(str(shard_dir), "train")
    r = subprocess.run([sys.executable, "-m", "fgpt_jax.data", "check", str(shard_dir)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "manifest missing" in r.stderr


def test_bundled_sample_builds_once_atomically(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FGPT_JAX_CACHE", str(cache))
    # Two processes racing for the first build: both succeed, one directory, no temp left.
    code = "from fgpt_jax.data.bundled import corpus_dir; print(corpus_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "FGPT_JAX_CACHE": str(cache)}) for _ in range(2)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert os.listdir(cache) == [os.path.basename(outs[0])]
    train, val = open_shards(resolve("tinyshakespeare"), "train"), open_shards(resolve("sample"), "val")
    assert train.path == outs[0] and 250_000 < train.num_tokens < 320_000 and 20_000 < val.num_tokens < 60_000
    cfg = DataConfig()
    s = WindowLoader(train, 64, 4, seed=cfg.seed)
    assert next(s).tokens.shape == (4, 65)
    assert len(val_windows(val, 64, 4, cfg.val_windows)) > 10
    # A half-built directory left by something else is replaced, not trusted.
    shutil.rmtree(outs[0])
    os.makedirs(outs[0])
    assert open_shards(resolve("tinyshakespeare"), "val").num_tokens == val.num_tokens
