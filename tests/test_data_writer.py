"""Shard writer on 150 real FineWeb-Edu documents written out as parquet and jsonl (local only)."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fgpt_jax.data import in_val_split as is_val  # noqa: E402
from fgpt_jax.data import writer as writer_mod  # noqa: E402
from fgpt_jax.data.shards import ShardError, open_shards  # noqa: E402
from fgpt_jax.data.sources import DataError, files_source  # noqa: E402
from fgpt_jax.data.writer import write_shards  # noqa: E402
from fgpt_jax.tokenizer import get_tokenizer  # noqa: E402

CSV = os.path.join(os.path.dirname(__file__), "data", "fineweb_edu_sample10BT_150docs_llm_scored.csv")
SHARD = 10_000  # ~18 train shards from the 150 documents


def fineweb_rows() -> list[dict]:
    """The CSV's texts in FineWeb-Edu's schema; ids/urls are synthetic (the CSV lacks them)."""
    csv.field_size_limit(1 << 24)
    with open(CSV, newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    tok = get_tokenizer()
    rows = []
    for i, text in enumerate(texts):
        score = 2.5 + (i % 7) / 4
        rows.append(
            {
                "text": text,
                "id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, text[:200])}>",
                "dump": "CC-MAIN-2013-20",
                "url": f"http://example.org/doc/{i}",
                "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2013-20/segments/0.warc.gz",
                "language": "en",
                "language_score": 0.97,
                "token_count": len(tok.encode(text)),
                "score": score,
                "int_score": int(round(score)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("fineweb")
    rows = fineweb_rows()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 80), d / "part-0.parquet", row_group_size=25)
    pq.write_table(table.slice(80), d / "part-1.parquet", row_group_size=25)
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {
        "rows": rows,
        "parquet": [str(d / "part-0.parquet"), str(d / "part-1.parquet")],
        "jsonl": [str(d / "docs.jsonl")],
    }


def _read_split(out, split):
    s = open_shards(str(out), split)
    return np.concatenate(s.arrays) if s.arrays else np.zeros(0, np.uint16), s


def _expected(rows, val: bool, val_fraction: float):
    tok = get_tokenizer()
    ids = [[tok.eot_id] + tok.encode(r["text"]) for r in rows if is_val(r["id"], val_fraction) == val]
    return np.array([t for d in ids for t in d], dtype=np.uint16), len(ids)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_tokens_equal_direct_tiktoken(corpus, tmp_path, fmt):
    m = write_shards(
        files_source(corpus[fmt]), str(tmp_path), shard_tokens=SHARD, val_fraction=0.1, workers=2, progress=False
    )
    for split, val in (("train", False), ("val", True)):
        got, s = _read_split(tmp_path, split)
        want, ndocs = _expected(corpus["rows"], val, 0.1)
        np.testing.assert_array_equal(got, want)  # order, content and one <|endoftext|> per document
        assert s.num_documents == ndocs and m["splits"][split]["num_documents"] == ndocs
        assert all(len(a) == SHARD for a in s.arrays[:-1]) and 0 < len(s.arrays[-1]) <= SHARD
    n_tokens = sum(len(get_tokenizer().encode(r["text"])) + 1 for r in corpus["rows"])
    assert m["splits"]["train"]["num_tokens"] + m["splits"]["val"]["num_tokens"] == n_tokens
    assert m["splits"]["train"]["num_documents"] + m["splits"]["val"]["num_documents"] == 150


def test_split_by_id_is_disjoint_and_stable(corpus):
    rows = corpus["rows"]
    val_ids = {r["id"] for r in rows if is_val(r["id"], 0.1)}
    train_ids = {r["id"] for r in rows if not is_val(r["id"], 0.1)}
    assert not val_ids & train_ids and 3 <= len(val_ids) <= 30
    # sha256, not Python's salted hash(): another interpreter must agree.
    keys = [r["id"] for r in rows[:40]]
    code = (
        "import json,sys; from fgpt_jax.data import in_val_split as is_val; "
        "print(json.dumps([is_val(k, 0.1) for k in json.load(sys.stdin)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert json.loads(out.stdout) == [is_val(k, 0.1) for k in keys]
    # The documented rule, pinned: first 8 bytes of sha256(key) as a fraction of 2**64.
    for k in keys:
        assert is_val(k, 0.3) == (int(hashlib.sha256(k.encode()).hexdigest()[:16], 16) < 0.3 * 2**64)


def _files_bytes(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_rerun_gives_identical_bytes(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(files_source(corpus["parquet"]), str(a), shard_tokens=SHARD, val_fraction=0.1, progress=False)
    write_shards(
        files_source(corpus["parquet"]),
        str(b),
        shard_tokens=SHARD,
        val_fraction=0.1,
        progress=False,
        workers=1,
        chunk_docs=7,
    )
    assert _files_bytes(a) == _files_bytes(b)
    # A complete directory is left alone; other settings are refused rather than mixed in.
    before = _files_bytes(a)
    write_shards(files_source(corpus["parquet"]), str(a), shard_tokens=SHARD, val_fraction=0.1, progress=False)
    assert _files_bytes(a) == before
    with pytest.raises(DataError, match="shard_tokens"):
        write_shards(files_source(corpus["parquet"]), str(a), shard_tokens=SHARD + 1, val_fraction=0.1, progress=False)


class _Interrupt:
    """Wraps a source and raises KeyboardInterrupt (as Ctrl-C would) after `after` documents."""

    def __init__(self, source, after):
        self.source, self.after = source, after
        self.description = source.description

    def __iter__(self):
        for i, doc in enumerate(self.source):
            if i == self.after:
                raise KeyboardInterrupt
            yield doc

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_resume_after_interrupt_matches_uninterrupted(corpus, tmp_path, fmt):
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(shard_tokens=SHARD, val_fraction=0.1, progress=False, chunk_docs=5)
    write_shards(files_source(corpus[fmt]), str(full), **kw)
    with pytest.raises(KeyboardInterrupt):
        write_shards(_Interrupt(files_source(corpus[fmt]), after=97), str(part), **kw)
    names = os.listdir(part)
    progress = json.load(open(part / writer_mod.PROGRESS))
    assert "manifest.json" not in names and 0 < progress["documents"] < 97
    assert progress["splits"]["train"]["partial_tokens"] > 0  # stopped in the middle of a shard
    # Debris a hard crash could leave: a temp file and a shard newer than the checkpoint.
    (part / "train_000001.npy.tmp999").write_bytes(b"\x93NUMPY half")
    n_done = len(progress["splits"]["train"]["shards"])
    (part / f"train_{n_done:06d}.npy").write_bytes(b"garbage")
    with pytest.raises(ShardError):
        open_shards(str(part), "train")  # an unfinished directory is never mistaken for a complete one
    write_shards(files_source(corpus[fmt]), str(part), **kw)
    assert _files_bytes(part) == _files_bytes(full)


def test_max_tokens_stops_at_document_boundary(corpus, tmp_path):
    m = write_shards(
        files_source(corpus["parquet"]),
        str(tmp_path),
        shard_tokens=SHARD,
        val_fraction=0.0,
        max_tokens=25_000,
        progress=False,
        chunk_docs=4,
    )
    tok = get_tokenizer()
    lengths = np.cumsum([len(tok.encode(r["text"])) + 1 for r in corpus["rows"]])
    n_docs = int(np.searchsorted(lengths, 25_000)) + 1
    assert m["splits"]["train"]["num_documents"] == n_docs
    assert m["splits"]["train"]["num_tokens"] == lengths[n_docs - 1] >= 25_000
    assert m["splits"]["val"]["num_tokens"] == 0


def test_missing_text_field_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(DataError, match=r"--text-field: column 'body' not in"):
        write_shards(files_source(corpus["parquet"], text_field="body"), str(tmp_path), progress=False)


def _cli(*args, env_extra=None):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fgpt_jax.data", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_cli_end_to_end(corpus, tmp_path):
    out = tmp_path / "cli"
    r = _cli(
        "fineweb",
        "--files",
        *corpus["parquet"],
        "--out",
        str(out),
        "--shard-tokens",
        "10000",
        "--val-fraction",
        "0.1",
        "--workers",
        "2",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    for split, val in (("train", False), ("val", True)):
        want, ndocs = _expected(corpus["rows"], val, 0.1)
        assert summary[split]["num_tokens"] == len(want) and summary[split]["num_documents"] == ndocs
    r = _cli("check", str(out))
    assert r.returncode == 0 and json.loads(r.stdout)["train"]["shards"] == summary["train"]["shards"]


@pytest.mark.slow
def test_cli_warns_when_validation_gets_too_few_documents(tmp_path):
    """`fineweb --files` on the real 150-document CSV with the default --val-fraction (0.005, sized for
    FineWeb's millions of documents) held out 1 document without a word. It now warns on stderr, with
    the counts and a --val-fraction that holds out about MIN_VAL_DOCUMENTS; a fraction that gives
    enough documents does not warn."""
    csv.field_size_limit(1 << 24)
    with open(CSV, newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    assert len(texts) == 150
    want_val = sum(is_val(t, 0.005) for t in texts)  # the CSV has no id column: the text is the key
    assert want_val < writer_mod.MIN_VAL_DOCUMENTS
    r = _cli("fineweb", "--files", CSV, "--out", str(tmp_path / "small"), "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["val"]["num_documents"] == want_val
    suggested = np.ceil(writer_mod.MIN_VAL_DOCUMENTS / 150 * 100) / 100  # rounded up to a percent: 0.14
    assert r.stderr.splitlines() == [
        f"warning: --out {tmp_path / 'small'}: validation holds {want_val} of 150 documents "
        f"({summary['val']['num_tokens']:,} tokens) at --val-fraction 0.005, too few for a steady val/loss; "
        f"to hold out about {round(suggested * 150)}, write a new --out with --val-fraction {suggested:g}"
    ], r.stderr
    enough = 0.2
    assert sum(is_val(t, enough) for t in texts) >= writer_mod.MIN_VAL_DOCUMENTS
    r = _cli(
        "fineweb", "--files", CSV, "--out", str(tmp_path / "enough"), "--val-fraction", str(enough), "--no-progress"
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["fineweb", "--files", "PARQUET", "--out", "OUT", "--text-field", "body"],
            "error: --text-field: column 'body'",
        ),
        (["fineweb", "--files", "missing.jsonl", "--out", "OUT"], "error: missing.jsonl: file not found"),
        (
            ["fineweb", "--out", "OUT", "--val-fraction", "2"],
            "error: argument --val-fraction: expected a number in [0, 1)",
        ),
        (["text", "--out", "OUT"], "error: the following arguments are required: FILE"),
    ],
)
def test_cli_bad_input_is_one_line(corpus, tmp_path, args, expected):
    args = [corpus["parquet"][0] if a == "PARQUET" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    r = _cli(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


# -- what --out may hold, and what a failed run leaves (issue 12, issue 13.2) ------------------------------------
def test_out_dir_with_someone_elses_files_is_refused_untouched(corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    theirs = {
        "train_images.npy": b"images",
        "val_labels.npy": b"labels",
        "manifest.json.bak": b"{}",
        "train_000000.npy": b"not ours either",
    }
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    with pytest.raises(
        DataError,
        match=r"--out .*mine: not empty and not a shard directory in progress "
        r"\(it holds 'manifest.json.bak' and 3 more\)",
    ):
        write_shards(files_source(corpus["parquet"]), str(out), shard_tokens=SHARD, val_fraction=0.1, progress=False)
    assert _files_bytes(out) == theirs


def test_rerun_in_its_own_directory_touches_only_its_own_names(corpus, tmp_path):
    out = tmp_path / "part"
    kw = dict(shard_tokens=SHARD, val_fraction=0.1, progress=False, chunk_docs=5)
    with pytest.raises(KeyboardInterrupt):
        write_shards(_Interrupt(files_source(corpus["parquet"]), after=97), str(out), **kw)
    # The user drops files that merely look like ours into the directory being written.
    theirs = {
        "train_images.npy": b"images",
        "val_labels.npy": b"labels",
        "manifest.json.bak": b"{}",
        "train_000001.npy.orig": b"backup",
    }
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    write_shards(files_source(corpus["parquet"]), str(out), **kw)
    got = _files_bytes(out)
    assert {n: got[n] for n in theirs} == theirs
    full = tmp_path / "full"
    write_shards(files_source(corpus["parquet"]), str(full), **kw)
    assert {n: b for n, b in got.items() if n not in theirs} == _files_bytes(full)


def test_failed_run_leaves_no_directory_behind(corpus, tmp_path):
    new = tmp_path / "new" / "deeper"
    with pytest.raises(DataError, match="--text-field"):  # fails on the first documents: nothing is written
        write_shards(files_source(corpus["parquet"], text_field="body"), str(new), progress=False)
    assert not (tmp_path / "new").exists()
    # Interrupted before the first shard completed: the directories this run created go again ...
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            _Interrupt(files_source(corpus["parquet"]), after=20),
            str(new),
            shard_tokens=10**7,
            progress=False,
            chunk_docs=5,
        )
    assert not (tmp_path / "new").exists()
    # ... and a directory that existed (empty) is left as it was found.
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            _Interrupt(files_source(corpus["parquet"]), after=20),
            str(existing),
            shard_tokens=10**7,
            progress=False,
            chunk_docs=5,
        )
    assert existing.is_dir() and os.listdir(existing) == []
    r = _cli("fineweb", "--files", *corpus["parquet"], "--out", str(new), "--text-field", "body")
    assert r.returncode == 2 and not (tmp_path / "new").exists()


def test_broken_progress_record_is_one_line(corpus, tmp_path):
    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            _Interrupt(files_source(corpus["parquet"]), after=97),
            str(out),
            shard_tokens=SHARD,
            val_fraction=0.1,
            progress=False,
            chunk_docs=5,
        )
    good = json.loads((out / writer_mod.PROGRESS).read_text())
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["partial"] = "../elsewhere.npy"  # the record names the files a rerun reads and keeps
    (out / writer_mod.PROGRESS).write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"malformed progress record \(splits.train: unexpected file name"):
        write_shards(files_source(corpus["parquet"]), str(out), shard_tokens=SHARD, val_fraction=0.1, progress=False)
    (out / writer_mod.PROGRESS).write_text("{half")
    with pytest.raises(DataError, match=f"^{out / writer_mod.PROGRESS}: unreadable .*; delete {out} and start again"):
        write_shards(files_source(corpus["parquet"]), str(out), shard_tokens=SHARD, val_fraction=0.1, progress=False)
    (out / writer_mod.PROGRESS).write_text(json.dumps({"settings": {}, "splits": []}))
    with pytest.raises(DataError, match=f"^{out / writer_mod.PROGRESS}: written with format=None"):
        write_shards(files_source(corpus["parquet"]), str(out), shard_tokens=SHARD, val_fraction=0.1, progress=False)


# -- signals: Ctrl-C exits 130 and resumes; SIGKILL leaves no tokeniser behind (issue 12, issue 13.9) ------------
def _blocked_run(tmp_path, workers: int):
    """A `data text` run that completes shards, then blocks reading a FIFO (its last input file), so a test
    can signal it at a known point. Returns (process, out dir, the FIFO's content for a reference run)."""
    src = tmp_path / "src"
    src.mkdir()
    rows = fineweb_rows()
    # More chunks of 1M characters than the loop keeps in flight (2 x workers + 1), so a shard completes
    # before it reaches the FIFO.
    text = "\n\n".join(r["text"] for r in rows)
    (src / "a.txt").write_text("\n\n".join([text] * -(-(2 * workers + 3) * writer_mod._CHUNK_CHARS // len(text))))
    tail = "\n\n".join(r["text"] for r in rows[:10])
    os.mkfifo(src / "b.txt")
    out = tmp_path / "out"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fgpt_jax.data",
            "text",
            str(src / "*.txt"),
            "--blocks",
            "--out",
            str(out),
            "--shard-tokens",
            "50000",
            "--workers",
            str(workers),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ((out / writer_mod.PROGRESS).exists() and json.load(open(out / writer_mod.PROGRESS))["seq"] >= 1):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run did not complete a shard: {p.communicate()}")
        time.sleep(0.05)
    return p, src, out, tail


def test_ctrl_c_exits_130_and_rerunning_resumes(tmp_path):
    p, src, out, tail = _blocked_run(tmp_path, workers=1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == (
        "error: interrupted; rerun the same command to resume after the last complete shard"
    ), err
    assert not (out / "manifest.json").exists()
    os.remove(src / "b.txt")
    (src / "b.txt").write_text(tail)
    args = ["text", str(src / "*.txt"), "--blocks", "--shard-tokens", "50000", "--workers", "1", "--no-progress"]
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0 and _files_bytes(out) == _files_bytes(tmp_path / "ref")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited; only its parent can reap it
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_leaves_no_tokeniser_workers(tmp_path):
    p, _, _, _ = _blocked_run(tmp_path, workers=2)
    kids = _children(p.pid)  # the spawned tokenisers (and multiprocessing's resource tracker)
    assert kids
    p.kill()
    p.wait()
    try:
        deadline = time.monotonic() + 20
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "tokeniser workers outlived their SIGKILLed parent"
    finally:
        for k in kids:  # orphans would hold the pipes open: end them before reading what is left
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        p.communicate()
