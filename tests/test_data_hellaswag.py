"""HellaSwag items: both file formats and their errors, and the checked download."""

import bz2
import gzip
import json
from pathlib import Path

import pytest

from fgpt_jax.data import hellaswag as hs
from fgpt_jax.data.hellaswag import HellaSwagError, load_examples, preprocess

DATA = Path(__file__).parent / "data" / "hellaswag_val_200.txt"

# The first validation item in the original schema (ActivityNet: its text is untouched by preprocessing).
FIRST = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "split": "val",
    "split_type": "indomain",
    "label": 3,
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}
# A WikiHow-style item with the bracket artifacts lm-eval-harness cleans up (synthetic text).
WIKIHOW = {
    "ind": 4,
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to brew tea [title] Boil the water.",
    "ctx_b": "[step] pour  it",
    "ctx": "[header] How to brew tea [title] Boil the water. [step] pour  it",
    "split": "val",
    "split_type": "zeroshot",
    "label": "1",
    "endings": [" over the cup. [substeps] Wait.", "into the pot.", "away.", "[title] Drink it."],
    "source_id": "wikihow~1",
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- formats -----------------------------------------------------------------------------------


def test_txt_format_and_compression(tmp_path):
    items = load_examples(DATA)
    assert len(items) == 200
    first = items[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.endings == tuple(FIRST["endings"]) and first.label == 3
    assert all(len(x.endings) == 4 and x.label in range(4) for x in items)
    raw = DATA.read_bytes()
    (tmp_path / "h.txt.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "h.txt.gz").write_bytes(gzip.compress(raw))
    assert load_examples(tmp_path / "h.txt.bz2") == load_examples(tmp_path / "h.txt.gz")
    assert [x.endings for x in load_examples(tmp_path / "h.txt.bz2", limit=5)] == [x.endings for x in items[:5]]


def test_jsonl_original_schema(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", [FIRST, WIKIHOW])
    first, wiki = load_examples(path)
    # lm-eval-harness: activity label prefix, ctx_b capitalised; otherwise as in llama.cpp's file.
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.endings == tuple(FIRST["endings"]) and first.label == 3
    # capitalize() leaves "[step] pour" alone; a tag at the very start leaves its space (as in the harness).
    assert wiki.context == "Home and Garden: How to brew tea. Boil the water. pour it"
    assert wiki.endings == ("over the cup. Wait.", "into the pot.", "away.", " Drink it.")
    assert wiki.label == 1
    # build-nanogpt: the raw ctx and endings.
    raw = load_examples(path, preprocess_mode="none")
    assert raw[1].context == WIKIHOW["ctx"] and raw[1].endings == tuple(WIKIHOW["endings"])
    gz = tmp_path / "hellaswag_val.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_examples(gz) == [first, wiki]  # `where` (file:line) is not compared


def test_preprocessing_says_what_was_done_to_each_format(tmp_path):
    """The eval record said "harness" for llama.cpp's text file, where --preprocess does not apply (its
    producer preprocessed it): `preprocessing` names what was done, per format; None is the official jsonl."""
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", [FIRST])
    assert hs.preprocessing(path, "harness") == "harness"
    assert hs.preprocessing(path, "none") == "none"
    assert hs.preprocessing(None, "none") == "none"
    assert hs.preprocessing(DATA, "harness") == hs.IN_FILE == "harness, by the file's producer (llama.cpp text)"
    (tmp_path / "h.txt.bz2").write_bytes(bz2.compress(DATA.read_bytes()))
    assert hs.preprocessing(tmp_path / "h.txt.bz2", "harness") == hs.IN_FILE


def test_preprocess_matches_harness_rules():
    assert preprocess("  a [title] b  ") == "a. b"
    assert preprocess("x [header] y [step] z") == "x y z"
    assert preprocess("no tags") == "no tags"


@pytest.mark.parametrize(
    "bad, where, what",
    [
        ({**FIRST, "endings": ["a", "b", "c"]}, 2, "list of 4 strings"),
        ({**FIRST, "label": 7}, 2, "label 0..3"),
        ({k: v for k, v in FIRST.items() if k != "label"}, 2, "test split is unlabelled"),
        ({**FIRST, "ctx_a": None}, 2, "'ctx_a'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, where, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [FIRST, bad])
    with pytest.raises(HellaSwagError, match=f"{path}:{where}: .*{what}"):
        load_examples(path)


def test_jsonl_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FIRST) + "\n{not json\n")
    with pytest.raises(HellaSwagError, match=f"{path}:2: expected one JSON object per line"):
        load_examples(path)


def test_txt_errors_name_file_and_line(tmp_path):
    lines = DATA.read_text().split("\n")[:12]
    bad = tmp_path / "bad_label.txt"
    bad.write_text("\n".join(lines[:7] + ["x"] + lines[8:]) + "\n")  # item 2's label line is line 8
    with pytest.raises(HellaSwagError, match=f"{bad}:8: expected a label 0..3, got 'x'"):
        load_examples(bad)
    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:11]) + "\n")
    with pytest.raises(HellaSwagError, match=f"{short}:11: expected 6 lines per item"):
        load_examples(short)
    with pytest.raises(HellaSwagError, match="missing.txt: file not found"):
        load_examples(tmp_path / "missing.txt")
    with pytest.raises(HellaSwagError, match="already preprocessed"):
        load_examples(DATA, preprocess_mode="none")


def test_download_checks_blob_id_and_caches(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "upstream.jsonl", [FIRST])
    blob = hs.git_blob_id(src.read_bytes())
    monkeypatch.setenv("FGPT_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HellaSwagError, match="git blob id .* expected 0f5ee25d"):
        hs.download("val", url=src.as_uri())  # not the official file: refused, nothing cached
    assert not (tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl").exists()
    monkeypatch.setitem(hs.BLOB_IDS, "val", blob)
    got = hs.download("val", url=src.as_uri())
    assert got == tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl" and got.read_bytes() == src.read_bytes()
    assert [p.name for p in got.parent.iterdir()] == [got.name]  # no temp file left behind
    assert hs.download("val", url=(tmp_path / "gone").as_uri()) == got  # cached and still valid: no fetch
    # The known blob id of the official val file is git's, not a plain sha1.
    assert hs.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
