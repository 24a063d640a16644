"""DataConfig checks and `open_data`: the verification modes, `Data.check()`, and corrupt validation shards."""

import dataclasses
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from fgpt_jax.config import from_json
from fgpt_jax.data import DataConfig
from fgpt_jax.data.pipeline import Data, Verification, open_data
from fgpt_jax.data.shards import ShardError, ShardSet
from fgpt_jax.data.sources import DataError, TextSource
from fgpt_jax.data.writer import write_shards

LEGACY_CONFIG = os.path.join(os.path.dirname(__file__), "data", "legacy_run_v0_1", "config.json")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prefetch", -1, "prefetch=-1 must be >= 0"),
        ("val_windows", 0, "val_windows=0 must be >= 1"),
        ("val_windows", -8, "val_windows=-8 must be >= 1"),
        ("read_threads", 0, "read_threads=0 must be >= 1"),
        ("verify", "sometimes", "verify='sometimes' must be one of background, startup, off"),
        ("verify", 1, "verify=1 must be one of background, startup, off"),
    ],
)
def test_data_config_refuses_bad_values(field, value, message):
    """Issue 13.8: negative data.prefetch / data.val_windows were accepted."""
    with pytest.raises(ValueError, match=f"^DataConfig: {message}"):
        DataConfig(**{field: value})


def test_verify_is_a_choice_and_old_booleans_still_load():
    assert DataConfig().verify == "background"
    assert DataConfig(verify=True).verify == "startup" and DataConfig(verify=False).verify == "off"
    with open(LEGACY_CONFIG) as f:
        text = f.read()
    assert json.loads(text)["data"]["verify"] is False  # a real config.json written by fgpt-jax 0.1.0
    assert from_json(text).data.verify == "off"
    cfg = json.loads(text)
    cfg["data"]["verify"] = True
    assert from_json(json.dumps(cfg)).data.verify == "startup"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two splits of ~450k tokens, one shard each: longer than the 64 sampled 4,096-token blocks, so a
    token changed between two blocks passes every check on open (only the full sha256 reads it)."""
    d = tmp_path_factory.mktemp("pipeline")
    (d / "text.txt").write_text(
        "".join(f"Paragraph {i} says {i * 7} and then {i * 13}, nothing more.\n\n" for i in range(60_000))
    )
    out = d / "shards"
    write_shards(
        TextSource([str(d / "text.txt")], blocks=True),
        str(out),
        shard_tokens=10**6,
        val_fraction=0.5,
        progress=False,
        workers=1,
    )
    return out


def _corrupt_between_samples(d, split: str) -> str:
    """Change one token where neither the fingerprint nor a sampled block looks; returns the shard's name."""
    entry = json.loads((d / "manifest.json").read_text())["splits"][split]["shards"][0]
    n = entry["num_tokens"]
    assert n > 64 * 4096
    arr = np.load(d / entry["file"], mmap_mode="r+")
    pos = 20 * (n - 4096) // 63 + 4096 + 50  # just after sampled block 20
    arr[pos] = (int(arr[pos]) + 1) % 50_000  # still a vocabulary id: the batch check cannot see it either
    arr.flush()
    del arr
    return entry["file"]


def _open(d, verify: str, train: bool = True) -> Data:
    return open_data(DataConfig(path=str(d), verify=verify, val_windows=8), 32, 4, 4, train=train)


