"""Shard reading and validation (manifest schema, names, fingerprints, sampled blocks, vocabulary), `data check`,
and the bundled sample cache."""

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
from fgpt_jax.data.sources import TextSource
from fgpt_jax.data.writer import write_shards
from fgpt_jax.tokenizer import get_tokenizer


@pytest.fixture
def books(tmp_path):
    """Varied paragraphs (identical ones would all hash into the same split)."""
    d = tmp_path / "books"
    d.mkdir()
    for name, n in (("a.txt", 150), ("b.txt", 250)):
        (d / name).write_text(
            "".join(
                f"Paragraph {name} {i}: the {i * i} quick brown foxes jump over {i % 7} lazy dogs.\n\n"
                for i in range(n)
            )
        )
    return d


@pytest.fixture
def shard_dir(books, tmp_path):
    out = tmp_path / "shards"
    write_shards(TextSource([str(books)], blocks=True), str(out), shard_tokens=500, val_fraction=0.3, progress=False)
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
    corrupt[len(good) // 2] ^= 0xFF  # a flipped byte in the middle: a shard this small is read whole
    first.write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match=f"{first.name}: contents do not match"):
        open_shards(str(shard_dir), "train")
    first.write_bytes(good)
    open_shards(str(shard_dir), "train", verify=True)


def io_bytes(b):
    import io

    return io.BytesIO(b)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "fgpt_jax.data", *args], capture_output=True, text=True)
    return r, [line for line in r.stderr.splitlines() if line.strip()]


def test_bad_manifests(shard_dir):
    path = shard_dir / "manifest.json"
    good = _manifest(shard_dir)
    for change, msg in [
        (lambda m: m["tokenizer"].update(sha256="0" * 64), "another tokenizer"),
        (lambda m: m.update(dtype="int32"), "dtype: expected 'uint16', got 'int32'"),
        (lambda m: m["splits"]["train"].update(num_tokens=1), "manifest says 1"),
    ]:
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
    r, lines = _cli("check", str(shard_dir))
    assert r.returncode == 2 and len(lines) == 1 and "manifest missing" in lines[0]


def _set(path: str, value):
    """A change to the manifest at a dotted path ("splits.train.shards.0.file"); value DELETE removes the key."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]

    def change(m):
        for k in parents:
            m = m[k]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value

    return change


DELETE = object()
SCHEMA_CASES = [  # (where, value, what the one line must say after "manifest.json: ")
    ("splits.train.num_tokens", "12345", "splits.train.num_tokens: expected a valid integer, got '12345'"),
    ("splits.train.num_tokens", True, "splits.train.num_tokens: expected a valid integer, got True"),
    ("splits.val.num_documents", -3, "splits.val.num_documents: expected greater than or equal to 0, got -3"),
    ("splits.train.shards.0.num_tokens", -5, "splits.train.shards[0].num_tokens: expected greater than or equal to 1"),
    ("splits.train.shards.0.num_tokens", None, "splits.train.shards[0].num_tokens: expected a valid integer, got None"),
    ("splits", [], "splits: expected a valid dictionary, got []"),
    ("tokenizer", None, "tokenizer: expected a valid dictionary, got None"),
    ("splits.train.shards", {"file": "x"}, "splits.train.shards: expected a valid list"),
    ("splits.train.shards.0", "train_000000.npy", "splits.train.shards[0]: expected a valid dictionary"),
    ("splits.val", DELETE, "splits.val: missing"),
    ("splits.train.shards.0.sha256", "xyz", "splits.train.shards[0].sha256: String should match pattern"),
    (
        "splits.train.shards.0.sampled",
        {"blocks": "64", "block_tokens": 4096, "sha256": "0" * 32},
        "splits.train.shards[0].sampled.blocks: expected a valid integer, got '64'",
    ),
    ("val_fraction", 2.0, "val_fraction: expected less than 1, got 2.0"),
    ("version", "1", "expected version 1, got '1'"),
    ("format", DELETE, "expected format 'fgpt-jax-shards', got None"),
    # Issue 12: a shard name must stay inside the directory.
    ("splits.train.shards.0.file", "../../etc/passwd", "splits.train.shards[0].file: expected a file name inside"),
    ("splits.train.shards.0.file", "/etc/passwd", "splits.train.shards[0].file: expected a file name inside"),
    ("splits.train.shards.0.file", "sub/train_000000.npy", "splits.train.shards[0].file: expected a file name"),
    ("splits.train.shards.0.file", "..", "splits.train.shards[0].file: expected a file name inside"),
    ("splits.train.shards.0.file", "a\\b.npy", "splits.train.shards[0].file: expected a file name inside"),
    (
        "splits.train.shards.1.file",
        "train_000000.npy",
        "splits.train.shards[1].file: 'train_000000.npy' is also splits.train.shards[0].file",
    ),
]


@pytest.mark.parametrize(
    "where, value, expected",
    SCHEMA_CASES,
    ids=[f"{w}={'<deleted>' if v is DELETE else repr(v)}"[:60] for w, v, _ in SCHEMA_CASES],
)
def test_manifest_schema_names_the_field(shard_dir, where, value, expected):
    m = _manifest(shard_dir)
    _set(where, value)(m)
    (shard_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError) as e:
        open_shards(str(shard_dir), "val")  # any split: the whole manifest is checked
    msg = str(e.value)
    assert msg.startswith(f"{shard_dir / 'manifest.json'}: {expected}") and "\n" not in msg, msg


def test_shard_name_outside_the_directory_is_never_opened(shard_dir, tmp_path):
    """A manifest naming ../outside.npy (a valid shard) is refused before anything is read; `data check`
    says so in one line, exit status 2 (it gave a traceback for malformed fields)."""
    m = _manifest(shard_dir)
    entry = m["splits"]["train"]["shards"][0]
    shutil.copy(shard_dir / entry["file"], tmp_path / "outside.npy")
    entry["file"] = "../outside.npy"
    (shard_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"splits.train.shards\[0\].file: expected a file name inside"):
        open_shards(str(shard_dir), "train")
    r, lines = _cli("check", str(shard_dir))
    assert r.returncode == 2 and len(lines) == 1 and "'../outside.npy'" in lines[0], r.stderr
    entry["file"], entry["num_tokens"] = "train_000000.npy", "lots"
    (shard_dir / "manifest.json").write_text(json.dumps(m))
    r, lines = _cli("check", str(shard_dir))
    assert r.returncode == 2 and lines == [
        f"error: {shard_dir / 'manifest.json'}: splits.train.shards[0].num_tokens: expected a valid integer, got 'lots'"
    ], r.stderr


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory):
    """One train shard of ~420k tokens: longer than the 64 sampled 4,096-token blocks (262,144 tokens)."""
    d = tmp_path_factory.mktemp("big")
    (d / "text.txt").write_text(
        "".join(f"Line {i} holds the numbers {i * 7} and {i * 13} in words.\n" for i in range(30_000))
    )
    out = d / "shards"
    write_shards(TextSource([str(d / "text.txt")]), str(out), shard_tokens=10**6, val_fraction=0.0, progress=False)
    return out


def _flip_token(shard_path, position):
    """Change one token (to another vocabulary id) in place, as disk corruption would."""
    arr = np.load(shard_path, mmap_mode="r+")
    arr[position] = (int(arr[position]) + 1) % 50_000
    arr.flush()
    del arr


def test_sampled_blocks_catch_changes_in_the_middle(big_shard, tmp_path):
    """Issue 12/13.6: a change in the middle of a shard passed the fingerprint (first and last 4,096 tokens)."""
    d = tmp_path / "copy"
    shutil.copytree(big_shard, d)
    entry = _manifest(d)["splits"]["train"]["shards"][0]
    n = entry["num_tokens"]
    assert n > 64 * 4096 and entry["sampled"] == {
        "blocks": 64,
        "block_tokens": 4096,
        "sha256": entry["sampled"]["sha256"],
    }
    block_30 = 30 * (n - 4096) // 63  # where sampled block 30 starts
    _flip_token(d / entry["file"], block_30 + 100)
    with pytest.raises(ShardError, match=f"{entry['file']}: sampled blocks do not match the manifest"):
        open_shards(str(d), "train")


def test_check_says_what_it_read_and_verify_reads_the_rest(big_shard, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(big_shard, d)
    entry = _manifest(d)["splits"]["train"]["shards"][0]
    n = entry["num_tokens"]
    gap = 30 * (n - 4096) // 63 + 4096 + 10  # just after sampled block 30: no cheap check reads it
    assert 31 * (n - 4096) // 63 > gap
    _flip_token(d / entry["file"], gap)
    open_shards(str(d), "train")  # the cheap checks cannot see it ...
    r, lines = _cli("check", str(d))
    assert r.returncode == 0 and len(lines) == 1 and lines[0].startswith("note: checked each shard's header")
    assert "64 sampled 4,096-token blocks" in lines[0] and "add --verify" in lines[0]  # ... and `check` says so
    out = json.loads(r.stdout)
    assert out["train"]["num_tokens"] == n and "sampled 4,096-token blocks" in out["checked"]
    r, lines = _cli("check", str(d), "--verify")  # the full sha256 finds it
    assert r.returncode == 2 and lines == [
        f"error: {d / entry['file']}: sha256 does not match the manifest (corrupt shard)"
    ]
    # A manifest written before sampled blocks existed still opens and checks; the note says what it read.
    m = _manifest(d)
    del m["splits"]["train"]["shards"][0]["sampled"]
    (d / "manifest.json").write_text(json.dumps(m))
    r, lines = _cli("check", str(d))
    assert r.returncode == 0 and "sampled" not in lines[0] and "first and last 4,096 tokens" in lines[0]


def test_bundled_sample_builds_once_atomically(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FGPT_JAX_CACHE", str(cache))
    # Two processes racing for the first build: both succeed, one directory, no temp left.
    code = "from fgpt_jax.data.bundled import corpus_dir; print(corpus_dir())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "FGPT_JAX_CACHE": str(cache)},
        )
        for _ in range(2)
    ]
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