def _copy(corpus, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(corpus, d)
    return d


def test_intact_corpus_verifies_in_the_background(corpus):
    data = _open(corpus, "background")
    assert data.verification is not None and any("in the background" in n for n in data.notes)
    assert data.verification.done.wait(60)
    data.check()  # nothing found: returns
    assert data.verified and len(data.verification.jobs) == 2
    assert next(data.loader).tokens.shape == (4, 33) and len(data.val) == 2


@pytest.mark.parametrize("split", ["train", "val"])
def test_background_verification_raises_from_check(corpus, tmp_path, split):
    """Issue 13.6: a changed shard trained silently; a corrupt val shard must fail, not switch val off."""
    d = _copy(corpus, tmp_path)
    name = _corrupt_between_samples(d, split)
    data = _open(d, "background")  # opens: the cheap checks cannot see this change
    assert data.val and data.verification.done.wait(60)
    for _ in range(2):  # raised on every call once found
        with pytest.raises(ShardError, match=f"{name}: sha256 does not match the manifest"):
            data.check()
    assert not data.verified


@pytest.mark.parametrize("split", ["train", "val"])
def test_startup_verification_refuses_to_open(corpus, tmp_path, split):
    d = _copy(corpus, tmp_path)
    name = _corrupt_between_samples(d, split)
    with pytest.raises(ShardError, match=f"{name}: sha256 does not match"):
        _open(d, "startup")
    off = _open(d, "off")  # skipped on request, and the log says what that means
    off.check()
    assert off.verification is None and any("not hashed (data.verify=off)" in n for n in off.notes)


def test_validation_only_verifies_before_returning(corpus, tmp_path):
    """Without a training loop nobody calls check(), so "background" hashes the val shards at once."""
    d = _copy(corpus, tmp_path)
    name = _corrupt_between_samples(d, "val")
    with pytest.raises(ShardError, match=f"{name}: sha256 does not match"):
        _open(d, "background", train=False)
    data = _open(corpus, "background", train=False)
    assert data.loader is None and data.verification is None and len(data.val) == 2


def test_check_never_blocks_on_a_slow_read(tmp_path):
    """check() reads a flag: a shard whose read blocks (here a FIFO nobody writes yet) never stalls it."""
    fifo = tmp_path / "train_000000.npy"
    os.mkfifo(fifo)
    manifest = {"splits": {"train": {"shards": [{"file": fifo.name, "sha256": "0" * 64}]}}}
    shards = ShardSet(
        path=str(tmp_path), split="train", manifest=manifest, arrays=[np.zeros(1, np.uint16)], files=[str(fifo)]
    )
    data = Data(loader=None, val=[], verification=Verification([shards]))
    t0 = time.perf_counter()
    data.check()
    assert time.perf_counter() - t0 < 0.05 and not data.verification.done.is_set() and not data.verified
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"not the manifest's bytes"))
    writer.start()
    assert data.verification.done.wait(30)
    writer.join()
    with pytest.raises(ShardError, match="train_000000.npy: sha256 does not match"):
        data.check()


def test_chat_data_has_nothing_to_verify(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "data", "instruction-examples.json")
    data = open_data(dataclasses.replace(DataConfig(), path=path, format="chat"), 64, 4, 4)
    data.check()
    assert data.verification is None


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("books.txt", "Call me Ishmael.", "python -m fgpt_jax.data text {f} --out data/books"),
        (
            "docs.jsonl",
            '{"text": "a document", "id": "1"}\n',
            "python -m fgpt_jax.data fineweb --files {f} --out data/docs",
        ),
        ("docs.csv", "text\nsome words\n", "python -m fgpt_jax.data fineweb --files {f} --out data/docs"),
        ("alpaca.json", '[{"instruction": "Say hi", "input": "", "output": "hi"}]', "data.format=chat"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "data.format=chat"),
        ("prefs.json", '[{"prompt": "Q", "chosen": "A", "rejected": "B"}]', "data.format=preference"),
    ],
)
def test_a_file_as_pretraining_data_says_how_to_make_shards(tmp_path, name, content, expected):
    """data.path naming a file with the default format (tokens) said "shard directory not found"."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        open_data(DataConfig(path=str(path)), 16, 4, 4)
    msg = str(e.value)
    assert msg.startswith(f"data.path {path}: a file, but pretraining (data.format=tokens) reads a shard directory")
    assert expected.format(f=path) in msg and "\n" not in msg, msg
    if "format=" not in expected:
        assert "then --config.data.path=data/" in msg, msg
